"""Pack a video dataset into webdataset tar shards that DALI decodes on GPU and CPU.

    python tools/make_shards.py LIST --root DIR --out DIR [--split train] [--labels CSV]
        [--layout frames|video] [--short-side 256] [--quality 95 | --crf 32 --gop 32 --speed 6
        --deadline good|realtime] [--shard-size 1GB] [--workers N] [--seed 0]
        [--image-tmpl img_{:05d}.jpg --fps 30] [--strict] [--part I/N | --merge]

LIST holds raw videos (`<path> <label>`) or frame folders (`<folder> <num frames> <label>`), paths
relative to --root. Writes OUT/<split>-NNNNNN.tar + .index.json and OUT/<split>.manifest.json
(docs/shard_format.md). Inputs that cannot be packed are listed in the manifest and summarized; the run
goes on (--strict: exit status 1 if any). Rerunning an interrupted command keeps its finished shards.

On many machines: run the same command with --part 0/N, ..., --part N-1/N (a SLURM array, any
scheduler; all into one --out), then once with --merge instead of --part to write the manifest.
"""

import argparse
import os
import re
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from shards import format as fmt
from shards.build import BuildError, Interrupted, build_split, merge_parts
from shards.encode import EncodedSample, EncodeOptions
from shards.lock import OutputLocked
from shards.manifest import Manifest
from shards.parts import Part
from shards.sources import ListFormatError, class_names, read_labels, read_list

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if unset or "default" in help:
            return help
        return f"{help} (default: %(default)s)"


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64MiB' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1GB, 500MB, 64MiB or 1000000")
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return size


def parse_part(text: str) -> Part:
    """'I/N' -> Part, for argparse."""
    try:
        return Part.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = EncodeOptions()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("list", type=Path, help="list file: '<video> <label>' or '<folder> <num frames> <label>' lines")
    p.add_argument("--root", type=Path, required=True, help="directory the list's paths are relative to")
    p.add_argument("--out", type=Path, required=True, help="output directory for shards and manifest")
    p.add_argument("--split", default="train", help="split name: file prefix and manifest name")
    p.add_argument("--labels", type=Path, help="CSV of 'id,name' rows; class names for the manifest")
    p.add_argument("--layout", choices=fmt.LAYOUTS, default=defaults.layout,
                   help=f"one JPEG per frame or one VP9 WebM per video (default {defaults.layout}; docs/shards.md)")
    p.add_argument("--short-side", type=int, default=defaults.short_side,
                   help=f"resize so the short side is this many pixels, 0 keeps the size (default "
                        f"{defaults.short_side}; frame-folder JPEGs in layout frames are stored as they are)")
    p.add_argument("--quality", type=int, default=defaults.quality, help="JPEG quality, layout frames")
    p.add_argument("--crf", type=int, default=defaults.crf, help="VP9 constant quality 0-63, layout video")
    p.add_argument("--gop", type=int, default=defaults.gop, help="VP9 keyframe interval, layout video")
    p.add_argument("--speed", type=int, default=defaults.speed, help="libvpx cpu-used 0-8, layout video")
    p.add_argument("--deadline", choices=["good", "realtime"], default=defaults.deadline,
                   help="libvpx deadline, layout video: realtime encodes ~6x faster into ~40%% more bytes")
    p.add_argument("--image-tmpl", default=defaults.image_tmpl, help="frame file names in frame folders, from 1")
    p.add_argument("--fps", type=float, default=defaults.folder_fps, help="frame rate recorded for frame folders")
    p.add_argument("--shard-size", type=parse_size, default="1GB", help="target shard size")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="encoding processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any input is rejected")
    many = p.add_mutually_exclusive_group()
    many.add_argument("--part", type=parse_part, help="pack only part I of N (I = 0..N-1) of the split; then --merge")
    many.add_argument("--merge", action="store_true",
                      help="write the manifest from the N finished --part runs (the same command otherwise)")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    return args


