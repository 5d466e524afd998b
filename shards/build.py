"""Packing a whole split: shuffle, encode in worker processes, fill shards in order, resume after a stop.

The sources are shuffled with a fixed seed and consumed in that order; a shard is closed as soon as
it reaches `shard_size` bytes. Encoding is deterministic (see shards/encode.py), so the shard
boundaries and bytes depend only on the inputs and options, never on `workers` or on interruptions.
Each finished shard's index records a fingerprint of the run and the range of shuffled positions it
consumed (with the inputs rejected there); a rerun keeps the finished prefix and continues after it.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import random
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from shards import format as fmt
from shards import lock
from shards.encode import EncodeOptions, encode_source
from shards.manifest import Manifest, Rejection, ShardRecord, write_json_atomic
from shards.sources import Source
from shards.workers import Result, ordered_results
from shards.writer import ShardWriter


class BuildError(RuntimeError):
    """The output directory holds shards this run cannot continue; the message says what to do."""


class Interrupted(KeyboardInterrupt):
    """Packing stopped by Ctrl-C (or a caller's KeyboardInterrupt); says what a rerun keeps."""

    def __init__(self, shards: int, inputs: int, total: int):
        super().__init__(f"{shards} finished shards kept ({inputs} of {total} inputs)")
        self.shards, self.inputs, self.total = shards, inputs, total


def tool_version() -> str:
    """The installed tdsclip version, recorded in every manifest."""
    try:
        return f"tdsclip {metadata.version('tdsclip')}"
    except metadata.PackageNotFoundError:
        return "tdsclip (not installed)"


def shuffled(sources: list[Source], seed: int) -> list[Source]:
    """The order samples are packed in: a fixed-seed shuffle, so every shard mixes classes."""
    order = list(sources)
    random.Random(seed).shuffle(order)
    return order


def fingerprint(sources: list[Source], options: EncodeOptions, split: str, shard_size: int, seed: int) -> str:
    """A digest of everything that decides the shards' bytes (not `workers`, not --root)."""
    spec = {"format": fmt.FORMAT_VERSION, "split": split, "shard_size": shard_size, "seed": seed,
            "options": dataclasses.asdict(options), "sources": [dataclasses.astuple(s) for s in sources]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass
class _Resume:
    records: list[ShardRecord]
    rejected: list[Rejection]
    position: int  # the next shuffled position to encode


def _finished_shards(out: Path, split: str, digest: str) -> _Resume:
    """The finished prefix of shards written by this same run; refuses shards of another run."""
    indexes = {}
    for path in sorted(out.glob(f"{split}-*{fmt.INDEX_SUFFIX}")):
        try:
            data = json.loads(path.read_text())
            build = data["build"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BuildError(f"{path}: not an index written by tools/make_shards.py; remove the {split}-* files "
                             f"from {out} or choose another --out") from None
        if build.get("fingerprint") != digest:
            raise BuildError(f"{path}: written by a different run (other list, options, seed or shard size); "
                             f"remove the {split}-* files from {out} or choose another --out")
        indexes[path.name] = (data, build)
    resume = _Resume(records=[], rejected=[], position=0)
    for shard in range(len(indexes)):
        data, build = indexes.get(fmt.index_name(split, shard), (None, None))
        tar = out / fmt.tar_name(split, shard)
        if data is None or build.get("start") != resume.position or not tar.is_file() \
                or tar.stat().st_size != build.get("bytes"):
            break
        resume.records.append(ShardRecord(tar=tar.name, index=fmt.index_name(split, shard),
                                          num_samples=len(data["samples"]), bytes=build["bytes"],
                                          sha256=build["sha256"]))
        resume.rejected += [Rejection(**r) for r in build["rejected"]]
        resume.position = build["stop"]
    return resume


def build_split(sources: list[Source], root: str | os.PathLike, out: str | os.PathLike, classes: list[str],
                options: EncodeOptions, *, split: str = "train", shard_size: int = 1 << 30, seed: int = 0,
                workers: int = 1, on_start: Callable[[int, int], None] | None = None,
                on_result: Callable[[Result], None] | None = None) -> Manifest:
    """Pack `sources` into `<out>/<split>-NNNNNN.tar` shards and write `<out>/<split>.manifest.json`.

    Resumes a run that stopped. For progress, `on_start` gets the number of inputs an earlier run already
    did and how many of those it rejected, and `on_result` is called once per input encoded now.
    Returns the manifest, identical to that of an uninterrupted run. Raises `lock.OutputLocked` while
    another process writes this split into `out`, and `Interrupted` on a KeyboardInterrupt.
    """
    if not fmt.SPLIT_PATTERN.match(split):
        raise ValueError(f"split {split!r} must match {fmt.SPLIT_PATTERN.pattern}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be > 0 bytes, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with lock.exclusive(out, split):
        return _build_locked(sources, Path(root), out, classes, options, split, shard_size, seed, workers,
                             on_start, on_result)


def _build_locked(sources: list[Source], root: Path, out: Path, classes: list[str], options: EncodeOptions,
                  split: str, shard_size: int, seed: int, workers: int,
                  on_start: Callable[[int, int], None] | None,
                  on_result: Callable[[Result], None] | None) -> Manifest:
    order = shuffled(sources, seed)
    digest = fingerprint(sources, options, split, shard_size, seed)
    resume = _finished_shards(out, split, digest)
    for temp in [*out.glob(f"{split}-*{fmt.TEMP_SUFFIX}"), *out.glob(f".{split}[.-]*.tmp*")]:
        temp.unlink()  # left by an interrupted run: a tar, or an index or manifest (atomicfile)
    records, rejected = list(resume.records), list(resume.rejected)
    if on_start is not None:
        on_start(resume.position, len(resume.rejected))
    if resume.position < len(order):
        (out / fmt.manifest_name(split)).unlink(missing_ok=True)
        encode = partial(encode_source, root=root, options=options)
        # closing: an exception here stops the workers at once, not when the generator is collected
        with contextlib.closing(ordered_results(order[resume.position:], encode, workers)) as results:
            try:
                per_shard = _fill_shards(order, resume.position, len(records), results, out, split, shard_size,
                                         digest, records, on_result)
            except KeyboardInterrupt:
                kept = _finished_shards(out, split, digest)
                raise Interrupted(len(kept.records), kept.position, len(order)) from None
        rejected += [r for shard_rejections in per_shard for r in shard_rejections]
    manifest = Manifest(split=split, layout=options.layout, encoding=options.encoding(), classes=classes,
                        num_samples=sum(r.num_samples for r in records), shards=records, rejected=rejected,
                        tool_version=tool_version(),
                        build={"seed": seed, "shard_size": shard_size, "fingerprint": digest,
                               "num_inputs": len(sources)},
                        directory=out)
    write_json_atomic(out / fmt.manifest_name(split), manifest.to_json())
    return manifest


def _fill_shards(order: list[Source], position: int, shard: int, results: Iterable[Result], out: Path, split: str,
                 shard_size: int, digest: str, records: list[ShardRecord],
                 on_result: Callable[[Result], None] | None) -> list[list[Rejection]]:
    """Write results into consecutive shards, appending their records; returns the rejections per shard
    (the last list holds rejections after the last shard, which no index records)."""
    writer, start, pending, per_shard = None, position, [], []
    try:
        for position, result in enumerate(results, position):
            if isinstance(result, Rejection):
                pending.append(result)
            else:
                writer = writer or ShardWriter(out, split, shard)
                writer.add(result)
            if on_result is not None:
                on_result(result)
            if writer is not None and (writer.size >= shard_size or position == len(order) - 1):
                build = {"fingerprint": digest, "start": start, "stop": position + 1,
                         "rejected": [dataclasses.asdict(r) for r in pending]}
                records.append(writer.close(build))
                per_shard.append(pending)
                writer, start, pending, shard = None, position + 1, [], shard + 1
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return per_shard + [pending]
