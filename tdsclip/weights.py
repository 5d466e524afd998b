"""Weights I/O: CLIP backbone files, official TDS-CLIP checkpoints, this project's checkpoints.

The official training script (BBYL9413/TDS-CLIP, train_vision.py) saves
``{"epoch", "model_state_dict", "optimizer_state_dict"}`` whose model keys look like
``visual.transformer.side_transformer.0.conv.0.weight``. ``official_to_ours`` / ``ours_to_official``
translate those names and shapes (1x1 convs are Linear here) both ways; ``load_model`` reads either
layout and ``export_official`` writes the official one; ``init_from_checkpoint`` starts a model
from either (fine-tuning).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
import zipfile
from pathlib import Path

import torch

from tdsclip.checkpoint_file import CheckpointError, read_checkpoint_file, write_checkpoint
from tdsclip.model import HEAD_WIDTH, TDSCLIP, ModelConfig, build_model

FORMAT = "tdsclip"
VERSION = 1

# (official name, our name, official shape of our tensor). Placeholders: {i} a layer index,
# {p} a parameter/buffer leaf name (weight, bias, running_mean, ...), {r} the rest of a backbone key.
_SIDE = "visual.transformer.side_transformer.{i}."
_OURS = "side.blocks.{i}."
_NAME_MAP: list[tuple[str, str, str]] = [
    ("visual.side_conv1.{p}", "side.stem.frame_conv.{p}", ""),
    ("visual.side_pre_bn3d.{p}", "side.stem.frame_norm.{p}", ""),
    ("visual.side_conv1_c5.{p}", "side.stem.diff_conv.{p}", ""),
    ("visual.side_pre_bn3d_c5.{p}", "side.stem.diff_norm.{p}", ""),
    ("visual.transformer.side_spatial_position_embeddings", "side.pos_embed", ""),
    ("visual.transformer.side_lns.{i}.{p}", "side.taps.{i}.norm.{p}", ""),
    ("visual.transformer.side_linears.{i}.{p}", "side.taps.{i}.proj.{p}", ""),
    (_SIDE + "bn_1.{p}", _OURS + "temporal_norm.{p}", ""),
    (_SIDE + "conv.0.weight", _OURS + "temporal_conv.in_proj.weight", "conv3d"),
    (_SIDE + "conv.0.bias", _OURS + "temporal_conv.in_proj.bias", ""),
    (_SIDE + "conv.1.weight", _OURS + "temporal_conv.time_weight", "depthwise"),
    (_SIDE + "conv.1.bias", _OURS + "temporal_conv.time_bias", ""),
    (_SIDE + "conv.2.weight", _OURS + "temporal_conv.out_proj.weight", "conv3d"),
    (_SIDE + "conv.2.bias", _OURS + "temporal_conv.out_proj.bias", ""),
    (_SIDE + "mse.conv1.weight", _OURS + "td_gate.reduce.weight", "conv2d"),
    (_SIDE + "mse.bn1.{p}", _OURS + "td_gate.reduce_norm.{p}", ""),
    (_SIDE + "mse.conv2.weight", _OURS + "td_gate.expand.weight", "conv2d"),
    (_SIDE + "mse.bn2.{p}", _OURS + "td_gate.expand_norm.{p}", ""),
    (_SIDE + "ln_1.{p}", _OURS + "attn_norm.{p}", ""),
    (_SIDE + "attn.in_proj_weight", _OURS + "cross_attn.qkv.weight", ""),
    (_SIDE + "attn.in_proj_bias", _OURS + "cross_attn.qkv.bias", ""),
    (_SIDE + "attn.out_proj.{p}", _OURS + "cross_attn.proj.{p}", ""),
    (_SIDE + "bn_2.{p}", _OURS + "mlp_norm.{p}", ""),
    (_SIDE + "mlp.fc1.{p}", _OURS + "mlp.fc1.{p}", ""),
    (_SIDE + "mlp.fc2.{p}", _OURS + "mlp.fc2.{p}", ""),
    ("visual.side_post_bn.{p}", "head.norm.{p}", ""),
    ("fc.{p}", "head.fc.{p}", ""),
    # The frozen CLIP ViT keeps OpenAI's names, under "backbone." instead of "visual.".
    ("visual.class_embedding", "backbone.class_embedding", ""),
    ("visual.positional_embedding", "backbone.positional_embedding", ""),
    ("visual.conv1.weight", "backbone.conv1.weight", ""),
    ("visual.ln_pre.{p}", "backbone.ln_pre.{p}", ""),
    ("visual.transformer.resblocks.{i}.{r}", "backbone.transformer.resblocks.{i}.{r}", ""),
]
# Official keys the network never reads: the frame-fusion head (train_vision.py's fusion_model) is
# skipped because the side network already returns one vector per clip; it has no parameters with
# the released configs (sim_header: None).
_UNUSED_OFFICIAL = re.compile(r"fusion_model\..*")
_OFFICIAL_SHAPES = {
    "": lambda t: t,
    "conv3d": lambda t: t.reshape(*t.shape, 1, 1, 1),  # Linear (out, in) -> Conv3d (out, in, 1, 1, 1)
    "conv2d": lambda t: t.reshape(*t.shape, 1, 1),  # Linear (out, in) -> Conv2d (out, in, 1, 1)
    "depthwise": lambda t: t.reshape(t.shape[0], 1, 3, 1, 1),  # (D, 3) -> Conv3d (D, 1, 3, 1, 1)
}
_GROUPS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>[a-z_]+)", "r": r"(?P<r>[\w.]+)"}


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template)
    for name, group in _GROUPS.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), group)
    return re.compile(pattern)


_RULES = [(_template_regex(o), o, _template_regex(ours), ours, shape) for o, ours, shape in _NAME_MAP]


def official_name_to_ours(name: str) -> str | None:
    """Our parameter/buffer name for an official one; None for official keys the network never reads.

    Raises KeyError for a name that is not part of the official TDS-CLIP model.
    """
    if _UNUSED_OFFICIAL.fullmatch(name):
        return None
    for official_re, _, _, ours, _ in _RULES:
        m = official_re.fullmatch(name)
        if m:
            return ours.format(**m.groupdict())
    raise KeyError(name)


def our_name_to_official(name: str) -> str:
    """The official name of one of our parameter/buffer names."""
    for _, official, ours_re, _, _ in _RULES:
        m = ours_re.fullmatch(name)
        if m:
            return official.format(**m.groupdict())
    raise KeyError(name)


def _official_shape(official_name: str, tensor: torch.Tensor) -> torch.Tensor:
    for official_re, _, _, _, shape in _RULES:
        if official_re.fullmatch(official_name):
            return _OFFICIAL_SHAPES[shape](tensor)
    raise KeyError(official_name)


def official_to_ours(state: dict[str, torch.Tensor], model: TDSCLIP) -> dict[str, torch.Tensor]:
    """Translate an official ``model_state_dict`` into ``model``'s state dict (names and shapes).

    Raises CheckpointError naming unknown, missing or wrongly shaped keys.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    ours, unexpected = {}, []
    for name, tensor in state.items():
        try:
            our_name = official_name_to_ours(name)
        except KeyError:
            unexpected.append(name)
            continue
        if our_name is None:
            continue
        if our_name not in expected:
            unexpected.append(name)
            continue
        target = expected[our_name]
        official_shape = _official_shape(name, target).shape
        if tensor.shape != official_shape:
            raise CheckpointError(
                f"official key {name!r} has shape {tuple(tensor.shape)}, the model expects "
                f"{tuple(official_shape)} (sizes inferred or configured wrongly?)"
            )
        ours[our_name] = tensor.reshape(target.shape)
    missing = [our_name_to_official(k) for k in expected if k not in ours]
    _raise_if_incompatible(missing, unexpected, "official checkpoint")
    return ours


