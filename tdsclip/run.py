"""One run of launch.py from a validated config: train (fresh, resumed or requeued) or test, with errors
said in one line and signals ending the run cleanly.

    run(config, args) -> exit status
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import pipelines
from shards.manifest import ShardFormatError
from tdsclip.build import apply_cpu_budget, build_test, build_trainer, test_view_note
from tdsclip.checkpoint import Checkpointer
from tdsclip.checkpoint_file import CheckpointError
from tdsclip.config import ConfigError, RunConfig, config_to_dict, save_config
from tdsclip.distributed import World, all_gather_objects, all_ranks_keys, close_distributed, init_distributed
from tdsclip.evaluate import evaluate, results_path, test_record, write_results
from tdsclip.metrics import MetricsLogger, plural
from tdsclip.run_dir import RunDirError, RunDirLock, make_directory, remove_leftovers
from tdsclip.stop import StopRequested, StopSignals
from tdsclip.train import NonFiniteLossError

RUN_ERRORS = (ConfigError, FileNotFoundError, ShardFormatError, CheckpointError, NonFiniteLossError, RunDirError)


def run(config: RunConfig, args: argparse.Namespace) -> int:
    world = init_distributed()
    seed = (config.seed + world.rank) % 2**32  # numpy takes seeds below 2**32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    log = MetricsLogger(config.output_dir, rank=world.rank, tensorboard=config.logging.tensorboard,
                        progress=config.logging.progress)
    lock = RunDirLock(config.output_dir)
    # a signal while starting (or testing) stops at once; fit() defers it to a step boundary
    stop = StopSignals("while testing" if args.test else "before training").install()
    try:
        apply_cpu_budget(config, world, log)
        if args.test:
            test(config, args, world, log)
        else:
            agreed(lambda: lock.acquire() if world.is_main else None)  # one run per output_dir
            train(config, args, world, log, stop)
    except (*RUN_ERRORS, pipelines.ShardReadError) as error:
        report_error(error, world, log)
        return 1
    except OSError as error:  # the file system refused a write (full, read-only, no permission)
        report_error(RunDirError(f"cannot write {error.filename or config.output_dir}: {error.strerror or error}; "
                                 "free space or fix the permissions (or set output_dir=...)"), world, log)
        return 1
    except StopRequested as stopped:
        log.close()
        if world.is_main:
            print(f"{stopped}: {stop_hint(config, args, stopped)}", file=sys.stderr)
        return stopped.exit_status
    except KeyboardInterrupt:
        log.close()  # stop the progress bar first, or it draws over the message
        if world.is_main:
            print(f"interrupted: {interrupt_hint(config, args)}", file=sys.stderr)
        return 130
    except (RuntimeError, dist.DistError) as error:
        if not lost_peer(error):
            raise
        log.close()
        print(f"error (rank {world.rank}): another process of this run stopped ({type(error).__name__}); its own "
              "message says why. Fix that, then rerun the same command with --resume auto", file=sys.stderr)
        return 1
    finally:
        stop.uninstall()
        log.close()
        lock.release()
        close_distributed()
    return 0


def agreed(action) -> None:
    """Run `action` (on whichever ranks it acts) and raise its error on every rank, so all stop together."""
    try:
        action()
        failure = None
    except (RunDirError, ConfigError, CheckpointError) as error:
        failure = error
    failures = [f for f in all_gather_objects(failure) if f is not None]
    if failures:
        raise failures[0]


def prepare_run_dir(config: RunConfig, args: argparse.Namespace, checkpointer: Checkpointer,
                    log: MetricsLogger) -> dict | None:
    """The checkpoint to resume from (None: a fresh start), after the run directory's rules: --resume needs
    last.pt, a fresh start needs a directory without an earlier run's checkpoints (or --overwrite)."""
    last, best = checkpointer.last_path, checkpointer.best_path
    if checkpointer.world.is_main:
        if removed := remove_leftovers(config.output_dir):
            log.info(f"removed {plural(len(removed), 'temporary file')} of an interrupted write: {', '.join(removed)}")
    existing = [p.name for p in (last, best) if p.exists()]
    if args.resume == "yes" and not last.exists():
        raise ConfigError(f"--resume: there is no checkpoint (last.pt) in {config.output_dir}; check output_dir, "
                          "or use '--resume auto' to start when there is none")
    if args.resume and last.exists():
        return checkpointer.load_last()
    if existing and not args.overwrite:
        raise ConfigError(f"{config.output_dir} holds {' and '.join(existing)} of an earlier run: pass --resume to "
                          "continue it, --overwrite to start over (deletes them), or set output_dir=...")
    if existing and checkpointer.world.is_main:
        for name in existing:
            (Path(config.output_dir) / name).unlink()
        log.info(f"--overwrite: deleted {' and '.join(existing)} of the earlier run in {config.output_dir}")
    return None


