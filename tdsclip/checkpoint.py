"""Training checkpoints: atomic last.pt / best.pt holding everything an exact resume needs.

A checkpoint is one torch.save'd dict in this project's format (tdsclip.load_model reads its
model part): {"format": "tdsclip", "version": 1, "model_config", "model"} plus the trainer's
"optimizer", "schedule", "epoch", "step", "batch_in_epoch", "best_top1", "best_epoch",
"validation_due", "world_size", "rng" and "data" (per rank) and the resolved "config". Files are
written to a temporary name in the same directory and renamed, so a crash mid-write never leaves a
truncated last.pt; best.pt is a hard link to (or copy of) the last.pt it was.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from atomicfile import atomic_copy
from tdsclip.weights import FORMAT, CheckpointError, atomic_save, read_checkpoint_file


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


class Checkpointer:
    """Writes last.pt / best.pt into `directory` (rank 0 only) and finds what to resume from."""

    def __init__(self, directory: str | Path, *, rank: int = 0):
        self.directory = Path(directory)
        self.rank = rank

    @property
    def last_path(self) -> Path:
        return self.directory / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.directory / "best.pt"

    def save(self, checkpoint: dict, *, best: bool = False) -> None:
        """Write last.pt (and best.pt when `best`). Call on every rank; only rank 0 writes."""
        if self.rank != 0:
            return
        atomic_save(checkpoint, self.last_path)
        if best:  # the same bytes: link (or copy) last.pt rather than serializing the state again
            atomic_copy(self.last_path, self.best_path)

    def load_last(self) -> dict | None:
        """The last checkpoint, or None when the directory has none."""
        if not self.last_path.is_file():
            return None
        checkpoint = read_checkpoint_file(self.last_path)
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT or "optimizer" not in checkpoint:
            raise CheckpointError(f"{self.last_path} is not a resumable tdsclip training checkpoint "
                                  "(no format/optimizer keys); move it away or pick another output_dir")
        return checkpoint
