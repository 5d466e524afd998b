"""Train or test TDS-CLIP.

    torchrun --nproc_per_node=8 launch.py --cfg configs/sthv2/vitb16.yaml [key.sub=value ...]
    python launch.py --cfg configs/demo.yaml --resume
    python launch.py --cfg configs/k400/vitb16.yaml --test --weights best.pt --test-crops 3 --test-clips 4
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

import pipelines
import tdsclip
from pipelines.augment import parse_randaugment
from pipelines.reader import shard_paths
from shards.manifest import ShardFormatError
from tdsclip.checkpoint import Checkpointer
from tdsclip.config import ConfigError, RunConfig, config_diff, config_to_dict, load_config, save_config
from tdsclip.distributed import World, all_gather_objects, close_distributed, init_distributed
from tdsclip.metrics import MetricsLogger, device_peak_tflops, train_flops_per_clip
from tdsclip.optim import WarmupCosineSchedule, build_optimizer
from tdsclip.train import NonFiniteLossError, Trainer, build_mixup, derive_batch, evaluate, write_results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML run config (configs/...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir/last.pt")
    parser.add_argument("--test", action="store_true", help="evaluate --weights multi-view, no training")
    parser.add_argument("--weights", help="checkpoint to test (this project's or an official TDS-CLIP one)")
    parser.add_argument("--test-crops", type=int, help="spatial crops per video: 1, 3, 5 or 10 (sets eval.test_crops)")
    parser.add_argument("--test-clips", type=int, help="temporal clips per video (sets eval.test_clips)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    if args.test and not args.weights:
        parser.error("--test needs --weights PATH")
    if args.weights and not args.test:
        parser.error("--weights is for --test; to continue a training run use --resume")
    for flag in ("test_crops", "test_clips"):  # the config validates them and records them with the results
        if getattr(args, flag) is not None:
            args.overrides.append(f"eval.{flag}={getattr(args, flag)}")
    return args


def loader_options(config: RunConfig, world: World, model_config: tdsclip.ModelConfig) -> dict:
    """The pipeline options train, val and test share: this rank, the model's clip geometry, data.*."""
    data = config.data
    return dict(rank=world.rank, world_size=world.world_size, seed=config.seed, sampling=data.sampling,
                frames_per_segment=model_config.frames_per_segment, image_size=model_config.image_size,
                resize=tuple(data.resize) if isinstance(data.resize, list) else data.resize,
                num_threads=data.num_threads, on_error=data.on_error)


def build_loaders(config: RunConfig, world: World, model_config: tdsclip.ModelConfig, batch_size: int) -> tuple:
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


def check_pipeline_options(config: RunConfig) -> None:
    """Options that only the pipelines can parse, checked before anything is built."""
    if config.data.randaugment:
        try:
            parse_randaugment(config.data.randaugment)
        except ValueError as error:
            raise ConfigError(f"data.randaugment: {error}") from None


def check_labels(loader, num_classes: int, data: str, remedy: str) -> None:
    """Every label of `data` must be a class of the model (a mismatch otherwise fails in the loss)."""
    top = max(sample.label for sample in loader.samples)
    if top >= num_classes:
        raise ConfigError(f"{data} has label {top}, but the model has {num_classes} classes: {remedy}")


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('s') else 's'}"


def resolve_precision(config: RunConfig, world: World) -> str:
    if config.precision != "auto":
        return config.precision
    return "bf16" if world.device.type == "cuda" else "fp32"


def build_model(config: RunConfig, log: MetricsLogger, *, load_weights: bool = True) -> torch.nn.Module:
    """The network; with `load_weights`, the frozen backbone from model.clip_weights and then everything
    from model.init_weights (a resumed run takes all its weights from its checkpoint instead)."""
    model = tdsclip.build_model(config.model.model_config())
    if not load_weights:
        return model
    if config.model.clip_weights:
        tdsclip.load_clip_weights(model, config.model.clip_weights)
        log.info(f"CLIP weights: {config.model.clip_weights}")
    else:
        log.info("CLIP weights: none (model.clip_weights is null) -- the frozen backbone keeps random weights")
    if config.model.init_weights:
        kept = tdsclip.init_from_checkpoint(model, config.model.init_weights)
        log.info(f"initialized from {config.model.init_weights}" +
                 (f"; new {', '.join(kept)} (other class count)" if kept else ""))
    return model


