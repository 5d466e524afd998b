#!/usr/bin/env python
"""Look at clips exactly as the configured pipeline delivers them to the model, before a long run.

    python tools/show_clips.py data/sthv2/shards --split train --cfg configs/sthv2/vitb16.yaml [key.sub=value ...]
        [--num 16] [--out sheet.png] [--gif DIR]

Builds the loader the trainer builds (the config's data.* options and the model's clip geometry; the
split's manifest is data.train_split or data.val_split), takes the first --num clips of epoch 1 on
rank 0, and draws each one de-normalised: its segments' centre frames in a row, the middle segment's
window of consecutive frames below, captioned with the class name from the manifest, whether it was
flipped (and its label swapped) and the video key. Frames smaller than 96 px are enlarged by a whole
factor. --gif writes each clip's frames, in time order, as an animated GIF too. Without --cfg, the
defaults every config starts from.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import pipelines
from atomicfile import atomic_write
from shards.manifest import ShardFormatError
from tdsclip import pictures
from tdsclip.build import build_loader, run_cpu_budget
from tdsclip.config import ConfigError, RunConfig, config_from_dict, load_config
from tdsclip.distributed import World

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", help="shard directory (with <split>.manifest.json); sets data.shards")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, as launch.py's")
    p.add_argument("--split", required=True, choices=["train", "val"],
                   help="the training pipeline (augmented) over data.train_split, or validation's over data.val_split")
    p.add_argument("--cfg", help="YAML run config (default: the built-in defaults)")
    p.add_argument("--num", type=int, default=16, help="clips to show (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("sheet.png"), help="the contact sheet, PNG (default: %(default)s)")
    p.add_argument("--gif", type=Path, metavar="DIR", help="also write an animated GIF per clip here")
    args = p.parse_intermixed_args(argv)  # overrides may come before and after the options
    if args.num < 1:
        p.error("--num must be >= 1")
    return args


def read_config(args: argparse.Namespace) -> RunConfig:
    """The run config with data.shards set to the SHARDS argument."""
    overrides = [*args.overrides, f"data.shards={args.shards}"]
    return load_config(args.cfg, overrides) if args.cfg else config_from_dict({}, overrides)


def make_loader(config: RunConfig, split: str, batch_size: int) -> pipelines.Loader:
    """Rank 0's loader of `split` ("train" or "val"), built as the trainer builds it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    budget = run_cpu_budget(config, world)
    budget.apply()
    loader = build_loader(config, world, config.model.model_config(), split, batch_size)
    print(budget.describe(), file=sys.stderr)  # once the data is found: an error stays one line
    return loader


def first_clips(loader: pipelines.Loader, count: int) -> dict:
    """The first `count` real clips of the loader's current epoch, as one batch on the CPU: `clips`,
    `label`, `key`, and for training clips `flipped` / `label_swapped` (from the epoch's plan where the
    batches do not carry them)."""
    plan, views = loader.plan(), loader.views
    parts: dict[str, list] = {"clips": [], "label": [], "key": [], "flipped": [], "label_swapped": []}
    for index, batch in enumerate(loader):
        rows = slice(index * plan.batch_size, (index + 1) * plan.batch_size)
        true_labels = np.array([loader.samples[i].label for i in plan.sample[rows]]).repeat(views)
        keep = batch["valid"].cpu().numpy()
        parts["clips"].append(batch["clips"].cpu()[keep])
        parts["label"].append(batch["label"].cpu()[keep])
        parts["key"] += [key for key, ok in zip(batch["key"], keep) if ok]
        flipped = batch.get("flipped", torch.from_numpy(plan.mirror[rows].reshape(-1) > 0))
        parts["flipped"].append(flipped.cpu()[keep])
        swapped = batch.get("label_swapped", torch.from_numpy(plan.label[rows].reshape(-1) != true_labels))
        parts["label_swapped"].append(swapped.cpu()[keep])
        if len(parts["key"]) >= count:
            break
    clips = {name: torch.cat(values)[:count] for name, values in parts.items() if name != "key"}
    if not loader.spec.train:  # evaluation clips are never flipped: say nothing about it
        del clips["flipped"], clips["label_swapped"]
    return {**clips, "key": parts["key"][:count]}


def write_gifs(directory: Path, batch: dict, captions: list[str], scale: int) -> None:
    """One animated GIF per clip, `<number>_<key>.gif`, 8 frames per second."""
    for number, (clip, caption, key) in enumerate(zip(batch["clips"], captions, batch["key"])):
        frames = [Image.fromarray(f) for f in pictures.clip_animation(clip, caption=caption, scale=scale)]
        path = directory / f"{number:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.gif"
        atomic_write(path, lambda f: frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:],
                                                    duration=125, loop=0))


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse outputs that cannot be written before any work is done."""
    if args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a directory; give a .png file")
    if args.gif is not None and args.gif.exists() and not args.gif.is_dir():
        raise ValueError(f"--gif {args.gif}: is a file; give a directory")


def show(args: argparse.Namespace, config: RunConfig) -> str:
    """Draw the sheet (and GIFs); the summary line."""
    per_batch = math.ceil(args.num / (config.data.num_sample if args.split == "train" else 1))
    loader = make_loader(config, args.split, per_batch)
    try:
        batch = first_clips(loader, args.num)
    finally:
        loader.close()
    names = loader.classes or []
    sheet, captions = pictures.batch_sheet(batch, names, count=args.num)
    atomic_write(args.out, lambda f: Image.fromarray(sheet).save(f, format="PNG"))
    summary = f"{args.out}: {len(captions)} {args.split} clips of {config.data.shards} ({sheet.shape[1]}x{sheet.shape[0]})"
    if args.gif is not None:
        write_gifs(args.gif, batch, captions, pictures.auto_scale(batch["clips"].shape[-1]))  # as the sheet's
        summary += f"; {len(captions)} GIFs in {args.gif}"
    return summary


def main(argv: list[str] | None = None) -> int:
    """Exit 0 with the sheet written, 2 for a bad option or config, 1 for unreadable shards."""
    args = parse_args(argv)
    try:
        config = read_config(args)
        check_outputs(args)
        if args.split == "val" and config.data.val_split is None:
            raise ConfigError("data.val_split is null: there is no validation split to show")
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        print(show(args, config))
    except (FileNotFoundError, ShardFormatError, pipelines.ShardReadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
