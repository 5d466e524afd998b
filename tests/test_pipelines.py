"""pipelines.build_loader (and Loader) on tiny fixture shards through the real DALI CPU path.

Fixture frames are flat gray with value 8*i + 4 for frame i, so a decoded, cropped and
normalized frame still says which frame it was.
"""

import dataclasses
import io
import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import params, sampling
from pipelines.config import DataConfig
from pipelines import plan as plan_module
from pipelines.plan import ClipSpec
from pipelines import source as source_module
from pipelines.augment import CLIP_MEAN, CLIP_STD
from shards.encode import EncodedSample
from shards.manifest import Manifest, write_json_atomic
from shards.writer import ShardWriter

SIZE = dict(image_size=16, resize=20)
DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)}


def loader_of(shards: Path, mode: str, batch_size: int, num_segments: int = 8, *, split: str | None = None,
              image_size: int = 224, frames_per_segment: int = 5, **options) -> pipelines.Loader:
    """pipelines.build_loader over `split` (default: `mode`) of the shard directory `shards`; options are
    DataConfig fields (flip "none" and one view unless given) or build_loader's."""
    data_options = {"flip": "none", "num_sample": 1, **{k: v for k, v in options.items() if k in DATA_FIELDS}}
    split = split or mode
    data = DataConfig(shards=str(shards), train_split=split, val_split=split, test_split=split, **data_options)
    return pipelines.build_loader(data, mode, batch_size=batch_size, num_segments=num_segments,
                                  frames_per_segment=frames_per_segment, image_size=image_size,
                                  **{k: v for k, v in options.items() if k not in DATA_FIELDS})


def frame_image(index: int, height: int = 24, width: int = 32) -> np.ndarray:
    return np.full((height, width, 3), 8 * index + 4, dtype=np.uint8)


def gradient_image(height: int = 24, width: int = 32) -> np.ndarray:
    ramp = np.linspace(0, 255, width).astype(np.uint8)
    return np.repeat(np.repeat(ramp[None, :, None], height, 0), 3, 2)


def jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def webm(frames: list[np.ndarray]) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=25)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "g": "8"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_shards(directory: Path, split: str, videos: list[dict], *, layout: str = "frames",
                 per_shard: int = 4) -> Path:
    """Shards written by shards.writer: videos are {"key", "label", "frames": [HxWx3 uint8]}."""
    directory.mkdir(parents=True, exist_ok=True)
    records = []
    for number, first in enumerate(range(0, len(videos), per_shard)):
        writer = ShardWriter(directory, split, number)
        for video in videos[first:first + per_shard]:
            writer.add(_encoded(video, layout))
        records.append(writer.close(build={}))
    manifest = Manifest(split=split, layout=layout, encoding={}, classes=[], num_samples=len(videos),
                        shards=records, rejected=[], tool_version="test")
    write_json_atomic(directory / f"{split}.manifest.json", manifest.to_json())
    return directory


def _encoded(video: dict, layout: str) -> EncodedSample:
    frames, key = video["frames"], video["key"]
    height, width = frames[0].shape[:2]
    meta = {"key": key, "label": video["label"], "num_frames": len(frames), "fps": 25.0, "width": width,
            "height": height, "source": f"{key}.mp4", "layout": layout}
    if "source_size" in video:  # (width, height) of the video the frames were resized from
        meta["source_width"], meta["source_height"] = video["source_size"]
    if layout == "frames":
        return EncodedSample(meta=meta, frames=[jpeg(image) for image in frames])
    return EncodedSample(meta=meta, video=webm(frames))


def indexed_videos(count: int, frames: list[int] | int = 30, label_of=lambda i: i % 3) -> list[dict]:
    lengths = frames if isinstance(frames, list) else [frames] * count
    return [{"key": f"v{i:03d}", "label": label_of(i), "frames": [frame_image(j) for j in range(lengths[i])]}
            for i in range(count)]


