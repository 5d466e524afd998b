"""Reading samples out of shards: the per-shard index, and byte ranges by `os.pread`.

A clip needs 40 of a video's frames; with `frames` shards each frame is its own JPEG member
whose byte range the shard index gives, so a reader fetches exactly those 40 JPEGs and never
scans the tar. With `video` shards it fetches the one `.webm` member.
"""

import dataclasses
import io
import os
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shards import format as fmt
from shards.manifest import Manifest, ShardFormatError, read_index, read_manifest


class ShardReadError(RuntimeError):
    """A sample could not be read or decoded; the message names the shard and the key."""


@dataclass(frozen=True)
class Sample:
    """One video of a shard, as its index describes it."""

    tar: str
    key: str
    label: int
    num_frames: int
    height: int  # as stored
    width: int
    layout: str
    ranges: np.ndarray  # (num_frames, 2) [offset, size] per frame (uint32, int64 past 4 GiB); video: (1, 2)
    source_height: int  # the source's size, whose official scaling the crop windows refer to
    source_width: int
    source: str | None = None  # the input it was packed from (None in older indexes)


def shard_paths(shards: str | os.PathLike | list, split: str) -> list[str]:
    """Tar paths of `split`: from `<dir>/<split>.manifest.json` (validated), or `shards` itself when a list."""
    if isinstance(shards, (list, tuple)):
        if not shards:
            raise ValueError("shards: the list of tar paths is empty")
        return [str(p) for p in shards]
    return [str(p) for p in read_split(shards, split).tar_paths()]


def read_split(directory: str | os.PathLike, split: str) -> Manifest:
    """`<directory>/<split>.manifest.json`, validated (its shards exist at their listed sizes), with samples."""
    if os.path.isfile(directory):
        raise ShardFormatError(f"{directory} is a file: give the shard directory (with <split>.manifest.json) "
                               f"or a list of tar paths")
    manifest = read_manifest(directory, split)
    if not manifest.num_samples:
        raise ShardFormatError(f"{Path(directory) / fmt.manifest_name(split)}: the {split} split has no samples "
                               f"({len(manifest.rejected)} inputs were rejected when it was packed)")
    return manifest


def read_samples(tars: list[str]) -> list[Sample]:
    """Every sample of the given shards, in shard order, from the per-shard indexes (validated by shards/)."""
    samples = []
    for tar in tars:
        if not os.path.isfile(tar):
            raise FileNotFoundError(f"{tar}: shard not found")
        for entry in read_index(fmt.index_beside(tar)):
            ranges = entry.frames if entry.layout == "frames" else [entry.video]
            ranges = np.asarray(ranges, dtype=np.int64)
            if ranges.max() < 2**32:  # half the memory: an index of all K400 frames is ~0.6 GB, not 1.2
                ranges = ranges.astype(np.uint32)
            samples.append(Sample(tar=str(entry.tar), key=entry.key, label=entry.label,
                                  num_frames=entry.num_frames, height=entry.height, width=entry.width,
                                  layout=entry.layout, ranges=ranges,
                                  source_height=entry.height if entry.source_height is None else entry.source_height,
                                  source_width=entry.width if entry.source_width is None else entry.source_width,
                                  source=entry.source))
    if not samples:
        raise ValueError(f"no samples in shards {tars[:3]}{'...' if len(tars) > 3 else ''}")
    layouts = {s.layout for s in samples}
    if len(layouts) > 1:
        raise ValueError(f"shards mix layouts {sorted(layouts)}; use one layout per split")
    return samples


