"""Crop windows (official positions) alone, and through the DALI graph on gradient frames."""

import re

import numpy as np
import pytest
import torch

from pipelines import augment, params
from pipelines import plan as plan_module
from pipelines.config import parse_randaugment
from test_pipelines import CUDA, SIZE, gradient_image, loader_of, write_shards


def test_scaled_size_follows_torchvision_resize_and_exact_sizes():
    assert params.scaled_size(24, 32, 256) == (256, 341)
    assert params.scaled_size(32, 24, 256) == (341, 256)
    assert params.scaled_size(240, 427, (256, 320)) == (256, 320)


def test_test_crops_official_positions_and_order():
    # scaled 256x341, crop 224: w_step = 29, h_step = 8
    assert params.test_crops(256, 341, 224, 1) == [(16, 58, False)]
    assert params.test_crops(256, 341, 224, 3) == [(16, 0, False), (16, 116, False), (16, 58, False)]
    five = [(0, 0), (0, 116), (32, 0), (32, 116), (16, 58)]
    assert params.test_crops(256, 341, 224, 5) == [(y, x, False) for y, x in five]
    assert params.test_crops(256, 341, 224, 10) == [(y, x, m) for y, x in five for m in (False, True)]
    with pytest.raises(ValueError, match="test_crops"):
        params.test_crops(256, 341, 224, 4)


def test_random_resized_crop_stays_inside_with_official_area_and_aspect():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(500):
        y, x, h, w = params.random_resized_crop(256, 341, rng)
        assert 0 <= y and y + h <= 256 and 0 <= x and x + w <= 341
        areas.append(h * w / (256 * 341))
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 or h == w == 256  # swapped sides stay in range
    assert min(areas) >= 0.07 and max(areas) > 0.9


def test_roi_maps_scaled_window_to_stored_pixels():
    roi = params.to_stored_roi((16, 58, 224, 224), scaled=(256, 341), stored=(480, 640))
    np.testing.assert_allclose(roi, [30, 58 * 640 / 341, 240 * 480 / 256, 282 * 640 / 341], rtol=1e-6)


def test_parse_randaugment():
    assert parse_randaugment("rand-m7-n4-mstd0.5") == (4, 7, 0.5)
    assert parse_randaugment("rand-m9-n2-inc1") == (2, 9, 0.0)
    with pytest.raises(ValueError, match="unknown part"):
        parse_randaugment("rand-m7-x4")


@pytest.mark.parametrize("spec, message", [
    ("rand-M7-n4", "part 'M7' is not a name and a number"), ("rand-m7--n4", "part '' is not"),
    ("rand-7", "part '7' is not"), ("rand-m7-n4-mstd", "part 'mstd' is not"),
    ("rand-m7.5-n4", "m takes an integer"), ("rand-m7-n4-inc0", "only increasing magnitudes"),
    ("rand-m11-n4", "magnitude m must be in 0..10"), ("augmix-m7", "must have a form like"),
])
def test_parse_randaugment_names_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_randaugment(spec)


@pytest.fixture(scope="module")
def gradient_shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gradient")
    write_shards(directory, "test", [{"key": "g", "label": 0, "frames": [gradient_image()] * 6}])
    return directory


def _mean_column(views: torch.Tensor) -> torch.Tensor:
    """(V, S, S) of a left-to-right ramp -> (V,) the image x the view's centre came from."""
    return views.mean(dim=(1, 2))


def test_three_crops_are_left_right_centre(gradient_shards):
    batch = next(iter(loader_of(gradient_shards, "test", 1, num_segments=1, test_crops=3,
                                num_threads=1, **SIZE)))
    left, right, centre = _mean_column(batch["clips"][:, 0, 2, 0]).tolist()
    assert left < centre < right


def test_crop_windows_follow_the_official_scaling_of_the_source_not_the_stored_size(tmp_path):
    """640x360 is stored 456x256 (long side rounded to even); the official code scales the source to 455x256
    (torchvision's rule) and crops there: the windows, mapped onto the stored frame, must be those."""
    stored = np.zeros((256, 456, 3), np.uint8)
    write_shards(tmp_path, "test", [{"key": "wide", "label": 0, "frames": [stored] * 4, "source_size": (640, 360)},
                                    {"key": "old", "label": 0, "frames": [stored] * 4}])  # an index without it
    data = loader_of(tmp_path, "test", 2, num_segments=1, test_crops=3, num_threads=1)
    official = params.test_crops(256, 455, 224, 3)  # left, right, centre of the 455x256 official frame
    assert [x for _, x, _ in official] == [0, 228, 114]
    roi = data.plan(0).roi  # (R, O, 4) [y0, x0, y1, x1] in stored pixels
    sx = 456 / 455
    np.testing.assert_allclose(roi[0, :, 1], [x * sx for _, x, _ in official], rtol=1e-6)
    np.testing.assert_allclose(roi[0, :, 3] - roi[0, :, 1], 224 * sx, rtol=1e-6)
    np.testing.assert_allclose(roi[1, :, 1], [0, 232, 116])  # without a source size: the stored frame is the scaled one


