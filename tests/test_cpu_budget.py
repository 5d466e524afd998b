"""The CPU budget: affinity and cgroup quotas (v2 and v1, read from injected files), division among local
ranks, the split between torch, DALI and readers, overrides, and apply()."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tdsclip import cpu_budget as cb


def cgroup_v2(tmp_path: Path, cpu_max: str | None, own: str = "/", own_cpu_max: str | None = None) -> tuple:
    """A fake v2 hierarchy: root/cpu.max (if given) and this process's cgroup `own` below it."""
    root = tmp_path / "cgroup"
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    if cpu_max is not None:
        (root / "cpu.max").write_text(cpu_max + "\n")
    if own_cpu_max is not None:
        (root / own.lstrip("/") / "cpu.max").write_text(own_cpu_max + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def cgroup_v1(tmp_path: Path, quota: int, period: int = 100_000, controllers: str = "cpu,cpuacct") -> tuple:
    root = tmp_path / "cgroup"
    directory = root / controllers / "job"
    directory.mkdir(parents=True)
    (directory / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (directory / "cpu.cfs_period_us").write_text(f"{period}\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"4:memory:/job\n3:{controllers}:/job\n2:cpuset:/\n")
    return root, proc


@pytest.mark.parametrize("text, cpus", [("max 100000", None), ("150000 100000", 1.5), ("400000 100000\n", 4.0),
                                        ("50000", 0.5)])
def test_parse_cpu_max(text, cpus):
    assert cb.parse_cpu_max(text) == cpus


@pytest.mark.parametrize("quota, period, cpus", [("-1", "100000", None), ("250000", "100000", 2.5),
                                                 ("100000\n", "50000\n", 2.0)])
def test_parse_cfs(quota, period, cpus):
    assert cb.parse_cfs(quota, period) == cpus


def test_cgroup_v2_smallest_quota_over_ancestors(tmp_path):
    root, proc = cgroup_v2(tmp_path, "300000 100000", own="/a/b", own_cpu_max="max 100000")
    assert cb.cgroup_cpu_quota(root, proc) == 3.0
    root, proc = cgroup_v2(tmp_path / "2", "800000 100000", own="/a", own_cpu_max="150000 100000")
    assert cb.cgroup_cpu_quota(root, proc) == 1.5


def test_cgroup_v1_quota_and_none(tmp_path):
    root, proc = cgroup_v1(tmp_path, 200_000)
    assert cb.cgroup_cpu_quota(root, proc) == 2.0
    root, proc = cgroup_v1(tmp_path / "2", -1, controllers="cpu")
    assert cb.cgroup_cpu_quota(root, proc) is None
    assert cb.cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing_proc") is None


def test_unreadable_quota_is_no_limit(tmp_path):
    root, proc = cgroup_v2(tmp_path, "garbage here")
    assert cb.cgroup_cpu_quota(root, proc) is None


def test_quota_below_affinity_wins(tmp_path):
    root, proc = cgroup_v2(tmp_path, "250000 100000")
    assert cb.available_cpus(set(range(8)), root, proc)[0] == 2.5
    assert cb.available_cpus({0, 1}, root, proc)[0] == 2.0  # the mask is smaller
    budget = cb.cpu_budget("cpu", affinity=set(range(8)), environ={}, cgroup_root=root, proc_cgroup=proc)
    assert budget.cpus == 2 and "cgroup quota 2.5" in budget.describe()


def test_local_ranks_share_the_node(tmp_path):
    root, proc = cgroup_v2(tmp_path, None)
    def budget(ranks, cpus=16, device="cpu"):
        return cb.cpu_budget(device, affinity=set(range(cpus)), environ={"LOCAL_WORLD_SIZE": str(ranks)},
                             cgroup_root=root, proc_cgroup=proc)
    assert budget(1).cpus == 16
    assert budget(4).cpus == 4 and "shared by 4 local ranks" in budget(4).origin
    assert budget(3).cpus == 5  # floor: never more threads than the share
    low = budget(8, cpus=2)
    assert (low.cpus, low.torch_threads, low.dali_threads) == (1, 1, 1)  # never below 1
    assert budget(8, cpus=2, device="cuda").py_workers == 0


def test_split_cpu_and_cuda(tmp_path):
    root, proc = cgroup_v2(tmp_path, None)
    def split(cpus, device):
        b = cb.cpu_budget(device, affinity=set(range(cpus)), environ={}, cgroup_root=root, proc_cgroup=proc)
        return b.torch_threads, b.dali_threads, b.py_workers
    assert split(2, "cpu") == (1, 1, 0)
    assert split(12, "cpu") == (8, 4, 0)
    assert split(16, "cuda") == (2, 10, 4)
    assert split(64, "cuda:1") == (8, 52, 4)


def test_overrides(tmp_path):
    root, proc = cgroup_v2(tmp_path, "100000 100000")
    budget = cb.cpu_budget("cpu", cpus=12, torch_threads=3, py_workers=2, affinity={0}, environ={},
                           cgroup_root=root, proc_cgroup=proc)
    assert (budget.cpus, budget.torch_threads, budget.dali_threads, budget.py_workers) == (12, 3, 4, 2)
    assert budget.origin == "set in the config"


@pytest.mark.parametrize("option", [{"cpus": 0}, {"torch_threads": 0}, {"dali_threads": -1}, {"py_workers": -1},
                                    {"torch_threads": 1.5}, {"cpus": True}])
def test_bad_override_names_itself(option):
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        cb.cpu_budget("cpu", affinity={0, 1}, environ={}, **option)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_local_world_size(value):
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        cb.cpu_budget("cpu", affinity={0, 1}, environ={"LOCAL_WORLD_SIZE": value})


def test_apply_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        cb.CpuBudget(cpus=3, torch_threads=3, dali_threads=1, py_workers=0, origin="test").apply()
        assert torch.get_num_threads() == 3
        cb.CpuBudget(cpus=1, torch_threads=1, dali_threads=1, py_workers=0, origin="test").apply()  # again: no error
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bench_train_runs_naive_and_budget_side_by_side(tmp_path, capsys):
    """tools/bench_train.py end to end on tiny shards: both sides built with their threads, the ratio printed
    (timing is not asserted)."""
    root = Path(__file__).resolve().parents[1]
    videos, shards = tmp_path / "videos", tmp_path / "shards"
    for tool in (["tools/make_synthetic.py", str(videos), "--num-classes", "2", "--videos-per-class", "2",
                  "--val-per-class", "1", "--frames", "12", "--size", "24", "--seed", "0"],
                 ["tools/make_shards.py", str(videos / "train.txt"), "--root", str(videos), "--out", str(shards),
                  "--split", "train", "--short-side", "0", "--workers", "1"]):
        subprocess.run([sys.executable, *tool], cwd=root, check=True, capture_output=True)
    spec = importlib.util.spec_from_file_location("bench_train", root / "tools" / "bench_train.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look themselves up there
    spec.loader.exec_module(bench)
    tiny = ["model.arch=null", "model.width=32", "model.layers=1", "model.heads=1", "model.patch_size=8",
            "model.image_size=16", "model.side_dim=32", "model.num_segments=2", "model.num_classes=2",
            "model.clip_weights=null", "data.resize=18", "compile=false", "data.global_batch_size=2",
            "data.max_device_batch_size=2", "data.num_sample=1", "data.flip=none", "cpu.cpus=2"]
    before = torch.get_num_threads()
    try:
        bench.main(["--cfg", str(root / "configs/demo.yaml"), f"data.shards={shards}", *tiny,
                    "--steps", "1", "--rounds", "1", "--warmup", "1"])
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr().out
    naive_dali = len(os.sched_getaffinity(0))
    assert f"naive (torch {bench.DEFAULT_TORCH_THREADS}, DALI {naive_dali})" in out
    assert "budget (torch 1, DALI 1)" in out  # cpu.cpus=2 on a CPU run: one each
    assert "ratio budget / naive: end-to-end" in out and "x, model only" in out
