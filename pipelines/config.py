"""The data options of a run (the `data:` section of a config), declared and checked in one place.

`DataConfig` holds every option the pipelines read from a run's config; `pipelines.build_loader`
turns it, plus the model's clip geometry and this process's rank, into a Loader. The choices of each
option are declared once, as the Literal types below; the tuples the pipelines check against
(SCHEMES, FLIPS, ...) are derived from them.

Imports neither DALI nor torch: the run's config loader imports this module, and a config error
should come before seconds of imports.
"""

import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Literal

Scheme = Literal["something", "kinetics"]  # which official dataset class picks the frames (pipelines.sampling)
Flip = Literal["none", "plain", "swap"]  # swap: mirrored clips take the mirrored class (flip_label_map)
OnError = Literal["raise", "skip"]  # an unreadable sample stops the run (naming it), or is left out and listed
TestCrops = Literal[1, 3, 5, 10]  # the official multi-view test crops
Mode = Literal["train", "val", "test"]

SCHEMES: tuple[str, ...] = typing.get_args(Scheme)
FLIPS: tuple[str, ...] = typing.get_args(Flip)
ON_ERROR: tuple[str, ...] = typing.get_args(OnError)
TEST_CROPS: tuple[int, ...] = typing.get_args(TestCrops)
MODES: tuple[str, ...] = typing.get_args(Mode)

RANDAUGMENT_FORM = "a form like 'rand-m7-n4-mstd0.5'"


@dataclass(kw_only=True)
class DataConfig:
    """Shards and the DALI pipeline options; errors are ValueError("data.<key>: ...")."""

    shards: str = "shards"  # directory holding <split>.manifest.json
    train_split: str = "train"
    val_split: str | None = "val"  # null: train without validation (no best.pt)
    test_split: str = "val"  # the split the test mode reads (Kinetics/SSv2 test on val)
    global_batch_size: int = 128  # videos per optimizer step, over all devices (paper: 16 x 8 GPUs)
    max_device_batch_size: int = 16  # micro-batch cap per device; the rest is gradient accumulation
    eval_batch_size: int = 16  # videos per device per eval batch
    num_sample: int = 2  # augmented views of each training video (repeated augmentation)
    sampling: Scheme = "something"  # which official dataset class picks the frames
    wrap_start: bool = False  # frames before a video's first from its end, as the official decord path
    resize: int | list[int] = 256  # short side, or [H, W] (Something-Something: [256, 320])
    flip: Flip = "plain"
    flip_label_map: dict[int, int] | None = None
    grayscale_prob: float = 0.0
    randaugment: str | None = None  # e.g. "rand-m7-n4-mstd0.5-inc1"
    num_threads: int | None = None  # DALI CPU threads; null: this process's share of the cores
    on_error: OnError = "raise"

    def __post_init__(self) -> None:
        for name in ("shards", "train_split", "test_split"):
            value = getattr(self, name)
            _require(isinstance(value, str) and value != "", name, "must be a non-empty string")
        _require(self.val_split is None or (isinstance(self.val_split, str) and self.val_split != ""), "val_split",
                 "must be a non-empty string or null")
        for name in ("global_batch_size", "max_device_batch_size", "eval_batch_size", "num_sample"):
            _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        for name, choices in (("sampling", SCHEMES), ("flip", FLIPS), ("on_error", ON_ERROR)):
            _require(getattr(self, name) in choices, name,
                     f"got {getattr(self, name)!r}; valid choices: {', '.join(map(repr, choices))}")
        _require(isinstance(self.wrap_start, bool), "wrap_start", "must be true or false")
        _require(self.num_threads is None or (_is_int(self.num_threads) and self.num_threads >= 1), "num_threads",
                 "must be an integer >= 1, or null for this process's share of the cores")
        _require(isinstance(self.grayscale_prob, (int, float)) and not isinstance(self.grayscale_prob, bool)
                 and 0.0 <= self.grayscale_prob <= 1.0, "grayscale_prob", "must be a number in [0, 1]")
        self._check_resize()
        self._check_flip_label_map()
        if self.randaugment is not None:
            _require(isinstance(self.randaugment, str), "randaugment", f"must be a string of {RANDAUGMENT_FORM}")
            try:
                parse_randaugment(self.randaugment)
            except ValueError as error:
                raise ValueError(f"data.randaugment: {error}") from None

    def _check_resize(self) -> None:
        pair = isinstance(self.resize, (list, tuple)) and len(self.resize) == 2
        ints = [self.resize] if _is_int(self.resize) else list(self.resize) if pair else []
        _require(bool(ints) and all(_is_int(v) and v >= 1 for v in ints), "resize",
                 f"must be an integer >= 1 (short side) or [H, W] of integers >= 1, got {self.resize!r}")

    def _check_flip_label_map(self) -> None:
        labels = self.flip_label_map
        if labels is not None:
            _require(isinstance(labels, dict), "flip_label_map",
                     "must be a mapping of label: label, e.g. {86: 87, 87: 86}")
            bad = [f"{k}: {v}" for k, v in labels.items() if not (_is_int(k) and _is_int(v) and k >= 0 and v >= 0)]
            _require(not bad, "flip_label_map", f"labels must be integers >= 0, got {', '.join(bad)}")
        _require(self.flip != "swap" or bool(labels), "flip_label_map",
                 "flip: swap needs a label map, e.g. {86: 87, 87: 86}")

    @property
    def resize_size(self) -> int | tuple[int, int]:
        """`resize` as the pipelines take it: the short side, or an exact (H, W)."""
        return self.resize if _is_int(self.resize) else (int(self.resize[0]), int(self.resize[1]))

    @property
    def randaugment_levels(self) -> tuple[int, int, float] | None:
        """`randaugment` parsed: (n, m, mstd), or None without RandAugment."""
        return parse_randaugment(self.randaugment) if self.randaugment else None


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"data.{key}: {message}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@functools.cache
def parse_randaugment(spec: str) -> tuple[int, int, float]:
    """Parse a timm-style "rand-m7-n4[-mstd0.5][-inc1]" into (n, m, mstd), m on timm's 0-10 scale.

    Magnitudes always increase with m (timm's "inc1", the official setting; DALI's monotonic suite).
    Raises ValueError naming the part that is wrong. Cached: a spec is parsed once however often asked.
    """
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must have {RANDAUGMENT_FORM}, got {spec!r}")
    n, m, mstd = 2, 10, 0.0
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d*)?)", part)
        if match is None:
            raise ValueError(f"randaugment {spec!r}: part {part!r} is not a name and a number ({RANDAUGMENT_FORM})")
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
