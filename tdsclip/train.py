"""The training loop: epochs of optimizer steps, validation after an epoch, checkpoints and reports, wired
from components that tdsclip/build.py builds from a RunConfig.

`Trainer.fit()` runs `train_one_epoch()` (gradient accumulation, per-step lr schedule, non-finite loss
guard, periodic logging and checkpoints, a clean stop on SIGTERM / SIGUSR1 / Ctrl-C), validates after
each epoch not in the skip list (tdsclip/evaluate.py) and writes last.pt / best.pt (tdsclip/checkpoint.py).
An epoch is floor(videos / global batch) optimizer steps, each on the same videos on any process layout.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tdsclip.checkpoint import Checkpointer
from tdsclip.config import CheckpointSection, EvalSection, LoggingSection, OptimSection
from tdsclip.distributed import World, all_ranks_keys, all_reduce_sum
from tdsclip.evaluate import autocast_context, evaluate
from tdsclip.metrics import MetricsLogger, StepTimer, host_rss_bytes, peak_device_memory_bytes
from tdsclip.optim import WarmupCosineSchedule
from tdsclip.stop import StopRequested, StopSignals

GIB = 2**30


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops before writing any checkpoint."""


@dataclass
class TrainState:
    """Where training stands; saved at the top level of a checkpoint."""

    epoch: int = 0  # the epoch being trained (== epochs done at an epoch boundary)
    step: int = 0  # optimizer steps done since the start of training
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_top1: float = -1.0
    best_epoch: int = -1
    # Set while validating after an epoch (the checkpoint written just before says so), cleared when
    # it finishes: a run resumed from that checkpoint validates the epoch first (fit()).
    validation_due: bool = False

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        for name in vars(self):
            setattr(self, name, state.get(name, getattr(TrainState(), name)))


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
    optim: OptimSection = field(default_factory=OptimSection)  # label smoothing, gradient clipping
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    evaluation: EvalSection = field(default_factory=EvalSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    accum_steps: int = 1
    precision: str = "fp32"  # training step
    mixup: Callable | None = None  # (clips, labels) -> (clips, soft targets)
    config: dict = field(default_factory=dict)  # the resolved run config, saved with each checkpoint
    data_fingerprint: str | None = None
    stop: StopSignals | None = None  # signals that end the run cleanly at the next step
    flops_per_clip: float | None = None  # training FLOPs per clip, for MFU
    peak_tflops: float | None = None
    class_names: list[str] | None = None  # of the training shards, for pictures and reports
    state: TrainState = field(default_factory=TrainState)
    history: list[dict] = field(default_factory=list)  # per optimizer step: step, loss
    val_history: list[dict] = field(default_factory=list)  # per validation: epoch, top1, top5
    reported_skips: set[str] = field(default_factory=set)  # "shard:key" already named in the log
    _shown_epoch: int = -1  # the epoch whose clips TensorBoard shows

    @property
    def epochs(self) -> int:
        return int(self.schedule.epochs)

    @property
    def steps_per_epoch(self) -> int:
        """Whole optimizer steps in an epoch: the loader's micro-batches past the last whole step are not trained on."""
        return len(self.train_loader) // self.accum_steps

    # --- checkpoints ---------------------------------------------------------------------

    def stateful_parts(self) -> dict:
        return dict(model=self.model, optimizer=self.optimizer, schedule=self.schedule, train_state=self.state,
                    loader=self.train_loader)

    def restore(self, checkpoint: dict) -> list[str]:
        """Continue from `checkpoint` exactly where it was written; returns notes for the log."""
        return self.checkpointer.restore(checkpoint, **self.stateful_parts(), config=self.config)

    def _save(self, *, best: bool = False) -> None:
        checkpoint = self.checkpointer.collect(**self.stateful_parts(), fingerprint=self.data_fingerprint,
                                               config=self.config)  # every rank: the gathers are collective
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
            is_best = self._validate(epoch)
        self._report_skipped()
        self._save(best=is_best and self.checkpointing.save_best)

    def _validate(self, epoch: int) -> bool:
        """Score the val split after `epoch`; True when it is the best so far."""
        result = evaluate(self.eval_model, self._shown_first(self.val_loader, "val/clips"), views=1,
                          num_classes=self.model.config.num_classes, device=self.world.device,
                          precision=self.evaluation.precision,
                          should_stop=lambda: self._stop_if_requested(f"during the validation after epoch {epoch + 1}"))
        self.val_loader.close()  # its prefetched batches and decode buffers are not needed until next time
        self.state.validation_due = False
        self.metrics.log(self.state.step, {"val/top1": result["top1"], "val/top5": result["top5"]})
        self.metrics.evaluation("val", self.state.step, result, self.class_names)
        self.val_history.append({"epoch": epoch + 1, "top1": result["top1"], "top5": result["top5"]})
        is_best = result["top1"] >= self.state.best_top1  # as the official loop: a tie saves the later epoch
        if is_best:
            self.state.best_top1, self.state.best_epoch = result["top1"], epoch
        self.metrics.info(f"epoch {epoch + 1}/{self.epochs}: val top-1 {result['top1']:.2f}% "
                          f"top-5 {result['top5']:.2f}% (best {self.state.best_top1:.2f}% "
                          f"at epoch {self.state.best_epoch + 1})")
        return is_best

    def _shown_first(self, loader, tag: str) -> Iterator[dict]:
        """The loader's batches, the first one's first clip shown in TensorBoard."""
        for index, batch in enumerate(loader):
            if index == 0:
                self.metrics.clips(tag, self.state.step, batch, self.class_names, count=1)
            yield batch

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
        return last or ((epoch + 1) % self.evaluation.every_epochs == 0 and epoch not in self.evaluation.skip_epochs)

    def train_one_epoch(self) -> None:
        """Optimizer steps over the rest of the current epoch (from state.batch_in_epoch)."""
        self.train_model.train()
        num_steps, done = self.steps_per_epoch, self.state.batch_in_epoch // self.accum_steps
        self.metrics.start_epoch(f"epoch {self.state.epoch + 1}/{self.epochs}", total=num_steps, completed=done)
        batches = iter(self.train_loader)
        timer, pending = StepTimer(), []
        for step_in_epoch in range(done, num_steps):
            self.schedule.step(self.state.epoch + step_in_epoch / num_steps)
            pending.append(self.optimizer_step(batches, timer))
            self.state.step += 1
            self.state.batch_in_epoch = (step_in_epoch + 1) * self.accum_steps
            self.metrics.advance(step_in_epoch + 1, "")
            if self.state.step % self.logging.log_every == 0 or step_in_epoch + 1 == num_steps:
                self._log(pending, timer)
                pending = []
                timer.reset()
            every = self.checkpointing.every_steps
            if every and self.state.step % every == 0:
                self._check_finite(pending)
                self._save()
            self._stop_if_requested(f"after step {self.state.step} (epoch {self.state.epoch + 1}, step "
                                    f"{step_in_epoch + 1}/{num_steps})", pending, timer)
        for _ in batches:  # the micro-batches that make no whole step: the loader moves on to the next epoch
            pass

    def _stop_if_requested(self, where: str, pending: list | None = None, timer: StepTimer | None = None) -> None:
        """When any rank received a stop signal: checkpoint here (all ranks), then raise StopRequested.
        During validation (`pending` None) last.pt already holds the epoch and its validation is redone."""
        name = self.stop.requested() if self.stop is not None else None  # collective
        if name is None:
            return
        if pending is not None:
            if pending:
                self._log(pending, timer)
            self._save()
        raise StopRequested(name, where)

    def optimizer_step(self, batches: Iterator, timer: StepTimer) -> torch.Tensor:
        """Forward/backward accum_steps micro-batches, then one optimizer step; returns the mean loss."""
        total = torch.zeros((), device=self.world.device)
        for index in range(self.accum_steps):
            start = time.perf_counter()
            batch = next(batches)
            timer.waited(time.perf_counter() - start)
            if self._shown_epoch != self.state.epoch:  # at the start of training and of each epoch
                self._shown_epoch = self.state.epoch
                self.metrics.clips("train/clips", self.state.step, batch, self.class_names)
            timer.clips += batch["clips"].shape[0]
            last = index == self.accum_steps - 1
            sync = contextlib.nullcontext() if last or not self.world.distributed else self.train_model.no_sync()
            with sync:
                loss = self._loss(batch["clips"], batch["label"])
                (loss / self.accum_steps).backward()
            total += loss.detach()
        if self.optim.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        timer.steps += 1
        return total / self.accum_steps

    def _loss(self, clips: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels
        if self.mixup is not None:
            clips, targets = self.mixup(clips, labels)  # targets: (B, classes) soft labels
        with autocast_context(self.world.device, self.precision):
            logits = self.train_model(clips)  # (B, classes)
        smoothing = 0.0 if self.mixup is not None else self.optim.label_smoothing  # mixup smooths its targets
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
                raise NonFiniteLossError(f"training loss is {value} at optimizer step {step} (epoch "
                                         f"{self.state.epoch + 1}); stopping. {self._divergence_advice()}")
        return values

    def _divergence_advice(self) -> str:
        """A command that works after a diverged loss: resume (lr and clipping may change on resume) or restart."""
        remedy = f"optim.lr={self.optim.lr / 10:g} (or optim.grad_clip=1.0)"
        if self.checkpointer.last_path.exists():
            return (f"The last good checkpoint ({self.checkpointer.last_path}) is untouched: rerun the same "
                    f"command with --resume {remedy}")
        return f"No checkpoint was written before it: rerun the same command with {remedy}"

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
        step_in_epoch = self.state.batch_in_epoch // self.accum_steps
        self.metrics.advance(step_in_epoch, status)
        line = (f"epoch {self.state.epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch} "
                f"(global {self.state.step}) {status}  data-wait {scalars['train/data_wait_frac']:.0%}  "
                f"step {scalars['train/step_time_s']:.3f}s")
        self.metrics.log(self.state.step, scalars, line)