def test_ten_crops_alternate_plain_and_mirrored(gradient_shards):
    batch = next(iter(loader_of(gradient_shards, "test", 1, num_segments=1, test_crops=10,
                                num_threads=1, **SIZE)))
    views = batch["clips"][:, 0, 2, 0]  # (10, S, S) red channel
    increasing = (views[:, :, -3:].mean((1, 2)) > views[:, :, :3].mean((1, 2))).tolist()
    assert increasing == [True, False] * 5
    assert batch["flipped"].tolist() == [False, True] * 5 and not batch["label_swapped"].any()
    torch.testing.assert_close(views[1], views[0].flip(-1), atol=0.05, rtol=0)


@pytest.mark.parametrize("name", ["translate_x", "translate_y"])
def test_randaugment_translate_is_dalis_translate_in_whole_pixels(name):
    """Our slice-based translate equals DALI's warp translate at nearest interpolation, every bin and sign,
    on frames of different sizes in one batch (a share of each frame's own size)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
    from nvidia.dali.auto_aug.core import signed_bin

    index = params.RA_OPS.index(name)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in ((24, 40, 3), (31, 17, 3))]
    ours = augment._rand_augment_suite()[index]
    suite = dali_rand_augment.get_rand_augment_suite(use_shape=True, max_translate_rel=params.RA_TRANSLATE)
    (dalis,) = [op for op in suite if op.name.endswith(name)]
    bins = np.repeat(np.arange(params.RA_NUM_BINS, dtype=np.int32), 4)
    signs = np.tile(np.repeat(np.arange(2, dtype=np.int32), 2), params.RA_NUM_BINS)
    batch = [images[i % 2] for i in range(len(bins))]

    @pipeline_def(batch_size=len(bins), num_threads=1, device_id=None)
    def both():
        frames = fn.external_source(source=lambda: batch, batch=True, layout="HWC")
        sizes = fn.external_source(source=lambda: [np.array(b.shape[:2], np.int32) for b in batch], batch=True)
        magnitude = signed_bin(fn.external_source(source=lambda: list(bins), batch=True),
                               fn.external_source(source=lambda: list(signs), batch=True))
        common = dict(magnitude_bin=magnitude, num_magnitude_bins=params.RA_NUM_BINS, shape=sizes, fill_value=128)
        return ours(frames, **common), dalis(frames, interp_type=types.INTERP_NN, **common)

    pipe = both()
    pipe.build()
    shifted, warped = ([np.asarray(s) for s in out] for out in pipe.run())
    for i, (got, want) in enumerate(zip(shifted, warped)):
        np.testing.assert_array_equal(got, want, err_msg=f"bin {bins[i]}, sign {signs[i]}, size {batch[i].shape}")
    for last in shifted[-4:]:  # the largest shift, on each size: moves and pads
        assert last.shape == batch[0].shape or last.shape == batch[1].shape
        assert (last == 128).all(axis=2).any() and not any(np.array_equal(last, image) for image in images)


def _timm_reference(name: str, image: np.ndarray, magnitude_bin: int) -> np.ndarray:
    """What timm's increasing op (the official inc1) makes of `image` at a magnitude bin (level = bin / 10)."""
    from PIL import Image, ImageOps

    if name == "posterize":
        bits = params.posterize_bits(magnitude_bin)  # 0 only at m=10: black, as PIL did before it refused 0 bits
        return np.asarray(ImageOps.posterize(Image.fromarray(image), bits)) if bits else np.zeros_like(image)
    if name == "solarize_add":
        add = int(magnitude_bin / params.RA_BINS_PER_UNIT / 10 * 110)
        return np.where(image < 128, np.minimum(image.astype(int) + add, 255), image).astype(np.uint8)
    assert name == "invert"
    return np.asarray(ImageOps.invert(Image.fromarray(image)))


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("name", ["posterize", "solarize_add", "invert"])
def test_randaugment_pixel_ops_match_timms_increasing_set(name, device):
    """Per magnitude bin, exactly what the official timm ops do (posterize: 2 bits at m=7, not DALI's 5)."""
    from nvidia.dali import fn, pipeline_def

    assert [params.posterize_bits(b) for b in (0, 24, 25, 70, 74, 75, 99, 100)] == [4, 4, 3, 2, 2, 1, 1, 0]
    ours = augment._rand_augment_suite()[params.RA_OPS.index(name)]
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    bins = np.arange(params.RA_NUM_BINS, dtype=np.int32)

    @pipeline_def(batch_size=len(bins), num_threads=1, device_id=0 if device == "cuda" else None)
    def applied():
        images = fn.external_source(source=lambda: [image] * len(bins), batch=True, layout="HWC")
        magnitude = fn.external_source(source=lambda: list(bins), batch=True)
        if device == "cuda":
            images = images.gpu()
        return ours(images, magnitude_bin=magnitude, num_magnitude_bins=params.RA_NUM_BINS)

    pipe = applied()
    pipe.build()
    (out,) = pipe.run()
    out = out.as_cpu() if device == "cuda" else out
    for b, got in zip(bins, out):
        np.testing.assert_array_equal(np.asarray(got), _timm_reference(name, image, int(b)), err_msg=f"bin {b}")


