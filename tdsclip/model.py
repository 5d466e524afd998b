"""TDS-CLIP: a frozen CLIP ViT plus a trainable temporal-difference side network.

The network (arXiv 2408.10688), in the order data flows through it:

1. ``SideStem`` (SME-Adapter): the centre frame of each M-frame window (official M = 5) and the M-1
   RGB differences inside the window go through two (3, p, p) 3D convs; stem = frame + 0.5 * differences.
2. The frozen open_clip ``VisionTransformer`` sees the centre frames; after each block its tokens are
   tapped (LayerNorm + Linear to ``side_dim``) and fused into the side stream: s = 0.5 s + 0.5 tap.
3. ``SideBlock`` i (one per backbone block): temporal conv + TD gate, class-token shift over time,
   cross attention from patch tokens to [class token; patches], MLP.
4. ``Head``: BatchNorm, mean over time and space, dropout, Linear.

The side stream is kept channels-last, ``(B, T, L, D)`` (L = h * w patch tokens, D = side_dim), so the
official 1x1x1 convs are Linear layers and its BatchNorm3d is a BatchNorm over the last dim; the
numbers are the official ones (see tests/test_model.py), the names are ours (see tdsclip/weights.py
for the mapping to the official checkpoint layout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
from torch import nn

from tdsclip.model_config import HEAD_WIDTH, TD_REDUCTION, ModelConfig

def tiny_config(**overrides) -> ModelConfig:
    """A few-hundred-kilobyte model for demos and tests (random weights, 32x32 frames)."""
    sizes = dict(arch=None, width=64, layers=2, heads=1, patch_size=8, image_size=32, side_dim=64, num_classes=10)
    return ModelConfig(**(sizes | overrides))


def exact_norm_on_cpu(x: torch.Tensor) -> bool:
    """Whether the side network's norms compute in float64: fp32 (or float64) on CPU, no autocast.

    With a few clips per batch, train-mode BatchNorm makes the gradients of biases (and of anything
    whose gradient is a sum over positions) small differences of large sums. fp32 rounding in the
    norms' statistics and backward reductions leaves them 1e-5..1e-4 from exact; the official fp32
    code is that far too. In float64 ours are a few 1e-6 from exact, so they differ from the official
    ones by little more than the official rounding (docs/model.md, Parity). Cost: ~4% of an fp32 CPU
    training step; the bf16 (autocast) and GPU paths do not take this branch.
    """
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")


def _double(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.double()


class ChannelNorm(nn.BatchNorm1d):
    """BatchNorm over the last dim of a channels-last tensor.

    Statistics are over every other dim, as the official BatchNorm3d over (B, C, T, h, w). They are
    computed in fp32 under autocast (bf16 sums over ~10^5 rows lose the mean) and in float64 for fp32
    on CPU (``exact_norm_on_cpu``).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (N, C)
        if rows.device.type != "cpu":
            return super().forward(rows.float()).reshape(x.shape).to(x.dtype)
        if exact_norm_on_cpu(rows):
            return self._forward_float64(rows).reshape(x.shape).to(x.dtype)
        # bf16 on CPU: (1, C, N) makes PyTorch's CPU kernels sum each channel as for the official layout
        return super().forward(rows.float().t().unsqueeze(0)).squeeze(0).t().reshape(x.shape).to(x.dtype)

    def _forward_float64(self, rows: torch.Tensor) -> torch.Tensor:
        """nn.BatchNorm1d's forward in float64; the running statistics keep their dtype."""
        running_mean = running_var = None
        if self.track_running_stats:
            # copies (also for float64 buffers): batch_norm updates them in place and saves them for backward
            running_mean = self.running_mean.to(torch.float64, copy=True)
            running_var = self.running_var.to(torch.float64, copy=True)
        momentum = self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average, as nn.BatchNorm1d
                momentum = 1.0 / self.num_batches_tracked.item()
        use_batch_stats = self.training or not self.track_running_stats
        out = F.batch_norm(rows.double(), running_mean, running_var, _double(self.weight), _double(self.bias),
                           use_batch_stats, momentum or 0.0, self.eps)
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean)
                self.running_var.copy_(running_var)
        return out


