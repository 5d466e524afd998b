#!/usr/bin/env python
"""Record the official TDS-CLIP training code's trajectory on a tiny model (tests/test_trajectory.py's data).

    python tools/official_trajectory.py /path/to/TDS-CLIP tests/data/trajectory/official.pt

The first argument is a checkout of https://github.com/BBYL9413/TDS-CLIP (nothing of it is copied into
this project). What runs is the official code itself, unchanged:

- ``clip/model.py`` (the network; loaded by file path: ``clip/__init__`` needs pkg_resources and a tokenizer),
- from ``train_vision.py``: the ``VideoCLIP`` class, the ``train()`` epoch loop (lr set at the first and
  every 10th batch, label-smoothed loss, AdamW step; ``--precision fp32``), and from ``main()`` the
  freezing rule, the criterion choice, the three AdamW parameter groups and the scheduler construction,
- ``utils/solver.py`` and ``utils/lr_scheduler.py`` (WarmupCosineAnnealingLR), ``utils/utils.py``'s
  ``AverageMeter``, and timm's ``LabelSmoothingCrossEntropy`` (what ``main()`` picks).

``train_vision.py`` and ``utils/utils.py`` cannot be imported here (their imports need torchnet,
termcolor, dotmap, RandAugment, pkg_resources and a distributed launch), so those pieces are lifted
from the files' syntax trees (``ast``: the same statements, re-printed without comments) and executed;
the config is a plain namespace holding the keys they read. The data loader is replaced by fixed
batches, and no process group exists (``train()`` needs none when grad_accumulation_steps is 1). Only
the recording is ours: the criterion is wrapped to note each step's loss and learning rates.

Start: the official-layout checkpoint ``--init`` (default: tests/data/golden_tiny/checkpoint.pt: width 64,
2 layers, patch 8, 16 px, side_dim 64, 5 classes). Run: epochs 1 and 2 of a 4-epoch schedule with 2
warm-up epochs (so the lr is set during warm-up and during the cosine), 12 batches of 2 videos per epoch
cycling through 4 fixed batches, T = 4, lr 1e-3, clip_ratio 0.5 (so the side and BatchNorm groups
differ), weight decay 0.15, label smoothing 0.1, fp32 on CPU. Saved: the frames and labels, every step's
loss and three group lrs, and per trainable tensor and BatchNorm buffer the final values (in full up to
SAMPLED elements, else SAMPLED evenly spaced ones) with the L2 norm and max of the change over all of it.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import hashlib
import importlib
import importlib.util
import io
import logging
import math
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLED = 512  # values kept per tensor: all of a small one, evenly spaced ones of a bigger one
SETTINGS = dict(lr=1e-3, weight_decay=0.15, betas=(0.9, 0.999), clip_ratio=0.5, smoothing=0.1, epochs=4,
                warmup_epochs=2, train_epochs=(1, 2), batches_per_epoch=12, distinct_batches=4, batch_size=2,
                num_segments=4, frames_per_segment=5, seed=12)


def frames_to_clips(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames (..., H, W) -> float32 inputs; (x - 128) / 64 is exact in fp32, so both sides agree bit for bit."""
    return (frames.float() - 128) / 64


