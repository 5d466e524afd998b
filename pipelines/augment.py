"""Spatial augmentation, split in two halves.

Parameters (pure numpy, per clip): crop windows are drawn here, in the coordinates of the
official "scaled" frame (the source scaled to short side 256, or exactly 256x320 for
Something-Something), and mapped back to the stored frame, so that DALI can crop and resize in ONE resampling
(`fn.resize` with a region of interest) instead of the official scale-then-crop pair.

Operators (DALI graph): `crop_resize`, `grayscale`, `rand_augment`, `normalize` work on both
single frames (HWC) and clips (FHWC); one set of parameters is shared by every frame of a clip.
"""

import functools
import math
import re

import numpy as np
from nvidia.dali import fn, types

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SSV2_FLIP_LABELS = {86: 87, 87: 86, 93: 94, 94: 93, 166: 167, 167: 166}
TEST_CROPS = (1, 3, 5, 10)


# ---------------------------------------------------------------- parameters (numpy)
def scaled_size(height: int, width: int, resize: int | tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the official scaled frame: short side `resize` (torchvision rule), or exactly (H, W)."""
    if not isinstance(resize, int):
        return int(resize[0]), int(resize[1])
    if height <= width:
        return resize, int(resize * width / height)
    return int(resize * height / width), resize


def random_resized_crop(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Official GroupRandomSizedCrop window (y, x, h, w) in a (height, width) frame.

    Area 0.08-1, aspect 3/4-4/3, h and w swapped with p=0.5, 10 attempts; the fallback is a
    square of the short side at a random position (scale to the output size, then random crop).
    """
    area = height * width
    for _ in range(10):
        target_area = rng.uniform(0.08, 1.0) * area
        aspect = rng.uniform(3 / 4, 4 / 3)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if rng.random() < 0.5:
            w, h = h, w
        if w <= width and h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side, side


def test_crops(height: int, width: int, size: int, num_crops: int) -> list[tuple[int, int, bool]]:
    """Official test crops (y, x, mirror) of a size x size window, in their official order.

    1: centre. 3: left, right, centre (GroupFullResSample). 5: the four corners then the centre
    (GroupOverSample). 10: those five, each followed by its mirror image.
    """
    if num_crops not in TEST_CROPS:
        raise ValueError(f"test_crops must be one of {TEST_CROPS}, got {num_crops}")
    if num_crops == 1:
        return [(int(round((height - size) / 2)), int(round((width - size) / 2)), False)]
    w_step, h_step = (width - size) // 4, (height - size) // 4
    if num_crops == 3:
        xy = [(0, 2 * h_step), (4 * w_step, 2 * h_step), (2 * w_step, 2 * h_step)]
    else:
        xy = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step)]
    mirrors = (False, True) if num_crops == 10 else (False,)
    return [(y, x, m) for x, y in xy for m in mirrors]


def to_stored_roi(window: tuple[int, int, int, int], scaled: tuple[int, int], stored: tuple[int, int]) -> np.ndarray:
    """Map a (y, x, h, w) window of the scaled frame to a stored-frame ROI [y0, x0, y1, x1] (float32)."""
    sy, sx = stored[0] / scaled[0], stored[1] / scaled[1]
    y, x, h, w = window
    return np.array([y * sy, x * sx, (y + h) * sy, (x + w) * sx], dtype=np.float32)


def parse_randaugment(spec: str) -> tuple[int, int, float]:
    """Parse a timm-style "rand-m7-n4[-mstd0.5][-inc1]" into (n, m, mstd), m on timm's 0-10 scale.

    Magnitudes always increase with m (timm's "inc1", the official setting; DALI's monotonic suite).
    """
    form = "a form like 'rand-m7-n4-mstd0.5'"
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must have {form}, got {spec!r}")
    n, m, mstd = 2, 10, 0.0
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if match is None:
            raise ValueError(f"randaugment {spec!r}: part {part!r} is not a name and a number ({form})")
        key, value = match.groups()
        if key in ("m", "n", "inc") and not value.isdigit():
            raise ValueError(f"randaugment {spec!r}: {key} takes an integer, got {value!r}")
        if key == "m":
            m = int(value)
        elif key == "n":
            n = int(value)
        elif key == "mstd":
            mstd = float(value)
        elif key == "inc":
            if value != "1":
                raise ValueError(f"randaugment {spec!r}: only increasing magnitudes (inc1) are supported")
        else:
            raise ValueError(f"randaugment {spec!r}: unknown part {part!r} (valid: m, n, mstd, inc)")
    if not 0 <= m <= 10:
        raise ValueError(f"randaugment {spec!r}: magnitude m must be in 0..10")
    if n < 1 or not 0 <= mstd < math.inf:
        raise ValueError(f"randaugment {spec!r}: n must be >= 1 and mstd finite and >= 0")
    return n, m, mstd


