"""End-to-end training throughput with the CPU budget (tdsclip/cpu_budget.py) against the naive thread
defaults, in one run: shards -> DALI pipeline -> training step, and the same step fed one batch kept
in memory (the model-only ceiling).

    python tools/bench_train.py --cfg configs/demo.yaml data.shards=DIR [--steps 10 --rounds 3] [key.sub=value ...]
    python tools/bench_train.py --cfg configs/demo.yaml data.shards=DIR --busy 2   # with 2 CPU-burning processes
    python tools/bench_train.py --cfg configs/k400/vitb16.yaml data.shards=/data/k400 model.clip_weights=null

Two trainers are built from the config, alike but for their threads:

  naive   torch's default intra-op threads (as found at start: all cores, or OMP_NUM_THREADS) and as
          many DALI threads (the cores / local ranks: the pipelines' default before the budget)
  budget  the run's CPU budget (tdsclip.build.run_cpu_budget: config cpu.*, data.num_threads), as
          launch.py applies it: torch and DALI threads split from this process's CPUs
Reader processes (py_workers) are the budget's on both sides.

Their steps alternate in rounds so that load from other jobs hits both alike. Prints clips/s, the
data-wait fraction (time blocked on the pipeline / wall time) and s/step of each, then the ratios
budget / naive and end-to-end / model-only (1.0: the data path costs nothing).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from shards.manifest import ShardFormatError
from tdsclip.build import build_trainer, run_cpu_budget
from tdsclip.config import ConfigError, load_config
from tdsclip.cpu_budget import CpuBudget, local_world_size
from tdsclip.distributed import init_distributed
from tdsclip.metrics import MetricsLogger, StepTimer

DEFAULT_TORCH_THREADS = torch.get_num_threads()  # before anything sets it: what a run gets by default


@dataclass
class Totals:
    """Sums over the timed chunks of one way of feeding one trainer."""

    seconds: float = 0.0
    data_wait: float = 0.0
    clips: int = 0
    steps: int = 0

    def row(self) -> str:
        return (f"{self.clips / self.seconds:10.2f}{self.data_wait / self.seconds:11.1%}"
                f"{self.seconds / self.steps:9.3f}")


@dataclass
class Setup:
    """One trainer and how many threads it runs with."""

    name: str
    torch_threads: int
    dali_threads: int
    trainer: object
    batches: Iterator | None = None
    one_batch: dict | None = None
    e2e: Totals = field(default_factory=Totals)
    model_only: Totals = field(default_factory=Totals)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="YAML run config, as for launch.py")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.shards=DIR")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per side per round and feed")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each: naive, then budget)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, pipeline fill)")
    parser.add_argument("--busy", type=int, default=0, help="CPU-burning processes to run alongside (a busy machine)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after the flags
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def timed_steps(setup: Setup, batches: Iterator, steps: int, totals: Totals | None) -> None:
    """`steps` optimizer steps of `setup` with its torch threads; added to `totals` (None: untimed)."""
    torch.set_num_threads(setup.torch_threads)
    trainer, timer = setup.trainer, StepTimer()
    cuda = trainer.world.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    timer.reset()
    for _ in range(steps):
        trainer.optimizer_step(batches, timer)
    if cuda:
        torch.cuda.synchronize()
    if totals is not None:
        totals.seconds += time.perf_counter() - timer.start
        totals.data_wait += timer.data_wait
        totals.clips += timer.clips
        totals.steps += timer.steps


def endless(loader) -> Iterator:
    """Batches of `loader` over as many epochs as asked for."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def bench_config(args, tmp: str, name: str, extra: tuple[str, ...] = ()):
    """The run config of one side (no validation: it is not measured, and benchmark shards may have a
    train split only)."""
    return load_config(args.cfg, [*args.overrides, *extra, f"output_dir={tmp}/{name}", "logging.tensorboard=false",
                                  "data.val_split=null"])


def build_setup(name: str, args, world, log, tmp: str, threads: int, dali: int) -> Setup:
    config = bench_config(args, tmp, name, (f"data.num_threads={dali}",))
    torch.set_num_threads(threads)  # compiled CPU kernels keep the thread count they are generated with
    trainer = build_trainer(config, world, log)
    trainer.train_model.train()
    return Setup(name, threads, trainer.train_loader.num_threads, trainer)


def measure(setups: list[Setup], args) -> None:
    """Warm each setup up on both feeds, then time them in alternating rounds."""
    for setup in setups:
        setup.batches = endless(setup.trainer.train_loader)
        timed_steps(setup, setup.batches, args.warmup, None)
        setup.one_batch = next(setup.batches)
        timed_steps(setup, itertools.repeat(setup.one_batch), args.warmup, None)
    for _ in range(args.rounds):
        for setup in setups:
            timed_steps(setup, setup.batches, args.steps, setup.e2e)
            timed_steps(setup, itertools.repeat(setup.one_batch), args.steps, setup.model_only)


def report(setups: list[Setup], budget: CpuBudget, log, world, busy: int, seconds: float) -> None:
    trainer = setups[0].trainer
    log.info(budget.describe())
    log.info(f"device {world.device}, {trainer.precision}, accumulation {trainer.accum_steps}, "
             f"{busy} competing CPU-burning process(es), {seconds:.0f} s")
    log.info(f"{'':34}{'clips/s':>10}{'data-wait':>11}{'step s':>9}")
    for s in setups:
        label = f"{s.name} (torch {s.torch_threads}, DALI {s.dali_threads})"
        log.info(f"{label:24}  end-to-end{s.e2e.row()}")
        log.info(f"{'':24}  model only{s.model_only.row()}")
    naive, ours = setups
    rate = lambda t: t.clips / t.seconds  # noqa: E731
    log.info(f"ratio budget / naive: end-to-end {rate(ours.e2e) / rate(naive.e2e):.2f}x, "
             f"model only {rate(ours.model_only) / rate(naive.model_only):.2f}x")
    log.info(f"ratio end-to-end / model-only: budget {rate(ours.e2e) / rate(ours.model_only):.2f}, "
             f"naive {rate(naive.e2e) / rate(naive.model_only):.2f}")


def run(args: argparse.Namespace) -> None:
    """Build both trainers, time them, report."""
    world = init_distributed()
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = MetricsLogger(tmp, rank=world.rank, tensorboard=False, progress="plain")
            start = time.perf_counter()
            budget = run_cpu_budget(bench_config(args, tmp, "budget"), world)
            naive_dali = max(1, len(os.sched_getaffinity(0)) // local_world_size())
            setups = [build_setup("naive", args, world, log, tmp, DEFAULT_TORCH_THREADS, naive_dali),
                      build_setup("budget", args, world, log, tmp, budget.torch_threads, budget.dali_threads)]
            measure(setups, args)
            report(setups, budget, log, world, args.busy, time.perf_counter() - start)
            log.close()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except (ConfigError, FileNotFoundError, ShardFormatError, ValueError) as error:  # each names the file or key
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
