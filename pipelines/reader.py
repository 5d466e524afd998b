"""Reading samples out of shards: the per-shard index, and byte ranges by `os.pread`.

A clip needs 40 of a video's frames; with `frames` shards each frame is its own JPEG member
whose byte range the shard index gives, so a reader fetches exactly those 40 JPEGs and never
scans the tar. With `video` shards it fetches the one `.webm` member.
"""

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LAYOUTS = ("frames", "video")


class ShardReadError(RuntimeError):
    """A sample could not be read or decoded; the message names the shard and the key."""


@dataclass(frozen=True)
class Sample:
    """One video of a shard, as its index describes it."""

    tar: str
    key: str
    label: int
    num_frames: int
    height: int
    width: int
    layout: str
    ranges: np.ndarray  # (num_frames, 2) int64 [offset, size] per frame; video: (1, 2)


def shard_paths(shards: str | os.PathLike | list, split: str) -> list[str]:
    """Tar paths of `split`: from `<dir>/<split>.manifest.json`, or `shards` itself when it is a list."""
    if isinstance(shards, (list, tuple)):
        if not shards:
            raise ValueError("shards: the list of tar paths is empty")
        return [str(p) for p in shards]
    directory = Path(shards)
    manifest_path = directory / f"{split}.manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no manifest for split {split!r}; write the shards with "
                                f"tools/make_shards.py --split {split}, or pass a list of tar paths")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != "tdsclip-shards":
        raise ValueError(f"{manifest_path}: not a tdsclip shard manifest (format={manifest.get('format')!r})")
    return [str(directory / entry["tar"]) for entry in manifest["shards"]]


def index_path(tar: str) -> str:
    """The index written beside a tar: `<split>-NNNNNN.tar` -> `<split>-NNNNNN.index.json`."""
    if not tar.endswith(".tar"):
        raise ValueError(f"{tar}: a shard path must end with .tar")
    return tar[: -len(".tar")] + ".index.json"


def read_samples(tars: list[str]) -> list[Sample]:
    """Every sample of the given shards, in shard order, read from the per-shard indexes."""
    samples = []
    for tar in tars:
        path = index_path(tar)
        if not os.path.isfile(tar):
            raise FileNotFoundError(f"{tar}: shard not found")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: index of shard {tar} not found; rewrite the shard with tools/make_shards.py")
        index = json.loads(Path(path).read_text())
        if index.get("format") != "tdsclip-shard-index":
            raise ValueError(f"{path}: not a tdsclip shard index (format={index.get('format')!r})")
        for entry in index["samples"]:
            samples.append(_sample(tar, path, entry))
    if not samples:
        raise ValueError(f"no samples in shards {tars[:3]}{'...' if len(tars) > 3 else ''}")
    layouts = {s.layout for s in samples}
    if len(layouts) > 1:
        raise ValueError(f"shards mix layouts {sorted(layouts)}; use one layout per split")
    return samples


def _sample(tar: str, path: str, entry: dict) -> Sample:
    key = entry.get("key", "?")
    try:
        layout = entry["layout"]
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
        ranges = np.asarray(entry["frames"] if layout == "frames" else [entry["video"]], dtype=np.int64)
        if layout == "frames" and ranges.shape != (entry["num_frames"], 2):
            raise ValueError(f"{len(ranges)} frame ranges for num_frames={entry['num_frames']}")
        if entry["num_frames"] < 1:
            raise ValueError("num_frames must be >= 1")
        return Sample(tar=tar, key=key, label=int(entry["label"]), num_frames=int(entry["num_frames"]),
                      height=int(entry["height"]), width=int(entry["width"]), layout=layout, ranges=ranges)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: sample {key!r}: bad index entry ({error!r})") from None


class ShardFiles:
    """Open file descriptors of shards, opened on first use (one set per process)."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def pread(self, tar: str, key: str, offset: int, size: int) -> np.ndarray:
        """Bytes [offset, offset+size) of `tar` as a uint8 array; errors name the shard and key."""
        try:
            fd = self._fds.get(tar)
            if fd is None:
                fd = self._fds[tar] = os.open(tar, os.O_RDONLY)
            data = os.pread(fd, int(size), int(offset))
        except OSError as error:
            raise ShardReadError(f"{tar}: sample {key!r}: read failed ({error})") from None
        if len(data) != size:
            raise ShardReadError(f"{tar}: sample {key!r}: short read at byte {offset} "
                                 f"({len(data)} of {size} bytes); the shard is truncated")
        return np.frombuffer(data, dtype=np.uint8)

    def __getstate__(self):  # file descriptors do not travel to worker processes
        return {"_fds": {}}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def check_sample(files: ShardFiles, sample: Sample, frames: np.ndarray) -> None:
    """Read and decode `frames` of `sample` in Python; raise ShardReadError naming shard and key if that fails.

    Only used after DALI reported a failure, to find which sample of the batch was bad.
    """
    from PIL import Image

    try:
        if sample.layout == "frames":
            for frame in np.unique(frames):
                offset, size = sample.ranges[frame]
                Image.open(io.BytesIO(files.pread(sample.tar, sample.key, offset, size).tobytes())).load()
        else:
            import av

            offset, size = sample.ranges[0]
            data = files.pread(sample.tar, sample.key, offset, size).tobytes()
            with av.open(io.BytesIO(data)) as container:
                decoded = sum(1 for _ in container.decode(video=0))
            if decoded <= int(np.max(frames)):
                raise ValueError(f"{decoded} frames decoded, frame {int(np.max(frames))} needed")
    except ShardReadError:
        raise
    except Exception as error:  # any decoder failure means the sample is bad
        raise ShardReadError(f"{sample.tar}: sample {sample.key!r}: decode failed ({error})") from None
