"""The run config: every shipped YAML loads, overrides apply, bad keys and values name themselves."""

import random
from pathlib import Path

import pytest
import yaml

from tdsclip.config import ConfigError, config_diff, config_from_dict, config_to_dict, load_config, save_config

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/**/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    config = load_config(path)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config  # what a run saves is what it ran with
    config.model.model_config()  # the model section builds a valid ModelConfig


@pytest.mark.parametrize("name, lr, side_dim, epochs, randaugment", [
    ("k400/vitb16", 1e-3, 320, 30, None),
    ("k400/vitl14", 1e-4, 512, 30, None),
    ("sthv1/vitb16", 1e-3, 320, 40, "rand-m7-n4-mstd0.5-inc1"),
    ("sthv1/vitl14", 1e-4, 512, 30, "rand-m7-n4-mstd0.5-inc1"),
    ("sthv2/vitb16", 1e-3, 320, 30, "rand-m7-n4-mstd0.5-inc1"),
    ("sthv2/vitl14", 1e-4, 512, 30, "rand-m7-n4-mstd0.5-inc1"),
])
def test_paper_settings(name, lr, side_dim, epochs, randaugment):
    config = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
    assert (config.optim.lr, config.model.side_dim, config.schedule.epochs) == (lr, side_dim, epochs)
    assert config.data.randaugment == randaugment
    assert (config.model.num_segments, config.model.frames_per_segment, config.data.num_sample) == (8, 5, 2)
    assert (config.optim.weight_decay, config.optim.betas, config.optim.label_smoothing) == (0.15, (0.9, 0.999), 0.1)
    assert config.schedule.warmup_epochs == 4
    assert config.data.global_batch_size == 128  # 16 per GPU x 8 GPUs
    kinetics = name.startswith("k400")  # the official code: datasets/kinetics.py unless "something" is in the name
    assert config.data.sampling == ("kinetics" if kinetics else "something")
    assert config.data.wrap_start == kinetics  # official modality: video (decord) for K400, frames for SS
    assert (config.data.resize, config.data.flip, config.data.grayscale_prob) == (
        (256, "plain", 0.2) if kinetics else ([256, 320], "swap", 0.0))
    assert config.eval.precision == "fp32"


def test_overrides_apply_and_parse_types():
    config = config_from_dict({}, ["optim.lr=3e-4", "data.resize=[256, 320]", "eval.skip_epochs=[1,2]",
                                   "model.clip_weights=null", "compile=false"])
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.data.resize == [256, 320]
    assert config.eval.skip_epochs == [1, 2]
    assert config.model.clip_weights is None and config.compile is False


