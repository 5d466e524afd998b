"""The plan of one epoch on one rank: which videos, which frames, which crops, in which batch.

Everything random is drawn here, in numpy, from (seed, epoch) for the shuffle shared by all
ranks and (seed, epoch, rank) for frames, crops, flips, grayscale and RandAugment, so the plan
of an epoch is a pure function of those numbers: that makes runs deterministic and lets a resumed
run continue mid-epoch with exactly the batches it would have seen (DALI's own RNG is not used).
Cost: ~50 us per video (1.5 s for a 30k-video rank share), in each process that reads the epoch;
Planner makes the next epoch's plan in the background.
"""

import threading
from dataclasses import dataclass

import numpy as np

from pipelines import params, sampling
from pipelines.config import FLIPS, MODES, TEST_CROPS
from pipelines.reader import Sample, SharedRanges

PLANS_KEPT = 4  # epoch plans a Planner keeps (see Planner)


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """What one loader makes of a video (validated; errors name the option)."""

    split: str
    num_segments: int = 8
    frames_per_segment: int = sampling.FRAMES_PER_SEGMENT  # the temporal-difference window around each centre
    sampling_scheme: str = "something"  # sampling.SCHEMES: the official dataset class whose frame choice to follow
    wrap_start: bool = False  # frames before a video's first come from its end (official decord path)
    image_size: int = 224
    resize: int | tuple[int, int] = 256
    num_sample: int = 1
    flip: str = "none"
    flip_label_map: dict[int, int] | None = None
    grayscale_prob: float = 0.0
    test_crops: int = 1
    test_clips: int = 1
    randaugment: tuple[int, int, float] | None = None  # (n, m, mstd) (config.parse_randaugment); train only

    def __post_init__(self):
        if self.split not in MODES:
            raise ValueError(f"split must be one of {MODES}, got {self.split!r}")
        sampling.check_scheme(self.sampling_scheme)
        if self.flip not in FLIPS:
            raise ValueError(f"flip must be one of {FLIPS}, got {self.flip!r}")
        for name in ("num_segments", "frames_per_segment", "image_size", "num_sample", "test_clips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.frames_per_segment % 2 == 0:
            raise ValueError(f"frames_per_segment must be odd (a window centred on each sampled frame), "
                             f"got {self.frames_per_segment}")
        if self.test_crops not in TEST_CROPS:
            raise ValueError(f"test_crops must be one of {TEST_CROPS}, got {self.test_crops}")
        if not 0.0 <= self.grayscale_prob <= 1.0:
            raise ValueError(f"grayscale_prob must be in [0, 1], got {self.grayscale_prob}")
        short = self.resize if isinstance(self.resize, int) else min(self.resize)
        if short < self.image_size:
            raise ValueError(f"resize {self.resize} must be at least image_size {self.image_size}")

    @property
    def train(self) -> bool:
        return self.split == "train"

    @property
    def num_views(self) -> int:
        """Spatial views per video, one DALI output each: num_sample (train), test_crops (test), 1 (val)."""
        return self.num_sample if self.train else self.test_crops if self.split == "test" else 1

    @property
    def num_clips(self) -> int:
        """Temporal clips per video: test_clips in test, else 1."""
        return self.test_clips if self.split == "test" else 1

    @property
    def frames_per_video(self) -> int:
        return self.num_clips * self.num_segments * self.frames_per_segment

    @property
    def label_map(self) -> dict[int, int]:
        if self.flip != "swap":
            return {}
        return params.SSV2_FLIP_LABELS if self.flip_label_map is None else dict(self.flip_label_map)


@dataclass
class EpochPlan:
    """Rows are videos in batch order (batch b = rows [b*B, (b+1)*B)); O views, F frames per video."""

    batch_size: int
    sample: np.ndarray  # (R,) index into the sample list
    valid: np.ndarray  # (R,) bool; False marks padding
    frames: np.ndarray  # (R, F) int32 frame indices, clip-major then segment then window
    roi: np.ndarray  # (R, O, 4) float32 [y0, x0, y1, x1] in stored-frame pixels
    mirror: np.ndarray  # (R, O) int32
    gray: np.ndarray  # (R, O) bool: convert to grayscale
    label: np.ndarray  # (R, O) int64, after the flip label swap
    ra: np.ndarray | None = None  # (R, O, 3, n) int32 RandAugment [op index, magnitude bin, negate] per level

    @property
    def num_batches(self) -> int:
        return len(self.sample) // self.batch_size


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")


def batches_per_epoch(num_videos: int, batch_size: int, world_size: int, *, shuffle: bool) -> int:
    """Batches every rank gets per epoch: len(rank_rows(...)[0]) // batch_size, without drawing the rows."""
    if shuffle:
        return max(1, num_videos // (batch_size * world_size))
    per_rank = -(-num_videos // world_size)  # ceil: the longest rank's share
    return max(1, -(-per_rank // batch_size))


def rank_rows(num_videos: int, batch_size: int, rank: int, world_size: int, *, shuffle: bool,
              rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This rank's videos for one epoch, in order, as (indices, valid); len is a multiple of batch_size.

    Every rank gets the same number of batches. shuffle (train): a permutation shared by all ranks,
    dealt round-robin; the remainder that does not fill a batch on every rank is dropped (a
    different remainder each epoch); if the data is smaller than one global batch it is repeated.
    No shuffle (val/test): video i goes to rank i % world_size; short ranks are padded with
    repeats marked invalid, so each video is counted exactly once over all ranks.
    """
    _check_rank(rank, world_size)
    num_batches = batches_per_epoch(num_videos, batch_size, world_size, shuffle=shuffle)
    if shuffle:
        order = np.resize(rng.permutation(num_videos), num_batches * batch_size * world_size)
        rows = order[rank::world_size]
        return rows, np.ones(len(rows), dtype=bool)
    rows = np.arange(rank, num_videos, world_size)
    pad = num_batches * batch_size - len(rows)
    filler = rows[:1] if len(rows) else np.zeros(1, dtype=np.int64)
    valid = np.concatenate([np.ones(len(rows), dtype=bool), np.zeros(pad, dtype=bool)])
    return np.concatenate([rows, np.resize(filler, pad)]), valid


def make_plan(samples: list[Sample], spec: ClipSpec, batch_size: int, *, rank: int, world_size: int,
              seed: int, epoch: int, skipped: frozenset = frozenset()) -> EpochPlan:
    """Plan one epoch; samples in `skipped` are replaced (train) or padded out as invalid (val/test)."""
    shuffle_rng = np.random.default_rng([seed, epoch])  # the same permutation on every rank
    rows, valid = rank_rows(len(samples), batch_size, rank, world_size, shuffle=spec.train, rng=shuffle_rng)
    rng = np.random.default_rng([seed, epoch, rank, 1])  # this rank's frames and crops
    rows, valid = _replace_skipped(rows, valid, len(samples), skipped, spec.train)
    num_rows, num_views = len(rows), spec.num_views
    plan = EpochPlan(batch_size=batch_size, sample=rows, valid=valid,
                     frames=np.zeros((num_rows, spec.frames_per_video), np.int32),
                     roi=np.zeros((num_rows, num_views, 4), np.float32),
                     mirror=np.zeros((num_rows, num_views), np.int32),
                     gray=np.zeros((num_rows, num_views), bool),
                     label=np.zeros((num_rows, num_views), np.int64))
    for r, index in enumerate(rows):
        _plan_video(plan, r, samples[index], spec, rng)
    if spec.train and spec.randaugment is not None:
        plan.ra = _rand_augment_draws(num_rows, num_views, *spec.randaugment,
                                      np.random.default_rng([seed, epoch, rank, 2]))
    return plan


@dataclass
class Planner:
    """The plan of any epoch of one rank, as a picklable callable (DALI worker processes call it).

    Train plans are made once per process: asking for epoch e returns it (made now if needed) and
    starts making e+1 in a background thread, so the next epoch's ~1.5 s (30k videos) of planning
    overlaps this epoch instead of stalling its first batch. Val/test plans do not depend on the
    epoch: one plan serves all. Keeps the plans of the 4 epochs last asked for (e-1 .. e+2 around a
    boundary, where the loader and the source prefetching past it ask for different epochs); least
    recently used first out, so a caller that goes back to an earlier epoch keeps it too.
    """

    samples: list[Sample]
    spec: ClipSpec
    batch_size: int
    rank: int
    world_size: int
    seed: int
    skipped: frozenset = frozenset()
    shared: SharedRanges | None = None  # where worker processes find the byte ranges (else pickled)

    def __post_init__(self):
        _check_rank(self.rank, self.world_size)
        self._cache: dict[int, EpochPlan] = {}
        self._pending: dict[int, threading.Thread] = {}
        self._lock = threading.Lock()

    def __call__(self, epoch: int) -> EpochPlan:
        epoch = epoch if self.spec.train else 0
        with self._lock:
            plan, thread = self._cache.pop(epoch, None), self._pending.get(epoch)
            if plan is not None:
                self._cache[epoch] = plan  # now the most recently used
        if plan is None and thread is not None:
            thread.join()
            plan = self._cache.get(epoch)
        if plan is None:
            plan = self._make(epoch)
        if self.spec.train:
            self._prefetch(epoch + 1)
        return plan

    def _make(self, epoch: int) -> EpochPlan:
        plan = make_plan(self.samples, self.spec, self.batch_size, rank=self.rank, world_size=self.world_size,
                         seed=self.seed, epoch=epoch, skipped=self.skipped)
        with self._lock:
            self._cache.pop(epoch, None)
            self._cache[epoch] = plan
            while len(self._cache) > PLANS_KEPT:
                del self._cache[next(iter(self._cache))]  # dicts keep insertion order: the least recently used
        return plan

    def _prefetch(self, epoch: int) -> None:
        with self._lock:
            if epoch in self._cache or epoch in self._pending:
                return
            thread = self._pending[epoch] = threading.Thread(target=self._background, args=(epoch,), daemon=True,
                                                             name=f"plan-epoch-{epoch}")
            thread.start()  # under the lock: another caller may join it as soon as it is pending

    def _background(self, epoch: int) -> None:
        try:
            self._make(epoch)
        finally:
            with self._lock:
                self._pending.pop(epoch, None)

    @property
    def num_batches(self) -> int:
        """Batches per epoch: the same for every epoch (skips replace or pad, never shorten)."""
        return batches_per_epoch(len(self.samples), self.batch_size, self.world_size, shuffle=self.spec.train)

    def __getstate__(self):  # plans are remade in the worker, not shipped; ranges come from `shared`
        state = {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_pending", "_lock")}
        if self.shared is not None:
            state["samples"] = self.shared.strip(self.samples)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache, self._pending, self._lock = {}, {}, threading.Lock()
        if self.shared is not None:
            self.samples = self.shared.attach(self.samples)


def _rand_augment_draws(rows: int, views: int, n: int, m: int, mstd: float,
                        rng: np.random.Generator) -> np.ndarray:
    """timm RandAugment choices per clip and view: n ops drawn with replacement, each applied with
    p=0.5 (else identity), magnitude m plus N(0, mstd) noise clipped to [0, 10], random sign."""
    ops = rng.integers(0, params.RA_NUM_DRAWN, (rows, views, n))
    ops = np.where(rng.random((rows, views, n)) < 0.5, ops, params.RA_IDENTITY)
    magnitude = np.clip(rng.normal(m, mstd, (rows, views, n)) if mstd > 0 else np.full((rows, views, n), m), 0, 10)
    bins = np.rint(magnitude * params.RA_BINS_PER_UNIT)
    negate = rng.integers(0, 2, (rows, views, n))
    return np.stack([ops, bins, negate], axis=2).astype(np.int32)


def _replace_skipped(rows, valid, num_videos, skipped, train):
    if not skipped:
        return rows, valid
    good = np.array([i for i in range(num_videos) if i not in skipped])
    if len(good) == 0:
        raise RuntimeError("every sample of the split failed to decode")
    bad = np.isin(rows, list(skipped))
    if train:  # the next good video takes the bad one's place
        rows = rows.copy()
        rows[bad] = good[np.searchsorted(good, rows[bad]) % len(good)]
        return rows, valid
    return np.where(bad, good[0], rows), valid & ~bad


def _plan_video(plan: EpochPlan, r: int, sample: Sample, spec: ClipSpec, rng: np.random.Generator) -> None:
    n = sample.num_frames
    centres = sampling.clip_centres(spec.sampling_scheme, spec.split, n, spec.num_segments, spec.num_clips,
                                    rng)  # (K, T)
    plan.frames[r] = sampling.window(centres, n, spec.frames_per_segment,
                                     wrap_start=spec.wrap_start).reshape(-1)  # (K*T*M,)
    stored = (sample.height, sample.width)
    scaled = params.scaled_size(sample.source_height, sample.source_width, spec.resize)  # the official frame
    if spec.train:
        for v in range(spec.num_views):
            plan.roi[r, v] = params.to_stored_roi(params.random_resized_crop(*scaled, rng), scaled, stored)
            flipped = spec.flip != "none" and rng.random() < 0.5
            plan.mirror[r, v] = flipped
            plan.label[r, v] = spec.label_map.get(sample.label, sample.label) if flipped else sample.label
            if spec.grayscale_prob > 0 and rng.random() < spec.grayscale_prob:
                plan.gray[r, v] = True
        return
    size = spec.image_size
    for v, (y, x, mirror) in enumerate(params.test_crops(*scaled, size, spec.num_views)):
        plan.roi[r, v] = params.to_stored_roi((y, x, size, size), scaled, stored)
        plan.mirror[r, v] = mirror
    plan.label[r] = sample.label
