"""tdsclip.pictures, tools/show_clips.py and predict --sheet: the pictures show what they claim.

Clips come from a real loader (DALI CPU) over tiny fixture shards whose frames are flat gray with value
8*i + 4 for frame i (tests/test_pipelines.py), so a drawn tile says which frame it is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipelines import indexed_videos, write_shards

from pipelines.augment import CLIP_MEAN, CLIP_STD
from tdsclip import pictures
from tdsclip.evaluate import accuracy_report
from tools import predict, show_clips

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_tiny" / "checkpoint.pt"
CLASSES = ["left", "right", "up"]
SWAP = {0: 1, 1: 0}
# demo.yaml made tiny: T=2 segments of M=5 frames, 16 px; flips that swap left and right
TINY = ["model.image_size=16", "model.num_segments=2", "data.resize=20", "data.num_threads=1", "data.num_sample=2",
        "data.flip=swap", "data.flip_label_map={0: 1, 1: 0}", "seed=5"]


def label_of(key: str) -> int:
    return int(key[1:]) % 3  # indexed_videos' default labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pictures")
    for split, count in (("train", 6), ("val", 3)):
        write_shards(directory, split, indexed_videos(count, frames=20))
        path = directory / f"{split}.manifest.json"
        manifest = json.loads(path.read_text())
        path.write_text(json.dumps({**manifest, "classes": CLASSES}))  # names, as make_shards --labels writes
    return directory


@pytest.fixture(scope="module")
def train_clips(shards) -> tuple[dict, object]:
    """The first 4 training clips (2 videos x 2 views) as show_clips takes them, and the epoch's plan."""
    config = show_clips.read_config(show_clips.parse_args([str(shards), "--split", "train", "--cfg",
                                                           str(ROOT / "configs/demo.yaml"), *TINY]))
    loader = show_clips.make_loader(config, "train", 2)
    plan = loader.plan()
    try:
        return show_clips.first_clips(loader, 4), plan
    finally:
        loader.close()


def test_denormalize_inverts_the_pipeline_normalisation():
    pixels = torch.randint(0, 256, (2, 3, 5, 7), generator=torch.Generator().manual_seed(0))  # (F, 3, H, W)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    normalised = (pixels / 255 - mean) / std  # as crop_mirror_normalize
    assert np.array_equal(pictures.denormalize(normalised), pixels.permute(0, 2, 3, 1).numpy())  # HWC
    coarse = pictures.denormalize(normalised.to(torch.bfloat16)).astype(int)  # bf16 batches: 8-bit mantissa
    assert np.abs(coarse - pixels.permute(0, 2, 3, 1).numpy()).max() <= 1


def test_clip_strip_pixels_are_the_loaders_frames_de_normalised(train_clips):
    batch, plan = train_clips
    clip = batch["clips"][0]  # (T=2, M=5, 3, 16, 16)
    strip = pictures.clip_strip(clip, caption="left", window_segment=1, scale=3)
    frames = plan.frames[0].reshape(2, 5)  # the stored frame index of each (segment, window position)
    layout = pictures.strip_layout(2, 5, 48, window_segment=1)
    assert [(t, m) for t, m, _, _ in layout] == [(0, 2), (1, 2)] + [(1, m) for m in range(5)]
    assert strip.shape == (pictures.CAPTION_HEIGHT + 2 * 48 + pictures.GAP, 5 * 50 - 2, 3)
    for t, m, top, left in layout:
        block = strip[top:top + 48, left:left + 48]
        expected = pictures.denormalize(clip[t, m]).repeat(3, 0).repeat(3, 1)
        assert np.array_equal(block, expected), (t, m)
        assert abs(block.mean() - (8 * frames[t, m] + 4)) < 2  # the frame the plan chose, not a neighbour
    assert (strip[:pictures.CAPTION_HEIGHT] < 128).any()  # the caption is drawn
    assert not (pictures.clip_strip(clip)[:pictures.CAPTION_HEIGHT] < 255).any()  # none without one