def build_trainer(config: RunConfig, world: World, log: MetricsLogger, checkpointer: Checkpointer | None = None, *,
                  resuming: bool = False) -> Trainer:
    """Model, data, optimizer, schedule and checkpointer (default: in output_dir) from the config, wired
    into a Trainer. `resuming`: the weights will come from a checkpoint, so no weight files are read."""
    precision = resolve_precision(config, world)
    use_compile = config.compile if config.compile is not None else world.device.type == "cuda"
    data, mcfg = config.data, config.model.model_config()
    per_device, accum = derive_batch(data.global_batch_size, world.world_size, data.max_device_batch_size)
    train_loader, val_loader = build_loaders(config, world, mcfg, per_device)  # data errors before a model is built
    log.info(f"batch: {data.global_batch_size} videos per step = {plural(world.world_size, 'process')} x "
             f"{per_device} per device x {plural(accum, 'accumulation step')} (x{data.num_sample} views each); "
             f"{precision} (validation {config.eval.precision}), torch.compile {'on' if use_compile else 'off'}, "
             f"device {world.device}")
    model = build_model(config, log, load_weights=not resuming).to(world.device)
    train_model = eval_model = model
    if world.distributed:
        device_ids = [world.local_rank] if world.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    if use_compile:
        train_model, eval_model = torch.compile(train_model), torch.compile(model)
    optim, schedule = config.optim, config.schedule
    optimizer = build_optimizer(model, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                                eps=optim.eps, clip_ratio=optim.clip_ratio, bn_lr_ratio=optim.bn_lr_ratio)
    mixup = None
    if optim.mixup:
        if per_device * data.num_sample % 2:
            raise ConfigError(f"optim.mixup mixes pairs: the per-device batch ({per_device} videos x "
                              f"{data.num_sample} views) must be even; change data.global_batch_size")
        mixup = build_mixup(num_classes=mcfg.num_classes, mixup_alpha=optim.mixup_alpha,
                            cutmix_alpha=optim.cutmix_alpha, switch_prob=optim.mixup_switch_prob,
                            label_smoothing=optim.label_smoothing)
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
        log_every=config.logging.log_every,
        checkpoint_every=config.checkpoint.every_steps, eval_every=config.eval.every_epochs,
        skip_epochs=config.eval.skip_epochs, save_best=config.checkpoint.save_best, config=config_to_dict(config),
        flops_per_clip=flops_per_clip, peak_tflops=peak,
    )


# Keys a resumed run may change: where data, outputs and weight files live (the checkpoint holds the
# weights), how the run reports, checkpoints and validates, and its length (the cosine then runs on
# to the new last epoch).
RESUME_MAY_CHANGE = ("output_dir", "compile", "model.clip_weights", "model.init_weights", "data.shards",
                     "data.num_threads", "data.on_error", "data.eval_batch_size", "logging.", "checkpoint.", "eval.",
                     "schedule.epochs")


def check_resume_config(saved: dict, current: dict, path: Path) -> list[str]:
    """Refuse to resume with a config that changes the run (model, data, optimizer, schedule, seed);
    return the allowed changes, "key: old -> new"."""
    changes = {key: f"{key}: {old!r} -> {new!r}" for key, (old, new) in config_diff(saved, current).items()}
    refused = [text for key, text in changes.items() if not key.startswith(RESUME_MAY_CHANGE)]
    if refused:
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with: {'; '.join(refused)}. "
                          f"Resume with the same settings, or start a new run with output_dir=...")
    return list(changes.values())


