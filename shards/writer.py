"""Writing one shard: a ustar tar in webdataset layout plus its byte-range index, both atomically.

The tar and the index are written under temporary names; the tar is renamed first and the index last,
so a shard whose index exists is complete. Tar headers carry fixed owner, mode and mtime, so the same
samples always give the same bytes (reruns can be checked by checksum).
"""

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

from shards import format as fmt
from atomicfile import sync_directory
from shards.encode import EncodedSample
from shards.manifest import IndexEntry, ShardRecord, write_json_atomic


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Appends samples to `<split>-NNNNNN.tar` (temporary until `close`) and records every member's range.

    `build` is stored in the index as writer bookkeeping (see shards/build.py); readers ignore it.
    """

    def __init__(self, directory: str | os.PathLike, split: str, shard: int):
        self.directory = Path(directory)
        self.tar_path = self.directory / fmt.tar_name(split, shard)
        self.index_path = self.directory / fmt.index_name(split, shard)
        self._temp = self.tar_path.with_name(self.tar_path.name + fmt.TEMP_SUFFIX)
        self._file = open(self._temp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.entries: list[IndexEntry] = []

    @property
    def size(self) -> int:
        """Bytes written so far (before the end-of-archive blocks)."""
        return self._tar.offset

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        """Append one member; returns the (offset, size) of its data in the tar."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
        offset = self._tar.offset + len(header)
        self._tar.addfile(info, io.BytesIO(data))
        return offset, len(data)

    def add(self, sample: EncodedSample) -> None:
        """Append a sample: `<key>.json`, then `<key>.webm` or `<key>.NNNNNN.jpg` per frame."""
        meta = sample.meta
        key = meta["key"]
        self._add(fmt.meta_member(key), _json_bytes(meta))
        video, frames = None, None
        if meta["layout"] == "video":
            video = self._add(fmt.video_member(key), sample.video)
        else:
            frames = [self._add(fmt.frame_member(key, i), data) for i, data in enumerate(sample.frames)]
        self.entries.append(IndexEntry(tar=self.tar_path, key=key, label=meta["label"],
                                       num_frames=meta["num_frames"], fps=meta["fps"], width=meta["width"],
                                       height=meta["height"], layout=meta["layout"], video=video, frames=frames,
                                       source_width=meta.get("source_width"),
                                       source_height=meta.get("source_height"), source=meta.get("source")))

    def close(self, build: dict[str, Any]) -> ShardRecord:
        """Finish the tar, rename it into place, then write the index; returns the manifest record."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temp, self.tar_path)  # the tar streams to a temporary file: no atomic_write callback
        sync_directory(self.tar_path.parent)
        record = ShardRecord(tar=self.tar_path.name, index=self.index_path.name, num_samples=len(self.entries),
                             bytes=self.tar_path.stat().st_size, sha256=file_sha256(self.tar_path))
        index = {"format": fmt.INDEX_FORMAT, "version": fmt.FORMAT_VERSION, "tar": self.tar_path.name,
                 "samples": [e.to_json() for e in self.entries],
                 "build": {**build, "bytes": record.bytes, "sha256": record.sha256}}
        write_json_atomic(self.index_path, index)
        return record

    def abort(self) -> None:
        """Drop the unfinished tar."""
        self._file.close()
        self._temp.unlink(missing_ok=True)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
