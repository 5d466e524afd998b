"""Pictures to look at instead of numbers: clips as the model sees them, confusion matrices, predictions.

Pure functions of tensors and arrays (torch, numpy, PIL): no pipeline is built here. Every picture
is an (H, W, 3) uint8 array, which TensorBoard takes as `add_image(tag, image, step,
dataformats="HWC")` and `PIL.Image.fromarray` saves.

- Clips: `denormalize` undoes the loader's CLIP normalisation; `clip_strip` draws one clip (the
  segments' centre frames in a row, one segment's window of M consecutive frames below, a caption);
  `batch_sheet` draws the first clips of a loader batch with their class names; `contact_sheet`
  tiles pictures; `clip_animation` gives a clip's frames in time order (for a GIF).
- Results: `confusion_matrix`, `most_confused`, `confusion_image` (accuracies: tdsclip/evaluate.py).
- Predictions: `predict_row` (an input's frames next to its top classes as bars), `predict_sheet`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pipelines.augment import CLIP_MEAN, CLIP_STD

GAP = 2  # px between the frames of a picture
SHEET_GAP = 6  # px between the pictures of a sheet
CAPTION_HEIGHT = 16  # px of the caption bar above a picture's frames
FONT_SIZE = 11
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
ACCENT = (230, 120, 0)  # marks the segment whose window is drawn, under its centre frame
NAVY = np.array([8, 48, 107])  # the darkest confusion cell and the probability bars
BAR_WIDTH = 160  # px of a probability bar at 100%
BAR_PITCH = 16  # px from one bar to the next
BAR_HEIGHT = 10
NAME_WIDTH = 170  # px of the class name and percentage right of a bar
MIN_TILE = 96  # px: batch_sheet enlarges smaller frames to at least this, by a whole factor
ANIMATION_WIDTH = 320  # px: an animation frame's least width, room for its caption


# ---------------------------------------------------------------- clips
def denormalize(clips: torch.Tensor) -> np.ndarray:
    """Normalised frames (..., 3, S, S) as the loader yields them (CLIP mean/std, any float dtype and
    device) -> uint8 frames (..., S, S, 3): the pixel values the pipeline normalised, rounded."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = (clips.detach().float().cpu() * std + mean) * 255  # (..., 3, S, S) in 0-255
    return pixels.round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


def clip_caption(class_name: str, *, flipped: bool | None = None, label_swapped: bool | None = None,
                 key: str | None = None) -> str:
    """'class [| flipped[, label swapped]] [| key]': what a clip shows; flags that are None are unknown
    (e.g. val clips, or batches without them) and left out."""
    parts = [class_name]
    if flipped:
        parts.append("flipped, label swapped" if label_swapped else "flipped")
    elif label_swapped:
        parts.append("label swapped")
    if key is not None:
        parts.append(key)
    return " | ".join(parts)


def strip_layout(num_segments: int, frames_per_segment: int, tile: int,
                 window_segment: int) -> list[tuple[int, int, int, int]]:
    """Where `clip_strip` puts each frame: (segment, frame in window, top, left) of its tile-sized square.
    Row 1: each segment's centre frame; row 2: the M frames of `window_segment`, in time order."""
    centre, step = frames_per_segment // 2, tile + GAP
    row1 = [(t, centre, CAPTION_HEIGHT, t * step) for t in range(num_segments)]
    row2 = [(window_segment, m, CAPTION_HEIGHT + step, m * step) for m in range(frames_per_segment)]
    return row1 + row2