def decoded_indices(clips: torch.Tensor) -> np.ndarray:
    """(B, T, 5, 3, S, S) normalized clips of flat frames -> (B, T, 5) frame indices."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (clips.float().cpu() * std + mean) * 255  # undo normalization
    value = pixels.mean(dim=(-1, -2, -3))
    return np.round((value.numpy() - 4) / 8).astype(int)


@pytest.fixture(scope="module")
def frame_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("frames")
    write_shards(directory, "train", indexed_videos(6, frames=[30, 30, 7, 30, 12, 30]))
    write_shards(directory, "test", indexed_videos(5, frames=30))
    return directory


def test_train_batch_shapes_dtype_and_expected_frames(frame_shards):
    data = loader_of(frame_shards, "train", batch_size=2, num_segments=4, num_sample=2, seed=3,
                     num_threads=1, **SIZE)
    assert len(data) == 3 and data.num_samples == 6
    seen = []
    for batch in list(data):  # held batches must stay intact while later ones are made (zero-copy)
        assert batch["clips"].shape == (4, 4, 5, 3, 16, 16) and batch["clips"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
        assert batch["key"][0] == batch["key"][1] and batch["key"][2] == batch["key"][3]
        got = decoded_indices(batch["clips"])
        plan = data.plan(0)
        for v, key in enumerate(batch["key"]):
            row = len(seen) // 2
            frames = plan.frames[row].reshape(4, 5)
            np.testing.assert_array_equal(got[v], frames)
            seen.append(key)
    assert sorted(set(seen)) == [f"v{i:03d}" for i in range(6)]


def test_test_split_views_adjacent_expected_frames_and_valid(frame_shards):
    data = loader_of(frame_shards, "test", batch_size=2, num_segments=4, test_crops=3, test_clips=2,
                     num_threads=1, **SIZE)
    batches = list(data)
    assert len(data) == 3 and data.num_samples == 5 and data.views == 6
    expected = sampling.window(sampling.test_centres(30, 4, 2), 30)  # (K=2, T, 5)
    for batch in batches:
        assert batch["clips"].shape == (12, 4, 5, 3, 16, 16)
        got = decoded_indices(batch["clips"]).reshape(2, 3, 2, 4, 5)  # (videos, crops, clips, T, 5)
        for video in got:
            for crop in video:
                np.testing.assert_array_equal(crop, expected)
    keys = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert keys == [f"v{i:03d}" for i in range(5) for _ in range(6)]
    assert batches[-1]["valid"].tolist() == [True] * 6 + [False] * 6
    labels = torch.cat([b["label"] for b in batches])[:30].view(5, 6)
    assert (labels == torch.tensor([i % 3 for i in range(5)])[:, None]).all()


@pytest.mark.parametrize("scheme", sampling.SCHEMES)
def test_val_uses_the_schemes_val_centres_and_one_view(frame_shards, scheme):
    data = loader_of(frame_shards, "val", batch_size=4, num_segments=8, sampling=scheme, num_threads=1,
                     split="test", **SIZE)  # val mode over the test split
    batch = next(iter(data))
    assert batch["clips"].shape == (4, 8, 5, 3, 16, 16)
    expected = sampling.window(sampling.clip_centres(scheme, "val", 30, 8)[0], 30)
    for got in decoded_indices(batch["clips"]):
        np.testing.assert_array_equal(got, expected)


def test_normalization_matches_clip_mean_std(tmp_path):
    color = np.zeros((24, 32, 3), np.uint8) + np.array([200, 50, 100], np.uint8)
    write_shards(tmp_path, "val", [{"key": "c", "label": 0, "frames": [color] * 6}])
    clips = next(iter(loader_of(tmp_path, "val", 1, num_segments=1, num_threads=1, **SIZE)))["clips"]
    expected = (torch.tensor([200, 50, 100]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    got = clips.mean(dim=(0, 1, 2, 4, 5))
    assert torch.allclose(got, expected, atol=0.05), (got, expected)


def test_flip_swaps_labels_exactly_when_mirrored_and_batches_say_which(tmp_path):
    videos = [{"key": f"g{i}", "label": i % 3, "frames": [gradient_image()] * 8} for i in range(12)]
    write_shards(tmp_path, "train", videos)
    data = loader_of(tmp_path, "train", 4, num_segments=1, num_sample=2, flip="swap",
                     flip_label_map={0: 1, 1: 0}, num_threads=1, seed=5, **SIZE)  # label 2 has no mirror class
    flips, swaps = [], []
    for batch in data:
        frame = batch["clips"][:, 0, 2, 0]  # (B, S, S) red channel of one frame per view
        mirrored = (frame[:, :, :4].mean((1, 2)) > frame[:, :, -4:].mean((1, 2))).tolist()
        truth = [int(k[1:]) % 3 for k in batch["key"]]
        assert batch["flipped"].dtype == batch["label_swapped"].dtype == torch.bool
        assert batch["flipped"].tolist() == mirrored  # what the TensorBoard images are told
        assert batch["label_swapped"].tolist() == [f and t != 2 for f, t in zip(mirrored, truth)]
        for flipped, label, true in zip(mirrored, batch["label"].tolist(), truth):
            assert label == ({0: 1, 1: 0}.get(true, true) if flipped else true)
        flips += mirrored
        swaps += batch["label_swapped"].tolist()
    assert 0 < sum(swaps) < sum(flips) < len(flips)


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_grayscale_is_per_clip_luma(tmp_path, layout):
    color = np.zeros((24, 32, 3), np.uint8) + np.array([200, 50, 100], np.uint8)
    write_shards(tmp_path, "train", [{"key": "c", "label": 0, "frames": [color] * 6}], layout=layout)
    batch = next(iter(loader_of(tmp_path, "train", 1, num_segments=2, grayscale_prob=1.0,
                                num_threads=1, **SIZE)))
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (batch["clips"] * std + mean) * 255  # (1, T, 5, 3, S, S)
    luma = 0.299 * 200 + 0.587 * 50 + 0.114 * 100
    assert torch.allclose(pixels.mean(dim=(0, 1, 2, 4, 5)), torch.full((3,), luma), atol=6)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_randaugment_same_ops_for_every_frame_of_a_clip_and_clips_differ(tmp_path, device):
    color = np.zeros((24, 32, 3), np.uint8) + np.array([200, 50, 100], np.uint8)
    write_shards(tmp_path, "train", [{"key": f"c{i}", "label": 0, "frames": [color] * 12} for i in range(8)])
    options = dict(num_segments=2, num_threads=1, seed=3, device=device, **SIZE)
    data = loader_of(tmp_path, "train", 8, randaugment="rand-m9-n1-mstd0.5", **options)
    assert data.mode == "frame"
    clips = next(iter(data))["clips"].flatten(1, 2).cpu()  # (8, 10, 3, S, S); without RandAugment all the same
    assert (clips == clips[:, :1]).all()  # every frame of a clip got the same op and magnitude
    distinct = {clip[0].numpy().tobytes() for clip in clips}
    assert len(distinct) > 1  # clips drew different ops
    plain = next(iter(loader_of(tmp_path, "train", 8, **options)))["clips"].flatten(1, 2).cpu()
    assert (plain == plain[:1, :1]).all() and not torch.equal(plain, clips)
    draws = data.plan(0).ra  # (R, O, 3, n): op, magnitude bin, sign per clip and view
    assert draws.shape == (8, 1, 3, 1)
    identity = draws[:, 0, 0, 0] == params.RA_IDENTITY  # drawn but not applied (p=0.5)
    changed = (clips[:, 0] - plain[:, 0]).abs().flatten(1).amax(1) > 1e-3
    assert not changed[torch.from_numpy(identity)].any()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("layout", ["frames", "video"])
def test_randaugment_works_on_the_stored_frame_before_the_crop(tmp_path, monkeypatch, layout, device):
    """As the official code (RandAugment before scaling): a translation moves the whole stored frame by a
    share of ITS width, and each crop then sees fill only where its window overlaps the vacated part.
    Videos of four sizes in one batch, two views each, grayscale on some."""
    sizes = [(24, 40), (40, 24), (32, 56), (20, 20)]
    color = np.array([200, 50, 100], np.uint8)
    videos = [{"key": f"c{i}", "label": 0, "frames": [np.zeros((*sizes[i % 4], 3), np.uint8) + color] * 6}
              for i in range(8)]
    write_shards(tmp_path, "train", videos, layout=layout)

    def largest_shift_right(rows, views, n, m, mstd, rng):  # level 0: translate_x at magnitude 10, positive
        draws = np.zeros((rows, views, 3, n), np.int32)
        draws[:, :, 0] = params.RA_IDENTITY
        draws[:, :, :, 0] = [params.RA_OPS.index("translate_x"), params.RA_NUM_BINS - 1, 0]
        return draws

    monkeypatch.setattr(plan_module, "_rand_augment_draws", largest_shift_right)
    data = loader_of(tmp_path, "train", 8, num_segments=2, num_threads=1, seed=5, device=device,
                     randaugment="rand-m9-n2", grayscale_prob=0.5, num_sample=2, **SIZE)
    batch = next(iter(data))
    red = batch["clips"][:, :, :, 0].cpu() * CLIP_STD[0] + CLIP_MEAN[0]  # (8*2, T, 5, S, S), 0-1
    columns = (red * 255).mean(dim=(1, 2, 3))  # (16, S): a video's two views adjacent
    plan, size = data.plan(0), SIZE["image_size"]
    overlaps = []
    for row, view in np.ndindex(8, 2):
        width = sizes[int(batch["key"][2 * row][1:]) % 4][1]
        vacated = params.RA_TRANSLATE * width  # stored columns x < vacated are fill (128) after the shift
        y0, x0, y1, x1 = plan.roi[row, view]
        x = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size  # where each output column samples
        margin = max(1.0, (x1 - x0) / size) + 0.5  # the linear, antialiased resampling blends this far
        fill, kept = x < vacated - margin, x > vacated + margin
        clip = columns[2 * row + view]
        content = 0.299 * 200 + 0.587 * 50 + 0.114 * 100 if plan.gray[row, view] else 200.0
        assert torch.allclose(clip[torch.from_numpy(fill)], torch.tensor(128.0), atol=4), (row, view)
        assert torch.allclose(clip[torch.from_numpy(kept)], torch.tensor(content), atol=6), (row, view)
        overlaps.append(fill.mean())
    assert plan.gray.any() and not plan.gray.all()
    assert min(overlaps) < 0.3 < max(overlaps)  # the share of fill follows each crop, not a fixed 45%


def test_one_pipeline_streams_consecutive_epochs(frame_shards):
    data = loader_of(frame_shards, "train", 2, num_segments=2, seed=6, num_threads=1, **SIZE)
    first = list(data)
    pipe = data._pipe
    second = list(data)  # epoch 1: no rebuild, same batches as a loader started at epoch 1
    assert data._pipe is pipe and data.state_dict()["epoch"] == 2
    planner = data.planner  # epoch 2's plan is being made (or made) in the background
    for thread in list(planner._pending.values()):
        thread.join()
    assert 2 in planner._cache
    fresh = loader_of(frame_shards, "train", 2, num_segments=2, seed=6, num_threads=1, **SIZE)
    next(iter(fresh))
    fresh.close()  # a new pipeline at the jump to epoch 1
    fresh.set_epoch(1)
    for got, want in zip(second, list(fresh)):
        assert got["key"] == want["key"] and torch.equal(got["clips"], want["clips"])
    assert [b["key"] for b in first] != [b["key"] for b in second]


@pytest.mark.parametrize("layout", ["frames", "video"])
def test_source_outputs_are_named_and_match_the_plan(tmp_path, layout):
    write_shards(tmp_path, "train", indexed_videos(2, frames=12), layout=layout)
    data = loader_of(tmp_path, "train", 2, num_segments=2, num_sample=2, grayscale_prob=0.5,
                     randaugment="rand-m9-n2", **SIZE)
    source = source_module.ClipSource(data.planner, data.mode, grayscale=True, randaugment=True)
    per_view = ["roi_start", "roi_end", "mirror", "gray", "draws"]
    inputs = ["encoded"] + (["frame_indices"] if layout == "video" else []) + ["frame_size"]
    assert source.output_names == tuple(inputs + [f"{f}/{v}" for v in range(2) for f in per_view])
    batch, plan = source.batch(0), data.plan(0)
    repeat = 2 * 5 if layout == "frames" else 1  # frame mode: one row per frame of the clip
    np.testing.assert_array_equal(batch["mirror/1"], np.repeat(plan.mirror[:2, 1], repeat))
    np.testing.assert_array_equal(batch["draws/0"], np.repeat(plan.ra[:2, 0], repeat, axis=0))
    np.testing.assert_array_equal(batch["roi_end/1"], np.repeat(plan.roi[:2, 1, 2:], repeat, axis=0))
    assert len(batch["encoded"]) == 2 * repeat and batch["frame_size"].tolist() == [[24, 32]] * (2 * repeat)
    assert len(source(SimpleNamespace(iteration=0))) == len(source.output_names)


def test_frame_spans_merge_adjacent_members_and_keep_frame_order():
    ranges = np.array([[512 + 1536 * i, 1000] for i in range(30)])  # 1000-byte members, 536 bytes apart
    frames = np.array([0, 0, 1, 2, 3, 12, 11, 10, 12, 29])  # clamped repeats, not sorted
    spans, pieces = source_module._frame_spans(ranges[frames])
    assert spans == [(512, 3 * 1536 + 1000), (512 + 10 * 1536, 2 * 1536 + 1000), (512 + 29 * 1536, 1000)]
    for frame, (span, offset, size) in zip(frames, pieces):  # each piece is its frame's bytes, in frame order
        assert (spans[span][0] + offset, size) == tuple(ranges[frame])


def test_planner_keeps_the_epochs_last_asked_for(frame_shards, monkeypatch):
    planner = loader_of(frame_shards, "train", 2, num_segments=2, seed=6, num_threads=1, **SIZE).planner
    made, make_plan = [], plan_module.make_plan
    monkeypatch.setattr(plan_module, "make_plan", lambda *a, **k: made.append(k["epoch"]) or make_plan(*a, **k))
    for epoch in [5, 0, 0, 5]:  # going back to an earlier epoch (a benchmark, a re-run) keeps it cached
        planner(epoch)
        for thread in list(planner._pending.values()):  # epoch + 1, made in the background
            thread.join()
    assert made.count(0) == 1 and made.count(5) == 1


def test_video_layout_decodes_the_expected_frames(tmp_path):
    write_shards(tmp_path, "train", indexed_videos(3, frames=[30, 20, 6]), layout="video")
    data = loader_of(tmp_path, "train", 3, num_segments=4, num_threads=1, seed=2, **SIZE)
    assert data.mode == "video"
    batch = next(iter(data))
    rows = {data.samples[i].key: r for r, i in enumerate(data.plan(0).sample)}
    for got, key in zip(decoded_indices(batch["clips"]), batch["key"]):
        np.testing.assert_array_equal(got, data.plan(0).frames[rows[key]].reshape(4, 5))


@pytest.mark.parametrize("world_size", [2, 3])
def test_test_split_counts_every_video_once_across_ranks(frame_shards, world_size):
    lengths, keys = set(), []
    for rank in range(world_size):
        data = loader_of(frame_shards, "test", 1, num_segments=2, rank=rank, world_size=world_size,
                         num_threads=1, **SIZE)
        lengths.add(len(data))
        plan = data.plan(0)
        keys += [data.samples[i].key for i, ok in zip(plan.sample, plan.valid) if ok]
    assert len(lengths) == 1
    assert sorted(keys) == [f"v{i:03d}" for i in range(5)]


def test_train_ranks_are_disjoint_equal_and_reshuffled_per_epoch(tmp_path):
    write_shards(tmp_path, "train", indexed_videos(10, frames=6))
    loaders = [loader_of(tmp_path, "train", 2, num_segments=2, rank=r, world_size=2, seed=7, **SIZE)
               for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == 2  # 10 videos, 2 ranks x 2 per batch: 8 used, 2 dropped
    orders = []
    for epoch in range(2):
        shares = [list(d.plan(epoch).sample) for d in loaders]
        assert not set(shares[0]) & set(shares[1]) and len(shares[0]) == len(shares[1]) == 4
        orders.append(shares)
    assert orders[0] != orders[1]


def test_same_seed_same_batches_other_seed_other_batches(frame_shards):
    def first(seed):
        return next(iter(loader_of(frame_shards, "train", 2, num_segments=2, seed=seed, num_threads=1,
                                   **SIZE)))
    a, b, c = first(11), first(11), first(12)
    assert a["key"] == b["key"] and torch.equal(a["clips"], b["clips"])
    assert a["key"] != c["key"] or not torch.equal(a["clips"], c["clips"])


@pytest.mark.parametrize("randaugment", [None, "rand-m9-n1-mstd0.5"])  # RandAugment: exact too
def test_resume_mid_epoch_and_at_epoch_boundary(frame_shards, randaugment):
    def make():
        return loader_of(frame_shards, "train", 2, num_segments=2, seed=4, num_threads=1,
                         randaugment=randaugment, **SIZE)

    full = make()
    reference = list(full) + list(full)  # epochs 0 and 1 (the loader moves on by itself)
    assert full.state_dict()["epoch"] == 2
    first = make()
    batches = iter(first)
    next(batches)
    state = first.state_dict()
    assert (state["epoch"], state["position"]) == (0, 1)
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # what a trainer does at the top of the epoch: must not rewind
    rest = list(resumed)
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["position"] == 0
    rest += list(resumed)
    assert len(rest) == len(reference) - 1
    for got, want in zip(rest, reference[1:]):
        assert got["key"] == want["key"] and torch.equal(got["clips"], want["clips"])


def _corrupt(directory: Path, key: str, frame: int, start: int = 0, stop: int | None = None, fill: int = 0) -> None:
    """Overwrite bytes [start, stop) of one frame in its shard (all of it by default) with `fill`."""
    index = json.loads(next(p for p in directory.glob("*.index.json")
                            if key in p.read_text()).read_text())
    entry = next(s for s in index["samples"] if s["key"] == key)
    offset, size = entry["frames"][frame]
    start, stop = start % size, size if stop is None else stop  # a negative start counts from the end
    with open(directory / index["tar"], "r+b") as tar:
        tar.seek(offset + start)
        tar.write(bytes([fill]) * (stop - start))


@pytest.fixture(params=["zeroed", "header", "junk", "tail"])
def broken_shards(tmp_path, request):
    """v002's frames zeroed, or only their headers (the start-of-image marker kept), or with an APP0
    length of 2, which leaves its payload where the next marker should be (PIL skips such junk, the
    source's header check does not: the re-check must agree with the source), or their last 4 bytes
    (the end of the scan data and the end-of-image marker: a decoder warns and goes on)."""
    write_shards(tmp_path, "test", indexed_videos(4, frames=6))
    damage = {"zeroed": (0, None), "header": (2, 200), "junk": (5, 6, 0x02), "tail": (-4, None)}[request.param]
    for frame in range(6):
        _corrupt(tmp_path, "v002", frame, *damage)
    return tmp_path


# 8 segments: 80 images per DALI batch, where DALI 2.4's CPU decoder can crash on a non-image
@pytest.mark.parametrize("num_segments", [2, 8])
def test_decode_error_names_shard_and_key(broken_shards, num_segments):
    data = loader_of(broken_shards, "test", 2, num_segments=num_segments, num_threads=1, **SIZE)
    with pytest.raises(pipelines.ShardReadError, match=r"test-000000\.tar: sample 'v002'"):
        list(data)


@pytest.mark.parametrize("num_segments", [2, 8])
def test_decode_error_skip_counts_and_marks_invalid(broken_shards, num_segments):
    data = loader_of(broken_shards, "test", 2, num_segments=num_segments, num_threads=1, on_error="skip",
                     **SIZE)
    batches = list(data)
    assert [s.rsplit(":", 1)[1] for s in data.skipped] == ["v002"]
    valid = [k for b in batches for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
    assert valid == ["v000", "v001", "v003"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype(frame_shards, dtype):
    data = loader_of(frame_shards, "test", 2, num_segments=2, dtype=dtype, num_threads=1, **SIZE)
    batch = next(iter(data))
    assert batch["clips"].dtype == dtype
    expected = sampling.window(sampling.test_centres(30, 2, 1), 30)[0]
    np.testing.assert_array_equal(decoded_indices(batch["clips"])[0], expected)


def test_reader_worker_processes_give_the_same_batches_over_epochs(frame_shards):
    def two_epochs(py_workers):
        data = loader_of(frame_shards, "train", 2, num_segments=2, seed=8, num_threads=1,
                         py_workers=py_workers, **SIZE)
        return data, list(data) + list(data)  # the workers' stream crosses the epoch boundary

    (_, a), (workers, b) = two_epochs(0), two_epochs(2)
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and torch.equal(x["clips"], y["clips"])
    shared = workers._shared.path  # the byte ranges the workers mapped
    assert Path(shared).exists()
    assert multiprocessing.active_children()
    workers.close()  # what the trainer does with its validation loader between evaluations
    assert not multiprocessing.active_children()
    del workers, b
    import gc

    gc.collect()
    assert not Path(shared).exists()


def test_ctrl_c_stops_the_main_process_only_even_while_reader_processes_start(frame_shards, monkeypatch):
    import importlib
    import os
    import signal
    import time

    loader_module = importlib.import_module("pipelines.batches")
    real_train_pipeline = loader_module.train_pipeline

    def interrupted_while_building(*args, **kwargs):
        pipe = real_train_pipeline(*args, **kwargs)
        build = pipe.build

        def build_after_ctrl_c():
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C came while the readers start (~1-2 s)
            time.sleep(0.1)
            build()
        pipe.build = build_after_ctrl_c
        return pipe

    monkeypatch.setattr(loader_module, "train_pipeline", interrupted_while_building)
    data = loader_of(frame_shards, "train", 2, num_segments=2, num_threads=1, py_workers=2, **SIZE)
    with pytest.raises(KeyboardInterrupt):
        next(iter(data))
    monkeypatch.undo()

    data = loader_of(frame_shards, "train", 2, num_segments=2, num_threads=1, py_workers=2, **SIZE)
    first = next(iter(data))
    readers = multiprocessing.active_children()
    assert len(readers) == 2
    for reader in readers:  # they block SIGINT from their first instruction on: inherited, not set once started
        blocked = int(Path(f"/proc/{reader.pid}/status").read_text().split("SigBlk:")[1].split()[0], 16)
        assert blocked & (1 << (signal.SIGINT - 1))
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, set())  # the main process's is lifted
    for reader in readers:  # a terminal's Ctrl-C reaches the whole process group
        os.kill(reader.pid, signal.SIGINT)
    time.sleep(0.5)
    assert all(reader.is_alive() for reader in readers)  # they leave it to the main process
    assert next(iter(data))["clips"].shape == first["clips"].shape
    data.close()


def test_train_skip_replaces_the_bad_video(broken_shards):
    data = loader_of(broken_shards, "train", 2, num_segments=2, split="test",
                     num_threads=1, on_error="skip", seed=1, **SIZE)
    keys = [k for b in data for k in b["key"]]
    assert len(keys) == 4 and "v002" not in keys and len(data.skipped) == 1
    assert data.state_dict()["skipped"] == [2]


def test_truncated_shard_names_shard_and_key(tmp_path):
    write_shards(tmp_path, "test", indexed_videos(2, frames=6))
    tar = tmp_path / "test-000000.tar"
    tar.write_bytes(tar.read_bytes()[:2048])  # cut inside v000's frames
    data = pipelines.Loader([str(tar)], ClipSpec(split="test", num_segments=2, **SIZE), 2, num_threads=1)  # no manifest
    with pytest.raises(pipelines.ShardReadError, match=r"test-000000\.tar: sample 'v00\d'.*(truncated|decode)"):
        list(data)


def test_load_state_dict_rejects_another_seed(frame_shards):
    state = loader_of(frame_shards, "train", 2, num_segments=2, seed=1, **SIZE).state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader_of(frame_shards, "train", 2, num_segments=2, seed=2, **SIZE).load_state_dict(state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (DALI mixed backend)")
@pytest.mark.parametrize("split", ["train", "test"])
def test_gpu_path_decodes_the_same_frames(frame_shards, split):
    options = dict(num_segments=4, seed=3, num_threads=2, grayscale_prob=0.5, flip="plain", **SIZE)
    gpu = loader_of(frame_shards, split, 2, device="cuda", **options)
    cpu = loader_of(frame_shards, split, 2, device="cpu", **options)
    for a, b in zip(gpu, cpu):
        assert a["clips"].device.type == "cuda" and a["label"].device.type == "cuda"
        assert a["key"] == b["key"]
        np.testing.assert_array_equal(decoded_indices(a["clips"]), decoded_indices(b["clips"]))
        torch.testing.assert_close(a["clips"].cpu(), b["clips"], atol=0.1, rtol=0)


def test_bad_arguments(frame_shards):
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 2.5"):
        loader_of(frame_shards, "test", 2.5, num_segments=2, **SIZE)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            loader_of(frame_shards, "test", 2, num_segments=2, device="cuda", **SIZE)
    with pytest.raises(ValueError, match="frames_per_segment must be odd"):
        loader_of(frame_shards, "test", 2, frames_per_segment=4, **SIZE)


def test_jpeg_header_check():
    from pipelines.reader import jpeg_headers_ok

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    frames = {}
    for name, options in {"baseline": {}, "progressive": {"progressive": True},
                          "exif": {"exif": b"Exif\x00\x00" + bytes(20)}}.items():
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75, **options)
        frames[name] = np.frombuffer(buffer.getvalue(), np.uint8)
    jpeg = frames["baseline"]
    sos = next(i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xDA)
    tail_damaged = jpeg.copy()
    tail_damaged[sos + 20:] = 0  # past the header: DALI decodes it (wrong pixels) without crashing
    frames["damage past the header"] = tail_damaged
    good = len(frames)
    frames.update({"empty": jpeg[:0], "no SOI": jpeg[2:], "zeroed header": np.concatenate([jpeg[:2], np.zeros(200, np.uint8),
                                                                                             jpeg[202:]]),
                   "cut before the scan": jpeg[:sos], "zeros after SOI": np.concatenate([jpeg[:3], np.zeros(9, np.uint8)]),
                   "cut inside SOI": jpeg[:3]})
    frames["fill bytes without end"] = np.concatenate([jpeg[:2], np.full(5000, 0xFF, np.uint8)])
    names = list(frames)
    assert not jpeg_headers_ok(np.empty(0, np.uint8), [0], [0]).any()
    for order in (names, names[::-1]):  # one buffer, frames back to back: none may read into the next
        sizes = np.array([len(frames[n]) for n in order])
        ok = jpeg_headers_ok(np.concatenate([frames[n] for n in order]), np.cumsum(sizes) - sizes, sizes)
        assert dict(zip(order, ok.tolist())) == {n: i < good for i, n in enumerate(names)}


def test_jpeg_problems_find_damage_past_the_header():
    from pipelines.reader import JPEG_BAD_END, JPEG_BAD_HEADER, JPEG_OK, jpeg_problems

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=75, progressive=True)
    jpeg = np.frombuffer(buffer.getvalue(), np.uint8)
    sos = next(i for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and jpeg[i + 1] == 0xDA)
    zeroed_tail = jpeg.copy()
    zeroed_tail[sos + 200:] = 0
    header_only = np.concatenate([jpeg[:sos + 14], [0xFF, 0xD9]]).astype(np.uint8)  # SOS segment, then EOI
    frames = {"whole": (jpeg, JPEG_OK), "bytes after the end marker": (np.concatenate([jpeg, np.zeros(70, np.uint8)]),
                                                                       JPEG_OK),
              "zeroed tail": (zeroed_tail, JPEG_BAD_END), "cut short": (jpeg[:-40], JPEG_BAD_END),
              "no scan data": (header_only, JPEG_BAD_END),
              "no header": (jpeg[2:], JPEG_BAD_HEADER)}
    sizes = np.array([len(frame) for frame, _ in frames.values()])
    problems = jpeg_problems(np.concatenate([frame for frame, _ in frames.values()]), np.cumsum(sizes) - sizes, sizes)
    assert dict(zip(frames, problems.tolist())) == {name: code for name, (_, code) in frames.items()}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_jpeg_damaged_past_its_header_is_named_once_or_skipped(tmp_path, capfd, on_error):
    """Textured frames (a scan of several KB) zeroed from the middle of their scan data on, or cut short by
    a shorter member: without the end check DALI decodes them with one libjpeg warning per frame."""
    rng = np.random.default_rng(1)
    videos = [{"key": f"n{i}", "label": 0, "frames": [rng.integers(0, 255, (24, 32, 3), np.uint8)] * 6}
              for i in range(3)]
    write_shards(tmp_path, "val", videos)
    for frame in range(6):
        _corrupt(tmp_path, "n1", frame, -300)
    data = loader_of(tmp_path, "val", 3, num_segments=2, num_threads=1, on_error=on_error, **SIZE)
    if on_error == "raise":
        with pytest.raises(pipelines.ShardReadError, match=r"val-000000\.tar: sample 'n1': .*frame \d+ .*is damaged "
                                                           r"past its header"):
            list(data)
    else:
        valid = [k for b in data for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
        assert valid == ["n0", "n2"] and [s.rsplit(":", 1)[1] for s in data.skipped] == ["n1"]
    assert "Corrupt JPEG" not in capfd.readouterr().err  # nothing reached the decoder


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_damaged_video_shard_names_or_skips_the_sample(tmp_path, on_error):
    write_shards(tmp_path, "test", indexed_videos(4, frames=12), layout="video")
    index = json.loads(next(p for p in tmp_path.glob("*.index.json") if "v002" in p.read_text()).read_text())
    offset, size = next(s for s in index["samples"] if s["key"] == "v002")["video"]
    with open(tmp_path / index["tar"], "r+b") as tar:  # the middle of the WebM: the frames' data
        tar.seek(offset + size // 2)
        tar.write(b"\x00" * (size // 4))
    data = loader_of(tmp_path, "test", 4, num_segments=8, num_threads=1, on_error=on_error, **SIZE)
    if on_error == "raise":
        with pytest.raises(pipelines.ShardReadError, match=r"sample 'v002': decode failed"):
            list(data)
    else:
        valid = [k for b in data for k, ok in zip(b["key"], b["valid"].tolist()) if ok]
        assert valid == ["v000", "v001", "v003"] and [s.rsplit(":", 1)[1] for s in data.skipped] == ["v002"]


def test_frames_per_segment_sets_the_window(frame_shards):
    data = loader_of(frame_shards, "val", batch_size=2, num_segments=4, split="test",
                     frames_per_segment=3, num_threads=1, **SIZE)
    batch = next(iter(data))
    assert batch["clips"].shape == (2, 4, 3, 3, 16, 16)
    expected = sampling.window(sampling.val_centres(30, 4), 30, length=3)  # (T, 3)
    for got in decoded_indices(batch["clips"]):
        np.testing.assert_array_equal(got, expected)


def test_ctrl_c_during_close_reaches_the_caller(frame_shards):
    data = loader_of(frame_shards, "train", batch_size=2, num_segments=2, num_threads=1, **SIZE)
    next(iter(data))
    real = data._pipe

    class Interrupted:
        def _shutdown(self):
            real._shutdown()
            raise KeyboardInterrupt  # as if Ctrl-C came while DALI shut down

    data._pipe = Interrupted()
    with pytest.raises(KeyboardInterrupt):
        data.close()


def test_bench_pipeline_measurements_run_on_our_graphs(frame_shards):
    """tools/bench_pipeline.py's stage split, source rate and feed rate build on pipelines' own graphs and
    sources: they must keep up with their signatures (timing is not asserted)."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_pipeline", Path(__file__).parents[1] / "tools" / "bench_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = loader_of(frame_shards, "train", 1, num_segments=2, num_threads=1, **SIZE)
    cost = bench.stage_cost(data, SimpleNamespace(image_size=SIZE["image_size"], threads=1, seconds=0))
    assert set(cost) == {"decode", "crop+resize", "all"} and all(cpu >= 0 and wall > 0 for cpu, wall in cost.values())
    rate, preads = bench.source_rate(data, seconds=0.2)
    assert rate > 0 and 1 <= preads <= data.spec.frames_per_video
    assert bench.feed_rate(data, 0, 1, seconds=0.2) > 0


def test_decode_window_covers_every_views_roi_and_the_filters_reach():
    roi = np.array([[[10.5, 20.25, 30.0, 60.0], [5.0, 40.0, 20.0, 90.5]],  # two views, upscaled (scale < 1)
                    [[0.0, 0.0, 120.0, 200.0], [0.0, 0.0, 120.0, 200.0]]], np.float32)  # shrinking 2.5x
    anchor, shape = params.decode_window(roi, np.array([[100, 100], [128, 256]]), size=80)
    margin_small, margin_big = 2 + params.DECODE_GUARD, 2 * 3 + params.DECODE_GUARD
    np.testing.assert_array_equal(anchor, [[20 - margin_small, 5 - margin_small], [0, 0]])  # [x0, y0], clamped
    np.testing.assert_array_equal(shape, [[91 + margin_small - (20 - margin_small), 30 + margin_small - (5 - margin_small)],
                                          [200 + margin_big, 120 + margin_big]])


@pytest.mark.parametrize("mode, options", [("train", dict(num_sample=2, flip="plain", grayscale_prob=0.5)),
                                           ("test", dict(test_crops=3))])
def test_crop_decode_gives_the_full_decodes_pixels(tmp_path, monkeypatch, mode, options):
    """CPU frame decoding reads only the crops' window (ClipSource crop_decode); on natural-looking
    frames the clips equal the whole-frame decode's but for rounding: at most 1 level in 0-255."""
    from shards.synthetic import natural_video

    rng = np.random.default_rng(0)
    videos = [{"key": f"v{i}", "label": 0, "frames": list(natural_video(12, 72, 128, rng))} for i in range(4)]
    shards = write_shards(tmp_path, mode, videos)

    def clips():
        loader = loader_of(shards, mode, batch_size=2, num_segments=2, image_size=32, resize=40, **options)
        return torch.cat([batch["clips"] for batch in loader])

    full_source, made = source_module.ClipSource, []

    def source(*args, crop_decode: bool, **kwargs):
        made.append(crop_decode)
        return full_source(*args, crop_decode=crop_decode and not full_decode, **kwargs)

    monkeypatch.setattr(pipelines.batches, "ClipSource", source)
    full_decode = False
    cropped = clips()
    full_decode = True
    full = clips()
    assert made == [True, True]  # the loader asked for it (CPU, frames, no RandAugment)
    levels = (cropped - full).abs() * torch.tensor(CLIP_STD).view(3, 1, 1) * 255
    assert levels.max() <= 1.01, levels.max()
    assert (levels > 0.5).float().mean() < 1e-3


def test_exif_orientation_is_not_applied_as_the_official_pil_loader(tmp_path):
    """Frame folders are copied as they are, EXIF tags included: a rotation tag must neither rotate the frames
    (PIL, the official loader, ignores it) nor break the crop windows, which refer to the stored size."""
    frames = [frame_image(j, 48, 64) for j in range(8)]  # not square: a rotation would change the size

    def rotated_tag(image: np.ndarray) -> bytes:
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=95, exif=exif)
        return buffer.getvalue()

    for name, encode in (("plain", jpeg), ("tagged", rotated_tag)):
        meta = {"key": "v000", "label": 0, "num_frames": len(frames), "fps": 25.0, "width": 64, "height": 48,
                "source": "v000.mp4", "layout": "frames"}
        (tmp_path / name).mkdir()
        writer = ShardWriter(tmp_path / name, "train", 0)
        writer.add(EncodedSample(meta=meta, frames=[encode(f) for f in frames]))
        record = writer.close(build={})
        manifest = Manifest(split="train", layout="frames", encoding={}, classes=[], num_samples=1, shards=[record],
                            rejected=[], tool_version="test")
        write_json_atomic(tmp_path / name / "train.manifest.json", manifest.to_json())
    for mode in ("train", "test"):  # the crop decode (train) and the whole-frame decode (test views)
        clips = [next(iter(loader_of(tmp_path / name, mode, 1, 2, split="train", image_size=16, resize=20,
                                     num_threads=1, test_crops=3)))["clips"] for name in ("plain", "tagged")]
        assert torch.equal(clips[0], clips[1]), mode
