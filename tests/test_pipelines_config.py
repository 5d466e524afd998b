"""pipelines.config.DataConfig (the data options, checked once) and pipelines.build_loader (a Loader from it)."""

import dataclasses
import subprocess
import sys
import typing

import pytest
import torch

import pipelines
from pipelines import config as config_module
from pipelines import reader as reader_module
from pipelines.config import DataConfig
from pipelines.plan import ClipSpec
from shards.manifest import read_manifest, write_json_atomic
from test_pipelines import SIZE, decoded_indices, indexed_videos, write_shards

GEOMETRY = dict(num_segments=2, frames_per_segment=5, image_size=SIZE["image_size"])


def test_choices_are_declared_once_as_literal_types():
    fields = {f.name: f.type for f in dataclasses.fields(DataConfig)}
    assert typing.get_args(fields["sampling"]) == config_module.SCHEMES == pipelines.sampling.SCHEMES
    assert typing.get_args(fields["flip"]) == config_module.FLIPS == ("none", "plain", "swap")
    assert typing.get_args(fields["on_error"]) == config_module.ON_ERROR == ("raise", "skip")
    assert config_module.TEST_CROPS == (1, 3, 5, 10) and config_module.MODES == ("train", "val", "test")


@pytest.mark.parametrize("key, value, message", [
    ("global_batch_size", 0, "must be an integer >= 1"), ("eval_batch_size", 2.5, "must be an integer >= 1"),
    ("num_sample", -1, "must be an integer >= 1"), ("grayscale_prob", 1.5, "must be a number in [0, 1]"),
    ("grayscale_prob", -0.1, "in [0, 1]"), ("num_threads", -1, "integer >= 1, or null"),
    ("num_threads", 0, "integer >= 1, or null"), ("resize", 0, "integer >= 1 (short side) or [H, W]"),
    ("resize", [256], "or [H, W]"), ("resize", [256, 0], "or [H, W]"), ("resize", "256", "or [H, W]"),
    ("resize", [256.5, 320], "or [H, W]"), ("resize", True, "or [H, W]"),
    ("flip_label_map", {1: -2}, "labels must be integers >= 0, got 1: -2"),
    ("flip", "mirror", "valid choices: 'none', 'plain', 'swap'"), ("sampling", "ucf", "valid choices"),
    ("on_error", "ignore", "valid choices: 'raise', 'skip'"), ("shards", "", "non-empty string"),
    ("randaugment", "rand-m11-n4", "magnitude m must be in 0..10"), ("randaugment", "augmix", "a form like"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=rf"^data\.{key}: .*{__import__('re').escape(message)}"):
        DataConfig(**{key: value})


def test_swap_needs_a_label_map_and_good_values_pass():
    with pytest.raises(ValueError, match=r"^data\.flip_label_map: flip: swap needs a label map"):
        DataConfig(flip="swap")
    data = DataConfig(flip="swap", flip_label_map={0: 1, 1: 0}, resize=[256, 320], randaugment="rand-m7-n4-mstd0.5",
                      num_threads=2, grayscale_prob=1)
    assert data.resize_size == (256, 320) and data.randaugment_levels == (4, 7, 0.5)
    assert DataConfig().resize_size == 256 and DataConfig().randaugment_levels is None


def test_config_module_imports_neither_dali_nor_torch():
    code = ("import sys, pipelines, pipelines.config; "
            "print(sorted(m for m in ('torch', 'nvidia.dali') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.fixture(scope="module")
def named_shards(tmp_path_factory):
    """train and val splits whose manifests name their classes."""
    directory = tmp_path_factory.mktemp("named")
    for split, count in (("train", 6), ("val", 3)):
        write_shards(directory, split, indexed_videos(count, frames=12))
        manifest = read_manifest(directory, split)
        write_json_atomic(directory / f"{split}.manifest.json",
                          dataclasses.replace(manifest, classes=["left", "right", "up"]).to_json())
    return directory


def test_build_loader_reads_each_manifest_once_and_matches_the_plain_loader(named_shards, monkeypatch):
    reads = []
    real = reader_module.read_manifest
    monkeypatch.setattr(reader_module, "read_manifest", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    data = DataConfig(shards=str(named_shards), resize=SIZE["resize"], flip="plain", grayscale_prob=0.5,
                      num_sample=2, num_threads=1)
    train = pipelines.build_loader(data, "train", batch_size=2, seed=3, **GEOMETRY)
    val = pipelines.build_loader(data, "val", batch_size=2, seed=3, **GEOMETRY)
    assert reads == ["train", "val"]
    assert train.classes == val.classes == ["left", "right", "up"] and (train.num_videos, val.num_videos) == (6, 3)
    assert train.views == 2 and val.views == 1
    spec = ClipSpec(split="train", num_sample=2, flip="plain", grayscale_prob=0.5, num_segments=2, **SIZE)
    plain = pipelines.Loader(reader_module.shard_paths(named_shards, "train"), spec, 2, seed=3, num_threads=1)
    for ours, theirs in zip(train, plain):  # the same epoch plan and pixels as the low-level constructor
        assert ours["key"] == theirs["key"] and torch.equal(ours["label"], theirs["label"])
        torch.testing.assert_close(ours["clips"], theirs["clips"], atol=0, rtol=0)
    test = pipelines.build_loader(data, "test", batch_size=1, test_crops=3, test_clips=2, **GEOMETRY)  # val videos
    assert test.views == 6 and len(test) == 3
    frames = decoded_indices(next(iter(test))["clips"])  # (crops x clips, T, M): crop outer, clip inner
    assert (frames[0::2] == frames[0]).all() and (frames[1::2] == frames[1]).all() and (frames[0] != frames[1]).any()


def test_build_loader_names_the_missing_split(named_shards):
    with pytest.raises(ValueError, match="data.val_split is null"):
        pipelines.build_loader(DataConfig(shards=str(named_shards), val_split=None), "val", batch_size=1,
                               **GEOMETRY)
    with pytest.raises(FileNotFoundError, match=r"nope\.manifest\.json.*has the splits train, val"):
        pipelines.build_loader(DataConfig(shards=str(named_shards), train_split="nope", resize=SIZE["resize"]),
                               "train", batch_size=1, **GEOMETRY)
