"""What a run directory guarantees: best.pt never stale, one writer, no leftovers, verified checkpoints, data
that cannot change under a mid-epoch resume, clean stops on signals, and the resume rules of a requeued job.
Kills are placed by the tests at the exact window (a patched write, a signal sent from the loader)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import launch
from pipelines.plan import rank_rows
from tdsclip import checkpoint as checkpoint_module
from tdsclip.checkpoint import Checkpointer
from tdsclip.checkpoint_file import CheckpointError, write_checkpoint
from tdsclip.run_dir import RunDirError, RunDirLock, remove_leftovers
from tdsclip.stop import StopRequested, StopSignals
from tests.test_launch import ROOT, overrides, shards  # noqa: F401 (the module's tiny shards fixture)
from tests.test_train import FakeLoader, make_trainer

DEMO = str(ROOT / "configs/demo.yaml")


def test_a_kill_between_last_and_best_is_repaired_at_the_next_start(tmp_path, monkeypatch):
    real_copy = checkpoint_module.atomic_copy

    def killed(*args):  # the process dies after last.pt is renamed and before best.pt is linked
        raise KeyboardInterrupt("kill -9")

    trainer = make_trainer(tmp_path, epochs=2)
    monkeypatch.setattr(checkpoint_module, "atomic_copy", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    last = trainer.checkpointer.load_last()
    assert (last["epoch"], last["best_epoch"]) == (1, 0) and not (tmp_path / "best.pt").exists()
    monkeypatch.setattr(checkpoint_module, "atomic_copy", real_copy)
    assert trainer.checkpointer.repair_best(last)
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 1
    assert not trainer.checkpointer.repair_best(last)  # already right: nothing to do

    stale = dict(last, epoch=0)  # best.pt of an older epoch (a copy, not a link) is replaced too
    write_checkpoint(stale, tmp_path / "best.pt")
    assert trainer.checkpointer.repair_best(last)
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 1


def test_a_second_run_into_the_same_directory_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    lock = RunDirLock(tmp_path / "run")
    lock.acquire()
    with pytest.raises(RunDirError, match=rf"{tmp_path}/run is in use by another run \(host .*, pid {os.getpid()}\)"):
        RunDirLock(tmp_path / "run").acquire()
    lock.release()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from tdsclip.run_dir import RunDirLock; "
                               f"RunDirLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
        RunDirLock(tmp_path / "run").acquire()
    holder.kill()  # kill -9: the kernel drops its lock
    holder.wait()
    taken = RunDirLock(tmp_path / "run")
    taken.acquire()
    taken.release()


def test_output_dir_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for mode in ([], ["--test", "--weights", "w.pt"]):
        assert launch.main(["--cfg", DEMO, f"output_dir={tmp_path}/file/run", *mode]) == 1
        assert f"output_dir {tmp_path}/file/run: {tmp_path}/file is a file, not a directory" in capsys.readouterr().err


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    for name in (".last.pt.tmp123", ".best.pt.link77", ".config.yaml.tmp9", "last.pt", "notes.tmp1"):
        (tmp_path / name).write_bytes(b"x")
    assert remove_leftovers(tmp_path) == [".best.pt.link77", ".config.yaml.tmp9", ".last.pt.tmp123"]
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "notes.tmp1"]


def test_flipped_bytes_in_a_checkpoint_are_caught(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    data = bytearray((tmp_path / "last.pt").read_bytes())
    state = torch.load(tmp_path / "last.pt", weights_only=False)["optimizer"]["state"]
    moment = next(iter(state.values()))["exp_avg_sq"].numpy().tobytes()  # Adam state, as the campaign hit
    at = bytes(data).index(moment[:64])
    data[at:at + 256] = bytes(b ^ 0x5A for b in data[at:at + 256])
    (tmp_path / "last.pt").write_bytes(bytes(data))
    os.unlink(tmp_path / "best.pt")  # a hard link to last.pt (the last epoch was the best): damaged alike
    with pytest.raises(CheckpointError, match=r"last\.pt is damaged: its content does not match the checksum.*"
                                              r"restore it from a copy, or start a new run"):
        trainer.checkpointer.load_last()
    write_checkpoint({"epoch": 0}, tmp_path / "best.pt")  # another file: the way out
    with pytest.raises(CheckpointError, match=rf"to resume from best.pt instead: cp {tmp_path}/best.pt "
                                              rf"{tmp_path}/last.pt, then rerun with --resume"):
        trainer.checkpointer.load_last()


def test_a_checkpoint_without_its_rng_or_config_is_one_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    checkpoint = trainer.checkpointer.load_last()
    for key in ("rng", "config"):
        write_checkpoint({k: v for k, v in checkpoint.items() if k != key}, tmp_path / "last.pt")
        with pytest.raises(CheckpointError, match=f"lacks {key}: it cannot resume a run exactly; start a new run from "
                                                  r"its weights with model.init_weights="):
            trainer.checkpointer.load_last()


def test_other_training_data_is_refused_mid_epoch_and_noted_at_an_epoch_boundary(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpoint = {"data_fingerprint": "abc", "data": [{"num_videos": 12}], "batch_in_epoch": 2}
    assert checkpointer.check_data(checkpoint, "abc", 12) is None
    with pytest.raises(CheckpointError, match=r"written mid-epoch on other training data \(the same number of videos, packed differently"):
        checkpointer.check_data(checkpoint, "xyz", 12)  # re-packed: same count, other order
    with pytest.raises(CheckpointError, match=r"\(12 videos; now 15\)"):
        checkpointer.check_data(checkpoint, "abc", 15)
    note = checkpointer.check_data(dict(checkpoint, batch_in_epoch=0), "xyz", 12)
    assert note.startswith("note: the training data changed") and "the next epoch uses it" in note


class SignallingLoader(FakeLoader):
    """Sends `sig` to this process when batch `at` of epoch `epoch` is read (as SLURM or Ctrl-C would)."""

    def __init__(self, sig, epoch, at, **kwargs):
        super().__init__(**kwargs)
        self.sig, self.when = sig, (epoch, at)

    def __iter__(self):
        for batch in super().__iter__():
            if (self.epoch, self.position - 1) == self.when:
                os.kill(os.getpid(), self.sig)
            yield batch


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_with_last_pt_and_the_resume_is_exact(tmp_path, sig, status):
    full = make_trainer(tmp_path / "full", epochs=2)
    full.fit()
    stopped = make_trainer(tmp_path / "run", epochs=2, loader=SignallingLoader(sig, epoch=1, at=0))
    stopped.stop = StopSignals().install()
    stopped.stop.defer()  # training: stop at the next step boundary
    try:
        with pytest.raises(StopRequested) as stop:
            stopped.fit()
    finally:
        stopped.stop.uninstall()
    assert stop.value.exit_status == status and f"stopped by {sig.name} after step 3 (epoch 2, step 1/2)" in str(stop.value)
    last = stopped.checkpointer.load_last()
    assert (last["epoch"], last["step"], last["batch_in_epoch"]) == (1, 3, 2)  # the step that was running finished
    resumed = make_trainer(tmp_path / "run", epochs=2, seed=5)
    resumed.restore(last)
    resumed.fit()
    assert [h["loss"] for h in stopped.history + resumed.history] == [h["loss"] for h in full.history]


def test_a_signal_while_starting_stops_at_once_and_a_second_ctrl_c_while_training_too():
    signals = StopSignals().install()
    try:
        with pytest.raises(StopRequested) as stop:  # nothing trained yet: nothing to wait for
            os.kill(os.getpid(), signal.SIGTERM)
        assert not stop.value.saved and stop.value.exit_status == 143
        signals.defer()
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.requested() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.uninstall()


def test_sigterm_to_launch_saves_last_pt_and_says_so_in_one_line(shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    command = [sys.executable, "launch.py", "--cfg", DEMO, *overrides(shards, run_dir, "schedule.epochs=3")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in process.stdout:  # the first training step is logged: the run is in its loop
        if line.startswith("epoch 1/3 step 1/3"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    step = torch.load(run_dir / "last.pt", weights_only=False)["step"]
    assert f"stopped by SIGTERM after step {step} " in err and "last.pt is saved; continue with the same command" in err
    resumed = subprocess.run([*command, "--resume", "auto"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0 and f"resuming from {run_dir}/last.pt" in resumed.stdout


def test_resume_needs_a_checkpoint_and_resume_auto_starts_without_one(shards, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "typo"
    assert launch.main(["--cfg", DEMO, "--resume", *overrides(shards, run_dir, "schedule.epochs=1")]) == 1
    assert f"--resume: there is no checkpoint (last.pt) in {run_dir}; check output_dir" in capsys.readouterr().err
    assert launch.main(["--cfg", DEMO, "--resume", "auto", *overrides(shards, run_dir, "schedule.epochs=1")]) == 0
    assert "resuming" not in capsys.readouterr().out and (run_dir / "last.pt").exists()
    assert launch.main(["--cfg", DEMO, "--overwrite", *overrides(shards, run_dir, "schedule.epochs=1")]) == 0
    assert "--overwrite: deleted last.pt and best.pt of the earlier run" in capsys.readouterr().out


def test_guards_class_names_and_a_global_batch_larger_than_the_data(shards, tmp_path, capsys):  # noqa: F811
    assert launch.main(["--cfg", DEMO, *overrides(shards, tmp_path / "a", "data.global_batch_size=16")]) == 1
    assert "has 12 videos, fewer than one step's data.global_batch_size=16" in capsys.readouterr().err
    swapped = tmp_path / "swapped"
    shutil.copytree(shards, swapped)
    manifest = (swapped / "val.manifest.json").read_text()
    assert '"classes":["0","1","2"]' in manifest
    (swapped / "val.manifest.json").write_text(manifest.replace('"classes":["0","1","2"]', '"classes":["0","2","1"]'))
    assert launch.main(["--cfg", DEMO, *overrides(swapped, tmp_path / "b")]) == 1  # val packed with swapped names
    assert ("the class names of splits 'train' and 'val' in " f"{swapped} differ (1: '1' / '2'; 2: '2' / '1'): pack "
            "both with the same --labels file") in capsys.readouterr().err


def test_the_same_global_batch_takes_the_same_steps_and_videos_on_any_layout():
    rng = lambda: np.random.default_rng([7, 0])  # noqa: E731 (the epoch's shared permutation)
    num_videos, global_batch = 22, 4
    layouts = {(1, 2, 2), (2, 2, 1), (4, 1, 1)}  # (processes, per-device batch, accumulation)
    steps = {}
    for world, per_device, accum in layouts:
        rows = [rank_rows(num_videos, per_device, r, world, shuffle=True, rng=rng())[0] for r in range(world)]
        micro = len(rows[0]) // per_device
        num_steps = micro // accum  # the trainer's steps_per_epoch
        steps[world] = [sorted(int(v) for r in rows for b in range(s * accum, (s + 1) * accum)
                               for v in r[b * per_device:(b + 1) * per_device]) for s in range(num_steps)]
    assert len(steps[1]) == num_videos // global_batch == 5
    assert steps[1] == steps[2] == steps[4]


def torchrun_in_training(shards: Path, run_dir: Path) -> subprocess.Popen:
    """tdsclip.torchrun with 2 gloo workers training the tiny model, returned once both are in epoch 2."""
    command = [sys.executable, "-m", "tdsclip.torchrun", "--standalone", "--nproc_per_node=2", "launch.py",
               "--cfg", DEMO, *overrides(shards, run_dir, "schedule.epochs=50")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    for line in process.stdout:
        if line.startswith("epoch 2/50 step 1/"):  # both ranks are in their loop
            return process
    raise AssertionError(f"the run ended before training: {process.communicate()[1][-2000:]}")


def test_sigterm_to_torchrun_stops_both_ranks_after_one_step_without_a_traceback(shards, tmp_path):  # noqa: F811
    process = torchrun_in_training(shards, tmp_path / "ddp")
    process.send_signal(signal.SIGTERM)  # as a scheduler signals the job step
    out, err = process.communicate(timeout=180)
    assert process.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.count("last.pt is saved") == 1  # rank 0 says it once
    assert "torchrun: stopped by SIGTERM" in err
    checkpoint = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and checkpoint["data"][0]["position"] == checkpoint["data"][1]["position"]


def test_workers_end_with_a_killed_torchrun_and_save_last_pt(shards, tmp_path):  # noqa: F811
    process = torchrun_in_training(shards, tmp_path / "ddp")
    process.kill()  # kill -9 of torchrun alone: nothing forwards a signal to the workers
    out, err = process.communicate(timeout=120)  # returns once the workers, which share its pipes, are gone too
    assert "stopped by SIGTERM after step" in err and "last.pt is saved" in err
    assert torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)["step"] >= 4
    RunDirLock(tmp_path / "ddp").acquire()  # free: no worker holds the run directory any more


def test_the_per_device_batch_may_change_on_resume_at_an_epoch_boundary_only(tmp_path):
    from tdsclip.config import ConfigError, config_from_dict, config_to_dict

    saved = config_to_dict(config_from_dict({}, ["data.max_device_batch_size=16"]))
    smaller = config_to_dict(config_from_dict({}, ["data.max_device_batch_size=8"]))
    checkpointer = Checkpointer(tmp_path)
    boundary = {"config": saved, "batch_in_epoch": 0, "world_size": 1}
    assert checkpointer.check_resume(boundary, smaller) == ["data.max_device_batch_size: 16 -> 8"]
    with pytest.raises(ConfigError, match=r"data.max_device_batch_size: 16 -> 8 \(at an epoch boundary only\)"):
        checkpointer.check_resume(dict(boundary, batch_in_epoch=3), smaller)


def test_a_mistyped_resume_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        launch.parse_args(["--cfg", DEMO, "--resume", "atuo"])
    assert "--resume takes no value or 'auto', got 'atuo'" in capsys.readouterr().err


def test_a_file_system_that_refuses_a_write_is_one_line(shards, tmp_path, monkeypatch, capsys):  # noqa: F811
    import errno

    import tdsclip.run as run_module

    def full(config, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run_module, "save_config", full)
    assert launch.main(["--cfg", DEMO, *overrides(shards, tmp_path / "run", "schedule.epochs=1")]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {tmp_path}/run/config.yaml: No space left on device; free space or fix the "
                   "permissions (or set output_dir=...)\n")


def test_a_resume_on_another_process_layout_draws_new_random_numbers(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.config = {"seed": 7}
    trainer.fit()
    checkpoint = trainer.checkpointer.load_last()
    checkpoint["world_size"] = 2  # written by 2 processes, at an epoch boundary
    torch.manual_seed(7)
    at_start = torch.rand(3)
    notes = trainer.restore(checkpoint)
    assert notes == [f"world size changed (2 -> 1); random streams start afresh from seed 7 at step {checkpoint['step']}"]
    after = torch.rand(3)
    assert not torch.equal(after, at_start)  # not the run's first numbers again
    trainer.restore(checkpoint)
    assert torch.equal(torch.rand(3), after)  # but the same for the same step
