"""The six shipped paper configs: the paper's test views and side widths by default."""

from pathlib import Path

import pytest
import yaml

from tdsclip.config import load_config

CONFIG_DIR = Path(__file__).parents[1] / "configs"
# The paper / official README report K400 at 8 frames x 3 crops x 4 clips, SSv1 and SSv2 at 8x3x2.
PAPER_VIEWS = {"k400": (3, 4), "sthv1": (3, 2), "sthv2": (3, 2)}
PAPER_CONFIGS = sorted(p for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name in PAPER_VIEWS)


def test_all_six_paper_configs_are_found():
    assert [f"{p.parent.name}/{p.stem}" for p in PAPER_CONFIGS] == [
        f"{d}/{a}" for d in sorted(PAPER_VIEWS) for a in ("vitb16", "vitl14")]


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_test_views_are_the_default(path):
    """launch.py --test and tools/predict.py read eval.test_crops x eval.test_clips from the config."""
    config = load_config(path)
    assert (config.eval.test_crops, config.eval.test_clips) == PAPER_VIEWS[path.parent.name]


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_side_dim_follows_from_arch(path):
    """The official pairing (B/16: 320, L/14: 512) comes from the model code, not from each YAML."""
    config = load_config(path)
    assert "side_dim" not in yaml.safe_load(path.read_text())["model"]
    assert config.model.side_dim == {"ViT-B-16": 320, "ViT-L-14": 512}[config.model.arch]
    assert load_config(path, ["model.side_dim=128"]).model.side_dim == 128
