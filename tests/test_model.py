"""The TDS-CLIP network: parity with the official code's outputs, parts, config validation, compile."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tdsclip
from tdsclip.model import (BackboneTap, ChannelNorm, SideLayerNorm, SideNetwork, TDGate, TemporalConv,
                           shift_class_token)
from tdsclip.weights import our_name_to_official

GOLDEN_CASES = sorted(p for p in (Path(__file__).parent / "data").glob("golden_*") if (p / "io.pt").is_file())
TOLERANCE = 1e-5  # max relative error, fp32 on CPU
# Gradients that are zero in exact arithmetic (a bias right before a train-mode BatchNorm, or one that
# cancels in the TD gate's x - maxpool(x)) come out of both implementations as rounding noise of
# ~1e-8 of the largest gradient; they are checked against the largest gradient instead of themselves.
NOISE_LEVEL = 1e-6


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.fixture(scope="module", params=GOLDEN_CASES, ids=lambda p: p.name)
def golden(request):
    """An official checkpoint with the official code's outputs for it, and our model run on its input."""
    case = request.param
    io = torch.load(case / "io.pt", map_location="cpu", weights_only=False)
    num_segments = io["input"].shape[1]
    model = tdsclip.load_model(case / "checkpoint.pt", num_segments=num_segments)
    with torch.no_grad():
        logits_eval = model(io["input"])
    model = tdsclip.load_model(case / "checkpoint.pt", num_segments=num_segments).train()
    logits_train = model(io["input"])
    loss = F.cross_entropy(logits_train, io["labels"])
    loss.backward()
    return io, model, logits_eval, logits_train, loss


def test_golden_eval_logits(golden):
    io, _, logits_eval, _, _ = golden
    assert logits_eval.shape == io["logits_eval"].shape
    assert max_rel_err(logits_eval, io["logits_eval"]) < TOLERANCE


def test_golden_train_logits_and_loss(golden):
    io, _, _, logits_train, loss = golden
    assert max_rel_err(logits_train, io["logits_train"]) < TOLERANCE
    assert abs(loss.item() - io["loss"].item()) / abs(io["loss"].item()) < TOLERANCE