def test_randaugment_draws_timms_fifteen_ops():
    assert params.RA_NUM_DRAWN == 15 and params.RA_OPS[params.RA_IDENTITY] == "identity"
    assert {"invert", "solarize_add"} <= set(params.RA_OPS[:params.RA_NUM_DRAWN])
    draws = plan_module._rand_augment_draws(4000, 1, 2, 7, 0.5, np.random.default_rng(0))  # (R, O, 3, n)
    ops = draws[:, 0, 0].ravel()
    applied = ops[ops != params.RA_IDENTITY]
    assert 0.45 < len(applied) / len(ops) < 0.55  # each drawn op applies with p=0.5
    assert set(applied.tolist()) == set(range(15)) and np.bincount(applied).min() > 0.7 * len(applied) / 15


@pytest.mark.parametrize("name", ["sharpness", "equalize"])
def test_sharpness_and_equalize_are_dalis_without_the_deprecated_aliases(name):
    import warnings

    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.auto_aug import rand_augment as dali_rand_augment
    from nvidia.dali.auto_aug.core import signed_bin

    ours = augment._rand_augment_suite()[params.RA_OPS.index(name)]
    (dalis,) = [op for op in dali_rand_augment.get_rand_augment_suite(use_shape=True) if op.name.endswith(name)]
    image = np.random.default_rng(2).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    bins = np.repeat(np.arange(params.RA_NUM_BINS, dtype=np.int32), 2)
    signs = np.tile(np.arange(2, dtype=np.int32), params.RA_NUM_BINS)

    @pipeline_def(batch_size=len(bins), num_threads=1, device_id=None)
    def applied(op):
        images = fn.external_source(source=lambda: [image] * len(bins), batch=True, layout="HWC")
        magnitude = signed_bin(fn.external_source(source=lambda: list(bins), batch=True),
                               fn.external_source(source=lambda: list(signs), batch=True))
        return op(images, magnitude_bin=magnitude, num_magnitude_bins=params.RA_NUM_BINS)

    outputs = []
    for op in (ours, dalis):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = applied(op)
            pipe.build()
        if op is ours:
            assert not [w for w in caught if "deprecated" in str(w.message)]
        outputs.append(np.stack([np.asarray(s) for s in pipe.run()[0]]))
    np.testing.assert_array_equal(*outputs)


def test_grayscale_before_the_resize_is_the_official_order_but_for_rounding():
    """to_luma, crop_resize, luma_to_rgb (ours) against crop_resize then luma in three channels (the
    official order), on natural-looking frames and upscaled and shrunk windows: at most 1 level apart,
    and only gray samples change."""
    from nvidia.dali import fn, pipeline_def, types

    from shards.synthetic import natural_video

    frames = list(natural_video(4, 64, 96, np.random.default_rng(0)))
    rois = [np.array(r, np.float32) for r in ([3.5, 10.25, 40.0, 50.5], [0.0, 0.0, 64.0, 96.0])] * 2
    gray = [np.array(g) for g in (True, True, False, False)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, enable_conditionals=True)
    def both():
        images = fn.external_source(source=lambda: frames, batch=True, layout="HWC")
        roi = fn.external_source(source=lambda: rois, batch=True)
        is_gray = fn.external_source(source=lambda: gray, batch=True)
        start, end = roi[0:2], roi[2:4]
        ours = augment.luma_to_rgb(augment.crop_resize(augment.to_luma(images, is_gray), start, end, 32,
                                                       augment.INTERP["train"]), is_gray)
        official = augment.crop_resize(images, start, end, 32, augment.INTERP["train"])
        if is_gray:
            luma = fn.color_space_conversion(official, image_type=types.RGB, output_type=types.GRAY)
            official = fn.cat(luma, luma, luma, axis_name="C")
        return ours, official

    pipe = both()
    pipe.build()
    ours, official = ([np.asarray(s).astype(int) for s in out] for out in pipe.run())
    for i, (got, want) in enumerate(zip(ours, official)):
        assert got.shape == want.shape == (32, 32, 3)
        assert np.abs(got - want).max() <= 1, i
        assert (got[..., 0] == got[..., 2]).all() == bool(gray[i]), i
    assert any((got != want).any() for got, want in zip(ours[:2], official[:2]))  # it is a rounding difference
    assert all((got == want).all() for got, want in zip(ours[2:], official[2:]))
