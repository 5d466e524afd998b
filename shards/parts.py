"""Packing one split on many machines: part I of N packs its own slice of the shuffled inputs.

The shuffled order (shards/build.py) is cut into N contiguous slices of nearly equal length; part I
packs positions [I*L//N, (I+1)*L//N) into shards named `<split>-partIIIIofNNNN-SSSSSS.tar` (with
their indexes), so parts never touch each other's files, and records what it did in
`<split>-partIIIIofNNNN.part.json`. The merge step concatenates the N records in part order, which
is the shuffled order: the merged manifest lists the samples in the order a single run packs them.
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """Part `index` (0-based) of `count`."""

    index: int
    count: int

    def __post_init__(self):
        if self.count < 1:
            raise ValueError(f"part {self.index}/{self.count}: the number of parts N must be at least 1")
        if not 0 <= self.index < self.count:
            raise ValueError(f"part {self.index}/{self.count}: the part number must be in 0..{self.count - 1}")
        if self.count > MAX_PARTS:
            raise ValueError(f"part {self.index}/{self.count}: at most {MAX_PARTS} parts")

    @classmethod
    def parse(cls, text: str) -> "Part":
        """'I/N' (I from 0, as SLURM's `--array=0-<N-1>` numbers its tasks) -> Part."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"--part {text!r}: expected I/N, e.g. 0/16 (parts are numbered 0..N-1)")
        return cls(int(match.group(1)), int(match.group(2)))

    def positions(self, total: int) -> tuple[int, int]:
        """The [start, stop) slice of the shuffled inputs this part packs."""
        return self.index * total // self.count, (self.index + 1) * total // self.count

    def stem(self, split: str) -> str:
        """The prefix of this part's files: `<split>-partIIIIofNNNN`."""
        return f"{split}-part{self.index:04d}of{self.count:04d}"

    def record_name(self, split: str) -> str:
        """The record a finished part writes: `<split>-partIIIIofNNNN.part.json`."""
        return f"{self.stem(split)}{RECORD_SUFFIX}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


MAX_PARTS = 9999  # four digits in the file names
RECORD_SUFFIX = ".part.json"


def parts_in(names: list[str], split: str) -> set[Part]:
    """The parts whose shards or records are among file `names` (of one directory), finished or not; lock
    files do not count (a run refused for a clash leaves one)."""
    pattern = re.compile(rf"{re.escape(split)}-part(\d{{4}})of(\d{{4}})(-\d{{6}}\.(tar|index\.json)|\.part\.json)")
    found = set()
    for name in names:
        if match := pattern.fullmatch(name):
            index, count = int(match.group(1)), int(match.group(2))
            if 0 <= index < count:
                found.add(Part(index, count))
    return found
