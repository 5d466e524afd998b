#!/usr/bin/env python
"""Train-step throughput of TDS-CLIP: ours (bf16 autocast + torch.compile) vs the official way of running it.

Both sides are the same network with the same weights and input; only how it runs differs:

  baseline  eager; fp32 on CPU, fp16 autocast + GradScaler on GPU (what the official train_vision.py does)
  ours      torch.compile(fullgraph=True); bf16 autocast on GPU, and on CPU when bf16 matmul is faster there

A train step is forward, cross-entropy, backward and an AdamW step over the trainable parameters
(the official foreach AdamW for the baseline, the fused one for ours).
Printed per side: clips/s, peak memory, achieved TFLOP/s and MFU (FLOPs of one step counted with
torch.utils.flop_counter, against the bf16 matmul rate measured in this run), then the ratio.
Steps alternate between the two sides in rounds so that machine noise hits both alike.

  python tools/bench_model.py --arch ViT-B-16 --batch 32 --segments 8          # GPU run
  python tools/bench_model.py --arch custom --batch 2 --segments 4             # quick CPU check
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tdsclip import ModelConfig, build_model, load_clip_weights, tiny_config, trainable_parameters
from tdsclip.cpu_budget import CpuBudget, cpu_budget
from tdsclip.metrics import host_rss_bytes


@dataclass
class Side:
    name: str
    step: callable
    step_times: list[float]
    peak_bytes: int = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="ViT-B-16", help="open_clip ViT name, or 'custom' for --width/--layers/...")
    p.add_argument("--batch", type=int, default=32, help="clips per step")
    p.add_argument("--segments", type=int, default=8, help="segments T per clip")
    p.add_argument("--classes", type=int, default=400)
    p.add_argument("--side-dim", type=int, default=None, help="default: the official one for the arch (320 B/16, 512 L/14)")
    p.add_argument("--width", type=int, default=64, help="custom arch only")
    p.add_argument("--layers", type=int, default=2, help="custom arch only")
    p.add_argument("--heads", type=int, default=2, help="custom arch only")
    p.add_argument("--patch", type=int, default=8, help="custom arch only")
    p.add_argument("--image", type=int, default=32, help="custom arch only")
    p.add_argument("--clip-weights", type=Path, default=None,
                   help="local CLIP file for the backbone (random weights otherwise: a random ViT-B is chaotic, "
                        "so its bf16-vs-fp32 logit gap says little)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, both sides (default: this process's CPU budget, all of it: no pipeline runs here)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each: --steps of baseline, then ours)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side (ours compiles here)")
    p.add_argument("--no-compile", action="store_true", help="ours without torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    for name in ("batch", "segments", "rounds", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def model_config(args: argparse.Namespace) -> ModelConfig:
    if args.arch == "custom":
        return tiny_config(
            width=args.width, layers=args.layers, heads=args.heads, patch_size=args.patch, image_size=args.image,
            side_dim=args.side_dim or 64, num_segments=args.segments, num_classes=args.classes,
        )
    return ModelConfig(arch=args.arch, side_dim=args.side_dim, num_segments=args.segments, num_classes=args.classes)


def model_budget(device: torch.device, threads: int | None) -> CpuBudget:
    """The CPU budget of this process with all of it for torch (no pipeline runs here), or `threads`."""
    budget = cpu_budget(device, torch_threads=threads)
    return budget if threads is not None else dataclasses.replace(budget, torch_threads=budget.cpus)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Best dense matmul FLOP/s of this device in ``dtype``."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2 * n**3 / best


def make_step(model, clips, labels, device, amp_dtype, scaler, fused):
    """One train step: forward (under autocast when amp_dtype), CE loss, backward, AdamW."""
    params = trainable_parameters(getattr(model, "_orig_mod", model))
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)

    def step():
        autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            loss = F.cross_entropy(model(clips), labels)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def bf16_logit_gap(model, clips) -> float:
    """Max |bf16-autocast logits - fp32 logits| / max |fp32 logits| (eval mode): a device sanity check."""
    model.eval()
    with torch.no_grad():
        reference = model(clips)
        with torch.autocast(clips.device.type, dtype=torch.bfloat16):
            low = model(clips).float()
    model.train()
    return ((low - reference).abs().max() / reference.abs().max()).item()


def count_flops(model, clips, labels) -> int:
    """FLOPs of one forward + backward (matmuls, convs, attention), counted eagerly."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(clips), labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def peak_step_memory(step, device: torch.device) -> int:
    """Peak memory of one step: on GPU the CUDA allocator's peak (absolute: it includes the weights of
    both sides' models, ~0.35 GiB per ViT-B/16 copy); on CPU the peak RSS rise during the step."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap so the rise below is this step's
    before, peak, done = host_rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], host_rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return max(peak[0], host_rss_bytes()) - before


def measure(sides: list[Side], args: argparse.Namespace, device: torch.device) -> None:
    """Warm up (and compile) each side, take its peak memory, then time steps in alternating rounds."""
    for side in sides:
        start = time.perf_counter()
        for _ in range(args.warmup):
            side.step()
        sync(device)
        print(f"{side.name}: warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        side.peak_bytes = peak_step_memory(side.step, device)
    for _ in range(args.rounds):
        for side in sides:
            for _ in range(args.steps):
                sync(device)
                start = time.perf_counter()
                side.step()
                sync(device)
                side.step_times.append(time.perf_counter() - start)


def side_figures(side: Side, batch: int, flops: float, bf16_rate: float) -> dict:
    """Throughput, step time, memory and FLOP rate of one side from its measured steps."""
    step_time = statistics.median(side.step_times)
    return {
        "clips_per_s": batch / step_time,
        "step_s": step_time,
        "step_s_each": side.step_times,
        "best_step_s": min(side.step_times),
        "peak_mem_gib": side.peak_bytes / 2**30,
        "tflops": flops / step_time / 1e12,
        "mfu": flops / step_time / bf16_rate,
    }


def run(args: argparse.Namespace) -> dict:
    """Build both sides, measure them, and return the figures (see ``report``)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    budget = model_budget(device, args.threads)
    budget.apply()  # before compiling: inductor's CPU kernels keep the thread count they are generated with
    print(budget.describe(), file=sys.stderr)
    torch.manual_seed(0)
    config = model_config(args)
    baseline_model = build_model(config)
    if args.clip_weights:
        load_clip_weights(baseline_model, args.clip_weights)
    baseline_model = baseline_model.to(device).train()
    our_model = build_model(config).to(device).train()
    our_model.load_state_dict(baseline_model.state_dict())
    clips = torch.randn(args.batch, config.num_segments, config.frames_per_segment, 3,
                        config.image_size, config.image_size, device=device)
    labels = torch.randint(config.num_classes, (args.batch,), device=device)

    precision_gap = bf16_logit_gap(our_model, clips)
    bf16_rate = matmul_rate(device, torch.bfloat16)
    fp32_rate = matmul_rate(device, torch.float32)
    use_bf16 = device.type == "cuda" or bf16_rate > 1.2 * fp32_rate  # bf16 only where it pays
    flops = count_flops(baseline_model, clips, labels)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        baseline = make_step(baseline_model, clips, labels, device, torch.float16, torch.amp.GradScaler("cuda"), False)
    else:
        baseline = make_step(baseline_model, clips, labels, device, None, None, False)
    compiled = our_model if args.no_compile else torch.compile(our_model, fullgraph=True, mode=args.compile_mode)
    ours = make_step(compiled, clips, labels, device, torch.bfloat16 if use_bf16 else None, None, True)
    sides = [Side("baseline", baseline, []), Side("ours", ours, [])]

    measure(sides, args, device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "config": {"arch": config.arch, "width": config.width, "layers": config.layers, "image_size": config.image_size,
                   "side_dim": config.side_dim, "batch": args.batch, "segments": config.num_segments},
        "ours_precision": "bf16" if use_bf16 else "fp32",
        "compiled": not args.no_compile,
        "gflop_per_clip": flops / args.batch / 1e9,
        "bf16_logit_gap": precision_gap,
        "bf16_matmul_tflops": bf16_rate / 1e12,
        "fp32_matmul_tflops": fp32_rate / 1e12,
        **{side.name: side_figures(side, args.batch, flops, bf16_rate) for side in sides},
    }
    results["speedup"] = results["ours"]["clips_per_s"] / results["baseline"]["clips_per_s"]
    # Load from other jobs only ever adds time, so on a shared machine the fastest steps are the better estimate.
    results["speedup_best_steps"] = results["baseline"]["best_step_s"] / results["ours"]["best_step_s"]
    return results


