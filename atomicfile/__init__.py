"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Used by every stage that writes something a later run reads: shard indexes and manifests, configs,
checkpoints, test results. Torch-free, so the shard tools stay light.

The content goes to a temporary file in the same directory, is flushed to disk, then renamed over
the target (atomic on POSIX), and the directory is synced so the rename itself survives a power
loss. A failure mid-write leaves the old file and no temporary behind.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(file)` on a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Make `path` hold what `source` holds now, atomically: a hard link where the file system allows
    one (no bytes copied; safe because every write here replaces files rather than changing them),
    a copy otherwise."""
    source, path = Path(source), Path(path)
    tmp = path.with_name(f".{path.name}.link{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network or FAT file systems)
        def copy(f: BinaryIO) -> None:
            with source.open("rb") as src:
                shutil.copyfileobj(src, f)
        atomic_write(path, copy)
        return
    try:
        os.replace(tmp, path)
        sync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sync_directory(directory: Path) -> None:
    """fsync a directory, so that renames into it are on disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