class RateColumn(ProgressColumn):
    """Videos/s and MB/s written, over the time since this run started."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("- videos/s  - MB/s", style="progress.data.speed")
        done = task.completed - task.fields["resumed"]
        return Text(f"{done / elapsed:.1f} videos/s  {task.fields['bytes'] / elapsed / 1e6:.1f} MB/s",
                    style="progress.data.speed")


def _drop_bar(progress: Progress) -> None:
    """Remove the progress bar (without the blank line rich leaves off a terminal): the one line that
    follows says why the run ended and where it stopped."""
    progress.live.transient = True
    progress.live.stop()
    progress.disable = True


def summarize(console: Console, manifest: Manifest, seconds: float, resumed: int, part: Part | None) -> None:
    total = sum(s.bytes for s in manifest.shards)
    name = manifest.split if part is None else f"{manifest.split} part {part}"
    console.print(f"{name}: {manifest.num_samples} samples in {len(manifest.shards)} shards, "
                  f"{total / 1e9:.2f} GB, layout {manifest.layout}, {seconds:.0f} s -> {manifest.directory}")
    if part is not None:
        console.print(f"when all {part.count} parts are done: the same command with --merge instead of --part "
                      f"writes {manifest.split}.manifest.json", highlight=False)
    if resumed:
        files = manifest.split if part is None else part.stem(manifest.split)
        console.print(f"resumed: {resumed} inputs were done by an earlier run; its finished shards were kept "
                      f"and its rejections are not rechecked (to recheck, delete {manifest.directory}/"
                      f"{files}-* and rerun)")
    if manifest.rejected:
        console.print(f"[yellow]{len(manifest.rejected)} inputs rejected[/] (all listed in the manifest):")
        for r in manifest.rejected[:20]:
            console.print(f"  {r.source}: {r.reason}", markup=False, highlight=False)
        if len(manifest.rejected) > 20:
            console.print(f"  ... and {len(manifest.rejected) - 20} more")


class StopSignal:
    """Handler of Ctrl-C and SIGTERM (what schedulers send): the first stops packing, as KeyboardInterrupt;
    later ones are ignored, so the clean-up (killing workers, removing a half-written shard) runs to its
    end without a traceback. `exit_status` is the shell's for that signal."""

    def __init__(self):
        self.exit_status = 128 + signal.SIGINT

    def install(self) -> None:
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum: int, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        self.exit_status = 128 + signum
        raise KeyboardInterrupt


STOP = StopSignal()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)  # long paths stay on one line, whole
    try:
        options = EncodeOptions(layout=args.layout, short_side=args.short_side, quality=args.quality,
                                crf=args.crf, gop=args.gop, speed=args.speed, deadline=args.deadline,
                                folder_fps=args.fps, image_tmpl=args.image_tmpl)
        sources = read_list(args.list)
        classes = class_names(sources, read_labels(args.labels) if args.labels else None, str(args.list))
        if not args.root.is_dir():
            raise ValueError(f"--root {args.root} is not a directory")
        start = time.perf_counter()
        if args.merge:
            manifest = merge_parts(sources, args.out, classes, options, split=args.split,
                                   shard_size=args.shard_size, seed=args.seed)
            resumed = 0
        else:
            manifest, resumed = pack(args, console, sources, classes, options)
    except (BuildError, OutputLocked, ListFormatError, ValueError, FileNotFoundError) as error:
        console.print(f"[red]error:[/] {error}", highlight=False)
        return 2
    except Interrupted as stop:
        console.print(f"interrupted: {stop.shards} finished shards kept in {args.out} ({stop.inputs} of "
                      f"{stop.total} inputs); rerun the same command to resume", highlight=False)
        return STOP.exit_status
    summarize(console, manifest, time.perf_counter() - start, resumed, args.part)
    if args.part is not None:
        return 1 if args.strict and manifest.rejected else 0  # an empty part is fine; the merge checks the split
    if not manifest.num_samples:
        console.print(f"[red]error:[/] no input of {args.list} could be packed (reasons above); "
                      f"the {args.split} split is empty", highlight=False)
        return 1
    return 1 if args.strict and manifest.rejected else 0


def pack(args: argparse.Namespace, console: Console, sources: list, classes: list[str],
         options: EncodeOptions) -> tuple[Manifest, int]:
    """build_split with a progress bar; returns the manifest and the inputs an earlier run had done. On an
    error or interrupt the bar is removed before the exception goes on (its one line says it all)."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
               TextColumn("rejected {task.fields[rejected]}"), TimeRemainingColumn())
    name = args.split if args.part is None else f"{args.split} part {args.part}"
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(name, total=len(sources), bytes=0, rejected=0, resumed=0)

        def on_result(result) -> None:
            task_fields = progress.tasks[task].fields
            if isinstance(result, EncodedSample):
                progress.update(task, advance=1, bytes=task_fields["bytes"] + result.num_bytes)
            else:
                progress.update(task, advance=1, rejected=task_fields["rejected"] + 1)

        resumed = []

        def on_start(done: int, rejected: int, total: int) -> None:
            resumed.append(done)
            progress.reset(task, total=total, completed=done, bytes=0, rejected=rejected, resumed=done)

        try:
            manifest = build_split(sources, args.root, args.out, classes, options, split=args.split,
                                   shard_size=args.shard_size, seed=args.seed, workers=args.workers,
                                   part=args.part, on_start=on_start, on_result=on_result)
        except BaseException:
            _drop_bar(progress)
            raise
    return manifest, resumed[0]


if __name__ == "__main__":
    STOP.install()
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before packing started or after it finished: nothing half-written
        print("interrupted", file=sys.stderr)
        sys.exit(STOP.exit_status)