def report(results: dict) -> None:
    c = results["config"]
    print(f"device {results['device']}; arch {c['arch'] or 'custom'} (width {c['width']}, layers {c['layers']}, "
          f"image {c['image_size']}), side_dim {c['side_dim']}, batch {c['batch']}, T {c['segments']}")
    print(f"{results['gflop_per_clip']:.1f} GFLOP per training clip; matmul rate bf16 "
          f"{results['bf16_matmul_tflops']:.2f} TFLOP/s, fp32 {results['fp32_matmul_tflops']:.2f} TFLOP/s; "
          f"bf16 logits within {100 * results['bf16_logit_gap']:.2f}% of fp32")
    print(f"{'':10s}{'clips/s':>10s}{'step s':>10s}{'peak GiB':>10s}{'TFLOP/s':>10s}{'MFU':>8s}")
    for name in ("baseline", "ours"):
        r = results[name]
        print(f"{name:10s}{r['clips_per_s']:10.3f}{r['step_s']:10.3f}{r['peak_mem_gib']:10.2f}"
              f"{r['tflops']:10.2f}{100 * r['mfu']:7.1f}%")
    print(f"speedup ours/baseline: {results['speedup']:.2f}x of median steps, "
          f"{results['speedup_best_steps']:.2f}x of fastest steps (best {results['baseline']['best_step_s']:.3f} s vs "
          f"{results['ours']['best_step_s']:.3f} s; ours: {results['ours_precision']}, "
          f"{'compiled' if results['compiled'] else 'eager'})")


def main(argv=None) -> None:
    args = parse_args(argv)
    results = run(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
