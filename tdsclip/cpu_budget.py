"""How many CPU threads each part of a run may use: torch's intra-op pool, DALI's CPU threads and the
processes that read shard bytes for DALI (``py_workers``).

A process may use the CPUs of its affinity mask, capped by its cgroup's CPU quota (containers, SLURM
and Kubernetes set one or both); torchrun starts LOCAL_WORLD_SIZE such processes per node, which share
them. Left alone, torch's OpenMP pool takes every core and DALI as many threads again; on a CPU run
the two then spin against each other (issue 14, 2 cores: 2.2-11.6 s per step with torch's default
threads, 0.4-0.65 s with OMP_NUM_THREADS=1). ``cpu_budget`` splits this process's share between the
three, and ``CpuBudget.apply`` sets torch's part (before anything is compiled: inductor's CPU kernels
keep the thread count they were generated with).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MAX_PY_WORKERS = 4  # reader processes on a GPU host: one feeds > 400 clips/s (docs/benchmarks.md, "Host-side feed")

_interop_threads_set = False  # torch allows set_num_interop_threads once per process


@dataclass(frozen=True, kw_only=True)
class CpuBudget:
    """This process's CPUs and their split. ``origin`` says where ``cpus`` came from."""

    cpus: int  # CPUs this process may keep busy (its share of the node's)
    torch_threads: int  # torch intra-op threads (OpenMP)
    dali_threads: int  # DALI CPU threads per pipeline (pipelines.loader's num_threads)
    py_workers: int  # processes reading shard bytes for DALI (pipelines.loader's py_workers; 0: in-thread)
    origin: str

    def describe(self) -> str:
        """One line for the start of a run."""
        return (f"CPU budget: {self.cpus} CPU{'s' if self.cpus != 1 else ''} ({self.origin}) -> torch "
                f"{self.torch_threads} thread(s), DALI {self.dali_threads} thread(s), "
                f"{self.py_workers} reader process(es)")

    def apply(self) -> None:
        """Set torch's intra-op threads (and, once per process, its inter-op threads) to the budget."""
        global _interop_threads_set
        torch.set_num_threads(self.torch_threads)
        if not _interop_threads_set:
            _interop_threads_set = True
            try:
                torch.set_num_interop_threads(self.torch_threads)
            except RuntimeError:  # inter-op work already ran (torch then refuses); its pool stays as it is
                pass


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("<quota> <period>" or "max <period>"); None: no limit."""
    fields = text.split()
    if not fields or fields[0] == "max":
        return None
    period = float(fields[1]) if len(fields) > 1 else 100_000.0
    return float(fields[0]) / period


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None: no limit (-1)."""
    quota, period = int(quota_text), int(period_text)
    return None if quota < 0 or period <= 0 else quota / period


def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """Directories that may hold this process's CPU limits: its cgroup and each ancestor, in the v2
    hierarchy and in the v1 cpu controller's (limits nest: a parent's quota caps its children)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and not controllers:
            bases = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu"]
        else:
            continue
        relative = Path(path.lstrip("/"))
        for base in bases:
            dirs += [base / ancestor for ancestor in (relative, *relative.parents)]
    return dirs or [root, root / "cpu"]  # no /proc/self/cgroup: the mount's top level


def _read_limit(directory: Path) -> float | None:
    """The CPU limit set in one cgroup directory (v2 or v1 files), None when it sets none."""
    try:
        if (directory / "cpu.max").is_file():
            return parse_cpu_max((directory / "cpu.max").read_text())
        if (directory / "cpu.cfs_quota_us").is_file():
            return parse_cfs((directory / "cpu.cfs_quota_us").read_text(),
                             (directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, IndexError):  # unreadable or unexpected: treat as no limit, like the kernel's "max"
        return None
    return None


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The smallest CPU quota over this process's cgroup and its ancestors (v2 or v1), in CPUs; None: none."""
    limits = [_read_limit(d) for d in dict.fromkeys(_own_cgroup_dirs(root, proc_cgroup))]
    return min((limit for limit in limits if limit is not None), default=None)