class SideLayerNorm(nn.LayerNorm):
    """nn.LayerNorm, in float64 for fp32 on CPU (``exact_norm_on_cpu``: its bias gradient sums all tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not exact_norm_on_cpu(x):
            return super().forward(x)
        out = F.layer_norm(x.double(), self.normalized_shape, _double(self.weight), _double(self.bias), self.eps)
        return out.to(x.dtype)


def patch_conv3d(frames: torch.Tensor, conv: nn.Conv3d) -> torch.Tensor:
    """``conv`` (kernel (3, p, p), stride (1, p, p), padding 1) as three patch matmuls, channels-last.

    frames: (B, T, C, H, W) -> (B, T, h * w, D). The spatial stride equals the kernel, so after
    padding each output position reads one non-overlapping p x p patch of frames t-1, t and t+1: one
    matmul per temporal tap. Matmuls keep bf16 exact on CPUs where oneDNN's bf16 conv is not (wrong
    results for >= 8 input channels, measured) and need no conv algorithm search on GPUs.
    """
    p, T = conv.kernel_size[-1], frames.shape[1]
    h, w = (frames.shape[-2] + 2 - p) // p + 1, (frames.shape[-1] + 2 - p) // p + 1
    padded = F.pad(frames, (1, 1, 1, 1, 0, 0, 1, 1))[..., : h * p, : w * p]  # (B, T + 2, C, h p, w p)
    patches = rearrange(padded, "b t c (h p1) (w p2) -> b t (h w) (c p1 p2)", p1=p, p2=p)
    device = patches.device.type
    if torch.is_autocast_enabled(device):  # cast once: the three taps read overlapping slices
        patches = patches.to(torch.get_autocast_dtype(device))
    taps = rearrange(conv.weight, "d c k p1 p2 -> k (c p1 p2) d")
    out = patches[:, :T] @ taps[0] + patches[:, 1 : T + 1] @ taps[1] + patches[:, 2:] @ taps[2]
    return out + conv.bias


class SideStem(nn.Module):
    """SME-Adapter: centre frame + 0.5 * frame differences, each a (3, p, p) conv and BatchNorm."""

    def __init__(self, side_dim: int, patch_size: int, frames_per_segment: int):
        super().__init__()
        self.centre = frames_per_segment // 2
        conv = dict(kernel_size=(3, patch_size, patch_size), stride=(1, patch_size, patch_size), padding=1)
        self.frame_conv = nn.Conv3d(3, side_dim, **conv)  # holds the weights; computed by patch_conv3d
        self.frame_norm = ChannelNorm(side_dim)
        self.diff_conv = nn.Conv3d(3 * (frames_per_segment - 1), side_dim, **conv)
        self.diff_norm = ChannelNorm(side_dim)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        # clips: (B, T, M, 3, H, W) -> side stream (B, T, L, D)
        frame = clips[:, :, self.centre]  # (B, T, 3, H, W)
        diffs = rearrange(clips[:, :, 1:] - clips[:, :, :-1], "b t m c h w -> b t (m c) h w")
        frame = self.frame_norm(patch_conv3d(frame, self.frame_conv))
        return frame + 0.5 * self.diff_norm(patch_conv3d(diffs, self.diff_conv))


class BackboneTap(nn.Module):
    """Projects one backbone block's tokens to the side width.

    ``proj`` keeps PyTorch's default Linear init, U(-1/sqrt(width), 1/sqrt(width)), as the official
    visual ``side_linears`` do: the official N(0, (2 side_dim)^-1/2) re-init in
    ``CLIP.initialize_parameters`` reaches only the text transformer's taps (``self.transformer``).
    """

    def __init__(self, width: int, side_dim: int):
        super().__init__()
        self.norm = SideLayerNorm(width)
        self.proj = nn.Linear(width, side_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens))


class TemporalConv(nn.Module):
    """1x1x1 conv -> depthwise conv over time (kernel 3, zero padded) -> 1x1x1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.in_proj = nn.Linear(dim, dim)
        self.time_weight = nn.Parameter(torch.empty(dim, 3))  # taps for t-1, t, t+1
        self.time_bias = nn.Parameter(torch.empty(dim))
        self.out_proj = nn.Linear(dim, dim)
        bound = 1 / math.sqrt(3)  # PyTorch's default conv init for a fan-in of 3
        nn.init.uniform_(self.time_weight, -bound, bound)
        nn.init.uniform_(self.time_bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_proj(x)  # (B, T, L, D)
        T = x.shape[1]
        padded = F.pad(x, (0, 0, 0, 0, 1, 1))  # (B, T + 2, L, D)
        w = self.time_weight
        x = padded[:, :T] * w[:, 0] + padded[:, 1 : T + 1] * w[:, 1] + padded[:, 2:] * w[:, 2] + self.time_bias
        return self.out_proj(x)


class TDGate(nn.Module):
    """TD-Adapter gate: x + x * (sigmoid(y) - 0.5), y from local temporal differences of squeezed x."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = dim // TD_REDUCTION
        self.reduce = nn.Linear(dim, hidden, bias=False)
        self.reduce_norm = ChannelNorm(hidden)
        self.expand = nn.Linear(hidden, dim, bias=False)
        self.expand_norm = ChannelNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce_norm(self.reduce(x))  # (B, T, L, C)
        T = r.shape[1]
        padded = F.pad(r, (0, 0, 0, 0, 1, 1), value=float("-inf"))  # max-pool padding over time
        local_max = torch.maximum(torch.maximum(padded[:, :T], padded[:, 1 : T + 1]), padded[:, 2:])
        diff = r - local_max
        y = 0.5 * diff + 0.5 * diff.mean(dim=-1, keepdim=True)
        gate = torch.sigmoid(self.expand_norm(self.expand(y))) - 0.5
        return x + x * gate


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(E)) v for (N, heads, L, E) queries and (N, heads, 1 + L, E) keys and values.

    On CPU as two matmuls and a softmax: PyTorch's CPU flash-attention backward runs at ~2 GFLOP/s in
    bf16 at a side block's sizes (20 ms per block, 15% of a compiled ViT-B/16 step; forward + backward
    17 ms against 7 ms for the matmuls, eager, one thread); fp32 costs the same either way. Under bf16
    autocast the scores are bf16 before the (fp32) softmax, as in the official nn.MultiheadAttention
    under AMP. Elsewhere SDPA's fused kernels.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, heads, L, 1 + L)
    return scores.softmax(dim=-1).to(v.dtype) @ v


class CrossAttention(nn.Module):
    """Patch tokens attend to [class token; patch tokens] (token 0 is the class token)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.normal_(self.qkv.weight, std=dim**-0.5)
        nn.init.zeros_(self.qkv.bias)
        nn.init.normal_(self.proj.weight, std=dim**-0.5 * 24**-0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)  # each (N, 1 + L, D)
        q = rearrange(q[:, 1:], "n l (h e) -> n h l e", h=self.heads)
        k = rearrange(k, "n l (h e) -> n h l e", h=self.heads)
        v = rearrange(v, "n l (h e) -> n h l e", h=self.heads)
        out = attention(q, k, v)  # (N, heads, L, D / heads)
        return self.proj(rearrange(out, "n h l e -> n l (h e)"))


class SideMLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        nn.init.normal_(self.fc1.weight, std=(2 * dim) ** -0.5)
        nn.init.normal_(self.fc2.weight, std=dim**-0.5 * 24**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def shift_class_token(cls: torch.Tensor) -> torch.Tensor:
    """(B, T, D): first half of channels from segment t + 1, second half from t - 1, zeros at the ends."""
    half = cls.shape[-1] // 2
    from_next = F.pad(cls[:, 1:, :half], (0, 0, 0, 1))
    from_prev = F.pad(cls[:, :-1, half:], (0, 0, 1, 0))
    return torch.cat([from_next, from_prev], dim=-1)


class SideBlock(nn.Module):
    """One side layer: temporal conv + TD gate, shifted-class-token cross attention, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.temporal_norm = ChannelNorm(dim)
        self.temporal_conv = TemporalConv(dim)
        self.td_gate = TDGate(dim)
        self.attn_norm = SideLayerNorm(dim)
        self.cross_attn = CrossAttention(dim, heads)
        self.mlp_norm = ChannelNorm(dim)
        self.mlp = SideMLP(dim)

    def forward(self, s: torch.Tensor, cls: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        # s: (B, T, L, D) side stream; cls: (B, T, D) tapped class token; pos_embed: (L, D)
        B = s.shape[0]
        s = s + self.td_gate(self.temporal_conv(self.temporal_norm(s)))
        tokens = torch.cat([shift_class_token(cls).unsqueeze(2), s + pos_embed], dim=2)  # (B, T, 1 + L, D)
        tokens = rearrange(self.attn_norm(tokens), "b t l d -> (b t) l d")
        s = s + rearrange(self.cross_attn(tokens), "(b t) l d -> b t l d", b=B)
        return s + self.mlp(self.mlp_norm(s))


class SideNetwork(nn.Module):
    """Stem, one tap + side block per backbone block, and the shared side position embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.side_dim
        self.stem = SideStem(dim, config.patch_size, config.frames_per_segment)
        self.taps = nn.ModuleList(BackboneTap(config.width, dim) for _ in range(config.layers))
        self.blocks = nn.ModuleList(SideBlock(dim, config.side_heads) for _ in range(config.layers))
        self.pos_embed = nn.Parameter(torch.empty(config.grid_size**2, dim))
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, clips: torch.Tensor, block_tokens: list[torch.Tensor]) -> torch.Tensor:
        # clips: (B, T, M, 3, H, W); block_tokens: per backbone block (B*T, 1 + L, W) -> (B, T, L, D)
        B, T = clips.shape[:2]
        s = self.stem(clips)
        for tap, block, tokens in zip(self.taps, self.blocks, block_tokens):
            tapped = rearrange(tap(tokens), "(b t) l d -> b t l d", b=B, t=T)
            s = 0.5 * s + 0.5 * tapped[:, :, 1:]
            s = block(s, tapped[:, :, 0], self.pos_embed)
        return s


class Head(nn.Module):
    """BatchNorm, mean over time and space, dropout, classifier."""

    def __init__(self, dim: int, num_classes: int, dropout: float):
        super().__init__()
        self.norm = ChannelNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        pooled = self.norm(s).mean(dim=(1, 2))  # (B, T, L, D) -> (B, D)
        return self.fc(self.dropout(pooled))


def build_backbone(config: ModelConfig) -> VisionTransformer:
    """A randomly initialised open_clip ViT without its pooling head (ln_post/proj are unused)."""
    backbone = VisionTransformer(
        image_size=config.image_size,
        patch_size=config.patch_size,
        width=config.width,
        layers=config.layers,
        heads=config.heads,
        mlp_ratio=4.0,
        output_dim=config.width,
        act_layer=QuickGELU if config.quick_gelu else nn.GELU,
        norm_layer=LayerNorm,
        block_type="custom",  # open_clip's scaled-dot-product attention block; same weights as OpenAI's
    )
    backbone.prune_intermediate_layers(config.layers, prune_norm=True, prune_head=True)
    return backbone


class TDSCLIP(nn.Module):
    """Frozen CLIP ViT + temporal-difference side network + classifier.

    ``model(clips)``: clips (B, T, M, 3, H, W), CLIP-normalised -> logits (B, num_classes). Any T
    works (the official code fixes it per run; config.num_segments records the training value).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        self.side = SideNetwork(config)
        self.head = Head(config.side_dim, config.num_classes, config.dropout)
        self.lock_backbone()

    def lock_backbone(self) -> None:
        """Freeze the backbone (the official rule: everything under the CLIP ViT). Idempotent."""
        self.backbone.requires_grad_(False)

    def encode_frames(self, clips: torch.Tensor) -> list[torch.Tensor]:
        """Run the frozen backbone on the centre frames; returns each block's tokens (B*T, 1 + L, W)."""
        centre = rearrange(clips[:, :, self.config.frames_per_segment // 2], "b t c h w -> (b t) c h w")
        with torch.no_grad():  # no autograd graph: the backbone is frozen and its input needs no grad
            out = self.backbone.forward_intermediates(
                centre, output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
            )
            pairs = zip(out["image_intermediates_prefix"], out["image_intermediates"])
            return [torch.cat([cls, patches], dim=1) for cls, patches in pairs]

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        self._check_input(clips)
        return self.head(self.side(clips, self.encode_frames(clips)))

    def _check_input(self, clips: torch.Tensor) -> None:
        # T comes from the input (nothing in the weights depends on it); config.num_segments is what
        # the model was built and trained for.
        c = self.config
        expected = (c.frames_per_segment, 3, c.image_size, c.image_size)
        if clips.ndim != 6 or tuple(clips.shape[2:]) != expected:
            raise ValueError(
                f"clips must have shape (B, T, {', '.join(map(str, expected))}) = (B, T, M, 3, H, W); "
                f"got {tuple(clips.shape)}"
            )


def build_model(config: ModelConfig) -> TDSCLIP:
    """A TDS-CLIP network with random weights (official init for the side network), backbone frozen."""
    return TDSCLIP(config)


def trainable_parameters(model: TDSCLIP) -> list[nn.Parameter]:
    """The parameters training updates: side network and head (the backbone is frozen)."""
    return [p for p in model.parameters() if p.requires_grad]