def test_sheet_captions_are_the_clips_classes_and_tiles_their_strips(train_clips):
    batch, plan = train_clips
    sheet, captions = pictures.batch_sheet(batch, CLASSES, count=4, scale=1, columns=2)
    for caption, key, flipped in zip(captions, batch["key"], plan.mirror[:2].reshape(-1)):
        label = SWAP.get(label_of(key), label_of(key)) if flipped else label_of(key)
        swapped = bool(flipped) and label != label_of(key)
        assert caption == pictures.clip_caption(CLASSES[label], flipped=bool(flipped), label_swapped=swapped, key=key)
    assert plan.mirror[:2].any() and not plan.mirror[:2].all()  # seed 5: both kinds of clip are checked
    height, width = pictures.clip_strip(batch["clips"][0]).shape[:2]
    for index, (clip, caption) in enumerate(zip(batch["clips"], captions)):
        top, left = (index // 2) * (height + pictures.SHEET_GAP), (index % 2) * (width + pictures.SHEET_GAP)
        assert np.array_equal(sheet[top:top + height, left:left + width], pictures.clip_strip(clip, caption=caption))


def test_confusion_matrix_counts_and_image_shades():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 200)
    labels[labels == 4] = 3  # class 4 has no videos
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 5, 200))
    matrix = pictures.confusion_matrix(torch.from_numpy(labels), preds, 5)
    expected = np.zeros((5, 5), int)
    for true, pred in zip(labels, preds):
        expected[true, pred] += 1
    assert np.array_equal(matrix, expected)
    report = accuracy_report(torch.from_numpy(matrix).double(), torch.zeros(5, dtype=torch.float64))
    accuracy = report["per_class_top1"]  # the per-class accuracy the run reports, from this matrix
    assert np.allclose(accuracy[:4], [100 * np.mean(preds[labels == c] == c) for c in range(4)]) and accuracy[4] is None
    assert report["per_class_videos"] == expected.sum(1).tolist()
    errors = expected * (1 - np.eye(5, dtype=int))
    true, pred = np.unravel_index(errors.argmax(), errors.shape)
    assert pictures.most_confused(matrix, list("abcde"), k=3)[0] == (
        f"{'abcde'[true]} -> {'abcde'[pred]}: {errors[true, pred]} of {expected[true].sum()} "
        f"({100 * errors[true, pred] / expected[true].sum():.1f}%)")
    assert len(pictures.most_confused(matrix, None, k=100)) == np.count_nonzero(errors)
    check_shades(pictures.confusion_image(matrix, list("abcde")), expected)


def test_confusion_image_of_400_classes_keeps_one_cell_per_class():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 400, 3000)
    preds = np.where(rng.random(3000) < 0.5, labels, rng.integers(0, 400, 3000))
    matrix = pictures.confusion_matrix(labels, preds, 400)
    image = pictures.confusion_image(matrix, [f"class {c}" for c in range(400)], size=800)
    cell, top, left = pictures.confusion_layout(400, 800)
    assert cell == 2 and image.shape == (top + 801, left + 801, 3)
    check_shades(image, matrix)


def check_shades(image: np.ndarray, counts: np.ndarray) -> None:
    """Each cell is shaded by the root of its share of its row (white 0, navy 1): read back at cell corners."""
    cell, top, left = pictures.confusion_layout(len(counts))
    drawn = image[top:top + len(counts) * cell:cell, left:left + len(counts) * cell:cell].astype(float)  # (C, C, 3)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    expected = 255 + np.sqrt(share)[..., None] * (pictures.NAVY - 255)
    assert np.abs(drawn - expected).max() <= 0.5


def test_predict_row_draws_the_frames_and_one_bar_per_class():
    frames = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    top = [("right", 0.625), ("left", 0.25), ("up", 0.125)]
    row = pictures.predict_row(frames, title="clip.mp4", top=top)
    for i, frame in enumerate(frames):
        left = i * (20 + pictures.GAP)
        assert np.array_equal(row[pictures.CAPTION_HEIGHT:pictures.CAPTION_HEIGHT + 20, left:left + 20], frame)
    check_bars(row, 0, frames_width=3 * 22 - 2, probabilities=[p for _, p in top])


