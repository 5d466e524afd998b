"""The training and evaluation loops, wired from components that tdsclip/build.py builds from a RunConfig.

`Trainer.fit()` runs epochs of `train_one_epoch()` (gradient accumulation, per-step lr schedule,
non-finite loss guard, periodic logging and checkpoints), validates after each epoch not in the
skip list and writes last.pt / best.pt. `evaluate()` averages the softmax over the views of each
video (multi-view test) and reports top-1, top-5 and mean class accuracy over all ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from atomicfile import atomic_write_text
from tdsclip.checkpoint import Checkpointer, rng_state, set_rng_state
from tdsclip.config import ConfigError
from tdsclip.distributed import World, all_gather_objects, all_ranks_keys, all_reduce_sum
from tdsclip.metrics import MetricsLogger, StepTimer, host_rss_bytes, peak_device_memory_bytes
from tdsclip.optim import WarmupCosineSchedule
from tdsclip.weights import CheckpointError, model_checkpoint

GIB = 2**30


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before writing any checkpoint."""


def check_world_size(checkpoint: dict, world_size: int) -> None:
    """A checkpoint written mid-epoch resumes only with its number of processes (each rank's data
    position belongs to its share of the epoch); one written at an epoch boundary resumes with any."""
    if checkpoint["batch_in_epoch"] and checkpoint["world_size"] != world_size:
        raise CheckpointError(f"the checkpoint was written mid-epoch by {checkpoint['world_size']} processes and "
                              f"this run has {world_size}: resume with the same command and process count "
                              f"(torchrun --nproc_per_node=... --nnodes=...)")


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


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when precision is 'bf16', plain fp32 otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class TrainState:
    epoch: int = 0  # the epoch being trained (== epochs done at an epoch boundary)
    step: int = 0  # optimizer steps done since the start of training
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_top1: float = -1.0
    best_epoch: int = -1
    # Set while validating after an epoch (the checkpoint written just before says so), cleared when
    # it finishes: a run resumed from that checkpoint validates the epoch first (fit()).
    validation_due: bool = False


