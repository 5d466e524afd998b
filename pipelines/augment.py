"""Spatial augmentation: the DALI operators.

`crop_resize`, `to_luma` / `luma_to_rgb`, `rand_augment`, `normalize` work on both single frames (HWC) and clips
(FHWC); one set of parameters, drawn per clip in numpy (pipelines/params.py, through the epoch
plan), is shared by every frame of a clip. Crops and resizes are one resampling (`fn.resize` with a
region of interest) instead of the official scale-then-crop pair.
"""

import functools

import numpy as np
from nvidia.dali import fn, types

from pipelines.params import RA_NUM_BINS, RA_OPS, RA_TRANSLATE, posterize_mask, solarize_add_shift

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def crop_resize(images, roi_start, roi_end, size: int, interp):
    """Crop the ROI and resize it to size x size in one resampling (antialiased when shrinking)."""
    return fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end,
                     interp_type=interp, antialias=True)


def to_luma(images, gray):
    """Luma (ITU-R 601: 0.299, 0.587, 0.114, as PIL's convert("L") and torchvision's Grayscale), one
    channel, where `gray` is true (per clip), else unchanged; `luma_to_rgb` after the resize makes it
    three channels again.

    A DALI conditional, so only the chosen clips are converted; done before the crop+resize, which
    then resamples one channel instead of three for those clips (the official order, resize then
    grayscale, differs by rounding only: at most 1 level, docs/fidelity.md). Measured on the CPU per
    clip: fn.color_twist(saturation=0/1) on every frame ~95 ms, the conversion after the resize ~11 ms,
    and the same linear map applied to the normalized float torch batch ~20 ms (4x the bytes); before
    the resize, a training clip at grayscale_prob 0.25 costs ~2.6 CPU-ms less than after it.
    """
    if gray:
        images = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return images


def luma_to_rgb(images, gray):
    """The one-channel (luma) clips where `gray` is true copied into three channels; the rest unchanged."""
    if gray:
        images = fn.cat(images, images, images, axis_name="C")
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
                                                      mag_to_param=posterize_mask)
    by_name["solarize_add"] = ops.solarize_add.augmentation(mag_range=bins, randomly_negate=False,
                                                            mag_to_param=solarize_add_shift)
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
