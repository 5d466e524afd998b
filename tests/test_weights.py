"""Weights I/O: official checkpoints both ways, our checkpoints, CLIP backbone files, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tdsclip
from tdsclip.weights import (
    CheckpointError,
    config_from_official,
    official_name_to_ours,
    our_name_to_official,
    _arch_with_sizes,
)
from tools import export_official as export_tool

GOLDEN = Path(__file__).parent / "data" / "golden_tiny" / "checkpoint.pt"


@pytest.fixture(scope="module")
def official_state() -> dict[str, torch.Tensor]:
    return torch.load(GOLDEN, map_location="cpu", weights_only=False)["model_state_dict"]


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 8, 5, 3, 16, 16)


def outputs(model: tdsclip.TDSCLIP, clips: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(clips)


def test_names_map_both_ways(official_state):
    for name in official_state:
        assert our_name_to_official(official_name_to_ours(name)) == name
    assert official_name_to_ours("fusion_model.frame_position_embeddings.weight") is None  # unused head
    with pytest.raises(KeyError):
        official_name_to_ours("visual.side_new_thing.weight")


def test_sizes_inferred_from_official_tensors(official_state):
    config = config_from_official(official_state, num_segments=4)
    assert (config.arch, config.width, config.layers, config.heads, config.patch_size, config.image_size) == (
        None, 64, 2, 1, 8, 16)
    assert (config.side_dim, config.num_classes, config.frames_per_segment, config.num_segments) == (64, 5, 5, 4)
    assert _arch_with_sizes(dict(width=768, layers=12, heads=12, patch_size=16, image_size=224)) == "ViT-B-16"


def test_official_round_trip_is_exact(official_state, tmp_path):
    model = tdsclip.load_model(GOLDEN)
    assert not model.training and model.config.num_segments == 8
    out = tmp_path / "official.pt"
    assert export_tool.main([str(GOLDEN), str(out)]) == 0
    exported = torch.load(out, map_location="cpu", weights_only=False)
    assert set(exported) == {"epoch", "model_state_dict", "optimizer_state_dict"}
    state = exported["model_state_dict"]
    assert set(state) == set(official_state)
    for name, tensor in official_state.items():
        assert state[name].shape == tensor.shape and torch.equal(state[name], tensor), name


def test_export_of_a_new_model_loads_back(clips, tmp_path):
    model = tdsclip.build_model(tdsclip.tiny_config(num_segments=8, image_size=16))
    tdsclip.export_official(model, tmp_path / "o.pt", epoch=4)
    exported = torch.load(tmp_path / "o.pt", weights_only=False)
    assert exported["epoch"] == 4 and all(k.startswith(("visual.", "fc.")) for k in exported["model_state_dict"])
    loaded = tdsclip.load_model(tmp_path / "o.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(ValueError, match=r"1 heads \(width // 64\); this model has model.heads=2"):
        tdsclip.export_official(tdsclip.build_model(tdsclip.tiny_config(heads=2)), tmp_path / "x.pt")
    tdsclip.save_model(tdsclip.build_model(tdsclip.tiny_config(heads=2)), tmp_path / "heads2.pt")
    assert export_tool.main([str(tmp_path / "heads2.pt"), str(tmp_path / "y.pt")]) == 1  # the message, no traceback
    assert not (tmp_path / "y.pt").exists()


def test_ddp_prefix_and_bare_state_dict(official_state, clips, tmp_path):
    reference = outputs(tdsclip.load_model(GOLDEN), clips)
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in official_state.items()}}, tmp_path / "ddp.pt")
    torch.save(official_state, tmp_path / "bare.pt")
    for name in ("ddp.pt", "bare.pt"):
        torch.testing.assert_close(outputs(tdsclip.load_model(tmp_path / name), clips), reference, rtol=0, atol=0)


def test_our_checkpoint_round_trip(clips, tmp_path):
    model = tdsclip.load_model(GOLDEN)
    checkpoint = tdsclip.model_checkpoint(model) | {"optimizer": {}, "step": 7}  # the trainer adds keys
    torch.save(checkpoint, tmp_path / "ours.pt")
    loaded = tdsclip.load_model(tmp_path / "ours.pt")
    assert loaded.config == model.config
    torch.testing.assert_close(outputs(loaded, clips), outputs(model, clips), rtol=0, atol=0)
    assert tdsclip.load_model(tmp_path / "ours.pt", num_segments=3).config.num_segments == 3
    tdsclip.save_model(loaded, tmp_path / "again.pt")
    assert torch.equal(torch.load(tmp_path / "again.pt", weights_only=False)["model"]["head.fc.bias"],
                       model.head.fc.bias)


def test_compiled_model_checkpoint_has_plain_names(tmp_path):
    model = tdsclip.build_model(tdsclip.tiny_config())
    compiled = torch.compile(model)
    assert not any(k.startswith("_orig_mod") for k in tdsclip.model_checkpoint(compiled)["model"])


def test_truncated_file_is_a_clear_error(tmp_path):
    data = GOLDEN.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*truncated"):
        tdsclip.load_model(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        tdsclip.load_model(tmp_path / "nowhere.pt")


def test_unknown_file_names_its_content(tmp_path):
    torch.save({"weights": 1, "stuff": 2}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"neither a tdsclip checkpoint.*\['weights', 'stuff'\]"):
        tdsclip.load_model(tmp_path / "other.pt")


def test_missing_and_unexpected_official_keys_are_named(official_state, tmp_path):
    broken = dict(official_state)
    del broken["visual.transformer.side_transformer.1.mlp.fc1.weight"]
    broken["visual.transformer.side_extra.weight"] = torch.zeros(1)
    torch.save({"model_state_dict": broken}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError) as error:
        tdsclip.load_model(tmp_path / "broken.pt")
    assert "missing keys: visual.transformer.side_transformer.1.mlp.fc1.weight" in str(error.value)
    assert "unexpected keys: visual.transformer.side_extra.weight" in str(error.value)


def test_mismatched_official_shape_is_named(official_state, tmp_path):
    broken = dict(official_state)
    broken["visual.transformer.side_transformer.0.mlp.fc1.weight"] = torch.zeros(128, 64)
    torch.save({"model_state_dict": broken}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"side_transformer.0.mlp.fc1.weight.*\(128, 64\).*\(256, 64\)"):
        tdsclip.load_model(tmp_path / "shape.pt")


def test_our_checkpoint_mismatch_is_named(tmp_path):
    checkpoint = tdsclip.model_checkpoint(tdsclip.build_model(tdsclip.tiny_config()))
    checkpoint["model"]["side.extra"] = checkpoint["model"].pop("head.fc.bias")
    torch.save(checkpoint, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: head.fc.bias\n.*unexpected keys: side.extra"):
        tdsclip.load_model(tmp_path / "bad.pt")
    checkpoint = tdsclip.model_checkpoint(tdsclip.build_model(tdsclip.tiny_config()))
    checkpoint["model_config"]["num_classes"] = 7
    torch.save(checkpoint, tmp_path / "classes.pt")
    with pytest.raises(CheckpointError, match=r"'head.fc.weight' has shape \(10, 64\), model_config implies \(7, 64\)"):
        tdsclip.load_model(tmp_path / "classes.pt")


class Holder(nn.Module):
    """Nests tensors under dotted names, to write a TorchScript archive like OpenAI's release files."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scripted(state: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    root = Holder()
    for key, value in state.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, Holder())
            module = getattr(module, part)
        module.register_buffer(leaf, value)
    return torch.jit.script(root)