class SharedRanges:
    """The byte ranges of all samples in one .npy file (in /dev/shm where it exists) that reader
    processes map instead of each unpickling a copy: the index of all Kinetics-400 frames is ~0.6 GB.

    Pickles as (path, starts); the file is deleted when the owning (parent-process) object goes,
    and files left by processes that died without cleaning up are deleted by the next one made.
    """

    def __init__(self, samples: list[Sample]):
        self.starts = np.concatenate([[0], np.cumsum([len(s.ranges) for s in samples])]).astype(np.int64)
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        _remove_orphans(directory)
        fd, self.path = tempfile.mkstemp(prefix=f"tdsclip-ranges-{os.getpid()}-", suffix=".npy", dir=directory)
        with os.fdopen(fd, "wb") as file:
            np.save(file, np.concatenate([s.ranges for s in samples]))
        self._finalizer = weakref.finalize(self, os.unlink, self.path)

    def __getstate__(self):
        return {"path": self.path, "starts": self.starts}

    def __setstate__(self, state):
        self.path, self.starts, self._finalizer = state["path"], state["starts"], None

    def strip(self, samples: list[Sample]) -> list[Sample]:
        """The samples without their ranges (what travels to a worker)."""
        empty = np.zeros((0, 2), np.uint32)
        return [dataclasses.replace(s, ranges=empty) for s in samples]

    def attach(self, samples: list[Sample]) -> list[Sample]:
        """The samples with their ranges mapped from the file (in a worker)."""
        table = np.load(self.path, mmap_mode="r")
        return [dataclasses.replace(s, ranges=table[a:b]) for s, a, b in zip(samples, self.starts, self.starts[1:])]


def _remove_orphans(directory: str) -> None:
    """Delete range files whose creating process no longer runs (killed before its cleanup)."""
    if not os.path.isdir("/proc/self"):  # no way to tell live processes from dead ones
        return
    for name in os.listdir(directory):
        parts = name.split("-")
        if name.startswith("tdsclip-ranges-") and len(parts) > 3 and parts[2].isdigit():
            if not os.path.exists(f"/proc/{parts[2]}"):
                try:
                    os.unlink(os.path.join(directory, name))
                except OSError:
                    pass


class ShardFiles:
    """Open file descriptors of shards, opened on first use (one set per process)."""

    def __init__(self):
        self._fds: dict[str, int] = {}

    def pread(self, tar: str, key: str, offset: int, size: int) -> np.ndarray:
        """Bytes [offset, offset+size) of `tar` as a new uint8 array; errors name the shard and key."""
        data = np.empty(int(size), np.uint8)
        self.pread_into(tar, key, offset, data)
        return data

    def pread_into(self, tar: str, key: str, offset: int, out: np.ndarray) -> None:
        """Fill the uint8 array `out` with the bytes of `tar` from `offset` on; errors name the shard and key."""
        try:
            fd = self._fds.get(tar)
            if fd is None:
                fd = self._fds[tar] = os.open(tar, os.O_RDONLY)
            count = os.preadv(fd, [out], int(offset))
        except OSError as error:
            raise ShardReadError(f"{tar}: sample {key!r}: read failed ({error})") from None
        if count != len(out):
            raise ShardReadError(f"{tar}: sample {key!r}: short read at byte {offset} "
                                 f"({count} of {len(out)} bytes); the shard is truncated")

    def __getstate__(self):  # file descriptors do not travel to worker processes
        return {"_fds": {}}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


_STANDALONE_MARKERS = np.array([0x01, *range(0xD0, 0xD8)])  # TEM, RST0-7: no length field
_SOF_MARKERS = np.array([m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC)])  # not DHT, JPG, DAC
MAX_HEADER_STEPS = 256  # marker steps before SOS; real headers take ~10, damaged ones (fill-byte runs) many


