"""pipelines.loader on tiny fixture shards through the real DALI CPU path.

Fixture frames are flat gray with value 8*i + 4 for frame i, so a decoded, cropped and
normalized frame still says which frame it was.
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import sampling
from pipelines.augment import CLIP_MEAN, CLIP_STD

SIZE = dict(image_size=16, resize=20)


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
    """Shards per docs/shard_format.md: videos are {"key", "label", "frames": [HxWx3 uint8]}."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for number, first in enumerate(range(0, len(videos), per_shard)):
        name = f"{split}-{number:06d}"
        samples = []
        with tarfile.open(directory / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for video in videos[first:first + per_shard]:
                samples.append(_write_sample(tar, video, layout))
        for sample in samples:  # offsets of data, known once members are written
            sample["frames" if layout == "frames" else "video"] = _data_ranges(directory / f"{name}.tar", sample)
            del sample["_members"]
        index = {"format": "tdsclip-shard-index", "version": 1, "tar": f"{name}.tar", "samples": samples}
        (directory / f"{name}.index.json").write_text(json.dumps(index))
        entries.append({"tar": f"{name}.tar", "index": f"{name}.index.json", "num_samples": len(samples),
                        "bytes": (directory / f"{name}.tar").stat().st_size, "sha256": ""})
    manifest = {"format": "tdsclip-shards", "version": 1, "tool_version": "test", "split": split,
                "layout": layout, "encoding": {}, "classes": [], "num_samples": len(videos),
                "shards": entries, "rejected": []}
    (directory / f"{split}.manifest.json").write_text(json.dumps(manifest))
    return directory


def _write_sample(tar: tarfile.TarFile, video: dict, layout: str) -> dict:
    frames, key = video["frames"], video["key"]
    height, width = frames[0].shape[:2]
    meta = {"key": key, "label": video["label"], "num_frames": len(frames), "fps": 25.0, "width": width,
            "height": height, "source": f"{key}.mp4", "layout": layout}
    members = {f"{key}.json": json.dumps(meta).encode()}
    if layout == "frames":
        members.update({f"{key}.{i:06d}.jpg": jpeg(image) for i, image in enumerate(frames)})
    else:
        members[f"{key}.webm"] = webm(frames)
    for name, data in members.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return {**{k: meta[k] for k in ("key", "label", "num_frames", "fps", "width", "height", "layout")},
            "_members": [n for n in members if not n.endswith(".json")]}


def _data_ranges(path: Path, sample: dict):
    with tarfile.open(path) as tar:
        found = {m.name: [m.offset_data, m.size] for m in tar.getmembers()}
    ranges = [found[name] for name in sample["_members"]]
    return ranges if sample["layout"] == "frames" else ranges[0]


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
    data = pipelines.loader(frame_shards, "train", batch_size=2, num_segments=4, num_sample=2, seed=3,
                            num_threads=1, **SIZE)
    assert len(data) == 3 and data.num_samples == 6
    seen = []
    for batch in data:
        assert batch["clips"].shape == (4, 4, 5, 3, 16, 16) and batch["clips"].dtype == torch.float32
        assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
        assert batch["key"][0] == batch["key"][1] and batch["key"][2] == batch["key"][3]
        got = decoded_indices(batch["clips"])
        plan = data._plan(0)
        for v, key in enumerate(batch["key"]):
            row = len(seen) // 2
            frames = plan.frames[row].reshape(4, 5)
            np.testing.assert_array_equal(got[v], frames)
            seen.append(key)
    assert sorted(set(seen)) == [f"v{i:03d}" for i in range(6)]
