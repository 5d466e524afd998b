"""From a DataConfig to a Loader: `build_loader` reads the split's manifest once and makes the ClipSpec.
(Tools and tests that hold tar paths build a `Loader` from a ClipSpec directly.)"""

import torch

from pipelines.batches import Loader
from pipelines.config import DataConfig, Mode
from pipelines.plan import ClipSpec
from pipelines.reader import read_split


def build_loader(data: DataConfig, mode: Mode, *, batch_size: int, num_segments: int, frames_per_segment: int,
                 image_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 test_crops: int = 1, test_clips: int = 1, num_threads: int | None = None, py_workers: int | None = None,
                 hw_decoder_load: float | None = None) -> Loader:
    """This rank's Loader over the split that `mode` reads: data.train_split ("train"), data.val_split
    ("val") or data.test_split ("test": test_crops x test_clips views per video).

    Reads `<data.shards>/<split>.manifest.json` once: the Loader holds its class names
    (`loader.classes`). batch_size: videos per batch on this rank. num_segments, frames_per_segment,
    image_size: the model's clip geometry (T, M, S). num_threads: DALI CPU threads (default
    data.num_threads). rank, world_size, seed, device, dtype, py_workers,
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
                  seed=seed, device=device, dtype=dtype, num_threads=num_threads or data.num_threads, on_error=data.on_error,
                  py_workers=py_workers, hw_decoder_load=hw_decoder_load, classes=manifest.classes)

