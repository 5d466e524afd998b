"""Our AdamW groups on the real TDS-CLIP model equal the official train_vision.py rule applied to the
official names of the same parameters."""

import tdsclip
from tdsclip.optim import build_optimizer, parameter_groups
from tdsclip.weights import our_name_to_official


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
