"""The manifest and the per-shard index: schema as dataclasses, reading with validation, atomic writing.

Every error names the file and the key at fault and says what to do, so a damaged or foreign shard
directory fails at load time rather than deep inside a data pipeline.
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shards import format as fmt
from atomicfile import atomic_write_text


class ShardFormatError(ValueError):
    """A manifest or index does not follow docs/shard_format.md; the message names file and key."""


@dataclass(frozen=True)
class Rejection:
    """An input that was not packed, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class ShardRecord:
    """One shard as the manifest lists it; `tar` and `index` are names relative to the manifest."""

    tar: str
    index: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """`<split>.manifest.json`; `directory` (not stored) is where it was read from."""

    split: str
    layout: str
    encoding: dict[str, Any]
    classes: list[str]
    num_samples: int
    shards: list[ShardRecord]
    rejected: list[Rejection]
    tool_version: str
    build: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None

    def tar_paths(self) -> list[Path]:
        """Absolute paths of the shard tars, in shard order."""
        return [self._dir() / s.tar for s in self.shards]

    def index_paths(self) -> list[Path]:
        """Absolute paths of the shard indexes, in shard order."""
        return [self._dir() / s.index for s in self.shards]

    def _dir(self) -> Path:
        return self.directory if self.directory is not None else Path(".")

    def to_json(self) -> dict[str, Any]:
        """The stored form (docs/shard_format.md)."""
        return {"format": fmt.MANIFEST_FORMAT, "version": fmt.FORMAT_VERSION, "tool_version": self.tool_version,
                "split": self.split, "layout": self.layout, "encoding": self.encoding, "classes": self.classes,
                "num_samples": self.num_samples, "shards": [asdict(s) for s in self.shards],
                "rejected": [asdict(r) for r in self.rejected], "build": self.build}