def check_bars(picture: np.ndarray, top: int, frames_width: int, probabilities: list[float]) -> None:
    """Bar i of the row starting at pixel row `top` is navy for round(p * BAR_WIDTH) px, then track."""
    left = frames_width + 2 * pictures.SHEET_GAP
    for i, probability in enumerate(probabilities):
        line = picture[top + pictures.bar_top(i) + pictures.BAR_HEIGHT // 2, left:left + pictures.BAR_WIDTH]
        navy = (line == pictures.NAVY).all(-1)
        assert navy.sum() == round(probability * pictures.BAR_WIDTH) and navy[:navy.sum()].all(), i


def test_show_clips_writes_a_sheet_and_gifs(shards, tmp_path, capsys):
    out, gifs = tmp_path / "sheet.png", tmp_path / "gifs"
    args = [str(shards), "--split", "val", "--cfg", str(ROOT / "configs/demo.yaml"), *TINY, "--num", "3",
            "--out", str(out), "--gif", str(gifs)]
    assert show_clips.main(args) == 0
    assert capsys.readouterr().out.startswith(f"{out}: 3 val clips")
    tile = 16 * math.ceil(pictures.MIN_TILE / 16)  # 96
    height, width = pictures.CAPTION_HEIGHT + 2 * tile + pictures.GAP, 5 * (tile + pictures.GAP) - pictures.GAP
    columns = round(math.sqrt(3 * height / width))
    rows = -(-3 // columns)
    sheet = np.asarray(Image.open(out))
    assert sheet.shape == (rows * (height + pictures.SHEET_GAP) - pictures.SHEET_GAP,
                           columns * (width + pictures.SHEET_GAP) - pictures.SHEET_GAP, 3)
    written = sorted(gifs.iterdir())
    assert [p.name for p in written] == ["00_v000.gif", "01_v001.gif", "02_v002.gif"]  # val: in order
    with Image.open(written[1]) as gif:
        assert gif.n_frames == 2 * 5 and gif.size == (max(tile, pictures.ANIMATION_WIDTH),
                                                      pictures.CAPTION_HEIGHT + tile)


@pytest.mark.parametrize("args, code, message", [
    (["--split", "val", "model.widht=3"], 2, "model.widht: unknown key"),
    (["--split", "val", "data.val_split=null"], 2, "data.val_split is null"),
    (["--split", "train", "data.train_split=nope"], 1, "nope.manifest.json"),
])
def test_show_clips_errors_are_one_line(shards, tmp_path, capsys, args, code, message):
    assert show_clips.main([str(shards), *args, "--out", str(tmp_path / "s.png")]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s.png").exists()


def test_predict_takes_launch_overrides_and_draws_a_sheet(tmp_path, capsys, monkeypatch):
    from shards.synthetic import indexed_frames, write_frame_folder

    folders = [tmp_path / "a", tmp_path / "b"]
    for number, folder in enumerate(folders):
        write_frame_folder(folder, indexed_frames(6 + number, 24, 24))
    monkeypatch.chdir(tmp_path)
    assert predict.is_override("data.resize=18") and predict.is_override("seed=3")
    assert predict.is_override("model.x=1") and not predict.is_override("clips.v1=a")  # not a config section
    Path("model.x=1").mkdir()  # an input named like an override: it exists, so it is an input
    assert not predict.is_override("model.x=1")
    sheet, result = tmp_path / "out" / "sheet.png", tmp_path / "p.json"
    golden = ["model.image_size=16", "model.num_segments=2", "model.num_classes=5"]  # demo.yaml has its other sizes
    code = predict.main([str(folders[0]), *golden, "data.resize=18", str(folders[1]),
                         "--cfg", str(ROOT / "configs/demo.yaml"), "--weights", str(GOLDEN), "--short-side", "0",
                         "--top", "3", "--json", str(result), "--sheet", str(sheet), "data.num_threads=1"])
    assert code == 0, capsys.readouterr().err
    predictions = json.loads(result.read_text())["predictions"]
    assert [p["input"] for p in predictions] == [str(f) for f in folders]
    picture = np.asarray(Image.open(sheet))
    tile = 16 * pictures.auto_scale(16)  # T=2 frames of the checkpoint's 16 px, enlarged as show_clips does
    frames_width = 2 * (tile + pictures.GAP) - pictures.GAP
    row_height = pictures.CAPTION_HEIGHT + max(tile, 3 * pictures.BAR_PITCH)
    assert picture.shape[0] == 2 * row_height + pictures.SHEET_GAP
    for number, prediction in enumerate(predictions):
        top = number * (row_height + pictures.SHEET_GAP)
        check_bars(picture, top, frames_width, [t["probability"] for t in prediction["top"]])
        tiles = picture[top + pictures.CAPTION_HEIGHT:top + pictures.CAPTION_HEIGHT + tile, :frames_width]
        assert (tiles != 255).any()  # the input's frames are drawn
