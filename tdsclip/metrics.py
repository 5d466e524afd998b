"""What a run reports: TensorBoard scalars and, on rank 0, a rich progress bar or plain log lines.

Scalars (tag: meaning): train/loss (mean over ranks), train/lr, train/clips_per_s (global), train/step_time_s,
train/data_wait_frac (time blocked on the pipeline / step time), sys/peak_device_mem_gib,
sys/host_rss_gib, train/mfu (GPU only), val/top1, val/top5, test/top1, test/top5,
test/mean_class_acc, data/skipped (samples left out after read errors).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

# Dense bf16 tensor-core peaks (TFLOP/s) for MFU; logging.peak_tflops overrides.
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0, "A100": 312.0,
                     "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def device_peak_tflops(device: torch.device) -> float | None:
    """The bf16 peak of a known GPU, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops
    return None


def host_rss_bytes() -> int:
    """Resident memory of this process (current, from /proc; peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return 0


class MetricsLogger:
    """Rank 0 writes TensorBoard events and prints; other ranks do nothing."""

    def __init__(self, log_dir: str | Path, *, rank: int = 0, tensorboard: bool = True,
                 progress: str = "auto"):
        self.enabled = rank == 0
        self.log_dir, self.tensorboard = Path(log_dir), tensorboard
        self.writer = None  # made at the first scalar: a run that fails at start leaves no empty event file
        self.purge_step: int | None = None
        self.progress = None
        self.task = None
        if not self.enabled:
            return
        use_rich = progress == "rich" or (progress == "auto" and sys.stdout.isatty())
        if use_rich:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()

    def info(self, message: str) -> None:
        """Print a line on rank 0 (through the progress bar's console when there is one)."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def start_at(self, step: int) -> None:
        """Training logs from `step` on: TensorBoard hides what an earlier, interrupted attempt logged there
        and later (after the checkpoint this run resumes from), so the curves do not zig-zag. Also set
        on a fresh run: TensorBoard's older loader (--load_fast=false) skips a run's first such mark."""
        self.purge_step = step

    def start_epoch(self, description: str, total: int, completed: int = 0) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total, completed=completed, status="")

    def advance(self, completed: int, status: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=completed, status=status)

    def log(self, step: int, scalars: dict[str, float], line: str | None = None) -> None:
        """Record scalars at `step`; in plain mode also print `line`."""
        if not self.enabled:
            return
        if self.tensorboard and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
        if line and self.progress is None:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class StepTimer:
    """Accumulates wall time and time blocked on the data pipeline between log points."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.clips = 0
        self.steps = 0

    def waited(self, seconds: float) -> None:
        self.data_wait += seconds

    def stats(self, world_size: int) -> dict[str, float]:
        """Throughput over the interval (clips counted on this rank, scaled to all ranks)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "train/clips_per_s": self.clips * world_size / elapsed,
            "train/step_time_s": elapsed / max(self.steps, 1),
            "train/data_wait_frac": self.data_wait / elapsed,
        }


def train_flops_per_clip(model: torch.nn.Module, clip_shape: tuple[int, ...], device: torch.device) -> float:
    """FLOPs of one training forward + backward on one clip (B=1), counted by torch's FlopCounterMode.

    Run in eval mode so the count does not touch BatchNorm running statistics.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    clips = torch.zeros((1, *clip_shape), device=device)
    with FlopCounterMode(display=False) as counter:
        model(clips).float().sum().backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return float(counter.get_total_flops())


def plural(count: int, noun: str) -> str:
    """"1 process", "2 processes", "4 crops": a count for a log line."""
    return f"{count} {noun}{'' if count == 1 else 'es' if noun.endswith('s') else 's'}"