@pytest.fixture(scope="module")
def openai_state() -> dict[str, torch.Tensor]:
    """A fake OpenAI CLIP state dict (fp16, text tower, pooling head) for the tiny config."""
    torch.manual_seed(1)
    source = tdsclip.build_model(tdsclip.tiny_config()).backbone
    state = {f"visual.{k}": v.half() for k, v in source.state_dict().items()}
    return state | {"visual.ln_post.weight": torch.ones(64), "visual.proj": torch.zeros(64, 32),
                    "token_embedding.weight": torch.zeros(10, 32), "input_resolution": torch.tensor(32)}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # OpenAI's files are TorchScript
@pytest.mark.parametrize("layout", ["torchscript", "state_dict", "open_clip"])
def test_load_clip_weights(openai_state, layout, tmp_path):
    path = tmp_path / "clip.pt"
    if layout == "torchscript":
        scripted(openai_state).save(str(path))
    elif layout == "state_dict":
        torch.save(openai_state, path)
    else:
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v.float() for k, v in openai_state.items()}}, path)
    model = tdsclip.build_model(tdsclip.tiny_config())
    side_before = model.side.state_dict()["blocks.0.mlp.fc1.weight"].clone()
    tdsclip.load_clip_weights(model, path)
    for name, tensor in model.backbone.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, openai_state[f"visual.{name}"].float()), name
    assert torch.equal(model.side.blocks[0].mlp.fc1.weight, side_before)
    assert not any(p.requires_grad for p in model.backbone.parameters())


