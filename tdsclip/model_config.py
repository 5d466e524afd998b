"""The sizes of a TDS-CLIP network (ModelConfig), checked once; torch-free, so a run's config loads fast."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

HEAD_WIDTH = 64  # CLIP ViTs and the official side attention both use 64-wide heads
TD_REDUCTION = 16  # the TD gate squeezes channels by this factor
# side_dim by backbone width, as the official configs pair them: 320 with ViT-B/16 (width 768), 512 with
# ViT-L/14 (width 1024); B/32 and L/14-336 share those widths.
OFFICIAL_SIDE_DIMS = {768: 320, 1024: 512}


def _clip_vision_sizes(arch: str) -> dict[str, int]:
    """Backbone sizes of an open_clip ViT config name, from open_clip's JSON model configs (read without
    importing open_clip and torch, so a config loads in a blink; no weights are touched)."""
    config = _open_clip_model_config(arch)
    vision = (config or {}).get("vision_cfg", {})
    plain = {"image_size", "layers", "width", "patch_size", "head_width"}
    if not vision or not set(vision) <= plain or not isinstance(vision.get("layers"), int):
        raise ValueError(
            f"model.arch={arch!r} is not a plain open_clip ViT (use e.g. 'ViT-B-32', 'ViT-B-16', "
            "'ViT-L-14', 'ViT-L-14-336', or arch=None with explicit sizes)"
        )
    width = vision["width"]
    return {
        "width": width,
        "layers": vision["layers"],
        "heads": width // vision.get("head_width", HEAD_WIDTH),
        "patch_size": vision["patch_size"],
        "image_size": vision["image_size"],
    }


@dataclass(kw_only=True)
class ModelConfig:
    """Sizes of a TDS-CLIP network.

    ``arch`` names an open_clip ViT ("ViT-B-16", ...) whose sizes fill ``width, layers, heads,
    patch_size, image_size``; with ``arch=None`` those five must be given. ``side_dim`` is the side
    network width; unset, it is the official one for the backbone width (``OFFICIAL_SIDE_DIMS``: 320
    for B/16, 512 for L/14), and other widths must set it. ``frames_per_segment`` is the odd window of
    consecutive frames around each sampled frame (official: 5). ``dropout`` is applied before the
    classifier. ``quick_gelu`` selects the OpenAI backbone activation (False for open_clip models
    trained with nn.GELU).
    """

    arch: str | None = "ViT-B-16"
    width: int | None = None
    layers: int | None = None
    heads: int | None = None
    patch_size: int | None = None
    image_size: int | None = None
    side_dim: int | None = None  # None: OFFICIAL_SIDE_DIMS[width]; resolved in __post_init__
    num_segments: int = 8
    frames_per_segment: int = 5
    num_classes: int = 400
    dropout: float = 0.0
    quick_gelu: bool = True

    def __post_init__(self) -> None:
        sizes = ("width", "layers", "heads", "patch_size", "image_size")
        if self.arch is not None:
            for name, value in _clip_vision_sizes(self.arch).items():
                given = getattr(self, name)
                if given is not None and given != value:
                    raise ValueError(f"model.{name}={given} conflicts with model.arch={self.arch!r} ({value})")
                setattr(self, name, value)
        self._check_positive_ints(sizes)
        self._resolve_side_dim()
        self._check_positive_ints(("side_dim", "num_segments", "frames_per_segment", "num_classes"))
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be divisible by model.heads={self.heads}")
        if self.patch_size < 3:
            raise ValueError(f"model.patch_size must be at least 3 (got {self.patch_size})")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"model.image_size={self.image_size} must be a multiple of model.patch_size={self.patch_size}"
            )
        if self.side_dim < TD_REDUCTION or self.side_dim % self.side_heads:
            raise ValueError(
                f"model.side_dim must be at least {TD_REDUCTION} and divisible by its head count "
                f"{self.side_heads} (side_dim // {HEAD_WIDTH}); got {self.side_dim}"
            )
        if self.frames_per_segment < 3 or self.frames_per_segment % 2 == 0:
            raise ValueError(f"model.frames_per_segment must be odd and at least 3 (got {self.frames_per_segment})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1) (got {self.dropout})")

    def _check_positive_ints(self, names: tuple[str, ...]) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer (got {value!r})")

    def _resolve_side_dim(self) -> None:
        """An unset side_dim becomes the official one for this backbone width (widths checked already)."""
        if self.side_dim is not None:
            return
        if self.width not in OFFICIAL_SIDE_DIMS:
            known = ", ".join(f"{d} for width {w}" for w, d in OFFICIAL_SIDE_DIMS.items())
            raise ValueError(f"model.side_dim must be set for a backbone of width {self.width} "
                             f"(official values exist only for the CLIP widths: {known})")
        self.side_dim = OFFICIAL_SIDE_DIMS[self.width]

    @property
    def side_heads(self) -> int:
        """Attention heads of the side network (official: side_dim // 64)."""
        return max(1, self.side_dim // HEAD_WIDTH)

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size


def _open_clip_model_config(arch: str) -> dict | None:
    """open_clip's model_configs/<arch>.json, or None when open_clip has no such config."""
    spec = importlib.util.find_spec("open_clip")  # locates the package without importing it
    path = Path(spec.origin).parent / "model_configs" / f"{arch}.json" if spec and spec.origin else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text())
