"""From a RunConfig to built components: the data pipelines, the model (with its weights), and a Trainer
wiring them to the optimizer, schedule, checkpointer and metrics; the same for --test and predict.

What only the data can check (labels against model.num_classes, train and val class names, a global
batch the training videos fill) is checked here, before a model is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

import pipelines
from tdsclip.checkpoint import Checkpointer, data_fingerprint
from tdsclip.checkpoint_file import CheckpointError, read_checkpoint_file
from tdsclip.config import ConfigError, RunConfig, config_to_dict
from tdsclip.cpu_budget import CpuBudget, cpu_budget
from tdsclip.distributed import World
from tdsclip.metrics import MetricsLogger, device_peak_tflops, plural, train_flops_per_clip
from tdsclip.model import TDSCLIP, ModelConfig, build_model
from tdsclip.optim import WarmupCosineSchedule, build_optimizer
from tdsclip.stop import StopSignals
from tdsclip.train import Trainer
from tdsclip.weights import (FORMAT, config_from_official, init_from_checkpoint, load_clip_weights,
                             load_official_state, model_from_checkpoint, official_state_of)

# What trained weights expect of their input and output: a test or predict config must agree with the
# checkpoint's training config on these (views, batch size, device and threads stay free).
BOUND_MODEL_KEYS = ("width", "layers", "heads", "patch_size", "image_size", "side_dim", "num_segments",
                    "frames_per_segment", "num_classes")
BOUND_DATA_KEYS = ("resize", "sampling", "wrap_start")


def derive_batch(global_batch_size: int, world_size: int, max_device_batch_size: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) so that per_device * accum * world == global.

    The per-device batch is the largest divisor of global / world that fits max_device_batch_size.
    """
    if global_batch_size % world_size:
        raise ConfigError(f"data.global_batch_size={global_batch_size} is not divisible by the "
                          f"{world_size} processes; pick a multiple of the world size")
    per_rank = global_batch_size // world_size
    per_device = max(d for d in range(1, min(per_rank, max_device_batch_size) + 1) if per_rank % d == 0)
    return per_device, per_rank // per_device