def ours_to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate our state dict into the official ``model_state_dict`` layout."""
    official = {}
    for name, tensor in state.items():
        official_name = our_name_to_official(name)
        official[official_name] = _official_shape(official_name, tensor)
    return official


def _raise_if_incompatible(missing: list[str], unexpected: list[str], what: str) -> None:
    if not missing and not unexpected:
        return
    lines = [f"{what} does not match the model:"]
    for label, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            lines.append(f"  {label} keys: {shown}")
    raise CheckpointError("\n".join(lines))


def config_from_official(state: dict[str, torch.Tensor], num_segments: int = 8) -> ModelConfig:
    """Infer the network sizes from an official ``model_state_dict``'s tensors.

    The head count is the official rule (width // 64); T is not stored in the weights.
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.side_conv1.weight",
                "visual.side_conv1_c5.weight", "fc.weight"]
    absent = [k for k in required if k not in state]
    if absent:
        raise CheckpointError(f"official checkpoint lacks {', '.join(absent)}; is it a TDS-CLIP checkpoint?")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    sizes = dict(width=width, layers=layers, heads=max(1, width // HEAD_WIDTH), patch_size=patch,
                 image_size=grid * patch)
    arch = _arch_with_sizes(sizes)
    return ModelConfig(
        arch=arch,
        **({} if arch else sizes),
        side_dim=state["visual.side_conv1.weight"].shape[0],
        num_segments=num_segments,
        frames_per_segment=state["visual.side_conv1_c5.weight"].shape[1] // 3 + 1,
        num_classes=state["fc.weight"].shape[0],
    )


KNOWN_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336")


def _arch_with_sizes(sizes: dict[str, int]) -> str | None:
    """The known open_clip arch with exactly these backbone sizes, if any."""
    for arch in KNOWN_ARCHS:
        config = ModelConfig(arch=arch)
        if all(getattr(config, k) == v for k, v in sizes.items()):
            return arch
    return None


# ---------------------------------------------------------------------------------------------
# Files


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the prefixes DDP ("module.") and torch.compile ("_orig_mod.") add to state-dict keys."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def is_official_state(state: object) -> bool:
    """Whether a dict looks like the official script's ``model_state_dict``."""
    return isinstance(state, dict) and any(
        k.removeprefix("module.") in ("visual.side_conv1.weight", "fc.weight") for k in state
    )


def model_checkpoint(model: TDSCLIP) -> dict:
    """The model part of our checkpoint format; the trainer adds its own keys to this dict."""
    model = getattr(model, "_orig_mod", model)
    return {
        "format": FORMAT,
        "version": VERSION,
        "model_config": dataclasses.asdict(model.config),
        "model": _strip_wrappers(model.state_dict()),
    }


def save_model(model: TDSCLIP, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` in our checkpoint format (atomically)."""
    write_checkpoint(model_checkpoint(model), path)


def model_from_checkpoint(checkpoint: dict, num_segments: int | None = None, source: str = "checkpoint") -> TDSCLIP:
    """Build the model stored in one of our checkpoint dicts (see ``model_checkpoint``)."""
    if checkpoint.get("version") != VERSION:
        raise CheckpointError(f"{source}: tdsclip checkpoint version {checkpoint.get('version')!r}, expected {VERSION}")
    for key in ("model_config", "model"):
        if key not in checkpoint:
            raise CheckpointError(f"{source}: tdsclip checkpoint has no {key!r} entry")
    fields = dict(checkpoint["model_config"])
    if num_segments is not None:
        fields["num_segments"] = num_segments
    try:
        config = ModelConfig(**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad model_config: {e}") from e
    model = build_model(config)
    state = _strip_wrappers(checkpoint["model"])
    expected = model.state_dict()
    _raise_if_incompatible(
        [k for k in expected if k not in state], [k for k in state if k not in expected], source
    )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: {name!r} has shape {tuple(tensor.shape)}, model_config implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    return model


def load_official_state(state: dict[str, torch.Tensor], num_segments: int = 8) -> TDSCLIP:
    """Build a model from an official ``model_state_dict``, sizes inferred from its tensors."""
    model = build_model(config_from_official(state, num_segments))
    model.load_state_dict(official_to_ours(state, model))
    return model


def load_model(path: str | os.PathLike, num_segments: int | None = None) -> TDSCLIP:
    """Load a TDS-CLIP model in eval mode from an official checkpoint or one of ours.

    Args:
        path: an official training-script checkpoint (``{"model_state_dict": ...}``, keys like
            ``visual.side_conv1.weight``, optional DDP ``module.`` prefix), a bare official state dict,
            or a tdsclip checkpoint (``{"format": "tdsclip", ...}``).
        num_segments: segments per clip T. Official files do not record it (default 8); for ours,
            None keeps the stored value.
    """
    path = Path(path)
    checkpoint = read_checkpoint_file(path)
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        model = model_from_checkpoint(checkpoint, num_segments, source=str(path))
    else:
        model = _load_official(official_state_of(checkpoint, path), num_segments, path)
    return model.eval()


def official_state_of(checkpoint: object, path: Path) -> dict[str, torch.Tensor]:
    """The official ``model_state_dict`` in what an official file holds (the script's dict, or a bare state)."""
    if isinstance(checkpoint, dict) and is_official_state(checkpoint.get("model_state_dict")):
        return checkpoint["model_state_dict"]
    if is_official_state(checkpoint):
        return checkpoint
    keys = list(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise CheckpointError(
        f"{path} is neither a tdsclip checkpoint (format='tdsclip') nor an official TDS-CLIP one "
        f"(model_state_dict with visual.side_* keys); top-level content: {keys}"
    )


# The sizes two networks must share for one's weights to start the other (the head may differ).
SHARED_SIZES = ("width", "layers", "heads", "patch_size", "image_size", "side_dim", "frames_per_segment", "quick_gelu")


def init_from_checkpoint(model: TDSCLIP, path: str | os.PathLike) -> list[str]:
    """Start `model` from the weights of a trained TDS-CLIP (official or ours), e.g. Kinetics-400
    weights for Something-Something: everything but a classifier of another class count is copied.

    Returns the names of the parameters left as they were (the head when the class counts differ).
    """
    source = load_model(path, num_segments=model.config.num_segments)
    differ = [f"{name}: {getattr(source.config, name)} in the checkpoint, {getattr(model.config, name)} here"
              for name in SHARED_SIZES if getattr(source.config, name) != getattr(model.config, name)]
    if differ:
        raise CheckpointError(f"{path} holds another network ({'; '.join(differ)}); set model.* to match it")
    state, own = source.state_dict(), model.state_dict()
    kept = sorted(name for name, tensor in own.items() if state[name].shape != tensor.shape)
    model.load_state_dict({name: t for name, t in state.items() if name not in kept}, strict=False)
    return kept


def _load_official(state: dict, num_segments: int | None, path: Path) -> TDSCLIP:
    try:
        return load_official_state(state, 8 if num_segments is None else num_segments)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def export_official(model: TDSCLIP, path: str | os.PathLike, epoch: int = 0) -> None:
    """Write ``model`` in the official training script's checkpoint layout (atomically).

    ``{"epoch", "model_state_dict", "optimizer_state_dict": {}}``: the official test script loads it
    strictly (``--weights``), the training script as ``pretrain``.
    """
    model = getattr(model, "_orig_mod", model)
    official_heads = model.config.width // HEAD_WIDTH
    if model.config.heads != official_heads:
        raise ValueError(
            f"the official code gives a width-{model.config.width} backbone {official_heads} heads (width // 64); "
            f"this model has model.heads={model.config.heads}, so it would compute different outputs there"
        )
    state = ours_to_official(_strip_wrappers(model.state_dict()))
    write_checkpoint({"epoch": epoch, "model_state_dict": state, "optimizer_state_dict": {}}, path, checksum=False)


# ---------------------------------------------------------------------------------------------
# CLIP backbone weights


def read_clip_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``visual.*`` tensors of a local CLIP file, as float32, ``visual.`` removed.

    Accepts an OpenAI release (TorchScript archive such as ViT-B-16.pt, or a plain state dict) and
    open_clip checkpoints (``.pt``/``.bin`` with or without a ``state_dict`` entry, ``.safetensors``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP weights not found at {path}. Nothing is downloaded: put the OpenAI release file there "
            "(e.g. ViT-B-16.pt from the official CLIP repository) or an open_clip checkpoint of the same arch."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    elif _is_torchscript(path):
        with warnings.catch_warnings():  # OpenAI's release files are TorchScript; jit.load warns it is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = read_checkpoint_file(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a CLIP state dict")
    state = _strip_wrappers(state)
    visual = {k.removeprefix("visual."): v.float() for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise CheckpointError(f"{path} has no 'visual.*' keys; is it a CLIP checkpoint? first keys: {list(state)[:5]}")
    return visual


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a constants.pkl; torch.save'd ones are not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_clip_weights(model: TDSCLIP, path: str | os.PathLike) -> None:
    """Load a local CLIP file's vision tower into ``model``'s frozen backbone (strict)."""
    visual = {k: v for k, v in read_clip_state(path).items() if not re.fullmatch(r"ln_post\.\w+|proj", k)}
    expected = model.backbone.state_dict()
    _raise_if_incompatible(
        [k for k in expected if k not in visual], [k for k in visual if k not in expected], f"CLIP file {path}"
    )
    for name, tensor in visual.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"CLIP file {path}: visual.{name} has shape {tuple(tensor.shape)}, the backbone "
                f"({model.config.arch or 'custom'}) expects {tuple(expected[name].shape)}; wrong arch or resolution?"
            )
    model.backbone.load_state_dict(visual)

