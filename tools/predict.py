#!/usr/bin/env python
"""Recognize the actions in your videos with trained TDS-CLIP weights: the top classes of each video.

    python tools/predict.py clip1.mp4 clip2.webm frames_folder/ --cfg configs/k400/vitb16.yaml \\
        --weights runs/k400_vitb16/best.pt --classes lists/kinetics_400_labels.csv --test-crops 3 --test-clips 4 \\
        [key.sub=value ...] [--json OUT.json] [--sheet OUT.png]

The inputs (video files, or folders of frames named by --image-tmpl) are packed into a temporary test
shard as tools/make_shards.py packs them, read by the multi-view test pipeline of `launch.py --test`
with the config's data settings (sampling, resize, eval.test_crops x eval.test_clips views) and scored
with the softmax averaged over each video's views, as the official test does. Class names come from
--classes, else from the config's training shards (data.shards), else they are the class numbers.
Inputs that cannot be decoded are named with the reason; the others are still scored.

Config overrides are positional, as launch.py's: an argument `key.sub=value` whose key starts with a
config section or key (model., data., eval., seed, ...) is an override, unless a file or folder of
that name exists. --sheet draws each input's frames (its first view's segment centres, as the model
saw them) next to its top classes as bars.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import pipelines
from atomicfile import atomic_write, atomic_write_text
from shards.build import build_split
from shards.encode import EncodeOptions
from shards.manifest import ShardFormatError, read_manifest
from shards.sources import IMAGE_TMPL, ListFormatError, Source, make_key, read_labels
from tdsclip import pictures
from tdsclip.build import build_test_loader, load_test_model, run_cpu_budget, test_view_note
from tdsclip.config import ConfigError, RunConfig, load_config
from tdsclip.distributed import World
from tdsclip.evaluate import video_probabilities
from tdsclip.weights import CheckpointError

SHEET_TILE = 112  # px: larger frames are shrunk to this in --sheet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: positional inputs and `key.sub=value` overrides told apart by `is_override`;
    --test-crops/--test-clips become eval.* overrides, validated with the config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT or key.sub=value",
                   help="video files, or folders of frames; and config overrides, e.g. data.resize=256")
    p.add_argument("--cfg", required=True, help="the YAML config the weights were trained with (its data settings)")
    p.add_argument("--weights", required=True, help="this project's checkpoint or an official TDS-CLIP one")
    p.add_argument("--classes", type=Path, help="an 'id,name' labels CSV (default: the classes of data.shards)")
    p.add_argument("--test-crops", type=int, help="spatial crops per video: 1, 3, 5 or 10 (default: eval.test_crops)")
    p.add_argument("--test-clips", type=int, help="temporal clips per video (default: eval.test_clips)")
    p.add_argument("--top", type=int, default=5, help="classes shown per video (default: %(default)s)")
    p.add_argument("--short-side", type=int, default=EncodeOptions.short_side,
                   help="pack videos at this short side, as make_shards (0 keeps the size; default %(default)s)")
    p.add_argument("--image-tmpl", default=IMAGE_TMPL,
                   help="frame file names in frame folders, numbered from 1 (default: %(default)s)")
    p.add_argument("--json", type=Path, help="also write the predictions here")
    p.add_argument("--sheet", type=Path, metavar="OUT.png", help="also draw each input's frames and top classes here")
    args = p.parse_intermixed_args(argv)  # inputs and overrides may come before and after the options
    if args.top < 1:
        p.error("--top must be >= 1")
    args.override = [item for item in args.inputs if is_override(item)]
    args.inputs = [item for item in args.inputs if not is_override(item)]
    if not args.inputs:
        p.error("no inputs: give video files or frame folders (key.sub=value arguments are config overrides)")
    for flag in ("test_crops", "test_clips"):  # validated with the config, like launch.py's
        if getattr(args, flag) is not None:
            args.override.append(f"eval.{flag}={getattr(args, flag)}")
    return args


def is_override(argument: str) -> bool:
    """Whether a positional argument is a config override: `key.sub=value` (or `key=value`) whose key starts
    with a config section or key, and no file or folder of that name exists (an input then)."""
    key, equals, _ = argument.partition("=")
    sections = {field.name for field in dataclasses.fields(RunConfig)}
    return bool(equals) and key.split(".")[0] in sections and not os.path.exists(argument)


def input_sources(inputs: list[str], image_tmpl: str) -> tuple[list[tuple[str, Source]], list[tuple[str, str]]]:
    """(input, Source) for each usable input, the path relative to / (the shard writer joins it to a root):
    a video file, or a folder of frames counted from 1 while `image_tmpl` names a file; and (input,
    reason) for the others."""
    sources, missing, used = [], [], set()
    for name in inputs:
        path = Path(name).resolve()
        count = None
        if path.is_dir():
            files = set(os.listdir(path))
            while image_tmpl.format((count or 0) + 1) in files:
                count = (count or 0) + 1
            if count is None:
                missing.append((name, f"no frame {image_tmpl.format(1)} in this folder (frames: check "
                                      f"--image-tmpl; videos: give the files, not their folder)"))
                continue
            if any(image_tmpl.format(i) in files for i in range(count + 2, len(files) + 2)):
                missing.append((name, f"frame {image_tmpl.format(count + 1)} is missing, later frames exist"))
                continue
        elif not path.is_file():
            missing.append((name, "no such video file or frame folder"))
            continue
        relative = os.path.relpath(path, "/")
        sources.append((name, Source(key=make_key(relative, used, strip_extension=count is None), path=relative,
                                     label=0, num_frames=count)))
    return sources, missing


def class_names(config: RunConfig, labels: list[str] | None, labels_csv: Path | None, num_classes: int) -> list[str]:
    """Names for the model's classes: the labels CSV's, else the training shards', else the numbers."""
    if labels is not None:
        if len(labels) != num_classes:
            raise ListFormatError(f"{labels_csv}: {len(labels)} classes, but the weights have {num_classes}")
        return labels
    names = training_classes(config)
    if len(names) == num_classes:
        return names
    print(f"note: class numbers shown: no --classes, and data.shards ({Path(config.data.shards).resolve()}) "
          f"names {len(names) or 'no'} classes for the weights' {num_classes}", file=sys.stderr)
    return [str(i) for i in range(num_classes)]


