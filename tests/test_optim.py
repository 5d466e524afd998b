"""The optimizer and schedule: AdamW groups equal to the official train_vision.py rule (on the real
TDS-CLIP model, by the official names of its parameters), their learning rates, warm-up + cosine."""

import math

import pytest
import torch
from torch import nn

import tdsclip
from tdsclip.optim import WarmupCosineSchedule, build_optimizer, parameter_groups
from tdsclip.weights import our_name_to_official
from test_train import TinyModel


def official_group(official_name: str) -> str:
    """train_vision.py: 'bn' and 'side' in the name -> bn group; 'visual' -> clip group; else other (fc)."""
    if "bn" in official_name and "side" in official_name:
        return "bn"
    return "side" if "visual" in official_name else "head"


def test_groups_match_official_rule():
    model = tdsclip.build_model(tdsclip.tiny_config(layers=3))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = parameter_groups(model)
    ours = {names[id(p)]: group for group, params in groups.items() for p in params}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(ours) == sorted(trainable)  # every trainable parameter once, frozen ones never
    assert {n: official_group(our_name_to_official(n)) for n in trainable} == ours
    assert len(groups["bn"]) == 2 * (2 + 4 * 3 + 1)  # stem 2, per block 4, head 1 BatchNorms


def test_optimizer_covers_exactly_the_trainable_parameters():
    model = tdsclip.build_model(tdsclip.tiny_config())
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.15)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in tdsclip.trainable_parameters(model)}
    assert [g["name"] for g in optimizer.param_groups] == ["side", "head", "bn"]


def test_optimizer_groups_follow_the_official_split():
    model = TinyModel()
    groups = parameter_groups(model)
    assert groups["head"] == [model.head.weight, model.head.bias]
    assert groups["bn"] == [model.side_bn.weight, model.side_bn.bias]
    assert groups["side"] == [model.side.weight, model.side.bias]  # frozen backbone left out
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.15, clip_ratio=0.5, bn_lr_ratio=0.25)
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert lrs == {"side": (5e-4, 0.15), "head": (1e-3, 0.15), "bn": (2.5e-4, 0.15)}


def test_schedule_warms_up_linearly_then_cosine_to_zero():
    optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    schedule = WarmupCosineSchedule(optimizer, epochs=30, warmup_epochs=4)
    lr_at = lambda epoch: (schedule.step(epoch), schedule.get_last_lr()[0])[1]  # noqa: E731
    assert lr_at(0) == 0.0
    assert lr_at(2.5) == pytest.approx(1e-3 * 2.5 / 4)
    assert lr_at(4) == pytest.approx(1e-3)
    assert lr_at(17) == pytest.approx(1e-3 * 0.5)
    assert lr_at(10.3) == pytest.approx(1e-3 * (math.cos(math.pi * 6.3 / 26) + 1) / 2)
    assert lr_at(30) == pytest.approx(0.0, abs=1e-12)
