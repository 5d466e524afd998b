"""Synthetic data: the motion label is in the motion only, the dataset packs through make_shards, and
self-indexing frames survive JPEG, VP9, crops and flips."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from shards.build import build_split
from shards.encode import EncodeOptions
from shards.manifest import read_frames, read_index, read_video
from shards.sources import read_labels, read_list
from shards.synthetic import MotionSpec, frame_index, indexed_frames, motion_video, write_video
from tools import make_synthetic


def _shape_outline(frame: np.ndarray) -> np.ndarray:
    return frame.max(axis=-1) < 40  # shapes have a near-black outline; the background never gets that dark


def _displacement(video: np.ndarray, t: int, step: int, max_shift: int = 12) -> tuple[int, int]:
    """The (dy, dx) that best maps the shape outlines of frame t onto those of frame t + step."""
    a, b = _shape_outline(video[t]), _shape_outline(video[t + step])
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    return max(shifts, key=lambda s: np.sum(np.roll(a, s, axis=(0, 1)) & b))


@pytest.mark.parametrize("num_classes", [4, 8])
def test_label_is_the_direction_of_motion(num_classes):
    spec = MotionSpec(num_classes=num_classes)
    expected = {4: [(0, 1), (1, 0), (0, -1), (-1, 0)],
                8: [(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]}[num_classes]
    for label in range(num_classes):
        video = motion_video(label, spec, np.random.default_rng(label))
        dy, dx = _displacement(video, 3, 4)
        assert (np.sign(dy), np.sign(dx)) == expected[label]
        assert abs(np.hypot(dy, dx) - 4 * spec.shape_speed) <= 1.5


def test_no_single_frame_tells_the_label():
    """With the same random draws, every class starts from the very same first frame."""
    spec = MotionSpec()
    first = [motion_video(label, spec, np.random.default_rng(7))[0] for label in range(spec.num_classes)]
    assert all(np.array_equal(first[0], f) for f in first[1:])
    later = [motion_video(label, spec, np.random.default_rng(7))[10] for label in range(spec.num_classes)]
    assert not np.array_equal(later[0], later[1])


def test_background_moves_independently_of_label():
    spec = MotionSpec(num_shapes=0)
    drifts = {tuple(np.sign(_displacement_background(motion_video(0, spec, np.random.default_rng(s)))))
              for s in range(6)}
    assert len(drifts) > 1


def _displacement_background(video: np.ndarray) -> tuple[int, int]:
    a, b = video[0].astype(float).mean(-1), video[12].astype(float).mean(-1)
    shifts = [(dy, dx) for dy in range(-12, 13) for dx in range(-12, 13)]
    return min(shifts, key=lambda s: np.abs(np.roll(a, s, axis=(0, 1)) - b).mean())


def test_make_synthetic_cli_and_make_shards(tmp_path):
    out = tmp_path / "syn"
    assert make_synthetic.main([str(out), "--num-classes", "3", "--videos-per-class", "2", "--val-per-class", "1",
                      "--frames", "12", "--size", "32"]) == 0
    train = read_list(out / "train.txt")
    assert len(train) == 6 and len(read_list(out / "val.txt")) == 3
    assert sorted(s.label for s in train) == [0, 0, 1, 1, 2, 2] and not any(s.is_frame_folder for s in train)
    assert read_labels(out / "labels.csv") == ["moving 0 degrees", "moving 120 degrees", "moving 240 degrees"]
    manifest = build_split(train, out, tmp_path / "shards", ["a", "b", "c"], EncodeOptions(short_side=0))
    assert manifest.num_samples == 6 and not manifest.rejected
    assert all(e.num_frames == 12 and e.width == 32 for e in read_index(manifest.index_paths()[0]))

    frames_out = tmp_path / "frames"
    assert make_synthetic.main([str(frames_out), "--videos-per-class", "1", "--val-per-class", "1", "--frames", "6",
                      "--size", "32", "--layout", "frames"]) == 0
    folders = read_list(frames_out / "train.txt")
    assert len(folders) == 4 and all(s.is_frame_folder and s.num_frames == 6 for s in folders)
    manifest = build_split(folders, frames_out, tmp_path / "fshards", ["0", "1", "2", "3"], EncodeOptions())
    assert manifest.num_samples == 4


def test_indexed_frames_survive_codecs_crops_and_flips(tmp_path):
    frames = indexed_frames(300, 32, 48)
    assert [frame_index(f) for f in frames] == list(range(300))
    path = tmp_path / "indexed.mp4"
    write_video(path, frames[:40])
    sources = tmp_path / "list.txt"
    sources.write_text("indexed.mp4 0\n")
    for layout in ("frames", "video"):
        options = EncodeOptions(layout=layout, short_side=64, quality=50, crf=45)
        manifest = build_split(read_list(sources), tmp_path, tmp_path / layout, ["0"], options)
        (entry,) = read_index(manifest.index_paths()[0])
        if layout == "frames":
            decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in read_frames(entry, range(40))]
        else:
            with av.open(io.BytesIO(read_video(entry))) as container:
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert [frame_index(f[5:30, 10:40][:, ::-1]) for f in decoded] == list(range(40))
    chw = np.transpose(frames[123], (2, 0, 1)).astype(np.float32)
    assert frame_index(chw) == 123