def train(config: RunConfig, args: argparse.Namespace, world: World, log: MetricsLogger) -> None:
    checkpointer = Checkpointer(config.output_dir, rank=world.rank)
    checkpoint = checkpointer.load_last() if args.resume else None
    if checkpoint is None and not args.resume and checkpointer.last_path.exists():
        raise SystemExit(f"{checkpointer.last_path} exists: pass --resume to continue that run, "
                         "or set output_dir=... to start a new one")
    if checkpoint is not None:  # checked before anything is built
        changes = check_resume_config(checkpoint["config"], config_to_dict(config), checkpointer.last_path)
    trainer = build_trainer(config, world, log, checkpointer, resuming=checkpoint is not None)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        if changes:
            log.info(f"resumed with config changes: {'; '.join(changes)}")
        state = trainer.state
        if state.epoch >= trainer.epochs and not state.validation_due:
            log.info(f"{checkpointer.last_path}: the run is complete ({trainer.epochs} epochs, best val top-1 "
                     f"{state.best_top1:.2f}%); to train longer, resume with schedule.epochs=N")
            return
        log.info(f"resuming from {checkpointer.last_path} (epoch {checkpoint['epoch'] + 1}, "
                 f"step {checkpoint['step']}, batch {checkpoint['batch_in_epoch']})")
    elif args.resume:
        log.info(f"--resume: no checkpoint in {config.output_dir}, starting from scratch")
    if world.is_main:
        save_config(config, Path(config.output_dir) / "config.yaml")
    trainer.fit()
    final = trainer.val_history[-1] if trainer.val_history else None
    if final:
        log.info(f"final val top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%; best top-1 "
                 f"{trainer.state.best_top1:.2f}% (epoch {trainer.state.best_epoch + 1})")
    kept = ", best.pt" if trainer.val_loader is not None and config.checkpoint.save_best else ""
    log.info(f"checkpoints: {config.output_dir}/last.pt{kept}")
    log.info(f"TensorBoard: tensorboard --logdir {config.output_dir}")


def test(config: RunConfig, args: argparse.Namespace, world: World, log: MetricsLogger) -> None:
    model = tdsclip.load_model(args.weights, num_segments=config.model.num_segments).to(world.device)
    net = model.config  # the weights' network; T from the config (official files do not record it)
    log.info(f"weights: {args.weights} ({net.arch or f'width {net.width}, {net.layers} layers'}, side_dim "
             f"{net.side_dim}, {net.num_classes} classes), {net.num_segments} segments of "
             f"{net.frames_per_segment} frames")
    crops, clips = config.eval.test_crops, config.eval.test_clips
    tars = shard_paths(config.data.shards, config.data.test_split)
    loader = pipelines.loader(tars, "test", config.data.eval_batch_size, model.config.num_segments,
                              **loader_options(config, world, model.config),
                              test_crops=crops, test_clips=clips)
    check_labels(loader, model.config.num_classes, f"split {config.data.test_split!r} of {config.data.shards}",
                 f"the weights {args.weights} were trained for fewer classes; check --weights and data.test_split")
    result = evaluate(model, loader, views=loader.views, num_classes=model.config.num_classes,
                      device=world.device, precision=config.eval.precision, keep_predictions=True)
    skipped = sorted(key for keys in all_gather_objects(loader.skipped) for key in keys)
    result.update(weights=str(args.weights), model=dataclasses.asdict(net), test_crops=crops, test_clips=clips,
                  skipped=skipped)
    if skipped:
        log.info(f"skipped {len(skipped)} unreadable sample(s) (data.on_error: skip), not counted: "
                 f"{', '.join(skipped)}")
    path = Path(config.output_dir) / "test_results.json"
    if world.is_main:
        save_config(config, Path(config.output_dir) / "test_config.yaml")
        write_results(result, path)
    log.log(0, {"test/top1": result["top1"], "test/top5": result["top5"],
                "test/mean_class_acc": result["mean_class_acc"]})
    log.info(f"test ({plural(crops, 'crop')} x {plural(clips, 'clip')}, {result['num_videos']} videos): "
             f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  mean class {result['mean_class_acc']:.2f}%  "
             f"-> {path}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.cfg, args.overrides)
        check_pipeline_options(config)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    world = init_distributed()
    seed = config.seed + world.rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    log = MetricsLogger(config.output_dir, rank=world.rank, tensorboard=config.logging.tensorboard,
                        progress=config.logging.progress)
    try:
        (test if args.test else train)(config, args, world, log)
    except (ConfigError, FileNotFoundError, ShardFormatError, pipelines.ShardReadError, tdsclip.CheckpointError,
            NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)  # the message names the file or key; no traceback needed
        return 1
    except KeyboardInterrupt:
        if world.is_main and not args.test:
            print(f"interrupted: rerun the same command with --resume to continue from {config.output_dir}/last.pt",
                  file=sys.stderr)
        return 130
    finally:
        log.close()
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
