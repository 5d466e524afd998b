"""AdamW with the official TDS-CLIP parameter groups, and the warm-up + cosine learning-rate schedule.

The official train_vision.py splits the trainable parameters into three AdamW groups: the side
network (lr * clip_ratio), the classifier (lr) and the side network's BatchNorm weights and biases
(lr / grad_accumulation_steps unless sync_bn; every official config has 1 step, so lr). Weight
decay applies to all three groups alike. Its WarmupCosineAnnealingLR rises linearly from 0 over
the warm-up epochs, then follows a half cosine to 0 at the last epoch, evaluated at fractional
epochs (epoch + batch / batches_per_epoch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

HEAD_PREFIX = "head."  # the classifier (the official code's `fc`)


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Split the trainable parameters into the official groups: side, head, bn."""
    bn_params = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for p in module.parameters(recurse=False)
    }
    groups: dict[str, list[nn.Parameter]] = {"side": [], "head": [], "bn": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in bn_params:
            groups["bn"].append(param)
        elif name.startswith(HEAD_PREFIX):
            groups["head"].append(param)
        else:
            groups["side"].append(param)
    return groups


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip_ratio: float = 1.0,
    bn_lr_ratio: float = 1.0,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of `model` in the official groups (empty groups dropped)."""
    ratios = {"side": clip_ratio, "head": 1.0, "bn": bn_lr_ratio}
    groups = [
        {"params": params, "lr": lr * ratios[name], "name": name}
        for name, params in parameter_groups(model).items()
        if params
    ]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused or None)


class WarmupCosineSchedule:
    """Sets each group's lr to base_lr * factor(epoch), epoch fractional (official stepping).

    factor rises linearly 0 -> 1 over `warmup_epochs`, then decays on a half cosine to
    `final_factor` at `epochs`. Call `step(epoch + batch / batches_per_epoch)` before each
    optimizer step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, epochs: float, warmup_epochs: float,
                 final_factor: float = 0.0):
        self.optimizer = optimizer
        self.epochs = epochs
        self.warmup_epochs = warmup_epochs
        self.final_factor = final_factor
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0.0
        self.step(0.0)

    def factor(self, epoch: float) -> float:
        if epoch < self.warmup_epochs:
            return epoch / self.warmup_epochs
        progress = min((epoch - self.warmup_epochs) / max(self.epochs - self.warmup_epochs, 1e-12), 1.0)
        cosine = (math.cos(math.pi * progress) + 1) / 2
        return cosine * (1 - self.final_factor) + self.final_factor

    def step(self, epoch: float) -> None:
        self.last_epoch = epoch
        factor = self.factor(epoch)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base_lr * factor

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"base_lrs": list(self.base_lrs), "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.base_lrs = list(state["base_lrs"])
        self.step(state["last_epoch"])