def available_cpus(affinity: set[int] | None = None, root: Path = CGROUP_ROOT,
                   proc_cgroup: Path = PROC_CGROUP) -> tuple[float, str]:
    """CPUs this process may use, the smaller of its affinity mask and its cgroup quota, and where that came from."""
    mask = len(affinity if affinity is not None else os.sched_getaffinity(0))
    quota = cgroup_cpu_quota(root, proc_cgroup)
    if quota is not None and quota < mask:
        return quota, f"cgroup quota {quota:g} of {mask} CPUs in the affinity mask"
    return float(mask), f"affinity mask {mask}" + (f", cgroup quota {quota:g}" if quota is not None else "")


def local_world_size(environ: dict | None = None) -> int:
    """Processes sharing this node's CPUs: torchrun's LOCAL_WORLD_SIZE (1 outside torchrun)."""
    value = (environ if environ is not None else os.environ).get("LOCAL_WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LOCAL_WORLD_SIZE={value!r} must be a positive integer (torchrun sets it)")
    return int(value)


def _split(cpus: int, device_type: str) -> dict[str, int]:
    """Default split of ``cpus`` between torch, DALI and reader processes."""
    if device_type == "cuda":
        # The model runs on the GPU: torch's host threads have little to do; DALI's CPU stages (and the
        # decoders' host side) and the readers feeding them are what the cores are for.
        py_workers = min(MAX_PY_WORKERS, cpus // 4)
        torch_threads = max(1, cpus // 8)
        return dict(torch_threads=torch_threads, py_workers=py_workers,
                    dali_threads=max(1, cpus - torch_threads - py_workers))
    # CPU: the model step and DALI's decode run at the same time (the pipeline prefetches); a third of
    # the cores to DALI keeps the two from spinning against each other. Reads stay in DALI's thread.
    dali_threads = max(1, cpus // 3)
    return dict(torch_threads=max(1, cpus - dali_threads), dali_threads=dali_threads, py_workers=0)


def _check_override(name: str, value: int | None, minimum: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < minimum):
        raise ValueError(f"{name} must be an integer >= {minimum} or null (got {value!r})")


def cpu_budget(device: str | torch.device = "cpu", *, cpus: int | None = None, torch_threads: int | None = None,
               dali_threads: int | None = None, py_workers: int | None = None, environ: dict | None = None,
               affinity: set[int] | None = None, cgroup_root: Path = CGROUP_ROOT,
               proc_cgroup: Path = PROC_CGROUP) -> CpuBudget:
    """This process's CPU budget for a run on ``device``.

    Args:
        device: where the model runs ("cpu" or "cuda[:i]"); it decides the split.
        cpus: CPUs of this process, instead of (affinity or cgroup quota) / LOCAL_WORLD_SIZE; e.g. when a
            launcher already pinned each rank to its own cores.
        torch_threads, dali_threads, py_workers: each replaces its own figure of the split.
        environ, affinity, cgroup_root, proc_cgroup: where to read the machine from (tests inject them).
    """
    for name, value, minimum in (("cpus", cpus, 1), ("torch_threads", torch_threads, 1),
                                 ("dali_threads", dali_threads, 1), ("py_workers", py_workers, 0)):
        _check_override(name, value, minimum)
    if cpus is not None:
        origin = "set in the config"
    else:
        node_cpus, origin = available_cpus(affinity, cgroup_root, proc_cgroup)
        ranks = local_world_size(environ)
        cpus = max(1, math.floor(node_cpus / ranks))
        if ranks > 1:
            origin += f", shared by {ranks} local ranks"
    split = _split(cpus, torch.device(device).type)
    given = dict(torch_threads=torch_threads, dali_threads=dali_threads, py_workers=py_workers)
    split |= {name: value for name, value in given.items() if value is not None}
    return CpuBudget(cpus=cpus, origin=origin, **split)
