"""Synthetic labelled videos for the demo and tests, and frames that carry their own index.

Motion dataset: textured shapes move in the class's direction over a textured background that drifts
in a random direction of its own. Shapes, textures, positions and the background drift are random per
video, so no single frame tells the class; two frames do (the label is the shapes' direction of motion).

Indexed frames (for pipeline tests): frame i is one flat colour whose three channels are the base-16
digits of i, so the index survives JPEG, VP9, resizing, crops and flips: `frame_index` reads it back
from any crop of a decoded frame.
"""

import csv
import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from shards.sources import IMAGE_TMPL

LEVELS = 16  # per channel digit; 16**3 indexable frames
MAX_INDEXED_FRAMES = LEVELS**3
DIRECTIONS = ("right", "down-right", "down", "down-left", "left", "up-left", "up", "up-right")


@dataclass(frozen=True, kw_only=True)
class MotionSpec:
    """Look of the motion videos; the defaults make a signal a tiny model learns in minutes."""

    num_classes: int = 4
    num_frames: int = 32
    size: int = 96
    num_shapes: int = 4
    shape_speed: float = 2.5  # pixels per frame, in the class direction
    background_speed: float = 0.75  # pixels per frame, random direction

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(DIRECTIONS):
            raise ValueError(f"num_classes must be in 2..{len(DIRECTIONS)}, got {self.num_classes}")
        if self.num_frames < 2:
            raise ValueError(f"num_frames must be >= 2, got {self.num_frames}")
        if self.size < 16 or self.size % 2:
            raise ValueError(f"size must be an even number >= 16, got {self.size}")

    def class_names(self) -> list[str]:
        """'moving <direction>' per class; the directions are spread evenly around the circle."""
        step = len(DIRECTIONS) // self.num_classes if len(DIRECTIONS) % self.num_classes == 0 else None
        if step is None:
            return [f"moving {360 * c / self.num_classes:.0f} degrees" for c in range(self.num_classes)]
        return [f"moving {DIRECTIONS[c * step]}" for c in range(self.num_classes)]


