"""What a run reports (MetricsLogger: tdsclip/console.py and tdsclip/tensorboard_sink.py on rank 0), and the
measurements behind it: step timing, memory, FLOPs for MFU.

Scalars (tag: meaning): train/loss (mean over ranks), train/lr, train/clips_per_s (global), train/step_time_s,
train/data_wait_frac (time blocked on the pipeline / step time), sys/peak_device_mem_gib,
sys/host_rss_gib, train/mfu (GPU only), val/top1, val/top5, test/top1, test/top5,
test/mean_class_acc, data/skipped (samples left out after read errors).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from tdsclip import pictures
from tdsclip.console import Console
from tdsclip.tensorboard_sink import TensorBoardSink

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
    """What a run reports, on rank 0 (other ranks do nothing): a Console and a TensorBoardSink."""

    def __init__(self, log_dir: str | Path, *, rank: int = 0, tensorboard: bool = True, progress: str = "auto"):
        self.enabled = rank == 0
        self.console = Console(progress) if self.enabled else None
        self.sink = TensorBoardSink(log_dir) if self.enabled and tensorboard else None

    def info(self, message: str) -> None:
        """Print a line on rank 0 (above the progress bar when there is one)."""
        if self.console is not None:
            self.console.print(message)

    def start_at(self, step: int) -> None:
        """Training logs from `step` on: TensorBoard hides what an earlier, interrupted attempt logged there
        and later (after the checkpoint this run resumes from), so the curves do not zig-zag. Also set
        on a fresh run: TensorBoard's older loader (--load_fast=false) skips a run's first such mark."""
        if self.sink is not None:
            self.sink.purge_step = step

    def start_epoch(self, description: str, total: int, completed: int = 0) -> None:
        if self.console is not None:
            self.console.start_epoch(description, total, completed)

    def advance(self, completed: int, status: str) -> None:
        if self.console is not None:
            self.console.advance(completed, status)

    def log(self, step: int, scalars: dict[str, float], line: str | None = None) -> None:
        """Record scalars at `step`; without a progress bar also print `line`."""
        if self.sink is not None:
            self.sink.scalars(step, scalars)
        if line and self.console is not None and not self.console.draws_bar:
            print(line, flush=True)

    def clips(self, tag: str, step: int, batch: dict, class_names: list[str] | None, count: int = 4) -> None:
        """A loader batch's first clips as the model sees them (de-normalised, captioned) at `step`."""
        if self.sink is not None:
            names = class_names or [str(label) for label in range(int(batch["label"].max()) + 1)]
            sheet, _ = pictures.batch_sheet(batch, names, count=count)
            self.sink.image(tag, step, sheet)

    def evaluation(self, split: str, step: int, result: dict, class_names: list[str] | None) -> None:
        """A validation's or test's confusion matrix (image), its most confused pairs and per-class accuracy."""
        if self.sink is None:
            return
        matrix = np.asarray(result["confusion"])
        names = class_names or [str(c) for c in range(len(matrix))]
        self.sink.image(f"{split}/confusion", step, pictures.confusion_image(matrix, names))
        pairs = pictures.most_confused(matrix, names)
        self.sink.text(f"{split}/most_confused", step, "\n".join(f"- {pair}" for pair in pairs) or "none")
        rows = [f"| {name} | {videos} | {'-' if acc is None else f'{acc:.1f}'} |"
                for name, videos, acc in zip(names, result["per_class_videos"], result["per_class_top1"])]
        self.sink.text(f"{split}/per_class_top1", step, "| class | videos | top-1 % |\n|---|---|---|\n" + "\n".join(rows))

    def close(self) -> None:
        if self.console is not None:
            self.console.close()
        if self.sink is not None:
            self.sink.close()


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
