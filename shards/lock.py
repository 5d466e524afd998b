"""One writer per split in an output directory: an exclusive lock held while packing.

Two make_shards runs writing the same split into one directory would race on the same shard names
(one crashed, the other's files survived by luck). Each run takes `flock` on `.<name>.lock` in the
output directory for its whole life and writes its host and pid into the file, so a second run is
refused at once with a message naming the holder. The kernel releases the lock when its holder dies,
even by kill -9, so a lock is never stale; the small file stays (removing it would let two runs lock
two different files of one name).
"""

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator


class OutputLocked(RuntimeError):
    """Another process holds the lock; the message names it and says what to do."""


def lock_path(directory: str | os.PathLike, name: str) -> Path:
    """The lock file of `name` (a split, or a part of one) in `directory`."""
    return Path(directory) / f".{name}.lock"


@contextlib.contextmanager
def exclusive(directory: str | os.PathLike, name: str) -> Iterator[None]:
    """Hold the lock on `name` in `directory` meanwhile; raises OutputLocked if another process holds it."""
    path = lock_path(directory, name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a process that just started"
            raise OutputLocked(f"{directory}: another tools/make_shards.py ({holder}) is writing {name} there; "
                               f"wait for it to finish or stop it, then rerun (its finished shards are kept)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_locked(directory: str | os.PathLike, name: str) -> bool:
    """Whether a process holds the lock on `name` now (a lock file that nobody holds does not count)."""
    path = lock_path(directory, name)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
