"""Which frames a clip uses: segment centres and the M-frame temporal-difference window.

Official TDS-CLIP semantics, 0-based, for a video of n frames cut into T segments of
M consecutive frames each (frames_per_segment, odd; official 5) (pure numpy; no I/O). A clip is a (T, M) array of frame
indices; a test sample with K clips is a (K, T, M) array.

The official code samples with one of two dataset classes, and so do we (`SCHEMES`):
"something" (datasets/sth.py: TSN ticks for training, segment middles for val/test) and
"kinetics" (datasets/kinetics.py, used for every dataset whose name lacks "something":
a random frame of each rounded segment for training, segment starts for val, evenly spread
starts for K test clips).
"""

import numpy as np

from pipelines.config import SCHEMES

FRAMES_PER_SEGMENT = 5


def clip_centres(scheme: str, split: str, num_frames: int, num_segments: int, num_clips: int = 1,
                 rng: np.random.Generator | None = None) -> np.ndarray:
    """Segment centres of one video, shape (K, T): K = num_clips in test, else 1.

    `rng` draws the training centres; val and test are deterministic.
    """
    check_scheme(scheme)
    kinetics = scheme == "kinetics"
    if split == "train":
        draw = kinetics_train_centres if kinetics else train_centres
        return draw(num_frames, num_segments, rng)[None]
    if split == "val":
        return (kinetics_val_centres if kinetics else val_centres)(num_frames, num_segments)[None]
    return (kinetics_test_centres if kinetics else test_centres)(num_frames, num_segments, num_clips)


def check_scheme(scheme: str) -> None:
    """Raise ValueError unless `scheme` is one of SCHEMES."""
    if scheme not in SCHEMES:
        raise ValueError(f"sampling must be one of {SCHEMES}, got {scheme!r}")


def train_centres(num_frames: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Random segment centres for training, shape (T,).

    If n > T, segment i spans [i*n//T, (i+1)*n//T) and its centre is uniform in it;
    otherwise the centres are all n frames plus random extra ones up to T, sorted.
    """
    n, t = _check(num_frames, num_segments)
    if n > t:
        ticks = np.arange(t + 1) * n // t  # (T+1,) segment boundaries
        return ticks[:-1] + rng.integers(0, ticks[1:] - ticks[:-1])
    extra = rng.integers(0, n, size=t - n)
    return np.sort(np.concatenate([np.arange(n), extra]))


def val_centres(num_frames: int, num_segments: int) -> np.ndarray:
    """Deterministic centres for validation, shape (T,): round(seg*i) + int(seg/2), seg = (n-1)/T."""
    n, t = _check(num_frames, num_segments)
    seg = (n - 1) / t
    return np.round(seg * np.arange(t)).astype(np.int64) + int(seg / 2)


def test_centres(num_frames: int, num_segments: int, num_clips: int) -> np.ndarray:
    """Centres of K test clips, shape (K, T): round(seg*i) + int(seg/(K+1)*(k+1))."""
    n, t = _check(num_frames, num_segments)
    if num_clips < 1:
        raise ValueError(f"test_clips must be >= 1, got {num_clips}")
    seg = (n - 1) / t
    starts = np.round(seg * np.arange(t)).astype(np.int64)  # (T,)
    shifts = np.array([int(seg / (num_clips + 1) * (k + 1)) for k in range(num_clips)])  # (K,)
    return shifts[:, None] + starts[None, :]


def kinetics_train_centres(num_frames: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Random centres for training, shape (T,): uniform in [round(seg*i), round(seg*(i+1))], both
    ends included, seg = (n-1)/T (adjacent segments share their boundary frame, as official)."""
    n, t = _check(num_frames, num_segments)
    bounds = np.round((n - 1) / t * np.arange(t + 1)).astype(np.int64)  # (T+1,)
    return bounds[:-1] + rng.integers(0, bounds[1:] - bounds[:-1] + 1)


def kinetics_val_centres(num_frames: int, num_segments: int) -> np.ndarray:
    """Deterministic centres for validation, shape (T,): the segment starts int(i*n/T)."""
    n, t = _check(num_frames, num_segments)
    return np.array([int(n / t * i) % n for i in range(t)], dtype=np.int64)


def kinetics_test_centres(num_frames: int, num_segments: int, num_clips: int) -> np.ndarray:
    """Centres of K test clips, shape (K, T): int(start_k + i*n/T) with the K starts spread evenly over
    the first segment (the official integer linspace from 0 to n/T - 1, truncated toward zero)."""
    n, t = _check(num_frames, num_segments)
    if num_clips < 1:
        raise ValueError(f"test_clips must be >= 1, got {num_clips}")
    tick = n / t
    # numpy >= 2 floors an integer linspace; the official code's numpy truncated (they differ when n < T)
    starts = np.trunc(np.linspace(0, tick - 1, num=num_clips)).astype(int)  # (K,)
    return np.array([[int(start + tick * i) % n for i in range(t)] for start in starts.tolist()], dtype=np.int64)


def window(centres: np.ndarray, num_frames: int, length: int = FRAMES_PER_SEGMENT, *,
           wrap_start: bool = False) -> np.ndarray:
    """Frames centre - length//2 + j for j < length, kept inside the video; shape centres.shape + (length,).

    Past the end they stay at the last frame, as in every official path. Before the start they stay
    at the first frame (the official frame-folder path), or with `wrap_start` count back from the end
    (the official decord video path: Python's negative indexing), which mixes a clip's start with its end.
    """
    frames = np.asarray(centres)[..., None] + (np.arange(length) - length // 2)
    if wrap_start:
        frames = np.where(frames < 0, frames % num_frames, frames)
    return np.clip(frames, 0, num_frames - 1)


def _check(num_frames: int, num_segments: int) -> tuple[int, int]:
    if num_frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got num_frames={num_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    return int(num_frames), int(num_segments)