def clip_strip(clip: torch.Tensor, *, caption: str = "", window_segment: int | None = None,
               scale: int = 1) -> np.ndarray:
    """One clip (T, M, 3, S, S), normalised as the loader yields it, as a picture: the caption, the T
    segments' centre frames in a row, and below them the M consecutive frames of `window_segment`
    (default the middle segment, marked under its centre frame). Frames are enlarged `scale` times
    (nearest neighbour: each pixel a scale x scale block)."""
    frames = denormalize(clip)  # (T, M, S, S, 3)
    segments, window = frames.shape[:2]
    window_segment = segments // 2 if window_segment is None else window_segment
    if not 0 <= window_segment < segments:
        raise ValueError(f"window_segment {window_segment} is not one of the clip's {segments} segments")
    tile = frames.shape[2] * scale
    layout = strip_layout(segments, window, tile, window_segment)
    width = max(segments, window) * (tile + GAP) - GAP
    picture = np.full((CAPTION_HEIGHT + 2 * tile + GAP, width, 3), BACKGROUND, np.uint8)
    for t, m, top, left in layout:
        picture[top:top + tile, left:left + tile] = _enlarge(frames[t, m], scale)
    mark = window_segment * (tile + GAP)
    picture[CAPTION_HEIGHT + tile:CAPTION_HEIGHT + tile + GAP, mark:mark + tile] = ACCENT
    return _with_caption(picture, caption)


def clip_animation(clip: torch.Tensor, *, caption: str = "", scale: int = 1) -> list[np.ndarray]:
    """The clip's T x M frames in time order (segment by segment), each under a caption bar
    'segment.frame caption', e.g. for an animated GIF; at least ANIMATION_WIDTH px wide, so that class
    names and the flip note fit beside small frames."""
    frames = denormalize(clip)  # (T, M, S, S, 3)
    tile = frames.shape[2] * scale
    width = max(tile, ANIMATION_WIDTH)
    pictures = []
    for t in range(frames.shape[0]):
        for m in range(frames.shape[1]):
            picture = np.full((CAPTION_HEIGHT + tile, width, 3), BACKGROUND, np.uint8)
            picture[CAPTION_HEIGHT:, :tile] = _enlarge(frames[t, m], scale)
            pictures.append(_with_caption(picture, f"{t + 1}.{m + 1} {caption}"))
    return pictures