def build_mixup(*, num_classes: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                label_smoothing: float) -> Callable:
    """The official batch Mixup/CutMix (timm's), applied to clips (B, T, M, 3, H, W); B must be even."""
    from timm.data import Mixup

    mix = Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=1.0, switch_prob=switch_prob,
                mode="batch", label_smoothing=label_smoothing, num_classes=num_classes)

    def apply(clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, m, c, h, w = clips.shape
        mixed, targets = mix(clips.reshape(b, t * m * c, h, w), labels)  # cutmix boxes span all frames
        return mixed.view(b, t, m, c, h, w), targets

    return apply


# --- data -------------------------------------------------------------------------------------


def run_cpu_budget(config: RunConfig, world: World) -> CpuBudget:
    """This process's CPU threads for torch, DALI and the shard readers (config `cpu.*`, data.num_threads)."""
    try:
        return cpu_budget(world.device, cpus=config.cpu.cpus, torch_threads=config.cpu.torch_threads,
                          dali_threads=config.data.num_threads, py_workers=config.cpu.py_workers)
    except ValueError as error:  # LOCAL_WORLD_SIZE set to something torchrun would not set
        raise ConfigError(str(error)) from None


def apply_cpu_budget(config: RunConfig, world: World, log: MetricsLogger) -> CpuBudget:
    """Set torch's threads to this process's budget and say what it is; call before building anything."""
    budget = run_cpu_budget(config, world)
    budget.apply()
    log.info(budget.describe())
    return budget


def build_loader(config: RunConfig, world: World, model_config: ModelConfig, mode: str, batch_size: int):
    """This rank's loader of `mode` ("train", "val", "test") with the model's clip geometry and the
    process's CPU budget."""
    budget = run_cpu_budget(config, world)
    return pipelines.build_loader(
        config.data, mode, batch_size=batch_size, num_segments=model_config.num_segments,
        frames_per_segment=model_config.frames_per_segment, image_size=model_config.image_size, rank=world.rank,
        world_size=world.world_size, seed=config.seed, test_crops=config.eval.test_crops,
        test_clips=config.eval.test_clips, num_threads=budget.dali_threads, py_workers=budget.py_workers)


def build_loaders(config: RunConfig, world: World, model_config: ModelConfig, batch_size: int) -> tuple:
    """The train and val pipelines of this rank (no val pipeline when data.val_split is null), checked
    against the model's classes, each other's class names and the global batch."""
    data = config.data
    train = build_loader(config, world, model_config, "train", batch_size)
    val = build_loader(config, world, model_config, "val", data.eval_batch_size) if data.val_split else None
    remedy = "set model.num_classes to the shards' number of classes"
    check_labels(train, model_config.num_classes, f"split {data.train_split!r} of {data.shards}", remedy)
    if val is not None:
        check_labels(val, model_config.num_classes, f"split {data.val_split!r} of {data.shards}", remedy)
        check_same_classes(train.classes, val.classes, data)
    if len(train.samples) < data.global_batch_size:
        raise ConfigError(f"split {data.train_split!r} of {data.shards} has {len(train.samples)} videos, fewer than "
                          f"one step's data.global_batch_size={data.global_batch_size}: an epoch would be less than "
                          f"one step. Lower data.global_batch_size to at most {len(train.samples)}")
    return train, val


def check_labels(loader, num_classes: int, what: str, remedy: str) -> None:
    """Every label `loader` reads must be a class of the model (a mismatch otherwise fails in the loss);
    `what` names the data in the error."""
    top = max(sample.label for sample in loader.samples)
    if top >= num_classes:
        raise ConfigError(f"{what} has label {top}, but the model has {num_classes} classes: {remedy}")


def check_same_classes(train: list[str] | None, val: list[str] | None, data) -> None:
    """Train and val must name the same classes in the same order (a val split packed without --labels, or
    with another labels file, scores every video against the wrong class)."""
    if not train or not val or train == val:
        return
    diffs = [f"{i}: {a!r} / {b!r}" for i, (a, b) in enumerate(zip(train, val)) if a != b]
    diffs += [f"{len(train)} / {len(val)} classes"] if len(train) != len(val) else []
    raise ConfigError(f"the class names of splits {data.train_split!r} and {data.val_split!r} in {data.shards} differ "
                      f"({'; '.join(diffs[:4])}): pack both with the same --labels file (tools/make_shards.py)")


def warn_on_class_count(loader, num_classes: int, split: str, log: MetricsLogger) -> None:
    """Say so when the training shards name another number of classes than the model has (e.g. a
    fine-tune that kept the pretrained model.num_classes): labels fit, but the head is oversized."""
    if loader.classes and len(loader.classes) != num_classes:
        log.info(f"warning: the {split!r} shards name {len(loader.classes)} classes and the model has "
                 f"{num_classes} (model.num_classes); set it to {len(loader.classes)} unless that is intended")


# --- model ------------------------------------------------------------------------------------


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
                  resuming: bool = False, stop: StopSignals | None = None) -> Trainer:
    """Model, data, optimizer, schedule and checkpointer (default: in output_dir) from the config, wired
    into a Trainer. `resuming`: the weights will come from a checkpoint, so no weight files are read."""
    precision = resolve_precision(config, world)
    use_compile = config.compile if config.compile is not None else world.device.type == "cuda"
    data, optim, mcfg = config.data, config.optim, config.model.model_config()
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
    warn_on_class_count(train_loader, mcfg.num_classes, data.train_split, log)
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
    return Trainer(
        model=model, train_model=train_model, eval_model=eval_model, optimizer=optimizer,
        train_loader=train_loader, val_loader=val_loader,
        schedule=WarmupCosineSchedule(optimizer, epochs=config.schedule.epochs,
                                      warmup_epochs=config.schedule.warmup_epochs,
                                      final_factor=config.schedule.final_factor),
        checkpointer=checkpointer or Checkpointer(config.output_dir, world=world), metrics=log, world=world,
        optim=optim, checkpointing=config.checkpoint, evaluation=config.eval, logging=config.logging,
        accum_steps=accum, precision=precision, mixup=mixup, config=config_to_dict(config),
        data_fingerprint=data_fingerprint(train_loader.samples), stop=stop,
        flops_per_clip=train_flops_per_clip(model, clip_shape, world.device) if peak else None,  # one step, for MFU
        peak_tflops=peak, class_names=train_loader.classes,
    )


