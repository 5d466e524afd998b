"""A run directory (output_dir) that one run writes at a time.

The run holds an exclusive lock on `output_dir/.lock` for its whole life: a second run into the same
directory is refused with the holder's host and pid. The kernel drops the lock when its process dies
(also on kill -9), so the next run takes a dead run's lock over without anyone deleting a file. While
holding it, the run removes the temporary files an earlier run left when it was killed mid-write.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
from pathlib import Path

LOCK_NAME = ".lock"
# atomicfile's temporaries: ".<name>.tmp<pid>" (writes) and ".<name>.link<pid>" (links)
LEFTOVER = re.compile(r"^\..+\.(tmp|link)\d+$")


class RunDirError(RuntimeError):
    """output_dir cannot be used: a file is in the way, or another run holds it."""


class RunDirLock:
    """The exclusive lock of one run directory; `acquire()` creates the directory."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._fd: int | None = None
        self._created = False

    @property
    def path(self) -> Path:
        return self.directory / LOCK_NAME

    def acquire(self) -> None:
        self._created = not self.directory.exists()
        make_directory(self.directory)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunDirError(f"output_dir {self.directory}: cannot create its lock file ({error.strerror or error}); "
                              "set output_dir=... to a directory you may write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(f"{self.directory} is in use by another run ({holder}): wait for it to end, or set "
                              "output_dir=... to write elsewhere") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Drop the lock; a directory this run created and left empty (it failed at start) goes too."""
        if self._fd is None:
            return
        if self._created and [p.name for p in self.directory.iterdir()] == [LOCK_NAME]:
            self.path.unlink()
            self.directory.rmdir()
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def make_directory(directory: Path) -> None:
    """mkdir -p, with one clear error when a file stands where a directory should be."""
    for parent in (directory, *directory.parents):
        if parent.exists() and not parent.is_dir():
            raise RunDirError(f"output_dir {directory}: {parent} is a file, not a directory; set output_dir=...")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # read-only file system, no permission, ...
        raise RunDirError(f"output_dir {directory} cannot be created: {error.strerror or error}; "
                          "set output_dir=... to a directory you may write") from None


def remove_leftovers(directory: str | Path) -> list[str]:
    """Delete the temporaries of writes that a killed run left in `directory`; returns their names.
    Only call while holding the directory's lock (no other writer)."""
    removed = []
    for path in Path(directory).iterdir():
        if LEFTOVER.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return sorted(removed)