def make_batches(settings: dict, image_size: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed batches: frames (N, B, T, M, 3, H, W) uint8, labels (N, B).

    Each video is one random image shifted a pixel further right in every frame (motion for the temporal
    differences to see), plus noise."""
    g = torch.Generator().manual_seed(settings["seed"])
    n, b, t, m = (settings[k] for k in ("distinct_batches", "batch_size", "num_segments", "frames_per_segment"))
    base = torch.randint(0, 256, (n, b, 3, image_size, image_size), generator=g)
    frames = torch.stack([base.roll(k, dims=-1) for k in range(t * m)], dim=2)  # (N, B, T*M, 3, H, W)
    frames = frames + torch.randint(-8, 9, frames.shape, generator=g)
    labels = torch.randint(0, num_classes, (n, b), generator=g)
    return frames.clamp(0, 255).to(torch.uint8).view(n, b, t, m, 3, image_size, image_size), labels


def load_file_module(path: Path, name: str) -> ModuleType:
    """Import one file of the checkout as a module (without its package's __init__)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def lift(path: Path, names: set[str]) -> str:
    """The source of the top-level functions and classes `names` of `path`, as written (via its syntax tree)."""
    tree = ast.parse(path.read_text())
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    if {n.name for n in nodes} != names:
        raise SystemExit(f"error: {path} lacks {sorted(names - {n.name for n in nodes})}; is it the official checkout?")
    return "\n\n".join(ast.unparse(n) for n in nodes)


def lift_main_setup(path: Path) -> str:
    """From train_vision.main(): the freezing rule, the criterion, the AdamW groups and the scheduler, as written."""
    main = next((n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef) and n.name == "main"),
                None)
    if main is None:
        raise SystemExit(f"error: {path} has no main(); is it the official checkout?")
    source = [ast.unparse(n) for n in main.body]

    def find(prefix: str) -> int:
        index = next((i for i, s in enumerate(source) if s.startswith(prefix)), None)
        if index is None:
            raise SystemExit(f"error: {path}: main() has no statement starting {prefix!r}; is it the official code?")
        return index

    first = [find(p) for p in ("if config.network.my_fix_clip", "mixup_fn = None", "if config.solver.mixup")]
    groups = range(find("clip_params = []"), find("optimizer = optim.AdamW") + 1)
    return "\n".join(source[i] for i in [*first, *groups, find("lr_scheduler = _lr_scheduler")])


def official_config(settings: dict, side_dim: int, num_classes: int) -> SimpleNamespace:
    """The config keys the lifted code reads (values of an official config, the tiny model's sizes)."""
    ns = SimpleNamespace
    solver = ns(type="cosine", epochs=settings["epochs"], lr_warmup_step=settings["warmup_epochs"], lr=settings["lr"],
                weight_decay=settings["weight_decay"], betas=list(settings["betas"]), clip_ratio=settings["clip_ratio"],
                grad_accumulation_steps=1, smoothing=settings["smoothing"], mixup=False)
    network = ns(my_fix_clip=True, sync_bn=False, drop_fc=0, n_emb=side_dim)
    data = ns(num_segments=settings["num_segments"], num_classes=num_classes, num_diff=settings["frames_per_segment"])
    return ns(solver=solver, network=network, data=data, logging=ns(print_freq=10**9))


def official_model(checkout: Path, state: dict[str, torch.Tensor], settings: dict, namespace: dict) -> torch.nn.Module:
    """The official VideoCLIP around the official CLIP visual tower, loaded strictly from `state`."""
    clip_model = load_file_module(checkout / "clip" / "model.py", "official_clip_model")
    width, _, patch, _ = state["visual.conv1.weight"].shape
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    side_dim = state["visual.side_conv1.weight"].shape[0]
    with contextlib.redirect_stdout(io.StringIO()):  # the official constructors print their settings
        clip = clip_model.CLIP(embed_dim=width, image_resolution=grid * patch, vision_layers=layers, vision_width=width,
                               vision_patch_size=patch, context_length=4, vocab_size=8, transformer_width=64,
                               transformer_heads=1, transformer_layers=1, T=settings["num_segments"],
                               side_dim=side_dim, num_diff=settings["frames_per_segment"])
        config = namespace["config"]
        model = namespace["VideoCLIP"](clip, namespace["video_header"]("None", {}), config)
    model.load_state_dict(state, strict=True)
    return model.float()  # train_vision.main() for --precision fp32


class RecordingCriterion(torch.nn.Module):
    """The official criterion, noting each step's loss and the optimizer's learning rates (set before it runs)."""

    def __init__(self, criterion: torch.nn.Module, optimizer_ref: dict):
        super().__init__()
        self.criterion, self.optimizer_ref, self.losses, self.lrs = criterion, optimizer_ref, [], []

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(logits, target)
        self.losses.append(loss.item())
        self.lrs.append([g["lr"] for g in self.optimizer_ref["optimizer"].param_groups])
        return loss


class FixedBatches:
    """The train loader: `length` batches cycling through the fixed ones, as (images, labels) of train_vision."""

    def __init__(self, frames: torch.Tensor, labels: torch.Tensor, length: int):
        self.frames, self.labels, self.length = frames, labels, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            clips = frames_to_clips(self.frames[i % len(self.frames)])  # (B, T, M, 3, H, W)
            yield clips.flatten(1, 3), self.labels[i % len(self.labels)]  # (B, T*M*3, H, W): (t, m, c) order


def summarize(final: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], names: list[str]) -> dict:
    """Per tensor: kept values (all, or SAMPLED evenly spaced), and the change's L2 norm and max over all of it."""
    out = {}
    for name in names:
        flat, start = final[name].detach().flatten(), initial[name].flatten()
        index = None if flat.numel() <= SAMPLED else torch.linspace(0, flat.numel() - 1, SAMPLED).round().int()
        delta = flat.double() - start.double()
        out[name] = {"index": index, "values": (flat if index is None else flat[index.long()]).clone(),
                     "delta_norm": delta.norm().item(), "delta_max": delta.abs().max().item()}
    return out


