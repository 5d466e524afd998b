"""Process group set-up from torchrun's environment: NCCL on GPU, gloo on CPU; one process works too."""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


PR_SET_PDEATHSIG = 1  # linux/prctl.h

# A gloo group beside NCCL's, for the small CPU-side agreements (stop requests) that must not wait for
# the GPU; None where the default group is gloo already or there is no group.
_CONTROL_GROUP = None


def init_distributed(timeout_minutes: int = 30) -> World:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); a lone process skips it.

    A torchrun worker dies with its torchrun: at once while joining (nothing to save yet; the join can
    wait for half an hour on ranks that will never come), by SIGTERM afterwards, so that a training run
    saves last.pt at its next step as for any SIGTERM."""
    global _CONTROL_GROUP
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    if under_torchrun:
        die_with_parent(signal.SIGKILL)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
        _CONTROL_GROUP = dist.new_group(backend="gloo") if backend != "gloo" else None
    if under_torchrun:
        die_with_parent(signal.SIGTERM)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def die_with_parent(sig: int) -> None:
    """Have the kernel send `sig` to this process when its parent ends (Linux; elsewhere nothing happens).
    A parent that has already gone (we were re-parented to init) ends the process now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # no libc prctl: not Linux
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), sig)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op for one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Max of a CPU `tensor` over ranks in place, over the gloo control group (no GPU sync); no-op for one process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return tensor


def all_ranks_keys(keys: list[str]) -> list[str]:
    """The union of every rank's `keys`, sorted (collective: call on every rank)."""
    return sorted({key for rank_keys in all_gather_objects(list(keys)) for key in rank_keys})


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-item list for one process)."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