def test_golden_gradients(golden):
    io, model, _, _, _ = golden
    grads = {our_name_to_official(n): p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(io["grads"])
    scale = max(g.abs().max().item() for g in io["grads"].values())
    for name, ref in io["grads"].items():
        ours = grads[name].reshape(ref.shape)
        if ref.abs().max() < NOISE_LEVEL * scale:
            assert (ours - ref).abs().max() < NOISE_LEVEL * scale, name
        else:
            assert max_rel_err(ours, ref) < TOLERANCE, name
    assert all(p.grad is None for p in model.backbone.parameters())


def test_golden_trainable_and_frozen_names(golden):
    io, model, _, _, _ = golden
    named = {our_name_to_official(n): p.requires_grad for n, p in model.named_parameters()}
    assert {n for n, trainable in named.items() if trainable} == set(io["trainable"])
    assert {n for n, trainable in named.items() if not trainable} == set(io["frozen"])
    assert len(tdsclip.trainable_parameters(model)) == len(io["trainable"])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return tdsclip.build_model(tdsclip.tiny_config(num_segments=3, layers=1)).train()


def tiny_clips(model, batch=2):
    c = model.config
    return torch.randn(batch, c.num_segments, c.frames_per_segment, 3, c.image_size, c.image_size)


def test_forward_shape_and_frozen_backbone(tiny):
    clips = tiny_clips(tiny)
    logits = tiny(clips)
    assert logits.shape == (2, tiny.config.num_classes)
    assert all(not t.requires_grad for t in tiny.encode_frames(clips))  # no autograd graph in the backbone
    assert not any(p.requires_grad for p in tiny.backbone.parameters())
    logits.sum().backward()
    assert all(p.grad is not None for p in tdsclip.trainable_parameters(tiny))
    tiny.zero_grad(set_to_none=True)


def test_bad_input_shape_names_expected_layout(tiny):
    with pytest.raises(ValueError, match=r"\(B, T, M, 3, H, W\)"):
        tiny(torch.randn(2, 3, 3, 32, 32))


def test_segments_come_from_the_input(tiny):
    other = tdsclip.build_model(tdsclip.tiny_config(num_segments=5, layers=1)).eval()
    other.load_state_dict(tiny.state_dict())
    clips = torch.randn(2, 5, 5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tiny.eval()(clips), other(clips))
    tiny.train()


def test_official_side_init():
    config = tdsclip.tiny_config(side_dim=128, layers=1)
    model = tdsclip.build_model(config)
    block, d = model.side.blocks[0], config.side_dim
    for weight, std in [(block.mlp.fc1.weight, (2 * d) ** -0.5), (block.mlp.fc2.weight, d**-0.5 * 24**-0.5),
                        (block.cross_attn.qkv.weight, d**-0.5), (block.cross_attn.proj.weight, d**-0.5 * 24**-0.5),
                        (model.side.pos_embed, 0.01)]:
        assert weight.std().item() == pytest.approx(std, rel=0.1)
    assert block.cross_attn.qkv.bias.abs().max() == 0 and model.head.norm.weight.min() == 1


@pytest.mark.parametrize("arch, side_dim", [("ViT-B-16", 320), ("ViT-L-14", 512)])
def test_backbone_taps_keep_the_default_linear_init(arch, side_dim):
    """Official visual side_linears: PyTorch's default Linear init, U(+-1/sqrt(width)), std 0.0208 (B/16),
    0.0180 (L/14); the N(0, (2 side_dim)^-1/2) re-init (0.0395, 0.0313) is the text transformer's only."""
    config = tdsclip.ModelConfig(arch=arch, side_dim=side_dim)
    torch.manual_seed(0)
    # the taps alone, at the real widths: a whole L/14 side network takes ~1 s to build
    taps = SideNetwork(config).taps if arch == "ViT-B-16" else [BackboneTap(config.width, side_dim) for _ in range(3)]
    bound = config.width**-0.5
    for tap in taps:
        weight, bias = tap.proj.weight, tap.proj.bias
        assert weight.shape == (side_dim, config.width)
        assert weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.02)
        assert weight.abs().max() <= bound and bias.abs().max() <= bound  # uniform, not normal
        assert weight.abs().max() > 0.99 * bound
        assert tap.norm.weight.min() == 1 and tap.norm.bias.abs().max() == 0


def test_shift_class_token():
    cls = torch.arange(1, 4, dtype=torch.float).view(1, 3, 1).expand(1, 3, 4)  # segment t holds t + 1
    shifted = shift_class_token(cls)[0]
    assert shifted[:, :2].tolist() == [[2, 2], [3, 3], [0, 0]]  # first half from the next segment
    assert shifted[:, 2:].tolist() == [[0, 0], [1, 1], [2, 2]]  # second half from the previous one


@pytest.mark.parametrize("T", [1, 2, 5])
def test_temporal_conv_is_the_official_depthwise_conv3d(T):
    torch.manual_seed(T)
    conv, x = TemporalConv(16), torch.randn(2, T, 3, 16)  # (B, T, L, D)
    x5 = x.permute(0, 3, 1, 2).unsqueeze(-1)  # (B, D, T, L, 1)
    ref = F.conv3d(F.conv3d(x5, conv.in_proj.weight.view(16, 16, 1, 1, 1), conv.in_proj.bias),
                   conv.time_weight.view(16, 1, 3, 1, 1), conv.time_bias, padding=(1, 0, 0), groups=16)
    ref = F.conv3d(ref, conv.out_proj.weight.view(16, 16, 1, 1, 1), conv.out_proj.bias)
    torch.testing.assert_close(conv(x), ref.squeeze(-1).permute(0, 2, 3, 1))