def build_namespace(checkout: Path, settings: dict, side_dim: int, num_classes: int) -> dict:
    """The globals the lifted official code runs in."""
    solver = importlib.import_module("utils.solver")  # the checkout is on sys.path; it imports utils.lr_scheduler
    video_clip = load_file_module(checkout / "modules" / "video_clip.py", "official_video_clip")
    namespace = {"torch": torch, "nn": torch.nn, "optim": torch.optim, "time": time, "datetime": datetime,
                 "suppress": contextlib.suppress, "rearrange": __import__("einops").rearrange,
                 "video_header": video_clip.video_header, "_lr_scheduler": solver._lr_scheduler,
                 "args": SimpleNamespace(precision="fp32"), "print": lambda *a, **k: None,
                 "logger": logging.getLogger("official"),
                 "config": official_config(settings, side_dim, num_classes)}
    exec(compile(lift(checkout / "utils" / "utils.py", {"AverageMeter"}), "utils/utils.py", "exec"), namespace)
    exec(compile(lift(checkout / "train_vision.py", {"VideoCLIP", "train"}), "train_vision.py", "exec"), namespace)
    return namespace


def run(checkout: Path, init: Path, settings: dict) -> dict:
    """Train the official code from `init` on the fixed batches; returns what tests/test_trajectory.py compares."""
    sys.path.insert(0, str(checkout))  # utils/solver.py imports utils.lr_scheduler
    state = torch.load(init, map_location="cpu", weights_only=False)["model_state_dict"]
    side_dim, num_classes = state["visual.side_conv1.weight"].shape[0], state["fc.weight"].shape[0]
    namespace = build_namespace(checkout, settings, side_dim, num_classes)
    model_onehot = official_model(checkout, state, settings, namespace)
    frames, labels = make_batches(settings, model_onehot.visual.input_resolution, num_classes)
    namespace["model_onehot"] = model_onehot
    exec(compile(lift_main_setup(checkout / "train_vision.py"), "train_vision.py:main", "exec"), namespace)
    criterion = RecordingCriterion(namespace["criterion"], namespace)
    torch.manual_seed(settings["seed"])
    loader = FixedBatches(frames, labels, settings["batches_per_epoch"])
    for epoch in settings["train_epochs"]:
        namespace["train"](model_onehot, loader, namespace["optimizer"], criterion, None, epoch, "cpu",
                           namespace["lr_scheduler"], namespace["config"], None, namespace["logger"])
    final = model_onehot.state_dict(keep_vars=True)
    trainable = [n for n, p in model_onehot.named_parameters() if p.requires_grad]
    buffers = [n for n in final if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    groups = [[n for n, p in model_onehot.named_parameters() if any(p is q for q in g["params"]) and p.requires_grad]
              for g in namespace["optimizer"].param_groups]
    return {"settings": settings, "init_sha256": hashlib.sha256(init.read_bytes()).hexdigest(), "frames": frames,
            "labels": labels, "losses": torch.tensor(criterion.losses, dtype=torch.float64),
            "lrs": torch.tensor(criterion.lrs, dtype=torch.float64), "groups": groups,
            "final": summarize(final, state, trainable + buffers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkout", type=Path, help="a checkout of BBYL9413/TDS-CLIP")
    p.add_argument("output", type=Path, help="where to write the trajectory (.pt)")
    p.add_argument("--init", type=Path, default=ROOT / "tests" / "data" / "golden_tiny" / "checkpoint.pt",
                   help="official-layout checkpoint to start from (default: %(default)s)")
    args = p.parse_args(argv)
    for need in (args.checkout / "train_vision.py", args.checkout / "clip" / "model.py", args.init):
        if not need.is_file():
            print(f"error: {need} does not exist (give a checkout of BBYL9413/TDS-CLIP and an official checkpoint)",
                  file=sys.stderr)
            return 1
    torch.set_num_threads(1)  # reproducible sums: the official run with 2 threads differs by 2.3e-7 in loss
    result = run(args.checkout.resolve(), args.init, dict(SETTINGS))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    torch.save(result, tmp)
    tmp.replace(args.output)  # atomic: a half-written file never replaces a good one
    print(f"wrote {args.output}: {len(result['losses'])} steps, losses {result['losses'][0]:.6f} -> "
          f"{result['losses'][-1]:.6f}, {len(result['final'])} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