def train(config: RunConfig, args: argparse.Namespace, world: World, log: MetricsLogger, stop: StopSignals) -> None:
    checkpointer = Checkpointer(config.output_dir, world=world)
    checkpoint = prepare_run_dir(config, args, checkpointer, log)
    if checkpoint is not None:  # checked before anything is built
        changes = checkpointer.check_resume(checkpoint, config_to_dict(config))
        if checkpointer.repair_best(checkpoint):
            log.info(f"best.pt repaired: it is epoch {checkpoint['epoch']} again, as {checkpointer.last_path} says")
        if checkpoint["epoch"] >= config.schedule.epochs and not checkpoint.get("validation_due"):
            best = f"best val top-1 {checkpoint['best_top1']:.2f}%" if checkpoint["best_epoch"] >= 0 else "no validation"
            log.info(f"{checkpointer.last_path}: the run is complete ({checkpoint['epoch']} epochs, {best}); "
                     "to train longer, resume with schedule.epochs=N")
            return
    trainer = build_trainer(config, world, log, checkpointer, resuming=checkpoint is not None, stop=stop)
    if checkpoint is not None:
        resume(trainer, checkpoint, changes, log)
    if world.is_main:
        save_config(config, Path(config.output_dir) / "config.yaml")
    log.start_at(trainer.state.step + 1)
    stop.defer()
    trainer.fit()
    if trainer.val_history:
        final = trainer.val_history[-1]
        log.info(f"final val top-1 {final['top1']:.2f}% top-5 {final['top5']:.2f}%; best top-1 "
                 f"{trainer.state.best_top1:.2f}% (epoch {trainer.state.best_epoch + 1})")
    kept = ", best.pt" if trainer.val_loader is not None and config.checkpoint.save_best else ""
    log.info(f"checkpoints: {config.output_dir}/last.pt{kept}")
    log.info(f"TensorBoard: tensorboard --logdir {config.output_dir}")


def resume(trainer, checkpoint: dict, changes: list[str], log: MetricsLogger) -> None:
    """Restore the trainer from `checkpoint` and say where it stands."""
    checkpointer = trainer.checkpointer
    if note := checkpointer.check_data(checkpoint, trainer.data_fingerprint, len(trainer.train_loader.samples)):
        log.info(note)
    for note in trainer.restore(checkpoint):
        log.info(f"note: {note}")
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
        log.info(f"resuming from {checkpointer.last_path}: {pending}epoch {state.epoch + 1}, step "
                 f"{state.batch_in_epoch // trainer.accum_steps}/{trainer.steps_per_epoch} (global {state.step})")


def test(config: RunConfig, args: argparse.Namespace, world: World, log: MetricsLogger) -> None:
    make_directory(Path(config.output_dir))  # where the results go: a file in the way is said before the work
    if note := test_view_note(config):
        log.info(note)
    model, loader = build_test(config, world, args.weights, log)
    crops, clips = config.eval.test_crops, config.eval.test_clips
    result = evaluate(model, loader, views=loader.views, num_classes=model.config.num_classes,
                      device=world.device, precision=config.eval.precision, keep_predictions=True)
    skipped = all_ranks_keys(loader.skipped)
    if skipped:
        log.info(f"skipped {len(skipped)} unreadable sample(s) (data.on_error: skip), not counted: "
                 f"{', '.join(skipped)}")
    names = loader.classes or [str(i) for i in range(model.config.num_classes)]
    path = results_path(config.output_dir, args.weights, crops, clips)
    if world.is_main:
        save_config(config, Path(config.output_dir) / "test_config.yaml")
        sources = {sample.key: sample.source for sample in loader.samples if sample.source}
        write_results(test_record(result, names, weights=args.weights, crops=crops, clips=clips, skipped=skipped,
                                  sources=sources), path)
    log.log(0, {"test/top1": result["top1"], "test/top5": result["top5"], "test/mean_class_acc": result["mean_class_acc"]})
    log.evaluation("test", 0, result, names)
    log.info(f"test ({plural(crops, 'crop')} x {plural(clips, 'clip')}, {result['num_videos']} videos): "
             f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  mean class {result['mean_class_acc']:.2f}%  "
             f"-> {path}")


def stop_hint(config: RunConfig, args: argparse.Namespace, stopped: StopRequested) -> str:
    """What was kept and what to run after a signal stopped the run."""
    last = Checkpointer(config.output_dir).last_path
    if stopped.saved:
        return f"{last} is saved; continue with the same command and --resume (or --resume auto)"
    if args.test:
        return "rerun the same command to test"
    if last.exists():
        return f"nothing new to save ({last} is as it was); continue with the same command and --resume auto"
    return "nothing was trained yet; rerun the same command (with --resume auto, as for any requeued run)"


def interrupt_hint(config: RunConfig, args: argparse.Namespace) -> str:
    """What to run after a Ctrl-C that did not wait for a checkpoint."""
    last = Checkpointer(config.output_dir).last_path
    if args.test:
        return "rerun the same command to test again"
    if last.exists():
        return f"rerun the same command with --resume to continue from {last}"
    return "no checkpoint was written yet; rerun the same command to start again"


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank went away (its own message says why)."""
    text = str(error)
    return dist.is_initialized() and (isinstance(error, dist.DistError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL")))


def report_error(error: Exception, world: World, log: MetricsLogger) -> None:
    """Print a run-stopping error (it names the file or key; no traceback) once per node: the ranks of a
    node meet the same config, checkpoint and files, but nodes may hold their own copies of the data.
    An unreadable sample is said by each rank that read one, a non-finite loss (averaged over ranks,
    the same everywhere) by rank 0."""
    log.close()
    if isinstance(error, pipelines.ShardReadError):
        speaks = True
    elif isinstance(error, NonFiniteLossError):
        speaks = world.is_main
    else:
        speaks = world.local_rank == 0
    if speaks:
        where = f" (rank {world.rank})" if world.distributed else ""
        print(f"error{where}: {error}", file=sys.stderr)
