"""Evaluation: validation after an epoch, the multi-view test, and what a test leaves on disk.

Every view of a video is scored, the softmax averaged over the video's views (as the official test),
and top-1 / top-5 / per-class accuracy and the confusion matrix summed over all ranks.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from atomicfile import atomic_write_text
from tdsclip import pictures
from tdsclip.distributed import all_gather_objects, all_reduce_sum

TOP_K = 5


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when precision is 'bf16', plain fp32 otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()  # on a generator: grad mode is restored at each yield, so callers keep theirs
def video_probabilities(model: nn.Module, loader: Iterable, *, views: int, num_classes: int,
                        device: torch.device, precision: str = "fp32") -> Iterator[tuple]:
    """Per batch: (keys, probs (B, classes), labels (B,), valid (B,)) of its B videos, the softmax averaged
    over each video's `views` adjacent views (multi-view test); valid is False on padding."""
    model.eval()
    for batch in loader:
        with autocast_context(device, precision):
            logits = model(batch["clips"])  # (B*V, classes)
        probs = logits.float().softmax(-1).view(-1, views, num_classes).mean(1)  # (B, classes)
        labels = batch["label"].view(-1, views)[:, 0]
        valid = batch["valid"].view(-1, views)[:, 0] if "valid" in batch else torch.ones_like(labels, dtype=torch.bool)
        yield batch["key"][::views], probs, torch.where(valid, labels, 0), valid  # padding: any label


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, *, views: int, num_classes: int, device: torch.device,
             precision: str = "fp32", keep_predictions: bool = False,
             should_stop: Callable[[], None] | None = None) -> dict[str, Any]:
    """Top-1/top-5/mean class accuracy (%), per-class accuracy and the confusion matrix (rows: true class,
    columns: top-1 class) over all ranks, softmax averaged over each video's views.

    Batches hold `views` adjacent views per video and an optional `valid` mask marking padding.
    `keep_predictions` adds each video's key, label and top-5 classes with their probabilities.
    `should_stop` is called before each batch (it raises to stop; collective when distributed).
    """
    confusion = torch.zeros(num_classes * num_classes, device=device)
    correct5 = torch.zeros(num_classes, device=device)
    predictions = []
    for keys, probs, labels, valid in video_probabilities(model, _checked(loader, should_stop), views=views,
                                                          num_classes=num_classes, device=device, precision=precision):
        top = probs.topk(min(TOP_K, num_classes), dim=-1)  # (B, 5)
        confusion.index_add_(0, labels * num_classes + top.indices[:, 0], valid.float())
        correct5.index_add_(0, labels, ((top.indices == labels[:, None]).any(-1) & valid).float())
        if keep_predictions:
            for key, label, classes, p, ok in zip(keys, labels.tolist(), top.indices.tolist(), top.values.tolist(),
                                                  valid.tolist()):
                if ok:
                    predictions.append({"key": key, "label": label, "top5": classes, "top5_prob": p})
    all_reduce_sum(confusion)
    all_reduce_sum(correct5)
    result = accuracy_report(confusion.cpu().double().view(num_classes, num_classes), correct5.cpu().double())
    result["views"] = views
    if keep_predictions:
        result["predictions"] = [p for rank in all_gather_objects(predictions) for p in rank]
    return result


def _checked(loader: Iterable, should_stop: Callable[[], None] | None) -> Iterator:
    for batch in loader:
        if should_stop is not None:
            should_stop()
        yield batch


def accuracy_report(confusion: torch.Tensor, correct5: torch.Tensor) -> dict[str, Any]:
    """Accuracies (%) from a (classes, classes) confusion matrix of counts and per-class top-5 hits
    (float64: exact ratios in the report)."""
    count = confusion.sum(1)
    correct1 = confusion.diagonal()
    seen = count > 0
    total = count.sum().clamp(min=1)
    per_class = torch.where(seen, 100.0 * correct1 / count.clamp(min=1), torch.nan)
    return {
        "top1": 100.0 * (correct1.sum() / total).item(),
        "top5": 100.0 * (correct5.sum() / total).item(),
        "mean_class_acc": per_class[seen].mean().item() if seen.any() else 0.0,
        "num_videos": int(count.sum().item()),
        "per_class_top1": [None if v != v else v for v in per_class.tolist()],  # None: no video of that class
        "per_class_videos": count.long().tolist(),
        "confusion": confusion.long().tolist(),
    }


def results_path(output_dir: str | Path, weights: str | Path, crops: int, clips: int) -> Path:
    """Where a test's results go: one file per weights file and views, so tests do not overwrite each other."""
    return Path(output_dir) / f"test_{Path(weights).stem}_{crops}x{clips}.json"


def test_record(result: dict, class_names: list[str], *, weights: str, crops: int, clips: int,
                skipped: list[str], sources: dict[str, str] | None = None) -> dict:
    """What a test keeps: the accuracies, per-class accuracy by name, the most confused pairs, and each
    video's source (the input it was packed from, by key in `sources`), top-5 class names and probabilities."""
    sources = sources or {}
    return {
        "weights": str(weights), "test_crops": crops, "test_clips": clips, "views": result["views"],
        "num_videos": result["num_videos"], "top1": result["top1"], "top5": result["top5"],
        "mean_class_acc": result["mean_class_acc"], "skipped": skipped,
        "per_class": [{"class": i, "name": name, "videos": result["per_class_videos"][i],
                       "top1": result["per_class_top1"][i]}
                      for i, name in enumerate(class_names)],
        "most_confused": pictures.most_confused(np.asarray(result["confusion"]), class_names),
        "videos": [{"key": p["key"], "source": sources.get(p["key"]), "label": p["label"],
                    "label_name": class_names[p["label"]],
                    "top5": [{"class": c, "name": class_names[c], "probability": prob}
                             for c, prob in zip(p["top5"], p["top5_prob"])]}
                   for p in result["predictions"]],
    }


def write_results(record: dict, path: str | Path) -> None:
    """Write a test record as JSON (atomically)."""
    atomic_write_text(path, json.dumps(record, indent=2))
