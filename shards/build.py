"""Packing a whole split: shuffle, encode in worker processes, fill shards in order, resume after a stop.

The sources are shuffled with a fixed seed and consumed in that order; a shard is closed as soon as
it reaches `shard_size` bytes. Encoding is deterministic (see shards/encode.py), so the shard
boundaries and bytes depend only on the inputs and options, never on `workers` or on interruptions.
Each finished shard's index records a fingerprint of the run and the range of shuffled positions it
consumed (with the inputs rejected there); a rerun keeps the finished prefix and continues after it.

On many machines, `part=Part(I, N)` packs only the I-th slice of the shuffled order, into files of its
own (shards/parts.py), and `merge_parts` then writes the split's manifest from the N parts' records:
the same samples, keys, bytes per sample and order as a single run, with shard boundaries also at the
N-1 slice ends (a single run's shards can straddle them).
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable

from shards import format as fmt
from shards import lock
from shards.encode import EncodeOptions, encode_source
from shards.manifest import Manifest, Rejection, ShardRecord, write_json_atomic
from shards.parts import RECORD_SUFFIX, Part, parts_in
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


@dataclasses.dataclass(frozen=True)
class _Job:
    """What one run writes: shards `<stem>-NNNNNN` into `out` from shuffled positions [start, stop)."""

    out: Path
    split: str
    stem: str  # the split, or a part's `<split>-partIIIIofNNNN`
    digest: str  # fingerprint() of the whole split: the same for every part
    start: int
    stop: int
    shard_size: int


@dataclasses.dataclass
class _Resume:
    records: list[ShardRecord]
    rejected: list[Rejection]
    position: int  # the next shuffled position to encode


def _finished_shards(job: _Job) -> _Resume:
    """The finished prefix of shards written by this same run; refuses shards of another run."""
    own = re.compile(rf"{re.escape(job.stem)}-\d{{6}}{re.escape(fmt.INDEX_SUFFIX)}")
    indexes = {}
    for path in sorted(p for p in job.out.iterdir() if own.fullmatch(p.name)):
        try:
            data = json.loads(path.read_text())
            build = data["build"]
        except (OSError, ValueError, KeyError, TypeError):
            raise BuildError(f"{path}: not an index written by tools/make_shards.py; remove the {job.stem}-* files "
                             f"from {job.out} or choose another --out") from None
        if build.get("fingerprint") != job.digest:
            raise BuildError(f"{path}: written by a different run (other list, options, seed or shard size); "
                             f"remove the {job.stem}-* files from {job.out} or choose another --out")
        indexes[path.name] = (data, build)
    resume = _Resume(records=[], rejected=[], position=job.start)
    for shard in range(len(indexes)):
        data, build = indexes.get(fmt.index_name(job.stem, shard), (None, None))
        tar = job.out / fmt.tar_name(job.stem, shard)
        if data is None or build.get("start") != resume.position or not tar.is_file() \
                or tar.stat().st_size != build.get("bytes"):
            break
        resume.records.append(ShardRecord(tar=tar.name, index=fmt.index_name(job.stem, shard),
                                          num_samples=len(data["samples"]), bytes=build["bytes"],
                                          sha256=build["sha256"]))
        resume.rejected += [Rejection(**r) for r in build["rejected"]]
        resume.position = build["stop"]
    return resume


def _refuse_other_layouts(out: Path, split: str, part: Part | None) -> None:
    """A split is packed by one run or by parts of one count, never a mix (their manifests would clash)."""
    names = [p.name for p in out.iterdir()]
    parts = parts_in(names, split)
    single = any(re.fullmatch(rf"{re.escape(split)}-\d{{6}}{re.escape(fmt.INDEX_SUFFIX)}", n) for n in names)
    if part is None and parts:
        raise BuildError(f"{out} holds shards of --part runs of the {split} split (parts of {parts.pop().count}); "
                         f"finish them and --merge, or remove the {split}-part* files, or choose another --out")
    if part is not None and single:
        raise BuildError(f"{out} holds shards of a single run of the {split} split; remove the {split}-* files "
                         f"or choose another --out for a --part run")
    if part is not None and (other := {p.count for p in parts} - {part.count}):
        raise BuildError(f"{out} holds parts of {other.pop()} of the {split} split, not of {part.count}; use "
                         f"that count, or remove the {split}-part* files, or choose another --out")


def _remove_temporaries(job: _Job) -> None:
    """Remove what an interrupted run of this stem left: a tar, or an index, manifest or record (atomicfile)."""
    stem = re.escape(job.stem)
    ours = re.compile(rf"{stem}-\d{{6}}{re.escape(fmt.TAR_SUFFIX + fmt.TEMP_SUFFIX)}"
                      rf"|\.{stem}(-\d{{6}}{re.escape(fmt.INDEX_SUFFIX)}|\.manifest\.json|{re.escape(RECORD_SUFFIX)})"
                      rf"\.tmp\d+")
    for path in job.out.iterdir():
        if ours.fullmatch(path.name):
            path.unlink()


def build_split(sources: list[Source], root: str | os.PathLike, out: str | os.PathLike, classes: list[str],
                options: EncodeOptions, *, split: str = "train", shard_size: int = 1 << 30, seed: int = 0,
                workers: int = 1, part: Part | None = None, on_start: Callable[[int, int, int], None] | None = None,
                on_result: Callable[[Result], None] | None = None) -> Manifest:
    """Pack `sources` into `<out>/<split>-NNNNNN.tar` shards and write `<out>/<split>.manifest.json`.

    With `part`, pack only that part's slice of the shuffled inputs into the part's own files and write
    its record instead of the manifest (merge_parts writes the manifest once every part is done); the
    returned manifest then describes the part.
    Resumes a run that stopped. For progress, `on_start` gets the number of inputs an earlier run already
    did, how many of those it rejected, and the number this run packs in all; `on_result` is called once
    per input encoded now. Returns the manifest, identical to that of an uninterrupted run. Raises
    `lock.OutputLocked` while another process writes the same files, and `Interrupted` on a KeyboardInterrupt.
    """
    if not fmt.SPLIT_PATTERN.match(split):
        raise ValueError(f"split {split!r} must match {fmt.SPLIT_PATTERN.pattern}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be > 0 bytes, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start, stop = part.positions(len(sources)) if part else (0, len(sources))
    job = _Job(out=out, split=split, stem=part.stem(split) if part else split, start=start, stop=stop,
               digest=fingerprint(sources, options, split, shard_size, seed), shard_size=shard_size)
    with lock.exclusive(out, job.stem):
        _refuse_other_layouts(out, split, part)
        records, rejected = _pack(job, shuffled(sources, seed), Path(root), options, workers, on_start, on_result)
    manifest = Manifest(split=split, layout=options.layout, encoding=options.encoding(), classes=classes,
                        num_samples=sum(r.num_samples for r in records), shards=records, rejected=rejected,
                        tool_version=tool_version(), build=_build_info(seed, shard_size, job.digest, len(sources)),
                        directory=out)
    if part is None:
        write_json_atomic(out / fmt.manifest_name(split), manifest.to_json())
    else:
        manifest.build.update(part=[part.index, part.count], start=start, stop=stop)
        write_json_atomic(out / part.record_name(split), manifest.to_json())
    return manifest


def _build_info(seed: int, shard_size: int, digest: str, num_inputs: int) -> dict:
    return {"seed": seed, "shard_size": shard_size, "fingerprint": digest, "num_inputs": num_inputs}


def _pack(job: _Job, order: list[Source], root: Path, options: EncodeOptions, workers: int,
          on_start: Callable[[int, int, int], None] | None,
          on_result: Callable[[Result], None] | None) -> tuple[list[ShardRecord], list[Rejection]]:
    """Resume or start the job; returns the records of all its shards and all its rejections."""
    resume = _finished_shards(job)
    _remove_temporaries(job)
    records, rejected = list(resume.records), list(resume.rejected)
    if on_start is not None:
        on_start(resume.position - job.start, len(resume.rejected), job.stop - job.start)
    if resume.position < job.stop:
        (job.out / fmt.manifest_name(job.split)).unlink(missing_ok=True)  # the split changes: merge again
        if job.stem != job.split:
            (job.out / f"{job.stem}{RECORD_SUFFIX}").unlink(missing_ok=True)
        encode = partial(encode_source, root=root, options=options)
        # closing: an exception here stops the workers at once, not when the generator is collected
        with contextlib.closing(ordered_results(order[resume.position:job.stop], encode, workers)) as results:
            try:
                per_shard = _fill_shards(job, resume.position, len(records), results, records, on_result)
            except KeyboardInterrupt:
                kept = _finished_shards(job)
                raise Interrupted(len(kept.records), kept.position - job.start, job.stop - job.start) from None
        rejected += [r for shard_rejections in per_shard for r in shard_rejections]
    return records, rejected


def _fill_shards(job: _Job, position: int, shard: int, results: Iterable[Result], records: list[ShardRecord],
                 on_result: Callable[[Result], None] | None) -> list[list[Rejection]]:
    """Write results into consecutive shards, appending their records; returns the rejections per shard
    (the last list holds rejections after the last shard, which no index records)."""
    writer, start, pending, per_shard = None, position, [], []
    try:
        for position, result in enumerate(results, position):
            if isinstance(result, Rejection):
                pending.append(result)
            else:
                writer = writer or ShardWriter(job.out, job.stem, shard)
                writer.add(result)
            if on_result is not None:
                on_result(result)
            if writer is not None and (writer.size >= job.shard_size or position == job.stop - 1):
                build = {"fingerprint": job.digest, "start": start, "stop": position + 1,
                         "rejected": [dataclasses.asdict(r) for r in pending]}
                records.append(writer.close(build))
                per_shard.append(pending)
                writer, start, pending, shard = None, position + 1, [], shard + 1
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return per_shard + [pending]


def merge_parts(sources: list[Source], out: str | os.PathLike, classes: list[str], options: EncodeOptions, *,
                split: str = "train", shard_size: int = 1 << 30, seed: int = 0) -> Manifest:
    """Write `<out>/<split>.manifest.json` from the records of the N finished parts of the same run (same
    sources and options as given here), in part order. Refuses while a part is missing or still running."""
    out = Path(out)
    digest = fingerprint(sources, options, split, shard_size, seed)
    with lock.exclusive(out, split):
        parts = _all_parts(out, split)
        shards, rejected = [], []
        for part in parts:  # part order is the shuffled order: the samples come in a single run's order
            part_shards, part_rejected = _part_record(out, split, part, digest)
            shards += part_shards
            rejected += part_rejected
        manifest = Manifest(split=split, layout=options.layout, encoding=options.encoding(), classes=classes,
                            num_samples=sum(s.num_samples for s in shards), shards=shards, rejected=rejected,
                            tool_version=tool_version(),
                            build={**_build_info(seed, shard_size, digest, len(sources)), "parts": len(parts)},
                            directory=out)
        write_json_atomic(out / fmt.manifest_name(split), manifest.to_json())
    return manifest


def _names(out: Path) -> list[str]:
    if not out.is_dir():
        raise BuildError(f"--out {out} is not a directory; run the --part runs into it first")
    return [p.name for p in out.iterdir()]


def _all_parts(out: Path, split: str) -> list[Part]:
    """Parts 0..N-1 of the split in `out`; every one must be finished and none running."""
    counts = {p.count for p in parts_in(_names(out), split)}
    if len(counts) != 1:
        raise BuildError(f"{out} holds parts of the {split} split of {len(counts)} different counts "
                         f"({', '.join(map(str, sorted(counts)))}); remove those of the wrong count, then merge"
                         if counts else f"{out} holds no parts of the {split} split; run the --part I/N runs first")
    count = counts.pop()
    every = [Part(i, count) for i in range(count)]
    running = [p for p in every if lock.is_locked(out, p.stem(split))]
    if running:
        raise BuildError(f"{out}: part {running[0]} of the {split} split is still running; merge when it has finished")
    missing = [p for p in every if not (out / p.record_name(split)).is_file()]
    if missing:
        listed = ", ".join(str(p) for p in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise BuildError(f"{out}: {len(missing)} of the {count} parts of the {split} split are not finished "
                         f"({listed}); run (or rerun) those --part runs, then merge")
    return every


def _part_record(out: Path, split: str, part: Part, digest: str) -> tuple[list[ShardRecord], list[Rejection]]:
    """A finished part's record, checked to belong to this run and to list shards that are there."""
    path = out / part.record_name(split)
    try:
        data = json.loads(path.read_text())
        build, shards = data["build"], [ShardRecord(**s) for s in data["shards"]]
        rejected = [Rejection(**r) for r in data["rejected"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise BuildError(f"{path}: not a part record of tools/make_shards.py; rerun --part {part}") from None
    if build.get("fingerprint") != digest or build.get("part") != [part.index, part.count]:
        raise BuildError(f"{path}: written by a different run (other list, options, seed or shard size); "
                         f"merge with the options of the --part runs, or rerun --part {part}")
    for shard in shards:
        tar = out / shard.tar
        if not tar.is_file() or tar.stat().st_size != shard.bytes or not (out / shard.index).is_file():
            raise BuildError(f"{tar}: missing or damaged (listed in {path.name}); rerun --part {part}, then merge")
    return shards, rejected