@dataclass(kw_only=True)
class Trainer:
    """Holds the built components; fit() trains, validates and checkpoints."""

    model: nn.Module  # the plain model (state dicts, config)
    train_model: nn.Module  # what the step calls: the model, DDP-wrapped and/or compiled
    eval_model: nn.Module  # what validation calls: the model, compiled or not (no DDP needed)
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosineSchedule
    train_loader: Any  # resumable (set_epoch, state_dict, load_state_dict); .skipped: unreadable samples left out
    val_loader: Any | None  # iterable of one epoch's batches per pass, with close() to release it in between
    checkpointer: Checkpointer
    metrics: MetricsLogger
    world: World
    epochs: int
    accum_steps: int = 1
    precision: str = "fp32"  # training step
    eval_precision: str = "fp32"  # validation
    label_smoothing: float = 0.0
    mixup: Callable | None = None  # (clips, labels) -> (clips, soft targets)
    grad_clip: float | None = None
    log_every: int = 10
    checkpoint_every: int = 0
    eval_every: int = 1
    skip_epochs: list[int] = field(default_factory=list)
    save_best: bool = True
    config: dict = field(default_factory=dict)
    flops_per_clip: float | None = None  # training FLOPs per clip, for MFU
    peak_tflops: float | None = None
    state: TrainState = field(default_factory=TrainState)
    history: list[dict] = field(default_factory=list)  # per optimizer step: step, loss
    val_history: list[dict] = field(default_factory=list)  # per validation: epoch, top1, top5
    reported_skips: set[str] = field(default_factory=set)  # "shard:key" already named in the log

    # --- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> dict:
        """Everything an exact resume needs (RNG and data position of every rank)."""
        checkpoint = model_checkpoint(self.model)
        checkpoint.update(
            optimizer=self.optimizer.state_dict(),
            schedule=self.schedule.state_dict(),
            epoch=self.state.epoch,
            step=self.state.step,
            batch_in_epoch=self.state.batch_in_epoch,
            best_top1=self.state.best_top1,
            best_epoch=self.state.best_epoch,
            validation_due=self.state.validation_due,
            world_size=self.world.world_size,
            rng=all_gather_objects(rng_state()),
            data=all_gather_objects(self.train_loader.state_dict()),
            config=self.config,
        )
        return checkpoint

    def restore(self, checkpoint: dict) -> None:
        """Continue from `checkpoint` exactly where it was written."""
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.schedule.load_state_dict(checkpoint["schedule"])
        self.state = TrainState(epoch=checkpoint["epoch"], step=checkpoint["step"],
                                batch_in_epoch=checkpoint["batch_in_epoch"],
                                best_top1=checkpoint["best_top1"], best_epoch=checkpoint["best_epoch"],
                                validation_due=checkpoint.get("validation_due", False))
        check_world_size(checkpoint, self.world.world_size)
        if checkpoint["world_size"] == self.world.world_size:
            set_rng_state(checkpoint["rng"][self.world.rank])
            try:
                self.train_loader.load_state_dict(checkpoint["data"][self.world.rank])
            except ValueError as error:
                raise CheckpointError(f"{error}: the training data differ from the checkpoint's; resume on the "
                                      f"same shards, or start a new run") from None
        else:
            saved, mine = checkpoint["data"][0].get("num_videos"), self.train_loader.state_dict().get("num_videos")
            if saved != mine:
                raise CheckpointError(f"the checkpoint was trained on {saved} videos, the training data now has "
                                      f"{mine}: resume on the same shards, or start a new run")
            self.metrics.info(f"note: world size changed ({checkpoint['world_size']} -> "
                              f"{self.world.world_size}); random streams restart from the seed")

    def _save(self, *, best: bool = False) -> None:
        checkpoint = self.checkpoint()  # every rank: the gathers are collective
        self.checkpointer.save(checkpoint, best=best)

    # --- training ------------------------------------------------------------------------

    def fit(self) -> None:
        """Train from self.state to the last epoch, validating and checkpointing each epoch."""
        if self.state.validation_due and self.state.batch_in_epoch == 0:  # stopped while validating
            self._end_epoch(self.state.epoch - 1)
        for epoch in range(self.state.epoch, self.epochs):
            if self.state.batch_in_epoch == 0:
                self.train_loader.set_epoch(epoch)
            self.train_one_epoch()
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0
            self._end_epoch(epoch)

    def _end_epoch(self, epoch: int) -> None:
        """Validate after `epoch` (when due) and checkpoint."""
        is_best = False
        self.state.validation_due = False  # due again below if this epoch validates (eval.* may change on resume)
        if self.val_loader is not None and self._validates(epoch):
            self.state.validation_due = True
            self._save()  # the epoch's training survives a validation that fails (bad shard, OOM); resume redoes it
            result = evaluate(self.eval_model, self.val_loader, views=1, num_classes=self.model.config.num_classes,
                              device=self.world.device, precision=self.eval_precision)
            self.val_loader.close()  # its prefetched batches and decode buffers are not needed until next time
            self.state.validation_due = False
            self.metrics.log(self.state.step, {"val/top1": result["top1"], "val/top5": result["top5"]})
            self.val_history.append({"epoch": epoch + 1, "top1": result["top1"], "top5": result["top5"]})
            is_best = result["top1"] >= self.state.best_top1  # as the official loop: a tie saves the later epoch
            if is_best:
                self.state.best_top1, self.state.best_epoch = result["top1"], epoch
            self.metrics.info(f"epoch {epoch + 1}/{self.epochs}: val top-1 {result['top1']:.2f}% "
                              f"top-5 {result['top5']:.2f}% (best {self.state.best_top1:.2f}% "
                              f"at epoch {self.state.best_epoch + 1})")
        self._report_skipped()
        self._save(best=is_best and self.save_best)

    def _report_skipped(self) -> None:
        """Name, once each, the samples any rank's loaders left out after a read error (data.on_error: skip)."""
        loaders = [self.train_loader] + ([self.val_loader] if self.val_loader is not None else [])
        mine = [key for loader in loaders for key in loader.skipped]
        skipped = all_ranks_keys(mine)  # every rank: collective
        new = [key for key in skipped if key not in self.reported_skips]
        if new:
            self.reported_skips.update(new)
            self.metrics.info(f"skipped {len(new)} unreadable sample(s) (data.on_error: skip; "
                              f"{len(skipped)} so far): {', '.join(new)}")
            self.metrics.log(self.state.step, {"data/skipped": len(skipped)})

    def _validates(self, epoch: int) -> bool:
        last = epoch + 1 == self.epochs
        return last or ((epoch + 1) % self.eval_every == 0 and epoch not in self.skip_epochs)

    def train_one_epoch(self) -> None:
        """Optimizer steps over the rest of the current epoch (from state.batch_in_epoch)."""
        self.train_model.train()
        num_batches = len(self.train_loader)
        num_steps = -(-num_batches // self.accum_steps)
        self.metrics.start_epoch(f"epoch {self.state.epoch + 1}/{self.epochs}", total=num_steps,
                                 completed=self.state.batch_in_epoch // self.accum_steps)
        batches = iter(self.train_loader)
        timer, pending = StepTimer(), []
        while self.state.batch_in_epoch < num_batches:
            first = self.state.batch_in_epoch
            micro = min(self.accum_steps, num_batches - first)
            self.schedule.step(self.state.epoch + first / num_batches)
            loss = self.optimizer_step(batches, micro, timer)
            self.state.step += 1
            self.state.batch_in_epoch = first + micro
            pending.append(loss)
            self.metrics.advance(self.state.batch_in_epoch // self.accum_steps, "")
            if self.state.step % self.log_every == 0 or self.state.batch_in_epoch == num_batches:
                self._log(pending, timer)
                pending = []
                timer.reset()
            if self.checkpoint_every and self.state.step % self.checkpoint_every == 0:
                self._check_finite(pending)
                self._save()

    def optimizer_step(self, batches: Iterable, micro: int, timer: StepTimer) -> torch.Tensor:
        """Forward/backward `micro` micro-batches, then one optimizer step; returns the mean loss."""
        total = torch.zeros((), device=self.world.device)
        for index in range(micro):
            start = time.perf_counter()
            batch = next(batches)
            timer.waited(time.perf_counter() - start)
            timer.clips += batch["clips"].shape[0]
            last = index == micro - 1
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.train_model.no_sync()
            with sync:
                loss = self._loss(batch["clips"], batch["label"])
                (loss / micro).backward()
            total += loss.detach()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.steps += 1
        return total / micro

    def _loss(self, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels
        if self.mixup is not None:
            clips, targets = self.mixup(clips, labels)  # targets: (B, classes) soft labels
        with autocast_context(self.world.device, self.precision):
            logits = self.train_model(clips)  # (B, classes)
        smoothing = 0.0 if self.mixup is not None else self.label_smoothing  # mixup smooths its targets
        return F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)

    def _check_finite(self, losses: list[torch.Tensor]) -> list[float]:
        """The per-step losses since the last call, averaged over ranks; raise if any is NaN or infinite.

        One all-reduce (every rank calls this at the same steps) and one device sync per log point;
        every rank sees the same values, so all stop together rather than some waiting in a collective.
        """
        if not losses:
            return []
        stacked = all_reduce_sum(torch.stack(losses)) / self.world.world_size
        values = stacked.tolist()
        for offset, value in enumerate(values):
            if not math.isfinite(value):
                step = self.state.step - len(values) + offset + 1
                raise NonFiniteLossError(
                    f"training loss is {value} at optimizer step {step} (epoch {self.state.epoch + 1}); "
                    f"stopping. The last good checkpoint ({self.checkpointer.last_path}) is untouched; "
                    "resume from it with a lower optim.lr or with optim.grad_clip set.")
        return values

    def _log(self, losses: list[torch.Tensor], timer: StepTimer) -> None:
        values = self._check_finite(losses)
        loss = sum(values) / len(values)
        lr = max(self.schedule.get_last_lr())
        scalars = {"train/loss": loss, "train/lr": lr, **timer.stats(self.world.world_size),
                   "sys/host_rss_gib": host_rss_bytes() / GIB}
        if self.world.device.type == "cuda":
            scalars["sys/peak_device_mem_gib"] = peak_device_memory_bytes(self.world.device) / GIB
            if self.flops_per_clip and self.peak_tflops:
                achieved = self.flops_per_clip * scalars["train/clips_per_s"] / self.world.world_size
                scalars["train/mfu"] = achieved / (self.peak_tflops * 1e12)
        self.history.extend({"step": self.state.step - len(values) + i + 1, "loss": v} for i, v in enumerate(values))
        status = f"loss {loss:.4f}  lr {lr:.2e}  {scalars['train/clips_per_s']:.1f} clips/s"
        self.metrics.advance(self.state.batch_in_epoch // self.accum_steps, status)
        line = (f"epoch {self.state.epoch + 1}/{self.epochs} step {self.state.step} "
                f"[{self.state.batch_in_epoch}/{len(self.train_loader)}] {status}  "
                f"data-wait {scalars['train/data_wait_frac']:.0%}  step {scalars['train/step_time_s']:.3f}s")
        self.metrics.log(self.state.step, scalars, line)


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


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()  # on a generator: grad mode is restored at each yield, so callers keep theirs
def video_probabilities(model: nn.Module, loader: Iterable, *, views: int, num_classes: int,
                        device: torch.device, precision: str = "fp32") -> Iterator[tuple]:
    """Per batch: (keys, probs (B, classes), labels (B,), valid (B,)) of its B videos, the softmax averaged
    over each video's `views` adjacent views (multi-view test); valid is False on padding."""
    model.eval()
    for batch in loader:
        with autocast_context(device, precision):
            logits = model(batch["clips"])  # (B*V, classes)
        probs = logits.float().softmax(-1).view(-1, views, num_classes).mean(1)  # (B, classes)
        labels = batch["label"].view(-1, views)[:, 0]
        valid = batch["valid"].view(-1, views)[:, 0] if "valid" in batch else torch.ones_like(labels, dtype=torch.bool)
        yield batch["key"][::views], probs, torch.where(valid, labels, 0), valid  # padding: any label


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, views: int, num_classes: int, device: torch.device,
             precision: str = "fp32", keep_predictions: bool = False) -> dict[str, Any]:
    """Top-1/top-5/mean class accuracy (%) over all ranks, softmax averaged over each video's views.

    Batches hold `views` adjacent views per video and an optional `valid` mask marking padding.
    """
    correct1 = torch.zeros(num_classes, device=device)
    correct5 = torch.zeros(num_classes, device=device)
    count = torch.zeros(num_classes, device=device)
    predictions = []
    for keys, probs, labels, valid in video_probabilities(model, loader, views=views, num_classes=num_classes,
                                                          device=device, precision=precision):
        top5 = probs.topk(min(5, num_classes), dim=-1).indices  # (B, 5)
        hit1 = (top5[:, 0] == labels) & valid
        hit5 = (top5 == labels[:, None]).any(-1) & valid
        correct1.index_add_(0, labels, hit1.float())
        correct5.index_add_(0, labels, hit5.float())
        count.index_add_(0, labels, valid.float())
        if keep_predictions:
            for key, label, top, ok in zip(keys, labels.tolist(), top5.tolist(), valid.tolist()):
                if ok:
                    predictions.append({"key": key, "label": label, "top5": top})
    for tensor in (correct1, correct5, count):
        all_reduce_sum(tensor)
    correct1, correct5, count = (t.cpu().double() for t in (correct1, correct5, count))  # exact ratios in the report
    seen = count > 0
    total = count.sum().clamp(min=1)
    result = {
        "top1": 100.0 * (correct1.sum() / total).item(),
        "top5": 100.0 * (correct5.sum() / total).item(),
        "mean_class_acc": 100.0 * (correct1[seen] / count[seen]).mean().item() if seen.any() else 0.0,
        "num_videos": int(count.sum().item()),
        "views": views,
    }
    if keep_predictions:
        result["predictions"] = [p for rank in all_gather_objects(predictions) for p in rank]
    return result


def write_results(result: dict, path: str | Path) -> None:
    """Write a test result as JSON (atomically)."""
    atomic_write_text(path, json.dumps(result, indent=2))
