"""From a RunConfig to built components: the data pipelines, the model (with its weights), and a
Trainer wiring them to the optimizer, schedule, checkpointer and metrics (launch.py runs it).

Options that only the pipelines or the data can check (RandAugment spec, labels against
model.num_classes) are checked here, before anything expensive is built.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import pipelines
from pipelines.augment import parse_randaugment
from pipelines.reader import shard_paths
from shards.manifest import ShardFormatError, read_manifest
from tdsclip.checkpoint import Checkpointer
from tdsclip.config import ConfigError, RunConfig, config_to_dict
from tdsclip.distributed import World
from tdsclip.metrics import MetricsLogger, device_peak_tflops, plural, train_flops_per_clip
from tdsclip.model import ModelConfig, build_model
from tdsclip.optim import WarmupCosineSchedule, build_optimizer
from tdsclip.train import Trainer, build_mixup, derive_batch
from tdsclip.weights import init_from_checkpoint, load_clip_weights, load_model


def loader_options(config: RunConfig, world: World, model_config: ModelConfig) -> dict:
    """The pipeline options train, val and test share: this rank, the model's clip geometry, data.*."""
    data = config.data
    return dict(rank=world.rank, world_size=world.world_size, seed=config.seed, sampling=data.sampling,
                wrap_start=data.wrap_start, frames_per_segment=model_config.frames_per_segment,
                image_size=model_config.image_size,
                resize=tuple(data.resize) if isinstance(data.resize, list) else data.resize,
                num_threads=data.num_threads, on_error=data.on_error)


def build_loaders(config: RunConfig, world: World, model_config: ModelConfig, batch_size: int) -> tuple:
    """The train and val pipelines of this rank (manifests named by data.train_split / data.val_split; no
    val pipeline when data.val_split is null)."""
    data, segments = config.data, model_config.num_segments
    options = loader_options(config, world, model_config)
    train = pipelines.loader(shard_paths(data.shards, data.train_split), "train", batch_size, segments, **options,
                             num_sample=data.num_sample, flip=data.flip, flip_label_map=data.flip_label_map,
                             grayscale_prob=data.grayscale_prob, randaugment=data.randaugment)
    val = None
    if data.val_split is not None:
        val = pipelines.loader(shard_paths(data.shards, data.val_split), "val", data.eval_batch_size, segments,
                               **options)
    for loader, split in ((train, data.train_split), (val, data.val_split)):
        if loader is not None:
            check_labels(loader, model_config.num_classes, f"split {split!r} of {data.shards}",
                         "set model.num_classes to the shards' number of classes")
    return train, val


def build_test(config: RunConfig, world: World, weights: str, log: MetricsLogger) -> tuple:
    """(model, loader) for --test: the network `weights` hold (T from model.num_segments: official files do
    not record it), on the device in eval mode, and this rank's multi-view pipeline over data.test_split."""
    model = load_model(weights, num_segments=config.model.num_segments).to(world.device)
    net = model.config
    log.info(f"weights: {weights} ({net.arch or f'width {net.width}, {net.layers} layers'}, side_dim "
             f"{net.side_dim}, {net.num_classes} classes), {net.num_segments} segments of "
             f"{net.frames_per_segment} frames")
    return model, build_test_loader(config, world, net, weights)


def build_test_loader(config: RunConfig, world: World, model_config: ModelConfig, weights: str) -> pipelines.Loader:
    """This rank's multi-view test pipeline over data.test_split (eval.test_crops x eval.test_clips views)."""
    data = config.data
    loader = pipelines.loader(shard_paths(data.shards, data.test_split), "test", data.eval_batch_size,
                              model_config.num_segments, **loader_options(config, world, model_config),
                              test_crops=config.eval.test_crops, test_clips=config.eval.test_clips)
    check_labels(loader, model_config.num_classes, f"split {data.test_split!r} of {data.shards}",
                 f"the weights {weights} were trained for fewer classes; check --weights and data.test_split")
    return loader


def test_view_note(config: RunConfig) -> str | None:
    """A note when the test views include mirror images (10 crops, as the official test) for classes that
    mirroring changes (data.flip not 'plain': e.g. left/right motion in Something-Something)."""
    if config.eval.test_crops == 10 and config.data.flip != "plain":
        return (f"note: eval.test_crops=10 adds the mirror image of each crop, as the official test does, but "
                f"data.flip is {config.data.flip!r}: mirroring changes these classes (left <-> right); "
                f"1, 3 and 5 crops do not mirror")
    return None


def check_pipeline_options(config: RunConfig) -> None:
    """Options that only the pipelines can parse, checked before anything is built."""
    if config.data.randaugment:
        try:
            parse_randaugment(config.data.randaugment)
        except ValueError as error:
            raise ConfigError(f"data.randaugment: {error}") from None


def train_classes(config: RunConfig) -> list[str] | None:
    """The class names of the training manifest (data.shards, data.train_split), or None where there is
    none to read (tar paths, or a directory without that manifest)."""
    if not Path(config.data.shards).is_dir():
        return None
    try:
        return read_manifest(config.data.shards, config.data.train_split, check_files=False).classes
    except (FileNotFoundError, ShardFormatError):
        return None