@pytest.mark.parametrize("overrides, message", [
    (["optim.foo=1"], "optim.foo: unknown key; valid keys here: lr,"),
    (["nope=1"], "nope: unknown key"),
    (["data.flip=maybe"], "data.flip: got 'maybe'; valid choices: 'none', 'plain', 'swap'"),
    (["precision=fp16"], "precision: got 'fp16'; valid choices: 'auto', 'bf16', 'fp32'"),
    (["eval.test_crops=4"], "eval.test_crops: got 4; valid choices: 1, 3, 5, 10"),
    (["optim.lr=fast"], "optim.lr: must be a number"),
    (["optim.lr=-1"], "optim.lr: must be > 0, got -1.0"),
    (["optim.betas=[0.9]"], "optim.betas: must have 2 items"),
    (["schedule.warmup_epochs=50"], "schedule.warmup_epochs: must be in [0, schedule.epochs=30]"),
    (["model.num_classes=0"], "model.num_classes must be a positive integer (got 0)"),
    (["data.global_batch_size=two"], "data.global_batch_size: must be an integer"),
    (["data.flip=swap"], "data.flip_label_map: flip: swap needs a label map"),
    (["optim=3"], "optim: must be a mapping"),
    (["optim.lr"], "expected key.sub=value"),
    (["optim.betas=[0.9,"], "override 'optim.betas=[0.9,': the value is not valid YAML (expected the node content"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert message in str(info.value)


def test_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optim.lrr: unknown key"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("optim: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML: expected the node content, .* line 2, column 1$"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    config = config_from_dict({}, ["optim.lr=2e-4", "data.resize=[256, 320]", "output_dir=x"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(config)


def test_config_diff_names_changed_keys():
    old = config_to_dict(config_from_dict({}, ["data.flip=swap", "data.flip_label_map={1: 2, 2: 1}"]))
    new = config_to_dict(config_from_dict({}, ["data.flip=swap", "data.flip_label_map={1: 2, 2: 1}", "optim.lr=0.5",
                                               "optim.betas=[0.8, 0.9]"]))
    assert config_diff(old, old) == {}
    assert config_diff(old, new) == {"optim.betas": ([0.9, 0.999], [0.8, 0.9]), "optim.lr": (0.001, 0.5)}


# Each bad value with the start of its one-line message: the dotted key first, then the valid range.
OUT_OF_RANGE = [
    (["schedule.final_factor=-5"], "schedule.final_factor: must be in [0, 1], got -5.0"),
    (["schedule.final_factor=1.5"], "schedule.final_factor: must be in [0, 1]"),
    (["schedule.epochs=0"], "schedule.epochs: must be >= 1"),
    (["schedule.warmup_epochs=.nan"], "schedule.warmup_epochs: must be in [0, schedule.epochs=30], got nan"),
    (["optim.lr=.inf"], "optim.lr: must be a finite number > 0, got inf"),
    (["optim.lr=nan"], "optim.lr: must be a finite number > 0, got nan"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay: must be >= 0"),
    (["optim.betas=[0.9, 1]"], "optim.betas[1]: must be in [0, 1), got 1.0"),
    (["optim.eps=-1"], "optim.eps: must be > 0, got -1.0"),
    (["optim.eps=0"], "optim.eps: must be > 0"),
    (["optim.clip_ratio=-1"], "optim.clip_ratio: must be >= 0, got -1.0"),
    (["optim.bn_lr_ratio=-0.5"], "optim.bn_lr_ratio: must be >= 0"),
    (["optim.grad_clip=0"], "optim.grad_clip: must be > 0 or null"),
    (["optim.label_smoothing=1"], "optim.label_smoothing: must be in [0, 1)"),
    (["optim.mixup_alpha=-1"], "optim.mixup_alpha: must be >= 0, got -1.0"),
    (["optim.cutmix_alpha=-0.1"], "optim.cutmix_alpha: must be >= 0"),
    (["optim.mixup_switch_prob=1.5"], "optim.mixup_switch_prob: must be in [0, 1]"),
    (["optim.mixup=true", "optim.mixup_alpha=0", "optim.cutmix_alpha=0"],
     "optim.mixup: needs optim.mixup_alpha > 0 or optim.cutmix_alpha > 0"),
    (["seed=-1"], "seed: must be in [0, 4294967296), got -1"),
    (["seed=4294967296"], "seed: must be in [0, 4294967296)"),
    (["seed=1e400"], "seed: must be an integer"),
    (["output_dir=''"], "output_dir: must be a non-empty string"),
    (["data.num_threads=-1"], "data.num_threads: must be an integer >= 1, or null"),
    (["data.num_threads=0"], "data.num_threads: must be an integer >= 1, or null"),
    (["data.resize=0"], "data.resize: must be an integer >= 1 (short side) or [H, W] of integers >= 1, got 0"),
    (["data.resize=-5"], "data.resize: must be an integer >= 1"),
    (["data.resize=[0, 320]"], "data.resize: must be an integer >= 1 (short side) or [H, W] of integers >= 1"),
    (["data.resize=[256]"], "data.resize: must be an integer >= 1 (short side) or [H, W]"),
    (["data.resize=[256, 320, 3]"], "data.resize: must be an integer >= 1 (short side) or [H, W]"),
    (["data.resize=[a, b]"], "data.resize: got ['a', 'b']; expected int or list[int]"),
    (["data.resize=100"], "data.resize: the short side 100 must be at least model.image_size=224"),
    (["data.resize=[256, 200]"], "data.resize: the short side 200 must be at least model.image_size=224"),
    (["data.global_batch_size=0"], "data.global_batch_size: must be an integer >= 1"),
    (["data.num_sample=0"], "data.num_sample: must be an integer >= 1"),
    (["data.grayscale_prob=-0.1"], "data.grayscale_prob: must be a number in [0, 1]"),
    (["data.shards=''"], "data.shards: must be a non-empty string"),
    (["data.val_split=''"], "data.val_split: must be a non-empty string or null"),
    (["data.flip_label_map={-1: 2}"], "data.flip_label_map: labels must be integers >= 0, got -1: 2"),
    (["data.flip_label_map={2: -3}"], "data.flip_label_map: labels must be integers >= 0, got 2: -3"),
    (["model.num_classes=4", "data.flip=swap", "data.flip_label_map={86: 87, 87: 86}"],
     "data.flip_label_map: label 86 (in 86: 87) is not a class of model.num_classes=4 (labels 0..3)"),
    (["model.num_classes=87", "data.flip_label_map={86: 87}"],
     "data.flip_label_map: label 87 (in 86: 87) is not a class of model.num_classes=87"),
    (["data.randaugment=rand-m11-n4"], "data.randaugment: randaugment 'rand-m11-n4': magnitude m must be in 0..10"),
    (["data.randaugment=''"], "data.randaugment: randaugment must have a form like"),
    (["model.clip_weights=''"], "model.clip_weights: must be a non-empty string or null"),
    (["model.init_weights=''"], "model.init_weights: must be a non-empty string or null"),
    (["model.dropout=nan"], "model.dropout must be in [0, 1) (got nan)"),
    (["eval.skip_epochs=[3, -1]"], "eval.skip_epochs[1]: must be >= 0, got -1"),
    (["eval.test_clips=0"], "eval.test_clips: must be >= 1, got 0"),
    (["eval.every_epochs=0"], "eval.every_epochs: must be >= 1"),
    (["logging.peak_tflops=0"], "logging.peak_tflops: must be > 0 or null, got 0.0"),
    (["logging.peak_tflops=-989"], "logging.peak_tflops: must be > 0 or null"),
    (["logging.log_every=0"], "logging.log_every: must be >= 1"),
    (["checkpoint.every_steps=-1"], "checkpoint.every_steps: must be >= 0"),
    (["data.flip_label_map={1: 2, 1: 3}"], "override 'data.flip_label_map={1: 2, 1: 3}': duplicate key "
                                           "data.flip_label_map.1 (twice on line 1); keep one"),
]


@pytest.mark.parametrize("overrides, message", OUT_OF_RANGE, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_out_of_range_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_range_bounds_are_accepted():
    """The ends of each range are valid: the checks refuse what is wrong, not what is unusual."""
    config = config_from_dict({}, [
        "schedule.final_factor=1", "optim.clip_ratio=0", "optim.bn_lr_ratio=0", "optim.mixup_alpha=0",
        "optim.mixup=true", "optim.mixup_switch_prob=1", "optim.betas=[0, 0]", "seed=4294967295",
        "data.num_threads=1", "data.resize=[224, 224]", "eval.skip_epochs=[0]", "logging.peak_tflops=989.5",
        "checkpoint.every_steps=0", "schedule.warmup_epochs=30", "data.grayscale_prob=1",
        "model.num_classes=88", "data.flip=swap", "data.flip_label_map={86: 87, 87: 86}"])
    assert (config.schedule.final_factor, config.seed, config.data.flip_label_map) == (1.0, 2**32 - 1, {86: 87, 87: 86})
    assert config_from_dict({}, ["seed=0", "schedule.final_factor=0"]).seed == 0


def test_flip_label_map_of_another_dataset_names_label_and_classes():
    path = Path(__file__).parents[1] / "configs/sthv1/vitb16.yaml"  # the SSv1 map: labels 86..167
    with pytest.raises(ConfigError) as info:
        load_config(path, ["model.num_classes=4"])
    assert str(info.value).startswith(f"{path}: data.flip_label_map: label 86 (in 86: 87) is not a class of "
                                      "model.num_classes=4 (labels 0..3)")


def test_randaugment_error_carries_the_file_prefix():
    path = Path(__file__).parents[1] / "configs/demo.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, ["data.randaugment=rand-x"])
    assert str(info.value) == (f"{path}: data.randaugment: randaugment 'rand-x': part 'x' is not a name and a "
                               "number (a form like 'rand-m7-n4-mstd0.5')")


@pytest.mark.parametrize("text, message", [
    ("seed: 1\noptim:\n  lr: 1.0e-3\n  eps: 1.0e-8\n  lr: 2.0e-3\n", "duplicate key optim.lr (at lines 3 and 5)"),
    ("optim: {lr: 1.0}\nseed: 2\noptim: {eps: 1.0}\n", "duplicate key optim (at lines 1 and 3)"),
    ("data:\n  flip_label_map: {86: 87, 0x56: 1}\n", "duplicate key data.flip_label_map.86 (twice on line 2)"),
])
def test_duplicate_yaml_keys_name_the_file_key_and_both_lines(tmp_path, text, message):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {message}; keep one"


def test_merge_keys_may_be_overridden(tmp_path):
    """`<<: *base` then a key of base is an override, not a duplicate."""
    path = tmp_path / "merge.yaml"
    path.write_text("optim:\n  <<: {lr: 1.0e-3, eps: 1.0e-7}\n  lr: 2.0e-3\n")
    config = load_config(path)
    assert (config.optim.lr, config.optim.eps) == (2e-3, 1e-7)


def _torch_checkpoint(path, legacy):
    import torch

    torch.save({"model": torch.zeros(3), "epoch": 1}, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("name, write, reason", [
    ("last.pt", lambda p: _torch_checkpoint(p, legacy=False), "a zip archive, as torch.save writes checkpoints"),
    ("old.pt", lambda p: _torch_checkpoint(p, legacy=True), "a pickle, as older torch checkpoints are"),
    ("noise.yaml", lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "binary data"),
    ("latin1.yaml", lambda p: p.write_bytes(b"model:\n  arch: \xe9\n"), "not utf-8 text: byte #xe9 at offset 15"),
    ("bell.yaml", lambda p: p.write_bytes(b"seed: 5\x07\n"), "control character #x07 at character 7"),
    ("list.yaml", lambda p: p.write_text("- model\n- data\n"),
     "its top level is a list, not a mapping of sections such as model: and data:"),
    ("word.yaml", lambda p: p.write_text("vitb16\n"),
     "its top level is a str, not a mapping of sections such as model: and data:"),
])
def test_a_file_that_is_not_a_yaml_config_is_one_line(tmp_path, name, write, reason):
    path = tmp_path / name
    write(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    example = "give a YAML run config, e.g. configs/k400/vitb16.yaml"
    assert str(info.value) == f"{path} is not a YAML config ({reason}); {example}"


def test_utf16_and_empty_files_load(tmp_path):
    (tmp_path / "utf16.yaml").write_bytes("seed: 5\n".encode("utf-16"))  # with a BOM, as PyYAML reads it
    assert load_config(tmp_path / "utf16.yaml").seed == 5
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert load_config(tmp_path / "empty.yaml") == config_from_dict({})