def _texture(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """A random blocky colour texture (H, W, 3) float in [0, 1], smoothed to cells of `cell` pixels."""
    coarse = rng.random((height // cell + 2, width // cell + 2, 3))
    return np.kron(coarse, np.ones((cell, cell, 1)))[:height, :width]


def _shape(rng: np.random.Generator, size: int) -> np.ndarray:
    """A bright checkerboard of two random colours with a dark outline, (size, size, 3) in [0, 1]."""
    colours = 0.55 + 0.45 * rng.random((2, 3))
    cell = max(1, size // 4)
    checker = (np.add.outer(np.arange(size) // cell, np.arange(size) // cell) % 2)[..., None]
    shape = np.where(checker == 0, colours[0], colours[1])
    shape[[0, -1], :] = shape[:, [0, -1]] = 0.05
    return shape


def motion_video(label: int, spec: MotionSpec, rng: np.random.Generator) -> np.ndarray:
    """One video of class `label`: uint8 (T, H, W, 3)."""
    size, frames = spec.size, spec.num_frames
    angle = 2 * math.pi * label / spec.num_classes
    velocity = spec.shape_speed * np.array([math.sin(angle), math.cos(angle)])  # (dy, dx), y down
    drift_angle = rng.uniform(0, 2 * math.pi)
    drift = spec.background_speed * np.array([math.sin(drift_angle), math.cos(drift_angle)])
    grey = _texture(rng, size, size, cell=max(2, size // 16)).mean(axis=-1, keepdims=True)
    background = 0.3 + 0.25 * (0.7 * grey + 0.3 * _texture(rng, size, size, cell=max(2, size // 16)))
    shape_size = max(6, size // 6)
    shapes = [(_shape(rng, shape_size), rng.uniform(0, size, 2)) for _ in range(spec.num_shapes)]
    video = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        dy, dx = np.round(drift * t).astype(int)
        frame = np.roll(background, (dy, dx), axis=(0, 1))
        for texture, start in shapes:
            y0, x0 = np.round(start + velocity * t).astype(int) % size
            rows = (y0 + np.arange(shape_size)) % size  # shapes wrap around the frame edges
            cols = (x0 + np.arange(shape_size)) % size
            frame[np.ix_(rows, cols)] = texture
        video[t] = (frame * 255).astype(np.uint8)
    return video


def natural_video(num_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (T, H, W, 3) with the statistics JPEG cares about in camera footage, unlike the flat motion
    videos: a colour gradient, smooth multi-scale texture panning across the frame, a textured disc
    crossing it, and per-frame sensor grain. For measuring storage quality (tools/bench_shards.py)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    gradient = np.stack([x / width, y / height, 1 - x / width], axis=-1) * 0.5  # (H, W, 3)
    pad = num_frames * 2
    texture = sum(_box_blur(_texture(rng, height + pad, width + pad, cell), cell // 2) * (cell / 32)
                  for cell in (4, 8, 16, 32))  # coarse scales strong, fine detail weak, as in photographs
    texture = (texture - texture.min()) / np.ptp(texture) * 0.5  # (H + pad, W + pad, 3)
    disc_colour = _box_blur(_texture(rng, height, width, 6), 1)
    radius = min(height, width) / 5
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = gradient + texture[t: t + height, 2 * t: 2 * t + width][:height, :width]  # pans 1 px down, 2 right
        cy, cx = height / 2 + radius * np.sin(t / 9), radius + (width - 2 * radius) * t / max(1, num_frames - 1)
        inside = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        frame[inside] = disc_colour[inside]
        grain = rng.normal(0, 0.015, frame.shape)
        frames[t] = np.clip((frame + grain) * 255, 0, 255).astype(np.uint8)
    return frames


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window on the two leading axes (edges clamped), by cumulative sums."""
    for axis in (0, 1):
        padded = np.concatenate([np.repeat(image.take([0], axis), radius + 1, axis), image,
                                 np.repeat(image.take([-1], axis), radius, axis)], axis)
        summed = np.cumsum(padded, axis)
        n = image.shape[axis]
        image = (summed.take(range(2 * radius + 1, 2 * radius + 1 + n), axis)
                 - summed.take(range(0, n), axis)) / (2 * radius + 1)
    return image


def indexed_frames(num_frames: int, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 (num_frames, H, W, 3); frame i is a flat colour encoding i (see `frame_index`)."""
    if not 1 <= num_frames <= MAX_INDEXED_FRAMES:
        raise ValueError(f"num_frames must be in 1..{MAX_INDEXED_FRAMES}, got {num_frames}")
    i = np.arange(num_frames)
    digits = np.stack([i % LEVELS, (i // LEVELS) % LEVELS, i // LEVELS**2], axis=-1)  # (T, 3)
    colours = (digits * (256 // LEVELS) + 256 // LEVELS // 2).astype(np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (num_frames, height, width, 3)).copy()


def frame_index(image: np.ndarray) -> int:
    """The index `indexed_frames` put in a frame: image (H, W, 3) or (3, H, W) (if `image.shape[0] == 3`),
    uint8 or float in 0..255. Uses the mean colour, so any crop, flip or resize of the frame works."""
    image = np.asarray(image, dtype=np.float64)
    channel_axis = 0 if image.shape[0] == 3 and image.shape[-1] != 3 else -1
    means = image.mean(axis=tuple(a for a in range(image.ndim) if a != channel_axis % image.ndim))
    digits = np.clip(np.round((means - 256 // LEVELS // 2) / (256 // LEVELS)), 0, LEVELS - 1).astype(int)
    return int(digits[0] + LEVELS * digits[1] + LEVELS**2 * digits[2])


def write_video(path: str | Path, video: np.ndarray, fps: float = 25.0) -> None:
    """Write uint8 (T, H, W, 3) as H.264 in MP4 (.mp4) or VP9 in WebM (.webm); H and W must be even."""
    path = Path(path)
    codec = {".mp4": "libx264", ".webm": "libvpx-vp9"}.get(path.suffix)
    if codec is None:
        raise ValueError(f"{path}: write .mp4 (H.264) or .webm (VP9)")
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"} if codec == "libx264" else {"crf": "20", "b": "0"}
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))


def write_frame_folder(folder: str | Path, video: np.ndarray, image_tmpl: str = IMAGE_TMPL,
                       quality: int = 90) -> None:
    """Write uint8 (T, H, W, 3) as JPEG files named by image_tmpl, numbered from 1."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(video):
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        (folder / image_tmpl.format(i + 1)).write_bytes(buffer.getvalue())


def make_motion_dataset(out: str | Path, spec: MotionSpec, *, train_per_class: int, val_per_class: int,
                        seed: int = 0, layout: str = "video", image_tmpl: str = IMAGE_TMPL) -> dict[str, int]:
    """Write OUT/videos/<split>/*.mp4 (layout video) or OUT/frames/<split>/<name>/ (layout frames),
    OUT/train.txt and OUT/val.txt in the matching list format, and OUT/labels.csv. Returns counts per split."""
    if layout not in ("video", "frames"):
        raise ValueError(f"layout must be 'video' or 'frames', got {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split_seed, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        rng = np.random.default_rng([seed, split_seed])
        lines = []
        for n in range(per_class * spec.num_classes):
            label = n % spec.num_classes
            video = motion_video(label, spec, rng)
            if layout == "video":
                relpath = f"videos/{split}/{n:06d}.mp4"
                write_video(out / relpath, video)
                lines.append(f"{relpath} {label}")
            else:
                relpath = f"frames/{split}/{n:06d}"
                write_frame_folder(out / relpath, video, image_tmpl)
                lines.append(f"{relpath} {len(video)} {label}")
        (out / f"{split}.txt").write_text("\n".join(lines) + "\n")
        counts[split] = len(lines)
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name"])
        writer.writerows(enumerate(spec.class_names()))
    return counts
