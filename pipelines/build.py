"""From a DataConfig to a Loader: `build_loader` reads the split's manifest once and makes the ClipSpec.

`loader(...)` is the older entry point (26 plain arguments, tar paths or a shard directory), kept
only until its last callers move to `build_loader`.
"""

import os
from pathlib import Path

import torch

from pipelines.batches import Loader
from pipelines.config import DataConfig, Mode, parse_randaugment
from pipelines.plan import ClipSpec
from pipelines.reader import read_split, shard_paths


def build_loader(data: DataConfig, mode: Mode, *, batch_size: int, num_segments: int, frames_per_segment: int,
                 image_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 test_crops: int = 1, test_clips: int = 1, py_workers: int | None = None,
                 hw_decoder_load: float | None = None) -> Loader:
    """This rank's Loader over the split that `mode` reads: data.train_split ("train"), data.val_split
    ("val") or data.test_split ("test": test_crops x test_clips views per video).

    Reads `<data.shards>/<split>.manifest.json` once: the Loader holds its class names
    (`loader.classes`). batch_size: videos per batch on this rank. num_segments, frames_per_segment,
    image_size: the model's clip geometry (T, M, S). rank, world_size, seed, device, dtype, py_workers,
    hw_decoder_load: as for Loader. RandAugment, flips, grayscale and num_sample apply to "train" only.
    """
    split = {"train": data.train_split, "val": data.val_split, "test": data.test_split}[mode]
    if split is None:
        raise ValueError("data.val_split is null: there is no validation split to load")
    manifest = read_split(data.shards, split)
    train = mode == "train"
    spec = ClipSpec(split=mode, num_segments=num_segments, frames_per_segment=frames_per_segment,
                    sampling_scheme=data.sampling, wrap_start=data.wrap_start, image_size=image_size,
                    resize=data.resize_size, num_sample=data.num_sample if train else 1,
                    flip=data.flip if train else "none", flip_label_map=data.flip_label_map if train else None,
                    grayscale_prob=data.grayscale_prob if train else 0.0, test_crops=test_crops,
                    test_clips=test_clips, randaugment=data.randaugment_levels if train else None)
    return Loader([str(path) for path in manifest.tar_paths()], spec, batch_size, rank=rank, world_size=world_size,
                  seed=seed, device=device, dtype=dtype, num_threads=data.num_threads, on_error=data.on_error,
                  py_workers=py_workers, hw_decoder_load=hw_decoder_load, classes=manifest.classes)


def loader(shards: str | os.PathLike | list, split: str, batch_size: int, num_segments: int = 8, *,
           frames_per_segment: int = 5, rank: int = 0, world_size: int = 1, seed: int = 0,
           device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
           sampling: str = "something", wrap_start: bool = False, image_size: int = 224,
           resize: int | tuple[int, int] = 256, num_sample: int = 1, flip: str = "none",
           flip_label_map: dict[int, int] | None = None,
           grayscale_prob: float = 0.0, randaugment: str | None = None, test_crops: int = 1,
           test_clips: int = 1, num_threads: int | None = None, on_error: str = "raise",
           py_workers: int | None = None, hw_decoder_load: float | None = None,
           manifest: str | None = None) -> Loader:
    """A Loader over `split` of `shards` (a directory with `<split>.manifest.json`, a list of tars, or one tar).

    Transitional: new code calls build_loader (a DataConfig) or Loader (tar paths and a ClipSpec).
    Options as DataConfig's and Loader's; `split` is the mode ("train", "val", "test"); `manifest`
    names which `<manifest>.manifest.json` of a shard directory to read (default `split`), e.g.
    split="test", manifest="val" for the multi-view test on the validation videos. flip defaults
    to "none" here, and "swap" without flip_label_map swaps the Something-Something v2 pairs.
    """
    spec = ClipSpec(split=split, num_segments=num_segments, frames_per_segment=frames_per_segment,
                    sampling_scheme=sampling, wrap_start=wrap_start, image_size=image_size, resize=resize,
                    num_sample=num_sample, flip=flip, flip_label_map=flip_label_map, grayscale_prob=grayscale_prob,
                    test_crops=test_crops, test_clips=test_clips,
                    randaugment=parse_randaugment(randaugment) if randaugment and split == "train" else None)
    one_tar = isinstance(shards, (str, os.PathLike)) and str(shards).endswith(".tar")
    if manifest is not None and (one_tar or isinstance(shards, (list, tuple))):
        raise ValueError("manifest= names a manifest of a shard directory; with tar paths, pass the tars you want")
    try:
        tars = [str(shards)] if one_tar else shard_paths(shards, manifest or split)
    except FileNotFoundError as error:
        missing_test_manifest = not (Path(shards) / "test.manifest.json").exists()
        if manifest is None and split == "test" and missing_test_manifest:  # K400 / SSv2 test on their val videos
            raise FileNotFoundError(f"{error}. To run the test views over another split's videos, pass "
                                    f"manifest=, e.g. loader(..., 'test', ..., manifest='val')") from None
        raise
    return Loader(tars, spec, batch_size, rank=rank, world_size=world_size, seed=seed, device=device, dtype=dtype,
                  num_threads=num_threads, on_error=on_error, py_workers=py_workers, hw_decoder_load=hw_decoder_load)