def warn_on_class_count(config: RunConfig, num_classes: int, log: MetricsLogger) -> None:
    """Say so when the training shards name another number of classes than the model has (e.g. a
    fine-tune that kept the pretrained model.num_classes): labels fit, but the head is oversized."""
    classes = train_classes(config)
    if classes is not None and len(classes) != num_classes:
        log.info(f"warning: the {config.data.train_split!r} shards name {len(classes)} classes and the model "
                 f"has {num_classes} (model.num_classes); set it to {len(classes)} unless that is intended")


def check_labels(loader, num_classes: int, what: str, remedy: str) -> None:
    """Every label `loader` reads must be a class of the model (a mismatch otherwise fails in the loss);
    `what` names the data in the error."""
    top = max(sample.label for sample in loader.samples)
    if top >= num_classes:
        raise ConfigError(f"{what} has label {top}, but the model has {num_classes} classes: {remedy}")


def resolve_precision(config: RunConfig, world: World) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if world.device.type == "cuda" else "fp32"


def model_with_weights(config: RunConfig, log: MetricsLogger, *, load_weights: bool = True) -> torch.nn.Module:
    """The network; with `load_weights`, all of it from model.init_weights when set, else its frozen
    backbone from model.clip_weights (a resumed run takes all its weights from its checkpoint instead)."""
    model = build_model(config.model.model_config())
    if not load_weights:
        return model
    if config.model.init_weights:  # holds the backbone too: no CLIP file needed
        kept = init_from_checkpoint(model, config.model.init_weights)
        copied = len(model.state_dict()) - len(kept)
        log.info(f"weights: {copied} tensors (backbone, side network{', head' if not kept else ''}) from "
                 f"{config.model.init_weights}" + (f"; new {', '.join(kept)} (other class count)" if kept else ""))
    elif config.model.clip_weights:
        load_clip_weights(model, config.model.clip_weights)
        log.info(f"CLIP weights: {config.model.clip_weights}")
    else:
        log.info("CLIP weights: none (model.clip_weights is null) -- the frozen backbone keeps random weights")
    return model


def build_trainer(config: RunConfig, world: World, log: MetricsLogger, checkpointer: Checkpointer | None = None, *,
                  resuming: bool = False) -> Trainer:
    """Model, data, optimizer, schedule and checkpointer (default: in output_dir) from the config, wired
    into a Trainer. `resuming`: the weights will come from a checkpoint, so no weight files are read."""
    precision = resolve_precision(config, world)
    use_compile = config.compile if config.compile is not None else world.device.type == "cuda"
    data, optim, schedule, mcfg = config.data, config.optim, config.schedule, config.model.model_config()
    per_device, accum = derive_batch(data.global_batch_size, world.world_size, data.max_device_batch_size)
    mixup = None
    if optim.mixup:
        if per_device * data.num_sample % 2:
            raise ConfigError(f"optim.mixup mixes pairs: the per-device batch ({per_device} videos x "
                              f"{data.num_sample} views) must be even; change data.global_batch_size")
        mixup = build_mixup(num_classes=mcfg.num_classes, mixup_alpha=optim.mixup_alpha,
                            cutmix_alpha=optim.cutmix_alpha, switch_prob=optim.mixup_switch_prob,
                            label_smoothing=optim.label_smoothing)
    train_loader, val_loader = build_loaders(config, world, mcfg, per_device)  # data errors before a model is built
    warn_on_class_count(config, mcfg.num_classes, log)
    log.info(f"batch: {data.global_batch_size} videos per step = {plural(world.world_size, 'process')} x "
             f"{per_device} per device x {plural(accum, 'accumulation step')} (x{data.num_sample} views each); "
             f"{precision} (validation {config.eval.precision}), torch.compile {'on' if use_compile else 'off'}, "
             f"device {world.device}")
    model = model_with_weights(config, log, load_weights=not resuming).to(world.device)
    train_model = eval_model = model
    if world.distributed:
        device_ids = [world.local_rank] if world.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if use_compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(model)
    optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                                eps=optim.eps, clip_ratio=optim.clip_ratio, bn_lr_ratio=optim.bn_lr_ratio)
    peak = config.logging.peak_tflops or device_peak_tflops(world.device)
    clip_shape = (mcfg.num_segments, mcfg.frames_per_segment, 3, mcfg.image_size, mcfg.image_size)
    flops_per_clip = train_flops_per_clip(model, clip_shape, world.device) if peak else None  # one step, for MFU
    return Trainer(
        model=model, train_model=train_model, eval_model=eval_model, optimizer=optimizer,
        train_loader=train_loader, val_loader=val_loader,
        schedule=WarmupCosineSchedule(optimizer, epochs=schedule.epochs, warmup_epochs=schedule.warmup_epochs,
                                      final_factor=schedule.final_factor),
        checkpointer=checkpointer or Checkpointer(config.output_dir, rank=world.rank), metrics=log, world=world,
        epochs=schedule.epochs, accum_steps=accum, precision=precision, eval_precision=config.eval.precision,
        label_smoothing=optim.label_smoothing, mixup=mixup, grad_clip=optim.grad_clip,
        log_every=config.logging.log_every, checkpoint_every=config.checkpoint.every_steps,
        eval_every=config.eval.every_epochs, skip_epochs=config.eval.skip_epochs,
        save_best=config.checkpoint.save_best, config=config_to_dict(config), flops_per_clip=flops_per_clip,
        peak_tflops=peak,
    )
