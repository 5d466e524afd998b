"""End-to-end training throughput: shards -> DALI pipeline -> training step, against the same step
fed from one batch already on the device (the model-only ceiling), in one run.

    python tools/bench_train.py --cfg configs/demo.yaml [--steps 20] [key.sub=value ...]
    python tools/bench_train.py --cfg configs/k400/vitb16.yaml data.shards=/data/k400 model.clip_weights=null

Prints clips/s and the data-wait fraction (time blocked on the pipeline / wall time) of both, and
the ratio end-to-end / model-only: 1.0 means the data path costs nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.manifest import ShardFormatError  # noqa: E402
from tdsclip.build import build_trainer  # noqa: E402
from tdsclip.config import ConfigError, load_config  # noqa: E402
from tdsclip.distributed import init_distributed  # noqa: E402
from tdsclip.metrics import MetricsLogger, StepTimer  # noqa: E402


def measure(trainer, batches, steps: int, warmup: int) -> dict[str, float]:
    """Run `warmup` then `steps` optimizer steps from `batches`; clips/s and data-wait fraction."""
    timer = StepTimer()
    for step in range(warmup + steps):
        if step == warmup:
            if trainer.world.device.type == "cuda":
                torch.cuda.synchronize()
            timer.reset()
        trainer.optimizer_step(batches, trainer.accum_steps, timer)
    if trainer.world.device.type == "cuda":
        torch.cuda.synchronize()
    stats = timer.stats(trainer.world.world_size)
    return {"clips_per_s": stats["train/clips_per_s"], "data_wait": stats["train/data_wait_frac"],
            "step_s": stats["train/step_time_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML run config, as for launch.py")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards=DIR")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, pipeline fill)")
    args = parser.parse_args()
    try:
        run(args)
    except (ConfigError, FileNotFoundError, ShardFormatError) as error:  # each names the file or key
        raise SystemExit(f"error: {error}") from None


def run(args: argparse.Namespace) -> None:
    """Build the trainer from the config and time both ways of feeding it."""
    with tempfile.TemporaryDirectory() as tmp:
        # no validation: it is not measured, and benchmark shards may have a train split only
        config = load_config(args.cfg, [*args.overrides, f"output_dir={tmp}", "logging.tensorboard=false",
                                        "data.val_split=null"])
        world = init_distributed()
        log = MetricsLogger(tmp, rank=world.rank, tensorboard=False, progress="plain")
        trainer = build_trainer(config, world, log)
        trainer.train_model.train()
        needed = (args.warmup + args.steps) * trainer.accum_steps
        epochs = itertools.count()
        loader = trainer.train_loader

        def pipeline_batches():
            for epoch in epochs:  # as many epochs as the steps need
                loader.set_epoch(epoch)
                yield from loader

        start = time.perf_counter()
        e2e = measure(trainer, pipeline_batches(), args.steps, args.warmup)
        one_batch = next(iter(loader))
        ceiling = measure(trainer, itertools.repeat(one_batch), args.steps, args.warmup)
        log.info(f"device {world.device}, {trainer.precision}, accumulation {trainer.accum_steps}, "
                 f"{needed} micro-batches per run, {time.perf_counter() - start:.0f} s")
        log.info(f"{'':24}{'clips/s':>10}{'data-wait':>11}{'step s':>9}")
        for name, row in (("end-to-end (pipeline)", e2e), ("model only (in memory)", ceiling)):
            log.info(f"{name:24}{row['clips_per_s']:10.2f}{row['data_wait']:11.1%}{row['step_s']:9.3f}")
        log.info(f"ratio end-to-end / model-only: {e2e['clips_per_s'] / ceiling['clips_per_s']:.2f}")
        log.close()


if __name__ == "__main__":
    main()
