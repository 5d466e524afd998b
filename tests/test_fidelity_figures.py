"""tools/fidelity_figures.py: the paper-scale figures docs/fidelity.md quotes (the fast, numpy-only sections)."""

import importlib.util
import sys
from pathlib import Path

TOOL = Path(__file__).parents[1] / "tools" / "fidelity_figures.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("fidelity_figures", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_lr_held_between_official_update_points_is_at_most_a_third_of_a_percent(capsys):
    """SSv1: 673 batches an epoch, 4 warm-up epochs, lr held for up to 9 batches: 9 / (4 * 673) of the peak."""
    tool = load_tool()
    assert tool.official_batches_per_epoch(86_017) == 673
    assert tool.main(["lr", "remainder"]) == 0
    out = capsys.readouterr().out
    assert "| sthv1/vitb16 | 673 | 0.334% |" in out and "| k400/vitb16 | 1879 | 0.120% |" in out
    gaps = [float(line.split("|")[3].strip(" %")) for line in out.splitlines() if line.startswith("| sthv") and "/vit" in line]
    assert max(gaps) <= 9 / (4 * 673) * 100 + 1e-3
    assert "| sthv1 | 86017 | 672, 1 (0.001%) | 673, 1, 7 |" in out


def test_cosine_factor_is_the_schedule_ours_trains_with():
    import torch

    from tdsclip.optim import WarmupCosineSchedule

    tool = load_tool()
    schedule = WarmupCosineSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), epochs=30,
                                    warmup_epochs=4)
    for epoch in (0.0, 1.7, 4.0, 12.3, 29.99):
        assert tool.cosine_factor(epoch, 30, 4) == schedule.factor(epoch)
