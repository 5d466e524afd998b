"""Training checkpoints, in one place: what goes into last.pt / best.pt, writing them (atomically, with a
checksum), reading and verifying them, and the rules a resume follows.

A checkpoint is one torch.save'd dict in this project's format (tdsclip.load_model reads its model part):
{"format": "tdsclip", "version": 1, "model_config", "model"} plus "optimizer", "schedule", the training
state ("epoch", "step", "batch_in_epoch", "best_top1", "best_epoch", "validation_due"), "world_size",
"rng" and "data" (one entry per rank), "data_fingerprint" (the training samples it was written on),
the resolved "config" and "checksum" (of everything else). Files are written to a temporary name and
renamed, so a crash mid-write never leaves a truncated last.pt; best.pt is a hard link to (or copy of)
the last.pt it was, and is repaired at the next start if a crash fell between the two.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from atomicfile import atomic_copy
from tdsclip.checkpoint_file import CheckpointError, read_checkpoint_file, write_checkpoint
from tdsclip.config import ConfigError, config_diff
from tdsclip.distributed import World, all_gather_objects
from tdsclip.weights import FORMAT, model_checkpoint

# Keys a resumed run may change: where data, outputs and weight files live (the checkpoint holds the
# weights), how the run reports, checkpoints and validates (data.val_split included), its length (the
# cosine then runs on to the new last epoch), the peak learning rate (the schedule is rescaled) and
# gradient clipping: the two remedies for a loss that diverged.
RESUME_MAY_CHANGE = ("output_dir", "compile", "model.clip_weights", "model.init_weights", "data.shards",
                     "data.val_split", "data.num_threads", "data.on_error", "data.eval_batch_size", "logging.",
                     "checkpoint.", "eval.", "schedule.epochs", "optim.lr", "optim.grad_clip", "cpu.")
# Keys a resume may change at an epoch boundary only: the per-device batch (memory) changes how a rank's
# share of an epoch is cut into micro-batches, which a mid-epoch position depends on, as on the world size.
BOUNDARY_MAY_CHANGE = ("data.max_device_batch_size",)
CONTRACT_KEYS = ("optimizer", "schedule", "epoch", "step", "batch_in_epoch", "best_top1", "best_epoch",
                 "world_size", "rng", "data", "config")


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def rng_state() -> dict:
    """Every random generator the training step touches, for an exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int, rank: int, step: int) -> None:
    """Seed every generator the training step touches from (seed, rank, step): a resume on another process
    layout draws new numbers rather than replaying those of the run's start."""
    state = np.random.SeedSequence([seed, rank, step]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def data_fingerprint(samples: list) -> str:
    """What identifies the training data for an exact resume: every sample's shard, key, label and frame
    count, in order (re-packed shards with the same number of videos read differently)."""
    digest = hashlib.blake2b(digest_size=16)
    for sample in samples:
        digest.update(f"{Path(sample.tar).name}\0{sample.key}\0{sample.label}\0{sample.num_frames}\n".encode())
    return digest.hexdigest()


class Checkpointer:
    """Owns last.pt / best.pt in `directory`: assembles a checkpoint from the stateful parts of a run,
    writes it (rank 0), reads and verifies it, and applies the resume rules."""

    def __init__(self, directory: str | Path, *, world: World | None = None):
        self.directory = Path(directory)
        self.world = world or World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    # --- content -------------------------------------------------------------------------------

    def collect(self, *, model: torch.nn.Module, optimizer: Stateful, schedule: Stateful, train_state: Stateful,
                loader: Stateful, fingerprint: str | None, config: dict) -> dict:
        """Everything an exact resume needs (every rank's RNG and data position). Collective: call on every rank."""
        checkpoint = model_checkpoint(model)
        checkpoint.update(optimizer=optimizer.state_dict(), schedule=schedule.state_dict(), **train_state.state_dict(),
                          world_size=self.world.world_size, rng=all_gather_objects(rng_state()),
                          data=all_gather_objects(loader.state_dict()), data_fingerprint=fingerprint, config=config)
        return checkpoint

    def restore(self, checkpoint: dict, *, model: torch.nn.Module, optimizer: Stateful, schedule: Stateful,
                train_state: Stateful, loader: Stateful, config: dict) -> list[str]:
        """Continue from `checkpoint` exactly where it was written; returns notes for the log."""
        notes = []
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        old_lr = checkpoint["config"].get("optim", {}).get("lr")
        new_lr = config.get("optim", {}).get("lr")
        if old_lr and new_lr and old_lr != new_lr:  # the cosine goes on from where it was, at the new peak
            schedule.base_lrs = [lr * new_lr / old_lr for lr in schedule.base_lrs]
            schedule.step(schedule.last_epoch)
            notes.append(f"learning rates scaled by {new_lr / old_lr:g} from here (optim.lr {old_lr:g} -> {new_lr:g})")
        train_state.load_state_dict(checkpoint)
        rank, world_size = self.world.rank, self.world.world_size
        if checkpoint["world_size"] == world_size:
            set_rng_state(checkpoint["rng"][rank])
            try:
                loader.load_state_dict(checkpoint["data"][rank])
            except ValueError as error:
                raise CheckpointError(f"{error}: the training data differ from the checkpoint's; resume on the "
                                      "same shards, or start a new run") from None
        else:  # another process layout: each rank's streams start afresh, from the seed and the step
            step, seed = checkpoint["step"], config.get("seed", 0)
            reseed(seed, rank, step)
            notes.append(f"world size changed ({checkpoint['world_size']} -> {world_size}); random streams start "
                         f"afresh from seed {seed} at step {step}")
        return notes

    # --- files ---------------------------------------------------------------------------------

    def save(self, checkpoint: dict, *, best: bool = False) -> None:
        """Write last.pt (and best.pt when `best`) with the content's checksum. Only rank 0 writes."""
        if self.world.rank != 0:
            return
        write_checkpoint(checkpoint, self.last_path)
        if best:  # the same bytes: link (or copy) last.pt rather than serializing the state again
            atomic_copy(self.last_path, self.best_path)

    def load_last(self) -> dict | None:
        """The last checkpoint, verified, or None when the directory has none."""
        if not self.last_path.is_file():
            return None
        checkpoint = read_checkpoint_file(self.last_path)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or "optimizer" not in checkpoint:
            raise CheckpointError(f"{self.last_path} is not a resumable tdsclip training checkpoint "
                                  "(no format/optimizer keys); move it away or pick another output_dir")
        missing = [key for key in CONTRACT_KEYS if key not in checkpoint]
        if missing:
            raise CheckpointError(f"{self.last_path} lacks {', '.join(missing)}: it cannot resume a run exactly; "
                                  f"start a new run from its weights with model.init_weights={self.last_path} "
                                  "output_dir=<a new directory>")
        return checkpoint

    def repair_best(self, checkpoint: dict) -> bool:
        """Make best.pt the best validated epoch again after a crash between writing last.pt and linking
        best.pt (last.pt then holds the best epoch, best.pt an older one or none). Rank 0; True if repaired."""
        holds_best = (checkpoint["best_epoch"] >= 0 and checkpoint["best_epoch"] == checkpoint["epoch"] - 1
                      and checkpoint["batch_in_epoch"] == 0 and not checkpoint.get("validation_due"))
        if self.world.rank != 0 or not holds_best or not checkpoint["config"].get("checkpoint", {}).get("save_best", True):
            return False
        if self.best_path.is_file() and (os.path.samefile(self.best_path, self.last_path)
                                         or _epoch_of(self.best_path) == checkpoint["epoch"]):
            return False
        atomic_copy(self.last_path, self.best_path)
        return True

    def check_resume(self, checkpoint: dict, config: dict) -> list[str]:
        """Refuse to resume with a config that changes the run or with another process count mid-epoch;
        return the allowed changes, "key: old -> new"."""
        changes = {key: f"{key}: {old!r} -> {new!r}" for key, (old, new) in config_diff(checkpoint["config"], config).items()}
        at_boundary = not checkpoint["batch_in_epoch"]
        refused = [text + (" (at an epoch boundary only)" if key.startswith(BOUNDARY_MAY_CHANGE) else "")
                   for key, text in changes.items()
                   if not key.startswith(RESUME_MAY_CHANGE) and not (at_boundary and key.startswith(BOUNDARY_MAY_CHANGE))]
        if refused:
            raise ConfigError(f"--resume: the config differs from the one {self.last_path} was trained with: "
                              f"{'; '.join(refused)}. Resume with the same settings, or start a new run with "
                              "output_dir=...")
        if checkpoint["batch_in_epoch"] and checkpoint["world_size"] != self.world.world_size:
            raise CheckpointError(f"the checkpoint was written mid-epoch by {checkpoint['world_size']} processes and "
                                  f"this run has {self.world.world_size}: resume with the same command and process "
                                  "count (torchrun --nproc_per_node=... --nnodes=...)")
        return list(changes.values())

    def check_data(self, checkpoint: dict, fingerprint: str, num_videos: int) -> str | None:
        """Refuse a mid-epoch resume on other training data (the rest of the epoch would read another order);
        at an epoch boundary return a note and go on."""
        saved = checkpoint.get("data_fingerprint")
        saved_videos = checkpoint["data"][0].get("num_videos")
        if (saved is None or saved == fingerprint) and saved_videos == num_videos:
            return None
        what = f"{saved_videos} videos" if saved_videos != num_videos else "the same number of videos, packed differently"
        if checkpoint["batch_in_epoch"]:
            raise CheckpointError(f"{self.last_path} was written mid-epoch on other training data ({what}; now "
                                  f"{num_videos}): resume on the same shards, or start a new run")
        return f"note: the training data changed since {self.last_path} ({what}; now {num_videos}); the next epoch uses it"


def _epoch_of(path: Path) -> int | None:
    """The epoch a checkpoint file was written at, read without loading its tensors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("epoch")
    except Exception:  # unreadable: repair_best replaces it
        return None
