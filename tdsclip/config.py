"""The run configuration: one typed dataclass tree, loaded from YAML and validated once.

`load_config(path, overrides)` reads a YAML file into `RunConfig`, applies dotted command-line
overrides (`optim.lr=3e-4`), and checks every key and value: types, each number's range (finite,
within its bounds), keys across sections (data.flip_label_map and data.resize against the model), and
no key given twice in a YAML mapping. Every error is one line that names the file and the dotted key
and says what is valid: the range, or the choices where there is a fixed set. A file that is not a YAML
config (a checkpoint, other binary data, a list) is refused in one line too. Code below the edge takes
plain arguments.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from atomicfile import atomic_write_text
from pipelines.config import DataConfig, TestCrops
from tdsclip.model_config import ModelConfig


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _check_range(value: Any, key: str, low: float | None = None, high: float | None = None, *,
                 open_low: bool = False, open_high: bool = False, nullable: bool = False) -> None:
    """Refuse a value that is not a finite number within [low, high] (an open end excludes its bound);
    None passes where `nullable`. The message says the range: `optim.eps: must be > 0, got -1.0`."""
    if nullable and value is None:
        return
    if low is not None and high is not None:
        wanted = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    else:
        wanted = f"{'>' if open_low else '>='} {low}" if low is not None else f"{'<' if open_high else '<='} {high}"
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and isinstance(value, float) and not math.isfinite(value):  # an int is exact, however large
        wanted = f"a finite number {wanted}"
    ok = number and (isinstance(value, int) or math.isfinite(value))
    ok = ok and (low is None or value > low or (not open_low and value == low))
    ok = ok and (high is None or value < high or (not open_high and value == high))
    _check(ok, key, f"must be {wanted}{' or null' if nullable else ''}, got {value!r}")


def _check_name(value: Any, key: str, *, nullable: bool = False) -> None:
    """Refuse an empty string (a path or split name); None passes where `nullable`."""
    if not (nullable and value is None):
        or_null = " or null" if nullable else ""
        _check(isinstance(value, str) and value != "", key, f"must be a non-empty string{or_null}")


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
        _check_name(self.clip_weights, "model.clip_weights", nullable=True)
        _check_name(self.init_weights, "model.init_weights", nullable=True)

    def model_config(self) -> ModelConfig:
        """The network's own config (everything but where weights come from)."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})


@dataclass(kw_only=True)
class DataSection(DataConfig):
    """The data options: pipelines.DataConfig, whose fields, choices and checks the pipelines declare
    once (errors as data.<key>); RunConfig checks them against the model."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as error:
            raise ConfigError(str(error)) from None


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
        _check_range(self.lr, "optim.lr", 0, open_low=True)
        _check_range(self.weight_decay, "optim.weight_decay", 0)
        for i, beta in enumerate(self.betas):
            _check_range(beta, f"optim.betas[{i}]", 0, 1, open_high=True)
        _check_range(self.eps, "optim.eps", 0, open_low=True)
        for name in ("clip_ratio", "bn_lr_ratio"):  # 0 freezes that group; a negative lr would ascend
            _check_range(getattr(self, name), f"optim.{name}", 0)
        _check_range(self.grad_clip, "optim.grad_clip", 0, open_low=True, nullable=True)
        _check_range(self.label_smoothing, "optim.label_smoothing", 0, 1, open_high=True)
        for name in ("mixup_alpha", "cutmix_alpha"):  # Beta(alpha, alpha); 0 turns that kind of mixing off
            _check_range(getattr(self, name), f"optim.{name}", 0)
        _check_range(self.mixup_switch_prob, "optim.mixup_switch_prob", 0, 1)
        _check(not self.mixup or self.mixup_alpha > 0 or self.cutmix_alpha > 0, "optim.mixup",
               "needs optim.mixup_alpha > 0 or optim.cutmix_alpha > 0 (both are 0)")


@dataclass(kw_only=True)
class ScheduleSection:
    """Linear warm-up then cosine decay, in epochs, stepped every optimizer step."""

    epochs: int = 30
    warmup_epochs: float = 4.0
    final_factor: float = 0.0  # lr at the end, relative to the peak

    def __post_init__(self) -> None:
        _check_range(self.epochs, "schedule.epochs", 1)
        _check(0 <= self.warmup_epochs <= self.epochs, "schedule.warmup_epochs",  # NaN fails both
               f"must be in [0, schedule.epochs={self.epochs}], got {self.warmup_epochs!r}")
        _check_range(self.final_factor, "schedule.final_factor", 0, 1)  # of the peak lr


@dataclass(kw_only=True)
class CheckpointSection:
    every_steps: int = 0  # also write last.pt every N optimizer steps (0: only at epoch ends)
    save_best: bool = True  # best.pt by val top-1

    def __post_init__(self) -> None:
        _check_range(self.every_steps, "checkpoint.every_steps", 0)


@dataclass(kw_only=True)
class CpuSection:
    """This process's CPU threads (tdsclip/cpu_budget.py); null: derived from the CPUs it may use (affinity,
    cgroup quota, shared by the local ranks). DALI's threads are data.num_threads."""

    cpus: int | None = None  # CPUs this process may keep busy; null: its share of the node's
    torch_threads: int | None = None  # torch intra-op threads; null: the budget's split
    py_workers: int | None = None  # processes reading shard bytes for DALI; null: up to 4 on a GPU host, 0 on CPU

    def __post_init__(self) -> None:
        _check_range(self.cpus, "cpu.cpus", 1, nullable=True)
        _check_range(self.torch_threads, "cpu.torch_threads", 1, nullable=True)
        _check_range(self.py_workers, "cpu.py_workers", 0, nullable=True)


