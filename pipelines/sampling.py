"""Which frames a clip uses: TSN segment centres and the 5-frame temporal-difference window.

Official TDS-CLIP semantics, 0-based, for a video of n frames cut into T segments of
M = 5 consecutive frames each (pure numpy; no I/O). A clip is a (T, M) array of frame
indices; a test sample with K clips is a (K, T, M) array.
"""

import numpy as np

FRAMES_PER_SEGMENT = 5


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


def window(centres: np.ndarray, num_frames: int, length: int = FRAMES_PER_SEGMENT) -> np.ndarray:
    """Frames clamp(centre - length//2 + j, 0, n-1) for j < length; shape centres.shape + (length,).

    The official video path wraps negative indices to the video's end; we clamp, so a window never
    mixes the clip's start with its end.
    """
    offsets = np.arange(length) - length // 2
    return np.clip(np.asarray(centres)[..., None] + offsets, 0, num_frames - 1)


def _check(num_frames: int, num_segments: int) -> tuple[int, int]:
    if num_frames < 1:
        raise ValueError(f"a video needs at least 1 frame, got num_frames={num_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    return int(num_frames), int(num_segments)