def training_classes(config: RunConfig) -> list[str]:
    """The class names of the training manifest (data.shards, data.train_split); none where it cannot be read."""
    try:
        return read_manifest(config.data.shards, config.data.train_split, check_files=False).classes
    except (OSError, ShardFormatError):
        return []


def predict(model: torch.nn.Module, config: RunConfig, sources: list[Source], encode: EncodeOptions, workdir: Path,
            world: World, progress: Progress | None = None, frames: dict | None = None) -> tuple[dict, dict]:
    """({key: class probabilities (numpy)}, {source path: why it was not scored}) for `sources`, packed into
    `workdir` with `encode` and read by the test pipeline of `launch.py --test`; `progress` shows both.
    `frames`, when a dict, gets each video's first-view segment centre frames (see `recording`)."""
    # Worker processes each import torch and DALI (~3 s): worth it only for many inputs.
    workers = max(1, min(os.cpu_count() or 1, len(sources) // 16))
    def ticker(description: str, total: int) -> Callable[..., None]:
        if progress is None:
            return lambda *_: None
        task = progress.add_task(description, total=total)
        return lambda *_: progress.advance(task)

    classes = [str(c) for c in range(model.config.num_classes)]  # the weights' classes; the labels (0) are unknown
    manifest = build_split(sources, "/", workdir, classes, encode, split="test", workers=workers,
                           on_result=ticker("packing", len(sources)))
    failed = {rejection.source: rejection.reason for rejection in manifest.rejected}
    if not manifest.num_samples:
        return {}, failed
    data = dataclasses.replace(config.data, shards=str(workdir), test_split="test", on_error="skip")
    loader = build_test_loader(dataclasses.replace(config, data=data), world, model.config, "the weights")
    probabilities = {}
    scored = ticker("scoring", len(loader))
    try:
        batches = loader if frames is None else recording(loader, loader.views, frames)
        for keys, probs, _, valid in video_probabilities(model, batches, views=loader.views,
                                                         num_classes=model.config.num_classes, device=world.device,
                                                         precision=config.eval.precision):
            for key, row, ok in zip(keys, probs.cpu().numpy(), valid.tolist()):
                if ok:
                    probabilities[key] = row
            scored()
        unreadable = {entry.rsplit(":", 1)[1] for entry in loader.skipped}  # "tar:key"
    finally:
        loader.close()
    failed.update({source.path: "unreadable: a frame did not decode" for source in sources if source.key in unreadable})
    return probabilities, failed


def recording(loader: Iterable[dict], views: int, frames: dict) -> Iterator[dict]:
    """The loader's batches, keeping in `frames` each video's first view as the model sees it: {key: its
    segments' centre frames (T, S, S, 3) uint8}."""
    for batch in loader:
        for key, clip in zip(batch["key"][::views], batch["clips"][::views]):  # clip: (T, M, 3, S, S)
            frames.setdefault(key, pictures.denormalize(clip[:, clip.shape[1] // 2]))
        yield batch


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress | None]:
    """A progress bar on stderr when it is a terminal (stdout keeps the results only), else None."""
    if not sys.stderr.isatty():
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as progress:
        yield progress


def check_output(path: Path, flag: str) -> None:
    """Refuse an output path that cannot be written before any work is done."""
    if path.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise ValueError(f"{flag} {path}: cannot write in {path.parent}")


def rank_classes(usable: list[tuple[str, Source]], probabilities: dict, failed: dict, names: list[str],
                 top: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """(results, skipped): each scored input's `top` classes, most probable first; the others, with why."""
    results, skipped = [], []
    for name, source in usable:
        if source.key not in probabilities:
            skipped.append((name, failed.get(source.path, "not scored")))
            continue
        probs = probabilities[source.key]
        results.append({"input": name, "key": source.key,
                        "top": [{"class": int(c), "name": names[c], "probability": float(probs[c])}
                                for c in probs.argsort()[::-1][:top]]})
    return results, skipped


def write_sheet(path: Path, results: list[dict], frames: dict) -> None:
    """Each result's frames (tiles of at most SHEET_TILE px) next to its top classes as bars, one per row."""
    rows = []
    for result in results:
        images = frames[result["key"]]  # (T, S, S, 3) uint8
        if images.shape[1] > SHEET_TILE:
            images = np.stack([np.asarray(Image.fromarray(i).resize((SHEET_TILE, SHEET_TILE), Image.BILINEAR))
                               for i in images])
        else:  # small models' frames: enlarged by a whole factor, as show_clips does
            scale = pictures.auto_scale(images.shape[1])
            images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        rows.append(pictures.predict_row(images, title=result["input"],
                                         top=[(t["name"], t["probability"]) for t in result["top"]]))
    atomic_write(path, lambda f: Image.fromarray(pictures.predict_sheet(rows)).save(f, format="PNG"))


def score(model: torch.nn.Module, config: RunConfig, encode: EncodeOptions,
          usable: list[tuple[str, Source]], device: torch.device, frames: dict | None) -> tuple[dict, dict]:
    """predict() on the usable inputs in a temporary directory, with a progress bar; SIGTERM as Ctrl-C."""
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the temporary shard goes
    try:
        with tempfile.TemporaryDirectory(prefix="tdsclip_predict_") as workdir, progress_bar() as progress:
            return predict(model, config, [source for _, source in usable], encode, Path(workdir), world, progress,
                           frames) if usable else ({}, {})
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Score the inputs; exit 0 when every one was scored, 1 when some were not, 2 for bad options."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # everything that can be checked before the work
        encode = EncodeOptions(short_side=args.short_side, image_tmpl=args.image_tmpl)
        config = load_config(args.cfg, args.override)
        budget = run_cpu_budget(config, World(rank=0, world_size=1, local_rank=0, device=device))
        budget.apply()
        model = load_test_model(config, args.weights).to(device)
        labels = read_labels(args.classes) if args.classes else None
        names = class_names(config, labels, args.classes, model.config.num_classes)
        for path, flag in ((args.json, "--json"), (args.sheet, "--sheet")):
            if path:
                check_output(path, flag)
    except (ConfigError, ValueError, OSError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(budget.describe(), file=sys.stderr)  # once the options are good; stdout holds the results
    if note := test_view_note(config):
        print(note, file=sys.stderr)
    usable, missing = input_sources(args.inputs, args.image_tmpl)
    frames = {} if args.sheet else None
    try:
        probabilities, failed = score(model, config, encode, usable, device, frames)
    except (FileNotFoundError, ShardFormatError, pipelines.ShardReadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    results, unscored = rank_classes(usable, probabilities, failed, names, args.top)
    skipped = missing + unscored
    for result in results:
        print(result["input"])
        for rank, entry in enumerate(result["top"], 1):
            print(f"  {rank}. {entry['name']}  {100 * entry['probability']:.1f}%")
    for name, reason in skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    if args.json:
        atomic_write_text(args.json, json.dumps({"weights": str(args.weights), "test_crops": config.eval.test_crops,
                                                 "test_clips": config.eval.test_clips, "predictions": results,
                                                 "skipped": [{"input": n, "reason": r} for n, r in skipped]},
                                                indent=2))
    if args.sheet and results:
        write_sheet(args.sheet, results, frames)
        print(f"sheet: {args.sheet}", file=sys.stderr)
    return 0 if results and not skipped else 1


if __name__ == "__main__":
    sys.exit(main())
