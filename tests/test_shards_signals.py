"""tools/make_shards.py as a process among others: Ctrl-C, kill -9 and a second run on the same output.

Each test starts make_shards on many tiny videos in a session of its own (as a terminal starts a
command: Ctrl-C reaches the whole process group) and acts once the run has written its first shard,
found by polling the output directory, so no step relies on a sleep being long enough.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.build import shuffled
from shards.sources import read_list
from shards.synthetic import indexed_frames, write_video
from tools import make_shards

ROOT = Path(__file__).resolve().parents[1]
NUM_INPUTS = 160  # tiny videos (~10 ms each): the run lasts ~2 s after its first shard, the test reacts in ms


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A root with NUM_INPUTS links to one tiny video, listed; the first input in packing order is missing,
    so the first shard's range holds a rejection."""
    root = tmp_path_factory.mktemp("signals")
    write_video(root / "tiny.mp4", indexed_frames(4, 16, 16))
    (root / "list.txt").write_text("".join(f"v/{i:04d}.mp4 {i % 2}\n" for i in range(NUM_INPUTS)))
    first = shuffled(read_list(root / "list.txt"), seed=0)[0].path
    (root / "v").mkdir()
    for i in range(NUM_INPUTS):
        if f"v/{i:04d}.mp4" != first:
            (root / f"v/{i:04d}.mp4").symlink_to(root / "tiny.mp4")
    return root


def _command(inputs: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "tools/make_shards.py"), str(inputs / "list.txt"), "--root", str(inputs),
            "--out", str(out), "--workers", "2", "--shard-size", "1", "--short-side", "0"]


def _start(inputs: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen(_command(inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_first_shard(process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 60
    while not list(out.glob("train-*.index.json")):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no shard written in 60 s"
        time.sleep(0.01)


def _group(leader: int) -> list[int]:
    """Live (not zombie) processes of the process group `leader` leads: make_shards and all it started."""
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[2]) == leader and fields[0] != "Z":
            members.append(int(pid))
    return members


def _wait_until_gone(leader: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := _group(leader)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def test_ctrl_c_prints_one_line_and_leaves_no_process(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    process = _start(inputs, out)
    try:
        _wait_for_first_shard(process, out)
        assert len(_group(process.pid)) >= 3  # make_shards, its fork server and workers
        # a second run on the same output is refused at once, naming the first
        assert make_shards.main([str(inputs / "list.txt"), "--root", str(inputs), "--out", str(out)]) == 2
        refusal = capsys.readouterr().err.strip()
        assert len(refusal.splitlines()) == 1 and f"pid {process.pid}" in refusal and "Traceback" not in refusal
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    (line,) = stderr.strip().splitlines()
    assert line.startswith("interrupted: ") and "rerun the same command to resume" in line
    assert _wait_until_gone(process.pid, 5) == []

    rerun = subprocess.run(_command(inputs, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    bar = next(line for line in rerun.stderr.splitlines() if f"{NUM_INPUTS}/{NUM_INPUTS}" in line)
    assert " rejected 1 " in bar + " "  # the input the interrupted run rejected is counted
    manifest = json.loads((out / "train.manifest.json").read_text())
    assert manifest["num_samples"] == NUM_INPUTS - 1 and len(manifest["rejected"]) == 1


def test_workers_exit_soon_after_make_shards_is_killed(inputs, tmp_path):
    out = tmp_path / "out"
    process = _start(inputs, out)
    try:
        _wait_for_first_shard(process, out)
        assert len(_group(process.pid)) >= 3
        process.kill()  # kill -9: no clean-up runs in make_shards
        process.wait(timeout=10)
        assert _wait_until_gone(process.pid, 5) == []  # its workers and fork server followed it
    finally:
        if _group(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
