"""The run configuration: one typed dataclass tree, loaded from YAML and validated once.

`load_config(path, overrides)` reads a YAML file into `RunConfig`, applies dotted command-line
overrides (`optim.lr=3e-4`), and checks every key and value. Errors name the dotted key and,
where there is a fixed set, the valid choices. Code below the edge takes plain arguments.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from atomicfile import atomic_write_text
from tdsclip.model import ModelConfig


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass(kw_only=True)
class ModelSection(ModelConfig):
    """The network (tdsclip.model.ModelConfig, whose checks name keys as model.<field>) plus where the
    CLIP weights live."""

    clip_weights: str | None = None  # local CLIP file; None = random frozen backbone (demo/tests)
    init_weights: str | None = None  # a trained TDS-CLIP (official or ours) to start from; the head only if it fits

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def model_config(self) -> ModelConfig:
        """The network's own config (everything but where weights come from)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


@dataclass(kw_only=True)
class DataSection:
    """Shards and the DALI pipeline options (see pipelines.loader)."""

    shards: str = "shards"  # directory holding <split>.manifest.json
    train_split: str = "train"
    val_split: str | None = "val"  # null: train without validation (no best.pt)
    test_split: str = "val"  # the split the test mode reads (Kinetics/SSv2 test on val)
    global_batch_size: int = 128  # videos per optimizer step, over all devices (paper: 16 x 8 GPUs)
    max_device_batch_size: int = 16  # micro-batch cap per device; the rest is gradient accumulation
    eval_batch_size: int = 16  # videos per device per eval batch
    num_sample: int = 2  # augmented views of each training video (repeated augmentation)
    sampling: Literal["something", "kinetics"] = "something"  # which official dataset class picks the frames
    wrap_start: bool = False  # frames before a video's first from its end, as the official decord path
    resize: int | list[int] = 256  # short side, or [H, W] (Something-Something: [256, 320])
    flip: Literal["none", "plain", "swap"] = "plain"
    flip_label_map: dict[int, int] | None = None
    grayscale_prob: float = 0.0
    randaugment: str | None = None  # e.g. "rand-m7-n4-mstd0.5-inc1"
    num_threads: int | None = None
    on_error: Literal["raise", "skip"] = "raise"

    def __post_init__(self) -> None:
        for name in ("global_batch_size", "max_device_batch_size", "eval_batch_size", "num_sample"):
            _check(getattr(self, name) > 0, f"data.{name}", "must be greater than 0")
        _check(0.0 <= self.grayscale_prob <= 1.0, "data.grayscale_prob", "must be in [0, 1]")
        if isinstance(self.resize, list):
            _check(len(self.resize) == 2, "data.resize", "must be an int or a list [H, W]")
        _check(self.flip != "swap" or bool(self.flip_label_map), "data.flip_label_map",
               "flip: swap needs a label map, e.g. {86: 87, 87: 86}")


@dataclass(kw_only=True)
class OptimSection:
    """AdamW with the official parameter groups, loss and batch mixing."""

    lr: float = 1e-3
    weight_decay: float = 0.15
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_ratio: float = 1.0  # lr multiplier of the side network relative to the head (official)
    bn_lr_ratio: float = 1.0  # lr multiplier of the BatchNorm group (official: 1 / grad accumulation = 1)
    grad_clip: float | None = None
    label_smoothing: float = 0.1
    mixup: bool = False  # official Mixup: mixup 0.8, cutmix 1.0, switch 0.5, per batch
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mixup_switch_prob: float = 0.5

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be greater than 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", "both must be in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "optim.label_smoothing", "must be in [0, 1)")
        _check(self.grad_clip is None or self.grad_clip > 0, "optim.grad_clip", "must be > 0 or null")


@dataclass(kw_only=True)
class ScheduleSection:
    """Linear warm-up then cosine decay, in epochs, stepped every optimizer step."""

    epochs: int = 30
    warmup_epochs: float = 4.0
    final_factor: float = 0.0  # lr at the end, relative to the peak

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "schedule.epochs", "must be greater than 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "schedule.warmup_epochs",
               f"must be in [0, schedule.epochs={self.epochs}]")


@dataclass(kw_only=True)
class CheckpointSection:
    every_steps: int = 0  # also write last.pt every N optimizer steps (0: only at epoch ends)
    save_best: bool = True  # best.pt by val top-1

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", "must be >= 0")


@dataclass(kw_only=True)
class LoggingSection:
    log_every: int = 10  # optimizer steps between log lines / TensorBoard points
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain"] = "auto"  # auto: rich bar in a terminal
    peak_tflops: float | None = None  # device bf16 peak for MFU; None: known GPUs, else no MFU

    def __post_init__(self) -> None:
        _check(self.log_every > 0, "logging.log_every", "must be greater than 0")


@dataclass(kw_only=True)
class EvalSection:
    every_epochs: int = 1
    skip_epochs: list[int] = field(default_factory=list)  # 0-based epochs with no validation (official)
    test_crops: Literal[1, 3, 5, 10] = 1
    test_clips: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"  # validation and test; fp32 as official, bf16 faster on GPU

    def __post_init__(self) -> None:
        _check(self.every_epochs > 0, "eval.every_epochs", "must be greater than 0")
        _check(self.test_clips > 0, "eval.test_clips", "must be greater than 0")


@dataclass(kw_only=True)
class RunConfig:
    """Everything one run needs. `output_dir` receives config.yaml, checkpoints and event files."""

    output_dir: str = "runs/default"
    seed: int = 1024
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool | None = None  # None: on for GPU, off on CPU
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        _check(bool(self.output_dir), "output_dir", "must not be empty")


# --- building the tree from plain data ------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and convert YAML forms (list -> tuple)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping of {[f.name for f in dataclasses.fields(tp)]}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices and type(value) in {type(c) for c in choices}, key,
               f"got {value!r}; valid choices: {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            _check(type(None) in options, key, "must not be null")
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: got {value!r}; expected {' or '.join(_type_name(o) for o in options)}")
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            _check(len(value) == len(args), key, f"must have {len(args)} items, got {value!r}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _check(isinstance(value, dict), key, f"must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_convert(k, key_type, f"{key}.{k}"): _convert(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        _check(name in names, key, f"unknown key; valid keys here: {', '.join(names)}")
        kwargs[name] = _convert(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{prefix or 'config'}: {error}") from error


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        _check(isinstance(child, dict), dotted, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem})") from None
    return key.strip(), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def config_from_dict(data: dict, overrides: list[str] = ()) -> RunConfig:
    """Build and validate a RunConfig from a plain mapping plus dotted overrides."""
    data = dict(data or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    return _build(RunConfig, data)


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Load a YAML config file, apply `key.sub=value` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--cfg {path} is a directory; give a YAML file, e.g. configs/k400/vitb16.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open() as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def config_to_dict(config: RunConfig) -> dict:
    """The resolved config as plain YAML-able data (tuples as lists)."""
    def plain(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: plain(v) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [plain(v) for v in node]
        return node
    return plain(dataclasses.asdict(config))


def config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (old value, new value)} for the keys both plain config dicts have and that differ."""
    def flat(node: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in node.items():
            if isinstance(value, dict) and key != "flip_label_map":  # a value, not a section
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[prefix + key] = value
        return items

    before, after = flat(old), flat(new)
    return {key: (before[key], after[key]) for key in sorted(before.keys() & after.keys()) if before[key] != after[key]}


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), so every run records what it ran."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
