"""Input lists, in the two annotation formats of the TDS-CLIP README, and the class-name CSV.

- raw videos, one per line: `<video path relative to --root> <label>`;
- frame folders, one per line: `<folder relative to --root> <number of frames> <label>`, frames
  numbered from 1 and named by an image template such as `img_{:05d}.jpg`.
A list is one format or the other; it is told apart by its lines (three fields, the middle an int).
"""

import csv
import hashlib
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from shards import format as fmt

IMAGE_TMPL = "img_{:05d}.jpg"  # frame file names in the official frame folders, numbered from 1


def check_image_tmpl(tmpl: str) -> None:
    """Raise ValueError unless `tmpl` names frame i as `tmpl.format(i)`, a different file for each i."""
    try:
        first, second = tmpl.format(1), tmpl.format(2)
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"image_tmpl {tmpl!r} must format one frame number, e.g. img_{{:05d}}.jpg ({error})") from None
    if first == second:
        raise ValueError(f"image_tmpl {tmpl!r} has no frame-number field: every frame would be {first!r}; "
                         f"use e.g. img_{{:05d}}.jpg")


class ListFormatError(ValueError):
    """A malformed list or labels file; the message names file and line."""


@dataclass(frozen=True)
class Source:
    """One input: a video file (`num_frames` None) or a frame folder of `num_frames` frames."""

    key: str
    path: str  # relative to --root, as written in the list
    label: int
    num_frames: int | None = None

    @property
    def is_frame_folder(self) -> bool:
        return self.num_frames is not None


def _is_int(text: str) -> bool:
    return re.fullmatch(r"[+-]?\d+", text) is not None


def _detect_frame_folders(lines: list[tuple[int, str]]) -> bool:
    """A list is of frame folders when most lines end in two integers after a path (by majority, so
    that one malformed line is reported as such rather than turning the list into one of videos)."""
    def folder_like(line: str) -> bool:
        parts = line.rsplit(None, 2)
        return len(parts) == 3 and _is_int(parts[1]) and _is_int(parts[2])
    return 2 * sum(folder_like(line) for _, line in lines) > len(lines)


def make_key(path: str, used: set[str], strip_extension: bool = True) -> str:
    """A webdataset key from a relative path: `[A-Za-z0-9_-]`, at most MAX_KEY_LENGTH, unique in `used`."""
    stem = os.path.splitext(path)[0] if strip_extension else path
    key = re.sub(f"[^{fmt.KEY_CHARS}]+", "_", stem).strip("_") or "sample"
    if len(key) > fmt.MAX_KEY_LENGTH or key in used:
        digest = hashlib.sha1(path.encode()).hexdigest()[:10]
        key = f"{key[: fmt.MAX_KEY_LENGTH - 11]}_{digest}"
        n = 1
        while key in used:
            key = f"{key[: fmt.MAX_KEY_LENGTH - 11 - len(str(n))]}_{digest}{n}"
            n += 1
    used.add(key)
    return key


def read_list(path: str | os.PathLike) -> list[Source]:
    """Parse a list file of either format; blank lines and `#` comments are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: list file not found")
    text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is not part of a path
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line and not line.startswith("#")]
    if not lines:
        raise ListFormatError(f"{path}: the list is empty")
    folders = _detect_frame_folders(lines)
    sources, used, first_line = [], set(), {}
    for n, line in lines:
        parts = line.rsplit(None, 2 if folders else 1)
        if len(parts) != (3 if folders else 2) or not all(map(_is_int, parts[1:])):
            raise ListFormatError(f"{path}:{n}: expected '<video path> <label>' or "
                                  f"'<frame folder> <num frames> <label>', got {line!r}")
        label = int(parts[-1])
        if label < 0:
            raise ListFormatError(f"{path}:{n}: label {label} is negative")
        num_frames = int(parts[1]) if folders else None
        if parts[0] in first_line:
            raise ListFormatError(f"{path}:{n}: {parts[0]!r} is listed twice (first on line {first_line[parts[0]]}); "
                                  f"remove one")
        first_line[parts[0]] = n
        key = make_key(parts[0], used, strip_extension=not folders)
        sources.append(Source(key=key, path=parts[0], label=label, num_frames=num_frames))
    return sources


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from an `id,name` CSV (the official lists/*.csv); a header row is allowed.

    Ids must be exactly 0..N-1; the result is indexed by id.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: labels CSV not found")
    names: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's byte-order mark
        for n, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < 2:
                raise ListFormatError(f"{path}:{n}: expected 'id,name', got {row!r}")
            if not _is_int(row[0].strip()):
                if n == 1:
                    continue  # header
                raise ListFormatError(f"{path}:{n}: id {row[0]!r} is not an integer")
            class_id = int(row[0])
            if class_id < 0:
                raise ListFormatError(f"{path}:{n}: id {class_id} is negative")
            if class_id in names:
                raise ListFormatError(f"{path}:{n}: id {class_id} appears twice")
            names[class_id] = ",".join(row[1:]).strip()
    top = max(names, default=-1)
    missing = list(itertools.islice((i for i in range(top + 1) if i not in names), 11))  # no 1e9-long list
    if missing:
        raise ListFormatError(f"{path}: ids must run from 0 without gaps (the highest is {top}); missing: "
                              f"{', '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}")
    return [names[i] for i in range(len(names))]


def class_names(sources: list[Source], labels: list[str] | None, list_path: str) -> list[str]:
    """The manifest's classes: the CSV names (every label must be in range) or the label numbers."""
    top = max(s.label for s in sources)
    if labels is None:
        distinct = len({s.label for s in sources})
        if top >= 10 * max(distinct, 100):  # e.g. one mistyped label would make a million classes
            raise ListFormatError(f"{list_path}: {distinct} distinct labels reach {top}, which would make "
                                  f"{top + 1} classes; check the labels or give --labels CSV")
        return [str(i) for i in range(top + 1)]
    if top >= len(labels):
        bad = next(s for s in sources if s.label >= len(labels))
        raise ListFormatError(f"{list_path}: label {bad.label} of {bad.path!r} is outside the "
                              f"{len(labels)} classes of the labels CSV")
    return labels
