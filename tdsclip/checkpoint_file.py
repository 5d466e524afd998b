"""Checkpoint files on disk: written atomically with a checksum of their content, read back and verified.

Both kinds of file this project writes go through here: training checkpoints (tdsclip/checkpoint.py)
and model files (tdsclip/weights.py). The checksum covers the content (keys, tensor bytes, values),
computed alike before writing and after reading, so any flipped byte that still unpickles is caught;
files written before checksums existed, and official files, carry none and load as they are.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomicfile import atomic_write

CHECKSUM_KEY = "checksum"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, damaged, or does not match the model or run."""


def payload_checksum(obj: Any) -> str:
    """A digest of a checkpoint's content: the same for the dict saved and the dict loaded back."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach().cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, np.ndarray):
        digest.update(f"A{obj.dtype}{obj.shape}".encode())
        digest.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        digest.update(b"{")
        for key, value in obj.items():
            digest.update(repr(key).encode())
            _feed(digest, value)
        digest.update(b"}")
    elif isinstance(obj, (list, tuple)):
        digest.update(b"[")
        for value in obj:
            _feed(digest, value)
        digest.update(b"]")
    else:
        digest.update(f"{type(obj).__name__}:{obj!r}".encode())


def write_checkpoint(obj: Any, path: str | Path, *, checksum: bool = True) -> None:
    """torch.save `obj` (a dict) to `path` atomically, with its checksum unless `checksum` is False (files in
    another project's layout). A failed write (disk full, I/O error) is one error naming the file and the
    free space; the previous file is kept."""
    path = Path(path)
    if checksum:
        obj = {**obj, CHECKSUM_KEY: payload_checksum(obj)}
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as error:
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        full = getattr(error, "errno", None) == errno.ENOSPC or free < 64 * 2**20  # torch.save's own error names no errno
        cause = "no space left on the device" if full else f"{type(error).__name__}: {error}"
        kept = f"; the previous {path.name} is kept" if path.exists() else ""
        raise CheckpointError(f"cannot write {path}: {cause} ({free / 2**30:.2f} GiB free in {path.parent}){kept}. "
                              "Free space (or set output_dir=...), then resume") from None


def read_checkpoint_file(path: str | Path) -> object:
    """torch.load a checkpoint onto the CPU and verify its checksum; a missing, unreadable or damaged file
    raises an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # Checkpoints carry trainer state (RNG, config) as well as tensors; load only files you trust.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError or pickle errors for bad files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {first_line} (the file is truncated or not a "
                              f"torch checkpoint); {way_out(path)}") from e
    if isinstance(checkpoint, dict) and CHECKSUM_KEY in checkpoint:
        saved = checkpoint.pop(CHECKSUM_KEY)
        if payload_checksum(checkpoint) != saved:
            raise CheckpointError(f"{path} is damaged: its content does not match the checksum written with it "
                                  f"(a disk or copy error); {way_out(path)}")
    return checkpoint


def way_out(path: Path) -> str:
    """What to use instead of an unusable last.pt / best.pt: the other one, when it is another file (best.pt is
    often a hard link to last.pt, and then damaged alike)."""
    others = {"last.pt": "best.pt", "best.pt": "last.pt"}
    other = path.with_name(others[path.name]) if path.name in others else None
    if other is not None and other.is_file() and not os.path.samefile(other, path):
        if path.name == "last.pt":
            return f"to resume from {other.name} instead: cp {other} {path}, then rerun with --resume"
        return f"use {other} instead"
    return "restore it from a copy, or start a new run"