# RandAugment operations: timm's increasing set (the official "inc1"), in timm's order, as
# nvidia.dali.auto_aug operations, indexed by the op numbers that plan.py draws per clip; "identity"
# (last, never drawn) stands for an op that was drawn but not applied. Magnitudes 0-10 in steps of
# 1/RA_BINS_PER_UNIT.
RA_OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize", "solarize_add", "color",
          "contrast", "brightness", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "identity")
RA_IDENTITY = RA_OPS.index("identity")
RA_NUM_DRAWN = RA_IDENTITY  # timm's 15
RA_TRANSLATE = 0.45  # timm's translate_pct: the largest shift, as a share of the frame size
RA_BINS_PER_UNIT = 10
RA_NUM_BINS = 10 * RA_BINS_PER_UNIT + 1


# ---------------------------------------------------------------- DALI operators
def crop_resize(images, roi_start, roi_end, size: int, interp):
    """Crop the ROI and resize it to size x size in one resampling (antialiased when shrinking)."""
    return fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end,
                     interp_type=interp, antialias=True)


def grayscale(images, gray):
    """Luma (ITU-R 601: 0.299, 0.587, 0.114, as PIL's convert("L") and torchvision's Grayscale) in all
    three channels where `gray` is true (per clip), else unchanged.

    A DALI conditional on the uint8 crops, so only the chosen clips are converted. Measured on the
    CPU per clip: fn.color_twist(saturation=0/1) on every frame ~95 ms, this ~11 ms, and the same
    linear map applied to the normalized float torch batch ~20 ms (4x the bytes).
    """
    if gray:
        luma = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
        images = fn.cat(luma, luma, luma, axis_name="C")
    return images


def _shift(data, rel_offset, shape, axis: int, fill_value=128):
    """Translate along `axis` (0: y, 1: x) by `rel_offset` of the frame's `shape` (H, W), in whole pixels:
    a padded slice of the frame's extent. Output pixel p shows input floor(p + 0.5 - d), d = rel_offset
    * extent: exactly DALI's translate (a linear `fn.warp_affine`) at nearest interpolation, which on
    the CPU costs ~10x this copy (~3 ms per 224x224 frame).
    """
    from nvidia.dali import math as dmath

    extent = shape[axis:axis + 1]  # (1,): a slice start and shape are vectors over the sliced axes
    start = fn.cast(dmath.floor(0.5 - rel_offset * extent), dtype=types.INT32)
    return fn.slice(data, start=start, shape=extent, axis_names="HW"[axis], out_of_bounds_policy="pad",
                    fill_values=fill_value)


def _as_shift(translate, axis: int):
    """DALI's translate_x (axis 1) / translate_y (axis 0), same magnitudes and signs, done by `_shift`."""
    from nvidia.dali.auto_aug.core import augmentation

    def shift(data, rel_offset, shape, fill_value=128):
        return _shift(data, rel_offset, shape, axis, fill_value)

    # The param is the signed share itself (DALI's own maps it to a (x, y) offset vector).
    return augmentation(shift, mag_range=translate.mag_range, randomly_negate=translate.randomly_negate,
                        mag_to_param=np.float32, name=translate.name)


def _sharpen(data, kernel):
    return fn.filter(data, kernel)


def _equalize(data, _):
    return fn.equalize(data)


def _without_deprecated_ops(sharpness, equalize) -> tuple:
    """DALI's sharpness and equalize, same parameters, through fn.filter / fn.equalize: DALI 2.4's own
    call the deprecated fn.experimental aliases, which print a warning at every pipeline build."""
    from nvidia.dali.auto_aug.core import augmentation

    return (augmentation(_sharpen, mag_range=sharpness.mag_range, randomly_negate=sharpness.randomly_negate,
                         mag_to_param=sharpness.mag_to_param, param_device=sharpness.param_device,
                         name=sharpness.name),
            augmentation(_equalize, name=equalize.name))


def posterize_bits(magnitude_bin: int) -> int:
    """Bits timm's increasing posterize ("inc1", the official setting) keeps at a magnitude bin:
    4 - int(level / 10 * 4), level = bin / RA_BINS_PER_UNIT; 2 bits at m=7 (DALI's own keeps 5)."""
    return 4 - (int(magnitude_bin) * 4) // (RA_NUM_BINS - 1)


