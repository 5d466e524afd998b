"""Per-clip augmentation parameters, in plain numpy (no DALI): the planning half of augmentation.

Crop windows are drawn in the coordinates of the official "scaled" frame (the source scaled to short
side 256, or exactly 256x320 for Something-Something) and mapped back to the stored frame, so that
DALI can crop and resize in ONE resampling (pipelines/augment.py's `crop_resize`). RandAugment's ops
are numbered here (the draws in epoch plans index RA_OPS) with the magnitude tables of the ops that
follow timm rather than DALI. pipelines/plan.py draws from these; pipelines/augment.py runs them.
"""

import math

import numpy as np

from pipelines.config import TEST_CROPS

SSV2_FLIP_LABELS = {86: 87, 87: 86, 93: 94, 94: 93, 166: 167, 167: 166}


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


DECODE_GUARD = 2  # pixels beyond the resampling filter's reach, so a crop decode's edge never reaches it


def decode_window(roi: np.ndarray, stored: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored-frame window a clip's views read, for decoding only it: (anchor (B, 2) [x0, y0],
    shape (B, 2) [w, h]), whole pixels, float32; `roi` (B, O, 4) [y0, x0, y1, x1] the views' ROIs,
    `stored` (B, 2) the stored (H, W), `size` the output side.

    The union of the views' ROIs, widened by the reach of the resampling filter: the resize reads
    pixels around its ROI (a cubic kernel 2 taps out, 2 x the scale when shrinking, antialiased) and
    those must be the full decode's; DECODE_GUARD more keeps the window's own edge (where chroma
    upsampling sees no neighbour) out of its reach. Clamped to the frame.
    """
    start, end = roi[..., :2].min(axis=1), roi[..., 2:].max(axis=1)  # (B, 2) [y, x]
    scale = (roi[..., 2:] - roi[..., :2]).max(axis=(1, 2)) / size  # input pixels per output pixel
    margin = (2 * np.ceil(np.maximum(scale, 1.0)) + DECODE_GUARD)[:, None]  # (B, 1)
    low = np.clip(np.floor(start) - margin, 0, stored)
    high = np.clip(np.ceil(end) + margin, 0, stored)
    return low[:, ::-1].astype(np.float32), (high - low)[:, ::-1].astype(np.float32)

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


def posterize_bits(magnitude_bin: int) -> int:
    """Bits timm's increasing posterize ("inc1", the official setting) keeps at a magnitude bin:
    4 - int(level / 10 * 4), level = bin / RA_BINS_PER_UNIT; 2 bits at m=7 (DALI's own keeps 5)."""
    return 4 - (int(magnitude_bin) * 4) // (RA_NUM_BINS - 1)


def posterize_mask(magnitude_bin) -> np.ndarray:
    return np.uint8((0xFF << (8 - posterize_bits(magnitude_bin))) & 0xFF)  # keep the top bits


def solarize_add_shift(magnitude_bin) -> np.ndarray:
    return np.uint8(int(magnitude_bin) * 110 // (RA_NUM_BINS - 1))  # timm: int(level / 10 * 110)