# --- test and predict ---------------------------------------------------------------------------


def load_test_model(config: RunConfig, weights: str | Path) -> TDSCLIP:
    """The network `weights` hold, in eval mode, checked against what the config asks of it: our checkpoints
    decide (a conflicting model or data setting is an error naming both values); official files, which
    record no config, take the config's segments and must have its sizes."""
    path = Path(weights)
    checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        check_bound_to_checkpoint(config, checkpoint, path)
        return model_from_checkpoint(checkpoint, source=str(path)).eval()
    state = official_state_of(checkpoint, path)
    check_official_sizes(config.model.model_config(), config_from_official(state, config.model.num_segments), path)
    return load_official_state(state, config.model.num_segments).eval()


def check_bound_to_checkpoint(config: RunConfig, checkpoint: dict, path: Path) -> None:
    saved_model = ModelConfig(**checkpoint["model_config"])
    mine = config.model.model_config()
    conflicts = [(f"model.{key}", getattr(saved_model, key), getattr(mine, key)) for key in BOUND_MODEL_KEYS
                 if getattr(saved_model, key) != getattr(mine, key)]
    saved_data = (checkpoint.get("config") or {}).get("data", {})
    current_data = config_to_dict(config)["data"]
    conflicts += [(f"data.{key}", saved_data[key], current_data[key]) for key in BOUND_DATA_KEYS
                  if key in saved_data and saved_data[key] != current_data[key]]
    if conflicts:
        listed = "; ".join(f"{key}: {old!r} in the weights' training config, {new!r} here" for key, old, new in conflicts)
        raise ConfigError(f"the weights {path} were trained for other inputs ({listed}): use the config they were "
                          f"trained with (saved as config.yaml beside them), or set those keys to the weights' values")


def check_official_sizes(mine: ModelConfig, theirs: ModelConfig, path: Path) -> None:
    """An official checkpoint's tensor sizes must be the config's."""
    conflicts = [f"model.{key}: {getattr(theirs, key)!r} in the tensors, {getattr(mine, key)!r} in the config"
                 for key in BOUND_MODEL_KEYS if getattr(theirs, key) != getattr(mine, key)]
    if conflicts:
        raise CheckpointError(f"the official checkpoint {path} does not fit the config ({'; '.join(conflicts)}): "
                              "set those model keys to the checkpoint's values")


def build_test(config: RunConfig, world: World, weights: str, log: MetricsLogger) -> tuple:
    """(model, loader) for --test: the network `weights` hold on the device in eval mode, and this rank's
    multi-view pipeline over data.test_split, whose classes must be the weights' classes."""
    model = load_test_model(config, weights).to(world.device)
    net = model.config
    log.info(f"weights: {weights} ({net.arch or f'width {net.width}, {net.layers} layers'}, side_dim "
             f"{net.side_dim}, {net.num_classes} classes), {net.num_segments} segments of "
             f"{net.frames_per_segment} frames")
    return model, build_test_loader(config, world, net, weights)


def build_test_loader(config: RunConfig, world: World, model_config: ModelConfig, weights: str):
    """This rank's multi-view test pipeline over data.test_split (eval.test_crops x eval.test_clips views)."""
    data = config.data
    loader = build_loader(config, world, model_config, "test", data.eval_batch_size)
    what = f"split {data.test_split!r} of {data.shards}"
    check_labels(loader, model_config.num_classes, what,
                 f"the weights {weights} were trained for fewer classes; check --weights and data.test_split")
    if loader.classes and len(loader.classes) != model_config.num_classes:
        raise ConfigError(f"{what} names {len(loader.classes)} classes and the weights {weights} have "
                          f"{model_config.num_classes}: test on the shards of the classes they were trained for")
    return loader


def test_view_note(config: RunConfig) -> str | None:
    """A note when the test views include mirror images (10 crops, as the official test) for classes that
    mirroring changes (data.flip not 'plain': e.g. left/right motion in Something-Something)."""
    if config.eval.test_crops == 10 and config.data.flip != "plain":
        return (f"note: eval.test_crops=10 adds the mirror image of each crop, as the official test does, but "
                f"data.flip is {config.data.flip!r}: mirroring changes these classes (left <-> right); "
                f"1, 3 and 5 crops do not mirror")
    return None