def contact_sheet(pictures: Sequence[np.ndarray], *, columns: int | None = None) -> np.ndarray:
    """Pictures in a grid, row by row, each at the top left of a cell the size of the largest, cells
    SHEET_GAP apart; `columns` default: about as many as make the sheet square."""
    if not pictures:
        raise ValueError("contact_sheet needs at least one picture")
    height = max(p.shape[0] for p in pictures)
    width = max(p.shape[1] for p in pictures)
    if columns is None:
        columns = max(1, round(math.sqrt(len(pictures) * height / width)))
    columns = min(columns, len(pictures))
    rows = -(-len(pictures) // columns)
    sheet = np.full((rows * (height + SHEET_GAP) - SHEET_GAP, columns * (width + SHEET_GAP) - SHEET_GAP, 3),
                    BACKGROUND, np.uint8)
    for index, picture in enumerate(pictures):
        top, left = (index // columns) * (height + SHEET_GAP), (index % columns) * (width + SHEET_GAP)
        sheet[top:top + picture.shape[0], left:left + picture.shape[1]] = picture
    return sheet


def batch_captions(batch: dict, class_names: Sequence[str], count: int) -> list[str]:
    """Captions of a loader batch's first `count` clips: class name of the label, flipped / label swapped
    where the batch says (optional `flipped`, `label_swapped` (B,) entries), the video key."""
    labels = batch["label"][:count].tolist()
    flags = {name: batch[name][:count].tolist() if name in batch else [None] * len(labels)
             for name in ("flipped", "label_swapped")}
    keys = batch["key"][:count] if "key" in batch else [None] * len(labels)
    return [clip_caption(_class_name(class_names, label), flipped=flipped, label_swapped=swapped, key=key)
            for label, flipped, swapped, key in zip(labels, flags["flipped"], flags["label_swapped"], keys)]


def batch_sheet(batch: dict, class_names: Sequence[str], *, count: int = 4, scale: int | None = None,
                columns: int | None = None) -> tuple[np.ndarray, list[str]]:
    """(sheet, captions): the first `count` clips of a loader batch (`clips` (B, T, M, 3, S, S), `label`,
    optional `flipped` / `label_swapped` / `key`) as clip strips with their captions, on one sheet.
    `scale` default: the smallest whole factor that makes frames MIN_TILE px or more (1 for S >= 96)."""
    captions = batch_captions(batch, class_names, count)
    scale = scale or auto_scale(batch["clips"].shape[-1])
    strips = [clip_strip(clip, caption=caption, scale=scale) for clip, caption in zip(batch["clips"], captions)]
    return contact_sheet(strips, columns=columns), captions


def auto_scale(size: int) -> int:
    """The smallest whole factor that enlarges `size` px frames to MIN_TILE px or more (1 if already)."""
    return max(1, math.ceil(MIN_TILE / size))


def _class_name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class {label}"


def _enlarge(frame: np.ndarray, scale: int) -> np.ndarray:
    return frame if scale == 1 else frame.repeat(scale, axis=0).repeat(scale, axis=1)


# ---------------------------------------------------------------- text
@functools.lru_cache(maxsize=4)
def _font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()  # the fixed bitmap font


def _fit(text: str, width: int) -> str:
    """`text`, cut with '...' to at most `width` px."""
    font = _font()
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def _draw_text(picture: np.ndarray, text: str, left: int, top: int, width: int) -> np.ndarray:
    image = Image.fromarray(picture)
    ImageDraw.Draw(image).text((left, top), _fit(text, width), fill=INK, font=_font())
    return np.asarray(image).copy()


def _with_caption(picture: np.ndarray, caption: str) -> np.ndarray:
    """Draw `caption` in the CAPTION_HEIGHT bar at the top of `picture`."""
    return _draw_text(picture, caption, 2, 2, picture.shape[1] - 4) if caption else picture


# ---------------------------------------------------------------- results
def confusion_matrix(labels: Sequence[int] | np.ndarray | torch.Tensor, predictions: Sequence[int] | np.ndarray |
                     torch.Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: [true class, predicted class]."""
    labels, predictions = (np.asarray(torch.as_tensor(v).cpu(), dtype=np.int64).reshape(-1)
                           for v in (labels, predictions))
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.size} labels but {predictions.size} predictions")
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and not (0 <= values.min() and values.max() < num_classes):
            raise ValueError(f"a {name} is outside the {num_classes} classes")
    counts = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def most_confused(matrix: np.ndarray, class_names: Sequence[str] | None = None, k: int = 10) -> list[str]:
    """The k largest off-diagonal counts, most first: 'true -> predicted: n of N (p%)'."""
    names = class_names or [str(c) for c in range(len(matrix))]
    errors = matrix.astype(np.int64).copy()
    np.fill_diagonal(errors, 0)
    order = np.argsort(-errors, axis=None, kind="stable")[:k]  # ties: lower true class, then predicted
    totals = matrix.sum(1)
    lines = []
    for true, predicted in zip(*np.unravel_index(order, errors.shape)):
        if errors[true, predicted] == 0:
            break
        count = int(errors[true, predicted])
        lines.append(f"{names[true]} -> {names[predicted]}: {count} of {int(totals[true])} "
                     f"({100 * count / totals[true]:.1f}%)")
    return lines


def confusion_shades(matrix: np.ndarray) -> np.ndarray:
    """(C, C) in [0, 1], how dark `confusion_image` draws each cell: the square root of the cell's share
    of its true class's videos (the root makes single confusions visible next to a full diagonal)."""
    totals = matrix.sum(1, keepdims=True)
    return np.sqrt(matrix / np.maximum(totals, 1))


def shade_colour(shades: np.ndarray) -> np.ndarray:
    """Shades in [0, 1] -> uint8 RGB (..., 3): white at 0, NAVY at 1."""
    white = np.array(BACKGROUND, dtype=np.float64)
    return np.round(white + shades[..., None] * (NAVY - white)).astype(np.uint8)


def confusion_layout(num_classes: int, size: int = 800) -> tuple[int, int, int]:
    """(cell, top, left) of `confusion_image`: the cell side in px (size // C, at least 1, at most 24) and
    the matrix's top-left corner."""
    cell = min(24, max(1, size // num_classes))
    names = cell >= 10  # room for a class name per row
    return cell, 2 * CAPTION_HEIGHT, (NAME_WIDTH if names else 4 * FONT_SIZE)


def confusion_image(matrix: np.ndarray, class_names: Sequence[str] | None = None, *, size: int = 800) -> np.ndarray:
    """The confusion matrix as a picture: rows the true classes, columns the predicted ones, both in class
    order; each cell shaded by `confusion_shades` (white: none, navy: all of that class). Cells are
    size // C px (>= 1 px: 400 classes fit in 800 px); class names label the rows where cells are >= 10 px,
    otherwise class numbers mark every few rows and columns."""
    num_classes = len(matrix)
    cell, top, left = confusion_layout(num_classes, size)
    side = num_classes * cell
    picture = np.full((top + side + 1, left + side + 1, 3), BACKGROUND, np.uint8)
    cells = shade_colour(confusion_shades(matrix))  # (C, C, 3)
    picture[top:top + side, left:left + side] = cells.repeat(cell, 0).repeat(cell, 1)
    picture[top + side, left:left + side + 1] = picture[top:top + side + 1, left + side] = 160  # frame
    picture = _with_caption(picture, f"{int(matrix.sum())} videos; rows: true class, columns: predicted")
    return _axis_labels(picture, num_classes, cell, top, left, class_names)


def _axis_labels(picture: np.ndarray, num_classes: int, cell: int, top: int, left: int,
                 class_names: Sequence[str] | None) -> np.ndarray:
    image = Image.fromarray(picture)
    draw, font = ImageDraw.Draw(image), _font()
    names = cell >= 10 and class_names is not None
    row_step = 1 if cell >= 10 else _tick_step(14 / cell)
    for c in range(0, num_classes, row_step):
        label = _fit(f"{c} {class_names[c]}", left - 4) if names else str(c)
        draw.text((2, top + c * cell + (cell - FONT_SIZE) // 2), label, fill=INK, font=font)
    for c in range(0, num_classes, _tick_step((7 * len(str(num_classes)) + 8) / cell)):
        draw.text((left + c * cell, CAPTION_HEIGHT + 2), str(c), fill=INK, font=font)
    return np.asarray(image).copy()


def _tick_step(minimum: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is >= minimum."""
    for power in range(0, 7):
        for base in (1, 2, 5):
            if base * 10 ** power >= minimum:
                return base * 10 ** power
    return 10 ** 7


# ---------------------------------------------------------------- predictions
def predict_row(frames: np.ndarray, *, title: str, top: Sequence[tuple[str, float]]) -> np.ndarray:
    """One input: `title` over its frames (N, H, W, 3) uint8 in a row, and right of them its top classes
    (name, probability), most probable first, each a bar BAR_WIDTH px at probability 1 with the name and
    percentage beside it. Bar i's filled part spans rows bar_top(i) .. + BAR_HEIGHT from column
    `frames_width + 2 * SHEET_GAP`, round(probability * BAR_WIDTH) px wide."""
    count, height, width = frames.shape[:3]
    frames_width = count * (width + GAP) - GAP
    bars_left = frames_width + 2 * SHEET_GAP
    body = max(height, len(top) * BAR_PITCH)
    picture = np.full((CAPTION_HEIGHT + body, bars_left + BAR_WIDTH + NAME_WIDTH, 3), BACKGROUND, np.uint8)
    for i, frame in enumerate(frames):
        picture[CAPTION_HEIGHT:CAPTION_HEIGHT + height, i * (width + GAP):i * (width + GAP) + width] = frame
    for i, (_, probability) in enumerate(top):
        y = bar_top(i)
        picture[y:y + BAR_HEIGHT, bars_left:bars_left + BAR_WIDTH] = 230  # the bar's track
        picture[y:y + BAR_HEIGHT, bars_left:bars_left + round(probability * BAR_WIDTH)] = NAVY
    for i, (name, probability) in enumerate(top):
        picture = _draw_text(picture, f"{100 * probability:.1f}% {name}", bars_left + BAR_WIDTH + 4,
                             bar_top(i) - 2, NAME_WIDTH - 6)
    return _with_caption(picture, title)


def bar_top(index: int) -> int:
    """The first pixel row of `predict_row`'s bar `index`."""
    return CAPTION_HEIGHT + index * BAR_PITCH + (BAR_PITCH - BAR_HEIGHT) // 2


def predict_sheet(rows: Sequence[np.ndarray]) -> np.ndarray:
    """`predict_row` pictures one under the other."""
    return contact_sheet(rows, columns=1)