@pytest.mark.parametrize("T", [1, 3, 6])
def test_td_gate_uses_temporal_max_pool(T):
    torch.manual_seed(T)
    gate, x = TDGate(32).eval(), torch.randn(2, T, 3, 32)
    r = gate.reduce_norm(gate.reduce(x))
    pooled = F.max_pool3d(r.permute(0, 3, 1, 2).unsqueeze(-1), (3, 1, 1), 1, (1, 0, 0))
    diff = r - pooled.squeeze(-1).permute(0, 2, 3, 1)
    y = gate.expand_norm(gate.expand(0.5 * diff + 0.5 * diff.mean(-1, keepdim=True)))
    torch.testing.assert_close(gate(x), x + x * (torch.sigmoid(y) - 0.5))


def test_norms_compute_in_float64_for_fp32_on_cpu():
    """fp32 on CPU: BatchNorm and LayerNorm arithmetic in float64, with nn.BatchNorm1d's running statistics."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16) * 3 + 1  # (B, T, L, C)
    ours, ref = ChannelNorm(16), torch.nn.BatchNorm1d(16)
    expected = F.batch_norm(x.reshape(-1, 16).double(), None, None, training=True).float().reshape(x.shape)
    assert torch.equal(ours(x), expected)
    ref(x.reshape(-1, 16))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 1
    ours.eval()
    torch.testing.assert_close(ours(x), ref.eval()(x.reshape(-1, 16)).reshape(x.shape))
    norm = SideLayerNorm(16)
    assert torch.equal(norm(x), F.layer_norm(x.double(), (16,)).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 path stays in fp32 statistics
        low = norm(x.bfloat16())
    assert low.dtype == torch.bfloat16 and not torch.equal(low.float(), F.layer_norm(x.double(), (16,)).float())


def test_fp32_gradients_close_to_float64():
    """Bias gradients under train-mode BatchNorm are small differences of large sums; the float64 norms
    keep fp32 within a few 1e-6 of exact (fp32 norms: up to 8e-6 here, 1e-4 on other models)."""
    torch.manual_seed(0)
    config = tdsclip.tiny_config(width=96, layers=2, patch_size=6, image_size=24, side_dim=96, num_segments=3)
    model = tdsclip.build_model(config).train()
    exact = tdsclip.build_model(config).double().train()
    exact.load_state_dict(model.state_dict())
    clips, labels = torch.randn(3, 3, 5, 3, 24, 24), torch.tensor([1, 4, 7])
    F.cross_entropy(model(clips), labels).backward()
    F.cross_entropy(exact(clips.double()), labels).backward()
    grads = {n: p.grad for n, p in exact.named_parameters() if p.requires_grad}
    scale = max(g.abs().max().item() for g in grads.values())
    for name, p in model.named_parameters():
        ref = grads.get(name)
        if ref is not None and ref.abs().max() > NOISE_LEVEL * scale:
            assert max_rel_err(p.grad.double(), ref) < 5e-6, name


def test_compiles_without_graph_breaks(tiny):
    """fullgraph=True fails on any graph break; aot_eager keeps the test fast (no C++ codegen)."""
    clips = tiny_clips(tiny)
    torch._dynamo.reset()
    compiled = torch.compile(tiny.eval(), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(clips), tiny(clips))
    tiny.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # train mode, bf16: batch statistics, running stats
        logits = compiled(clips)
    logits.float().sum().backward()
    assert tiny.head.fc.weight.grad is not None
    tiny.zero_grad(set_to_none=True)
    compiled(clips).sum().backward()  # train mode, fp32: the float64 norms and their running stats
    assert tiny.head.norm.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


def test_bf16_autocast_close_to_fp32(tiny):
    clips = tiny_clips(tiny).clamp(-2, 2)
    tiny.eval()
    with torch.no_grad():
        ref = tiny(clips)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = tiny(clips)
    tiny.train()
    assert max_rel_err(low.float(), ref) < 0.03  # measured 0.4%; broken bf16 convs gave 17%


def test_arch_fills_sizes():
    config = tdsclip.ModelConfig(arch="ViT-L-14-336", side_dim=512)
    assert (config.width, config.layers, config.heads, config.patch_size, config.image_size) == (1024, 24, 16, 14, 336)
    assert config.side_heads == 8 and config.grid_size == 24


@pytest.mark.parametrize("arch, side_dim", [("ViT-B-16", 320), ("ViT-B-32", 320), ("ViT-L-14", 512),
                                             ("ViT-L-14-336", 512)])
def test_side_dim_defaults_to_the_official_width_for_the_arch(arch, side_dim):
    assert tdsclip.ModelConfig(arch=arch).side_dim == side_dim
    assert tdsclip.ModelConfig(arch=arch, side_dim=128).side_dim == 128  # an explicit value wins
    custom = dict(arch=None, width=768, layers=2, heads=12, patch_size=16, image_size=32)
    assert tdsclip.ModelConfig(**custom).side_dim == 320  # by width, not by name


def test_saved_explicit_side_dim_loads_identically(tmp_path):
    """Checkpoints and run configs store the resolved side_dim: an explicit one, official or not, stays."""
    for side_dim in (512, 320):  # 320 with L/14 is not the official pairing; it must survive a reload
        saved = dataclasses.asdict(tdsclip.ModelConfig(arch="ViT-L-14", side_dim=side_dim))
        assert saved["side_dim"] == side_dim and tdsclip.ModelConfig(**saved).side_dim == side_dim
    tiny = tdsclip.build_model(tdsclip.tiny_config(layers=1))
    tdsclip.save_model(tiny, tmp_path / "tiny.pt")
    assert tdsclip.load_model(tmp_path / "tiny.pt").config == tiny.config


@pytest.mark.parametrize("fields, message", [
    (dict(arch="ViT-B-16", width=512), "model.width=512 conflicts with model.arch"),
    (dict(arch=None, width=64, layers=2, heads=1, patch_size=8, image_size=32),
     "model.side_dim must be set for a backbone of width 64"),
    (dict(arch="RN50"), "model.arch='RN50' is not a plain open_clip ViT"),
    (dict(arch=None, width=64, layers=2, heads=1, patch_size=8), "model.image_size must be a positive integer"),
    (dict(num_segments=0), "model.num_segments must be a positive integer"),
    (dict(frames_per_segment=4), "model.frames_per_segment must be odd"),
    (dict(side_dim=8), "model.side_dim must be at least 16"),
    (dict(side_dim=131), "model.side_dim must be at least 16 and divisible"),
    (dict(dropout=1.0), r"model.dropout must be in \[0, 1\)"),
    (dict(arch=None, width=64, layers=2, heads=3, patch_size=8, side_dim=64, image_size=32),
     "divisible by model.heads=3"),
    (dict(arch=None, width=64, layers=2, heads=1, patch_size=8, side_dim=64, image_size=36),
     "multiple of model.patch_size"),
])
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        tdsclip.ModelConfig(**fields)


def test_bench_model_tool_runs(tmp_path):
    """tools/bench_model.py end to end on the tiny config (eager both sides; timing is not asserted)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).parents[1] / "tools" / "bench_model.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks itself up there
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--arch", "custom", "--batch", "1", "--segments", "2", "--rounds", "1", "--steps", "1",
                             "--warmup", "1", "--no-compile", "--json", str(tmp_path / "r.json")])
    results = bench.run(args)
    bench.report(results)
    assert results["gflop_per_clip"] > 0 and results["bf16_logit_gap"] < 0.03
    assert results["ours"]["clips_per_s"] > 0 and results["baseline"]["mfu"] > 0
    assert results["speedup"] == pytest.approx(results["ours"]["clips_per_s"] / results["baseline"]["clips_per_s"])