@dataclass(frozen=True)
class IndexEntry:
    """One sample of a shard index. `tar` is the absolute path of its shard.

    `video` is the (offset, size) of the `.webm` data (layout video); `frames` the (offset, size) of every
    frame's JPEG data, frame i of the source at position i (layout frames).
    """

    tar: Path
    key: str
    label: int
    num_frames: int
    fps: float
    width: int
    height: int
    layout: str
    video: tuple[int, int] | None = None
    frames: list[tuple[int, int]] | None = None
    source_width: int | None = None  # the decoded source's size; None (older shards): as stored
    source_height: int | None = None
    source: str | None = None  # the input it was packed from, as the list names it; None in older indexes

    def to_json(self) -> dict[str, Any]:
        """The stored form; `tar` is kept once per index, not per entry."""
        entry = {"key": self.key, "label": self.label, "num_frames": self.num_frames, "fps": self.fps,
                 "width": self.width, "height": self.height, "layout": self.layout}
        if self.source_width is not None:
            entry["source_width"], entry["source_height"] = self.source_width, self.source_height
        if self.source is not None:
            entry["source"] = self.source
        if self.layout == "video":
            entry["video"] = list(self.video)
        else:
            entry["frames"] = [list(r) for r in self.frames]
        return entry


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write compact JSON atomically (atomicfile): readers see all or nothing."""
    atomic_write_text(path, json.dumps(obj, separators=(",", ":")))


def _load(path: Path, kind: str, expected_format: str, hint: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} not found; {hint}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"{path}: unreadable {kind} ({error}); {hint}") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardFormatError(f"{path}: not a {expected_format} file (format={got!r})")
    if data.get("version") != fmt.FORMAT_VERSION:
        raise ShardFormatError(f"{path}: version {data.get('version')!r} is not {fmt.FORMAT_VERSION}; "
                               f"rewrite the shards with this tools/make_shards.py")
    return data


def _get(data: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in data:
        raise ShardFormatError(f"{where}: missing key {key!r}")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ShardFormatError(f"{where}: key {key!r} should be {kind}, got {value!r}")
    return value


def _layout(data: dict, where: str) -> str:
    layout = _get(data, "layout", str, where)
    if layout not in fmt.LAYOUTS:
        raise ShardFormatError(f"{where}: key 'layout' is {layout!r}, not one of {fmt.LAYOUTS}")
    return layout


def read_manifest(directory: str | os.PathLike, split: str, check_files: bool = True) -> Manifest:
    """Read and validate `<directory>/<split>.manifest.json`.

    With check_files, every listed tar and index must exist and each tar must have its listed size.
    """
    directory = Path(directory)
    path = directory / fmt.manifest_name(split)
    hint = f"write it with tools/make_shards.py LIST --out {directory} --split {split}"
    found = sorted(p.name[:-len(fmt.manifest_name(""))] for p in directory.glob(fmt.manifest_name("*")))
    if found and not path.is_file():
        hint = f"this directory has the splits {', '.join(found)}; or {hint}"
    data = _load(path, "manifest", fmt.MANIFEST_FORMAT, hint)
    where = str(path)
    if _get(data, "split", str, where) != split:
        raise ShardFormatError(f"{where}: key 'split' is {data['split']!r}, expected {split!r}")
    layout = _layout(data, where)
    shards = []
    for i, s in enumerate(_get(data, "shards", list, where)):
        at = f"{where}: shards[{i}]"
        if not isinstance(s, dict):
            raise ShardFormatError(f"{at}: should be an object")
        shards.append(ShardRecord(tar=_get(s, "tar", str, at), index=_get(s, "index", str, at),
                                  num_samples=_get(s, "num_samples", int, at), bytes=_get(s, "bytes", int, at),
                                  sha256=_get(s, "sha256", str, at)))
    num_samples = _get(data, "num_samples", int, where)
    if num_samples != sum(s.num_samples for s in shards):
        raise ShardFormatError(f"{where}: num_samples={num_samples} but the shards hold "
                               f"{sum(s.num_samples for s in shards)}")
    rejected = [Rejection(source=str(r.get("source")), reason=str(r.get("reason")))
                for r in _get(data, "rejected", list, where)]
    manifest = Manifest(split=split, layout=layout, encoding=_get(data, "encoding", dict, where),
                        classes=[str(c) for c in _get(data, "classes", list, where)], num_samples=num_samples,
                        shards=shards, rejected=rejected, tool_version=str(data.get("tool_version", "")),
                        build=data.get("build", {}), directory=directory)
    if check_files:
        for record, tar, index in zip(shards, manifest.tar_paths(), manifest.index_paths()):
            if not tar.is_file():
                raise FileNotFoundError(f"{tar}: shard listed in {path} not found; rerun tools/make_shards.py")
            if tar.stat().st_size != record.bytes:
                raise ShardFormatError(f"{tar}: {tar.stat().st_size} bytes, but {path} lists {record.bytes}; "
                                       f"the shard is damaged or from another run; rerun tools/make_shards.py")
            if not index.is_file():
                raise FileNotFoundError(f"{index}: index listed in {path} not found; rerun tools/make_shards.py")
    return manifest


def _range(value: Any, at: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, int) for v in value)
            or value[0] < 0 or value[1] < 0):
        raise ShardFormatError(f"{at}: should be [offset, size] of non-negative ints, got {value!r}")
    return value[0], value[1]


def _entry(tar: Path, e: Any, at: str) -> IndexEntry:
    if not isinstance(e, dict):
        raise ShardFormatError(f"{at}: should be an object")
    layout = _layout(e, at)
    num_frames = _get(e, "num_frames", int, at)
    if num_frames < 1:
        raise ShardFormatError(f"{at}: num_frames must be >= 1, got {num_frames}")
    video, frames = None, None
    if layout == "video":
        video = _range(_get(e, "video", list, at), f"{at}.video")
    else:
        raw = _get(e, "frames", list, at)
        if len(raw) != num_frames:
            raise ShardFormatError(f"{at}: {len(raw)} frame ranges for num_frames={num_frames}")
        frames = [_range(r, f"{at}.frames[{i}]") for i, r in enumerate(raw)]
    source = {}
    if "source_width" in e or "source_height" in e:  # written since 2026-11-26; older indexes lack them
        source = {key: _get(e, key, int, at) for key in ("source_width", "source_height")}
        if min(source.values()) < 1:
            raise ShardFormatError(f"{at}: source_width and source_height must be >= 1, got {source}")
    if "source" in e:  # written since 2026-12-04
        source["source"] = _get(e, "source", str, at)
    return IndexEntry(tar=tar, key=_get(e, "key", str, at), label=_get(e, "label", int, at), num_frames=num_frames,
                      fps=float(_get(e, "fps", (int, float), at)), width=_get(e, "width", int, at),
                      height=_get(e, "height", int, at), layout=layout, video=video, frames=frames, **source)


def read_index(path: str | os.PathLike) -> list[IndexEntry]:
    """Read and validate a shard index `<split>-NNNNNN.index.json`; entries carry the absolute tar path."""
    path = Path(path)
    data = _load(path, "shard index", fmt.INDEX_FORMAT, "rerun tools/make_shards.py to rewrite the shard")
    tar = (path.parent / _get(data, "tar", str, str(path))).resolve()
    return [_entry(tar, e, f"{path}: samples[{i}]") for i, e in enumerate(_get(data, "samples", list, str(path)))]


def read_member_bytes(tar_path: str | os.PathLike, offset: int, size: int) -> bytes:
    """The `size` bytes at `offset` of a tar (a member's data, as an index gives it), by one pread."""
    fd = os.open(tar_path, os.O_RDONLY)
    try:
        return _pread_exact(fd, offset, size, tar_path)
    finally:
        os.close(fd)


def read_frames(entry: IndexEntry, frames: list[int]) -> list[bytes]:
    """The JPEG bytes of the given frames (0-based) of a layout-frames sample; the tar is opened once."""
    if entry.layout != "frames":
        raise ValueError(f"{entry.tar}: sample {entry.key!r} has layout {entry.layout!r}, not 'frames'")
    outside = [i for i in frames if not 0 <= i < len(entry.frames)]
    if outside:
        raise IndexError(f"{entry.tar}: sample {entry.key!r} has frames 0..{len(entry.frames) - 1}; asked for {outside}")
    fd = os.open(entry.tar, os.O_RDONLY)
    try:
        return [_pread_exact(fd, *entry.frames[i], entry.tar) for i in frames]
    finally:
        os.close(fd)


def read_video(entry: IndexEntry) -> bytes:
    """The `.webm` bytes of a layout-video sample."""
    if entry.layout != "video":
        raise ValueError(f"{entry.tar}: sample {entry.key!r} has layout {entry.layout!r}, not 'video'")
    return read_member_bytes(entry.tar, *entry.video)


def _pread_exact(fd: int, offset: int, size: int, name: Any) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ShardFormatError(f"{name}: {size} bytes wanted at offset {offset}, {len(data)} there; "
                               f"the tar is truncated; rerun tools/make_shards.py")
    return data