@dataclass(kw_only=True)
class LoggingSection:
    log_every: int = 10  # optimizer steps between log lines / TensorBoard points
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain"] = "auto"  # auto: rich bar in a terminal
    peak_tflops: float | None = None  # device bf16 peak for MFU; None: known GPUs, else no MFU

    def __post_init__(self) -> None:
        _check_range(self.log_every, "logging.log_every", 1)
        _check_range(self.peak_tflops, "logging.peak_tflops", 0, open_low=True, nullable=True)


@dataclass(kw_only=True)
class EvalSection:
    every_epochs: int = 1
    skip_epochs: list[int] = field(default_factory=list)  # 0-based epochs with no validation (official)
    test_crops: TestCrops = 1
    test_clips: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"  # validation and test; fp32 as official, bf16 faster on GPU

    def __post_init__(self) -> None:
        _check_range(self.every_epochs, "eval.every_epochs", 1)
        for i, epoch in enumerate(self.skip_epochs):
            _check_range(epoch, f"eval.skip_epochs[{i}]", 0)
        _check_range(self.test_clips, "eval.test_clips", 1)


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
    cpu: CpuSection = field(default_factory=CpuSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        _check_name(self.output_dir, "output_dir")
        _check_range(self.seed, "seed", 0, 2**32, open_high=True)  # numpy's seed range
        self._check_labels_fit_model()
        self._check_resize_fits_model()

    def _check_labels_fit_model(self) -> None:
        """Every label of data.flip_label_map is a class of the model (a map copied from another dataset
        would otherwise swap labels the loss cannot take)."""
        classes = self.model.num_classes
        for source, target in (self.data.flip_label_map or {}).items():
            outside = next((label for label in (source, target) if label >= classes), None)
            _check(outside is None, "data.flip_label_map",
                   f"label {outside} (in {source}: {target}) is not a class of model.num_classes={classes} "
                   f"(labels 0..{classes - 1}); give this dataset's mirrored pairs "
                   "(or null, with data.flip plain or none)")

    def _check_resize_fits_model(self) -> None:
        """The crops are taken from the resized frame, so its short side must hold model.image_size."""
        short = self.data.resize if isinstance(self.data.resize, int) else min(self.data.resize)
        _check(short >= self.model.image_size, "data.resize",
               f"the short side {short} must be at least model.image_size={self.model.image_size}")


# --- building the tree from plain data ------------------------------------------------------


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # list[int], not list
        return str(tp).replace("typing.", "")
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


# --- reading YAML ----------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_SNIFF_BYTES = 8192  # enough of a file's start to tell a checkpoint or other binary from text
_EXAMPLE = "give a YAML run config, e.g. configs/k400/vitb16.yaml"


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one silently,
    so a second `lr:` further down a section would quietly win. `key_prefix` names where the document
    sits (an override's key), for the dotted name in the error."""

    key_prefix = ""

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_unique_keys(node, self.key_prefix, set())
        return super().construct_document(node)

    def _check_unique_keys(self, node: yaml.Node, prefix: str, visited: set[int]) -> None:
        if id(node) in visited:  # an alias: checked where its anchor is
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_unique_keys(item, f"{prefix}[{i}]", visited)
        if not isinstance(node, yaml.MappingNode):
            return
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base` brings keys that this mapping may override
                self._check_unique_keys(value_node, prefix, visited)
                continue
            if not isinstance(key_node, yaml.ScalarNode):  # PyYAML refuses these itself (unhashable)
                continue
            key = self.construct_object(key_node)  # 86 and 0x56 are one key
            dotted = f"{prefix}.{key}" if prefix else str(key)
            line = key_node.start_mark.line + 1
            if key in first_line:
                where = f"at lines {first_line[key]} and {line}" if first_line[key] != line else f"twice on line {line}"
                raise ConfigError(f"duplicate key {dotted} ({where}); keep one")
            first_line[key] = line
            self._check_unique_keys(value_node, dotted, visited)


def _load_yaml(text: str | bytes, key_prefix: str = "") -> Any:
    """Parse one YAML document safely, refusing duplicate keys (ConfigError); yaml.YAMLError otherwise."""
    loader = _ConfigLoader(text)
    loader.key_prefix = key_prefix
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What is wrong and where, on one line (a PyYAML error's text spans several)."""
    problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _binary_kind(head: bytes) -> str | None:
    """What a file that starts with `head` is, where that is plainly not YAML text; None otherwise."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive, as torch.save writes checkpoints"
    if head.startswith(b"\x80"):
        return "a pickle, as older torch checkpoints are"
    if b"\x00" in head and not head.startswith((b"\xff\xfe", b"\xfe\xff")):  # UTF-16 text has NULs
        return "binary data"
    return None


def _not_text(error: yaml.reader.ReaderError) -> str:
    """Why PyYAML's reader refused a file: a byte its encoding cannot decode, or a control character."""
    code = error.character if isinstance(error.character, int) else ord(error.character)
    if error.encoding == "unicode":  # PyYAML's name for text that decoded but holds a non-printable character
        return f"control character #x{code:02x} at character {error.position}"
    return f"not {error.encoding} text: byte #x{code:02x} at offset {error.position}"


def _read_config_file(path: Path) -> dict:
    """The top-level mapping of a YAML config file, or a one-line ConfigError naming the file."""
    if path.is_dir():
        raise ConfigError(f"--cfg {path} is a directory; give a YAML file, e.g. configs/k400/vitb16.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)  # a multi-gigabyte video given by mistake is not read whole
            kind = _binary_kind(head)
            if kind is not None:
                raise ConfigError(f"{path} is not a YAML config ({kind}); {_EXAMPLE}")
            raw = head + f.read()
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
    try:
        data = _load_yaml(raw)
    except yaml.reader.ReaderError as error:  # undecodable bytes or control characters
        raise ConfigError(f"{path} is not a YAML config ({_not_text(error)}); {_EXAMPLE}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path} is not a YAML config (its top level is a {type(data).__name__}, not a mapping "
                          f"of sections such as model: and data:); {_EXAMPLE}")
    return data or {}


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    try:
        value = _load_yaml(raw, key.strip()) if raw else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({_yaml_problem(error)})") from None
    except ConfigError as error:
        raise ConfigError(f"override {text!r}: {error}") from None
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
    data = _read_config_file(path)
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