def test_clip_weights_errors(openai_state, tmp_path):
    model = tdsclip.build_model(tdsclip.tiny_config())
    with pytest.raises(FileNotFoundError, match="CLIP weights not found at .*ViT-B-16.pt.*Nothing is downloaded"):
        tdsclip.load_clip_weights(model, tmp_path / "ViT-B-16.pt")
    torch.save(openai_state, tmp_path / "clip.pt")
    wrong_size = tdsclip.build_model(tdsclip.tiny_config(image_size=48))
    with pytest.raises(CheckpointError, match=r"visual.positional_embedding has shape \(17, 64\).*\(37, 64\)"):
        tdsclip.load_clip_weights(wrong_size, tmp_path / "clip.pt")
    deeper = tdsclip.build_model(tdsclip.tiny_config(layers=3))
    with pytest.raises(CheckpointError, match="missing keys: transformer.resblocks.2"):
        tdsclip.load_clip_weights(deeper, tmp_path / "clip.pt")


def test_init_from_checkpoint_copies_all_but_a_head_of_another_size(tmp_path):
    torch.manual_seed(0)
    trained = tdsclip.build_model(tdsclip.tiny_config(num_classes=3))
    tdsclip.save_model(trained, tmp_path / "k400.pt")
    target = tdsclip.build_model(tdsclip.tiny_config(num_classes=5))
    head_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("head.")}
    kept = tdsclip.init_from_checkpoint(target, tmp_path / "k400.pt")
    assert kept == ["head.fc.bias", "head.fc.weight"]
    for name, tensor in target.state_dict().items():
        expected = head_before[name] if name in kept else trained.state_dict()[name]
        torch.testing.assert_close(tensor, expected, rtol=0, atol=0, msg=name)

    same = tdsclip.build_model(tdsclip.tiny_config(num_classes=3))
    assert tdsclip.init_from_checkpoint(same, tmp_path / "k400.pt") == []  # everything, head included
    with pytest.raises(CheckpointError, match="side_dim: 64 in the checkpoint, 32 here"):
        tdsclip.init_from_checkpoint(tdsclip.build_model(tdsclip.tiny_config(side_dim=32)), tmp_path / "k400.pt")


def test_init_from_an_official_checkpoint(official_state, clips):
    official = tdsclip.load_model(GOLDEN)
    model = tdsclip.build_model(official.config)
    assert tdsclip.init_from_checkpoint(model, GOLDEN) == []
    torch.testing.assert_close(outputs(model, clips), outputs(official, clips), rtol=0, atol=0)
