"""Train or test TDS-CLIP.

    torchrun --nproc_per_node=8 launch.py --cfg configs/sthv2/vitb16.yaml [key.sub=value ...]
    python launch.py --cfg configs/demo.yaml --resume
    python launch.py --cfg configs/k400/vitb16.yaml --test --weights best.pt --test-crops 3 --test-clips 4
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

import pipelines
import tdsclip
from shards.manifest import ShardFormatError
from tdsclip.build import build_test, build_trainer, check_pipeline_options, test_view_note
from tdsclip.checkpoint import Checkpointer
from tdsclip.config import ConfigError, RunConfig, config_diff, config_to_dict, load_config, save_config
from tdsclip.distributed import World, all_ranks_keys, close_distributed, init_distributed
from tdsclip.metrics import MetricsLogger, plural
from tdsclip.train import NonFiniteLossError, check_world_size, evaluate, write_results


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


# Keys a resumed run may change: where data, outputs and weight files live (the checkpoint holds the
# weights), how the run reports, checkpoints and validates (data.val_split included), and its length
# (the cosine then runs on to the new last epoch).
RESUME_MAY_CHANGE = ("output_dir", "compile", "model.clip_weights", "model.init_weights", "data.shards",
                     "data.val_split", "data.num_threads", "data.on_error", "data.eval_batch_size", "logging.",
                     "checkpoint.", "eval.", "schedule.epochs")


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
        raise ConfigError(f"{checkpointer.last_path} exists: pass --resume to continue that run, "
                          "or set output_dir=... to start a new one")
    if checkpoint is not None:  # checked before anything is built
        changes = check_resume_config(checkpoint["config"], config_to_dict(config), checkpointer.last_path)
        check_world_size(checkpoint, world.world_size)
        if checkpoint["epoch"] >= config.schedule.epochs and not checkpoint.get("validation_due"):
            validated = checkpoint["best_epoch"] >= 0
            best = f"best val top-1 {checkpoint['best_top1']:.2f}%" if validated else "no validation"
            log.info(f"{checkpointer.last_path}: the run is complete ({checkpoint['epoch']} epochs, {best}); "
                     "to train longer, resume with schedule.epochs=N")
            return
    trainer = build_trainer(config, world, log, checkpointer, resuming=checkpoint is not None)
    if checkpoint is not None:
        trainer.restore(checkpoint)
        if changes:
            log.info(f"resumed with config changes: {'; '.join(changes)}")
        state = trainer.state
        if any(change.startswith("data.val_split:") for change in changes):  # scores on another split
            state.best_top1, state.best_epoch = -1.0, -1
            log.info("data.val_split changed: best.pt is chosen afresh on the new split")
        if state.epoch >= trainer.epochs:  # only the last validation is left
            log.info(f"resuming from {checkpointer.last_path}: the validation after epoch {state.epoch}")
        else:
            pending = f"the validation after epoch {state.epoch}, then " if state.validation_due else ""
            log.info(f"resuming from {checkpointer.last_path}: {pending}epoch {state.epoch + 1}, "
                     f"step {state.step}, batch {state.batch_in_epoch}")
    elif args.resume:
        log.info(f"--resume: no checkpoint in {config.output_dir}, starting from scratch")
    if world.is_main:
        save_config(config, Path(config.output_dir) / "config.yaml")
    log.start_at(trainer.state.step + 1)
    trainer.fit()
    final = trainer.val_history[-1] if trainer.val_history else None
    if final:
        log.info(f"final val top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%; best top-1 "
                 f"{trainer.state.best_top1:.2f}% (epoch {trainer.state.best_epoch + 1})")
    kept = ", best.pt" if trainer.val_loader is not None and config.checkpoint.save_best else ""
    log.info(f"checkpoints: {config.output_dir}/last.pt{kept}")
    log.info(f"TensorBoard: tensorboard --logdir {config.output_dir}")


def test(config: RunConfig, args: argparse.Namespace, world: World, log: MetricsLogger) -> None:
    if note := test_view_note(config):
        log.info(note)
    model, loader = build_test(config, world, args.weights, log)
    crops, clips = config.eval.test_crops, config.eval.test_clips
    result = evaluate(model, loader, views=loader.views, num_classes=model.config.num_classes,
                      device=world.device, precision=config.eval.precision, keep_predictions=True)
    skipped = all_ranks_keys(loader.skipped)
    result.update(weights=str(args.weights), model=dataclasses.asdict(model.config), test_crops=crops, test_clips=clips,
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


def resume_hint(config: RunConfig, args: argparse.Namespace) -> str:
    """What to run after a Ctrl-C."""
    last = Checkpointer(config.output_dir).last_path
    if args.test:
        return "rerun the same command to test again"
    if last.exists():
        return f"rerun the same command with --resume to continue from {last}"
    return "no checkpoint was written yet; rerun the same command to start again"


def report_error(error: Exception, world: World) -> None:
    """Print a run-stopping error (it names the file or key; no traceback) once per node: the ranks of a
    node meet the same config, checkpoint and files, but nodes may hold their own copies of the data.
    An unreadable sample is said by each rank that read one, a non-finite loss (averaged over ranks,
    the same everywhere) by rank 0."""
    if isinstance(error, pipelines.ShardReadError):
        speaks = True
    elif isinstance(error, NonFiniteLossError):
        speaks = world.is_main
    else:
        speaks = world.local_rank == 0
    if speaks:
        where = f" (rank {world.rank})" if world.distributed else ""
        print(f"error{where}: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.cfg, args.overrides)
        check_pipeline_options(config)
    except ConfigError as error:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # the ranks of a node read the same config: say it once
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
        report_error(error, world)
        return 1
    except KeyboardInterrupt:
        log.close()  # stop the progress bar first, or it draws over the message
        if world.is_main:
            print(f"interrupted: {resume_hint(config, args)}", file=sys.stderr)
        return 130
    finally:
        log.close()
        close_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