def _posterize_mask(magnitude_bin) -> np.ndarray:
    return np.uint8((0xFF << (8 - posterize_bits(magnitude_bin))) & 0xFF)  # keep the top bits


def _solarize_add_shift(magnitude_bin) -> np.ndarray:
    return np.uint8(int(magnitude_bin) * 110 // (RA_NUM_BINS - 1))  # timm: int(level / 10 * 110)


@functools.cache
def _tabled_augmentation_class():
    """nvidia.dali.auto_aug's operation class, building its magnitude -> parameter table unconverted.

    In a pipeline with conditionals DALI converts every call with AutoGraph, down to the 101
    `mag_to_param` calls per operation that fill each table (~1 ms each): 7 of the 10 s a
    RandAugment pipeline (n=4) took to build. The table holds numpy values only, so converting
    it buys nothing: the same tables and graph (the suite's operations are checked against DALI's
    and timm's in tests/test_pipelines_augment.py).
    """
    from nvidia.dali.auto_aug.core import _Augmentation
    from nvidia.dali.pipeline import do_not_convert

    class TabledAugmentation(_Augmentation):
        @do_not_convert
        def _map_mags_to_params(self, magnitudes):
            return super()._map_mags_to_params(magnitudes)

    return TabledAugmentation


def _rand_augment_suite() -> list:
    """The RA_OPS operations: DALI's monotonic RandAugment suite plus its invert and solarize_add, at
    timm's magnitudes; translations done as whole-pixel shifts of a share of the `shape` they are given."""
    from nvidia.dali.auto_aug import augmentations as ops
    from nvidia.dali.auto_aug import rand_augment as dali_rand_augment

    suite = dali_rand_augment.get_rand_augment_suite(use_shape=True, max_translate_rel=RA_TRANSLATE)
    by_name = {op.name.rsplit(".", 1)[-1]: op for op in suite}
    by_name["invert"] = ops.invert
    # Integer magnitudes: the mappings get the bin numbers themselves (exact, unlike float bins).
    bins = np.arange(RA_NUM_BINS)
    by_name["posterize"] = ops.posterize.augmentation(mag_range=bins, randomly_negate=False,
                                                      mag_to_param=_posterize_mask)
    by_name["solarize_add"] = ops.solarize_add.augmentation(mag_range=bins, randomly_negate=False,
                                                            mag_to_param=_solarize_add_shift)
    missing = [name for name in RA_OPS if name not in by_name]
    if missing:  # the op numbers in plans must mean the same operations
        raise RuntimeError(f"DALI's RandAugment suite has no {missing}; it has {sorted(by_name)}")
    for axis, name in ((1, "translate_x"), (0, "translate_y")):
        by_name[name] = _as_shift(by_name[name], axis)
    by_name["sharpness"], by_name["equalize"] = _without_deprecated_ops(by_name["sharpness"], by_name["equalize"])
    tabled = _tabled_augmentation_class()
    return [by_name[name].augmentation(augmentation_cls=tabled) for name in RA_OPS]


def rand_augment(images, draws, n: int, frame_size):
    """RandAugment with the ops and magnitudes drawn in numpy per clip (plan.ra), nvidia.dali.auto_aug ops.

    `draws` is a (3, n) int32 input per sample: op index, magnitude bin, negate, per level;
    `frame_size` the (H, W) of the sample's frames (an int32 input). The source repeats a clip's
    draws for each of its frames, so all frames get the same operations; each level is a DALI
    conditional, so every op runs once on the frames that chose it.
    """
    from nvidia.dali.auto_aug.core import select, signed_bin

    suite = _rand_augment_suite()
    for level in range(n):
        magnitude = signed_bin(draws[1, level], draws[2, level])
        images = select(suite, draws[0, level], data=images, magnitude_bin=magnitude,
                        num_magnitude_bins=RA_NUM_BINS, shape=frame_size, fill_value=128)
    return images


def normalize(images, mirror, dtype, layout: str):
    """Mirror per clip, scale to [0,1], normalize with CLIP mean/std, transpose to `layout` (CHW/FCHW)."""
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=dtype, output_layout=layout,
                                    mean=[255 * v for v in CLIP_MEAN], std=[255 * v for v in CLIP_STD])


INTERP = {"train": types.INTERP_LINEAR, "eval": types.INTERP_CUBIC}