def jpeg_headers_ok(buffer: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per frame buffer[start:start + size]: whether it opens with SOI and a chain of marker segments
    that reaches the start of scan (SOS) after a frame header (SOFn), within MAX_HEADER_STEPS."""
    return _walk_headers(buffer, starts, sizes)[0]


def _walk_headers(buffer: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(header ok (N,) bool, where each frame's scan data starts (N,) int64: just past its SOS segment).

    All frames are walked in lockstep, one segment per step, so a batch costs ~10 numpy steps (a
    header has ~10 segments), not a Python loop per frame. Reads never leave a frame's bytes.
    """
    starts, sizes = np.asarray(starts, np.int64), np.asarray(sizes, np.int64)
    ends = starts + sizes
    ok, has_frame, alive = np.zeros(len(starts), bool), np.zeros(len(starts), bool), sizes >= 4
    scan_start = ends.copy()
    index = np.flatnonzero(alive)
    alive[index] = (buffer[starts[index]] == 0xFF) & (buffer[starts[index] + 1] == 0xD8)
    at = starts + 2
    for _ in range(MAX_HEADER_STEPS):
        index = np.flatnonzero(alive)
        if not index.size:
            break
        pos = at[index]
        inside = pos + 4 <= ends[index]
        pos = np.where(inside, pos, starts[index])  # in-frame indices for the lanes that stop here
        marker = buffer[pos + 1]
        valid = inside & (buffer[pos] == 0xFF) & ~np.isin(marker, (0x00, 0xD8, 0xD9))
        scan = valid & (marker == 0xDA)
        ok[index[scan]] = has_frame[index[scan]]
        has_frame[index] |= valid & np.isin(marker, _SOF_MARKERS)
        length = buffer[pos + 2].astype(np.int64) << 8 | buffer[pos + 3]
        step = np.where(marker == 0xFF, 1, np.where(np.isin(marker, _STANDALONE_MARKERS), 2, 2 + length))
        at[index] = pos + step
        scan_start[index[scan]] = at[index[scan]]
        alive[index] = valid & ~scan
    return ok, scan_start


JPEG_OK, JPEG_BAD_HEADER, JPEG_BAD_END = 0, 1, 2
JPEG_PROBLEMS = {JPEG_BAD_HEADER: "is not a JPEG (its header is damaged)",
                 JPEG_BAD_END: "is damaged past its header (no scan data ending in the end-of-image marker: "
                               "cut short or overwritten)"}


def jpeg_problems(buffer: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Per frame buffer[start:start + size]: JPEG_OK, JPEG_BAD_HEADER (see jpeg_headers_ok) or JPEG_BAD_END
    (no end-of-image marker FF D9 after at least one byte of scan data).

    The end matters because decoders do not fail on a JPEG cut short or zeroed past its header:
    libjpeg warns (naming no sample) and fills the missing rows with grey. Scan data cannot hold
    FF D9 (an FF there is followed by 00 or a restart marker), so an EOI after the scan start is the
    image's end. Frames whose last two bytes are EOI pass in numpy; only the rare others (bytes
    trailing the EOI, or damage) are searched, one bytes.find each. Damage inside the scan data
    that keeps the EOI is not found here (it decodes to wrong pixels, as with any JPEG reader).
    """
    starts, sizes = np.asarray(starts, np.int64), np.asarray(sizes, np.int64)
    ends = starts + sizes
    header_ok, scan_start = _walk_headers(buffer, starts, sizes)
    problems = np.where(header_ok, JPEG_OK, JPEG_BAD_HEADER).astype(np.int8)
    last = np.where(header_ok, ends - 2, starts)  # in-frame indices (a good header is > 4 bytes)
    ends_in_eoi = header_ok & (buffer[last] == 0xFF) & (buffer[last + 1] == 0xD9) & (scan_start < ends - 2)
    for i in np.flatnonzero(header_ok & ~ends_in_eoi):
        eoi = buffer[scan_start[i]:ends[i]].tobytes().find(b"\xff\xd9")
        if eoi < 1:  # none, or no scan data before it
            problems[i] = JPEG_BAD_END
    return problems


def check_sample(files: ShardFiles, sample: Sample, frames: np.ndarray) -> None:
    """Read and decode `frames` of `sample` in Python; raise ShardReadError naming shard and key if that fails.

    Only used after DALI reported a failure, to find which sample of the batch was bad.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        if sample.layout == "frames":
            for frame in np.unique(frames):
                offset, size = sample.ranges[frame]
                data = files.pread(sample.tar, sample.key, offset, size)
                problem = int(jpeg_problems(data, [0], [len(data)])[0])  # what the source refuses to give DALI
                if problem != JPEG_OK:
                    raise ValueError(f"frame {int(frame)} ({int(size)} bytes) {JPEG_PROBLEMS[problem]}")
                try:
                    Image.open(io.BytesIO(data.tobytes())).load()
                except UnidentifiedImageError:
                    raise ValueError(f"frame {int(frame)} ({int(size)} bytes) is not an image") from None
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
