"""The run config: every shipped YAML loads, overrides apply, bad keys and values name themselves."""

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
    (["optim.lr=-1"], "optim.lr: must be greater than 0"),
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
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
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
