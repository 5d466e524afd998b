"""launch.py end to end on tiny synthetic shards through the real DALI CPU pipeline and model:
train + resume, torchrun with 2 gloo processes, multi-view test of an official-layout checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import launch
import pipelines
import tdsclip
from pipelines.reader import shard_paths
from pipelines.plan import ClipSpec
from tdsclip.build import build_loaders, build_trainer
from tdsclip.checkpoint_file import write_checkpoint
from tdsclip.config import ConfigError
from tdsclip.distributed import World

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden_tiny" / "checkpoint.pt"
NUM_CLASSES = 3
VIDEOS_PER_CLASS = 4
# A model small enough for seconds per epoch on 2 cores; T=2 keeps clips short.
TINY = ["model.arch=null", "model.width=32", "model.layers=1", "model.heads=1", "model.patch_size=8",
        "model.image_size=16", "model.side_dim=32", "model.num_segments=2", f"model.num_classes={NUM_CLASSES}",
        "model.clip_weights=null", "data.resize=18", "data.num_threads=1", "compile=false",
        "data.global_batch_size=4", "data.max_device_batch_size=2", "data.eval_batch_size=4",
        "data.num_sample=1", "data.flip=none", "logging.log_every=1", "logging.progress=plain",
        "schedule.epochs=2", "schedule.warmup_epochs=0.5", "eval.skip_epochs=[]", "seed=3"]


def run_tool(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Synthetic motion videos packed into train/val shards."""
    root = tmp_path_factory.mktemp("launch")
    videos, out = root / "videos", root / "shards"
    run_tool("tools/make_synthetic.py", str(videos), "--num-classes", str(NUM_CLASSES),
             "--videos-per-class", str(VIDEOS_PER_CLASS), "--val-per-class", "2", "--frames", "12", "--size", "24", "--seed", "0")
    for split in ("train", "val"):
        run_tool("tools/make_shards.py", str(videos / f"{split}.txt"), "--root", str(videos), "--out", str(out),
                 "--split", split, "--short-side", "0", "--workers", "1")
    return out


def overrides(shards: Path, output_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.shards={shards}", f"output_dir={output_dir}", *extra]


def test_bad_config_exits_with_the_key(tmp_path, capsys):
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "optim.lrr=1"]) == 2
    assert "optim.lrr: unknown key; valid keys here: lr," in capsys.readouterr().err


def test_missing_shards_is_a_clear_error(tmp_path, capsys):
    args = ["--cfg", str(ROOT / "configs/demo.yaml"), f"data.shards={tmp_path}", f"output_dir={tmp_path}/run"]
    assert launch.main(args) == 1
    assert f"error: {tmp_path}/train.manifest.json: manifest not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # no empty TensorBoard run left behind


def test_misspelled_split_lists_the_splits_there(shards, tmp_path, capsys):
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, tmp_path, "data.val_split=vall")]) == 1
    assert "vall.manifest.json: manifest not found; this directory has the splits train, val" in capsys.readouterr().err


def test_num_classes_below_the_shards_labels_is_a_clear_error(shards, tmp_path, capsys):
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, tmp_path, "model.num_classes=2")]) == 1
    assert "split 'train' of" in (err := capsys.readouterr().err)
    assert "has label 2, but the model has 2 classes: set model.num_classes" in err


def test_a_tar_as_data_shards_is_a_clear_error(shards, tmp_path, capsys):
    tar = shards / "train-000000.tar"
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, tmp_path), f"data.shards={tar}"]) == 1
    assert f"{tar} is a file: give the shard directory" in capsys.readouterr().err


def test_bad_randaugment_is_a_config_error(capsys):
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "data.randaugment=rand-x"]) == 2
    assert "data.randaugment: randaugment 'rand-x': part 'x' is not a name and a number" in capsys.readouterr().err


def test_arguments(capsys):
    args = launch.parse_args(["--cfg", "c.yaml", "data.shards=s", "--resume", "optim.lr=0.5"])
    assert args.resume and args.overrides == ["data.shards=s", "optim.lr=0.5"]  # overrides around the flags
    with pytest.raises(SystemExit):
        launch.parse_args(["--cfg", "c.yaml", "--weights", "w.pt"])
    assert "--weights is for --test" in capsys.readouterr().err
    args = launch.parse_args(["--cfg", "c.yaml", "--test", "--weights", "w.pt", "--test-crops", "3", "--test-clips", "2"])
    assert args.overrides == ["eval.test_crops=3", "eval.test_clips=2"]  # validated and recorded as config
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "--test", "--weights", "w.pt", "--test-clips", "0"]) == 2
    assert "eval.test_clips" in capsys.readouterr().err


def test_interrupt_hint_matches_what_is_on_disk(tmp_path):
    from tdsclip.config import load_config
    from tdsclip.run import interrupt_hint

    config = load_config(ROOT / "configs/demo.yaml", [f"output_dir={tmp_path}"])
    train, test = launch.parse_args(["--cfg", "c.yaml"]), launch.parse_args(["--cfg", "c.yaml", "--test", "--weights", "w"])
    assert interrupt_hint(config, train) == "no checkpoint was written yet; rerun the same command to start again"
    (tmp_path / "last.pt").write_bytes(b"")
    assert interrupt_hint(config, train) == f"rerun the same command with --resume to continue from {tmp_path}/last.pt"
    assert interrupt_hint(config, test) == "rerun the same command to test again"


def test_mixup_needs_an_even_device_batch(shards, tmp_path, capsys):
    args = ["--cfg", str(ROOT / "configs/demo.yaml"),
            *overrides(shards, tmp_path / "run", "optim.mixup=true", "data.global_batch_size=3")]
    assert launch.main(args) == 1
    assert "optim.mixup mixes pairs" in capsys.readouterr().err


def test_loaders_follow_the_models_clip_geometry_and_data_sampling(shards, tmp_path):
    from tdsclip.config import load_config
    from tdsclip.distributed import World

    config = load_config(ROOT / "configs/demo.yaml", overrides(shards, tmp_path, "model.frames_per_segment=3",
                                                               "data.sampling=kinetics", "data.wrap_start=true"))
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    train, val = build_loaders(config, world, config.model.model_config(), batch_size=2)
    assert next(iter(val))["clips"].shape == (4, 2, 3, 3, 16, 16)  # (B, T, M=3, 3, S, S)
    assert train.spec.sampling_scheme == val.spec.sampling_scheme == "kinetics"
    assert train.spec.wrap_start and val.spec.wrap_start
    plan = val.plan(0)
    n = val.samples[plan.sample[0]].num_frames
    assert plan.frames[0, :3].tolist() == [n - 1, 0, 1]  # kinetics val: centre 0, window of 3 wrapped


def test_fine_tune_from_official_weights_without_validation(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--cfg", str(ROOT / "configs/demo.yaml"),
            *overrides(shards, run_dir, "schedule.epochs=1", "data.val_split=null", f"model.init_weights={GOLDEN}",
                       "model.width=64", "model.layers=2", "model.side_dim=64")]  # the golden network's sizes
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert f"from {GOLDEN}; new head.fc.bias, head.fc.weight (other class count)" in out  # 5 -> 3
    assert "weights: " in out and "(backbone, side network) from" in out and "CLIP weights" not in out
    assert "warning:" not in out  # the shards' 3 classes match model.num_classes
    assert "val top-1" not in out and f"checkpoints: {run_dir}/last.pt\n" in out
    assert (run_dir / "last.pt").is_file() and not (run_dir / "best.pt").exists()


def test_a_head_larger_than_the_shards_classes_is_pointed_out(shards, tmp_path):
    from tdsclip.build import warn_on_class_count

    lines = []
    log = type("Log", (), {"info": lambda self, line: lines.append(line)})()
    loader = pipelines.Loader(shard_paths(shards, "train"), ClipSpec(split="train"), 2, device="cpu",
                              classes=["a", "b", "c"])
    for classes in (NUM_CLASSES, 400):
        warn_on_class_count(loader, classes, "train", log)
    assert lines == ["warning: the 'train' shards name 3 classes and the model has 400 (model.num_classes); "
                     "set it to 3 unless that is intended"]


@pytest.mark.parametrize("name", ["k400/vitb16", "sthv1/vitb16", "sthv2/vitb16"])
def test_each_datasets_config_trains_and_validates_with_its_own_data_settings(shards, tmp_path, capsys, name):
    """The shipped config's sampling, wrap, flip, grayscale, RandAugment and views, on a tiny network."""
    tiny = [o for o in TINY if not o.startswith(("data.num_sample", "data.flip"))]
    resize = "data.resize=18" if name.startswith("k400") else "data.resize=[18,22]"  # SS: an exact H x W
    pairs = [] if name.startswith("k400") else ["data.flip_label_map={0: 1, 1: 0}"]  # left/right pairs of 3 classes
    args = ["--cfg", str(ROOT / "configs" / f"{name}.yaml"),
            *tiny, resize, *pairs, f"data.shards={shards}", f"output_dir={tmp_path}", "schedule.epochs=1"]
    assert launch.main(args) == 0
    out = capsys.readouterr().out
    assert "(x2 views each)" in out and "epoch 1/1: val top-1" in out, out
    assert "epoch 1/1 step 3/3 (global 3)" in out  # 12 videos, a global batch of 4 (2 per device x 2 accumulation)


def tensorboard_start_marks(run_dir: Path) -> list[int]:
    """Steps of the session-start marks (SummaryWriter's purge_step) in `run_dir`'s event files, sorted."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sorted(event.step for path in run_dir.glob("events.out.tfevents.*")
                  for event in EventFileLoader(str(path)).Load() if event.HasField("session_log"))


def test_train_then_resume_and_refuse_overwrite(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, run_dir, "schedule.epochs=1")]) == 0
    out = capsys.readouterr().out
    assert "batch: 4 videos per step = 1 process x 2 per device x 2 accumulation steps" in out
    assert "CLIP weights: none" in out and "val top-1" in out
    assert f"tensorboard --logdir {run_dir}" in out
    assert {"config.yaml", "last.pt", "best.pt"} <= set(os.listdir(run_dir))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run_dir))
    model = tdsclip.load_model(run_dir / "last.pt")  # the model part is readable on its own
    assert model.config.num_classes == NUM_CLASSES and model.config.num_segments == 2

    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, run_dir)]) == 1
    assert "holds last.pt and best.pt of an earlier run: pass --resume" in capsys.readouterr().err
    first_step = torch.load(run_dir / "last.pt", weights_only=False)["step"]
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "--resume", *overrides(shards, run_dir)]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "resumed with config changes: schedule.epochs: 1 -> 2" in out
    checkpoint = torch.load(run_dir / "last.pt", weights_only=False)
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["schedule"]["epochs"] == 2
    # each run marks where it starts logging, so TensorBoard hides what an interrupted attempt logged there on
    assert tensorboard_start_marks(run_dir) == [1, first_step + 1]
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "--resume", *overrides(shards, run_dir)]) == 0
    assert "the run is complete (2 epochs" in capsys.readouterr().out  # and nothing is retrained
    assert torch.load(run_dir / "last.pt", weights_only=False)["step"] == checkpoint["step"]
    longer = overrides(shards, run_dir, "schedule.epochs=3", "data.val_split=train")
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "--resume", *longer]) == 0
    assert "data.val_split changed: best.pt is chosen afresh on the new split" in capsys.readouterr().out
    assert torch.load(run_dir / "best.pt", weights_only=False)["best_epoch"] == 2  # the new split's only score

    changed = overrides(shards, run_dir, "optim.lr=0.5", "seed=4", "optim.weight_decay=0.1")
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "--resume", *changed]) == 1
    err = capsys.readouterr().err  # the learning rate may change on resume (the remedy for a diverged loss)
    assert "optim.weight_decay: 0.05 -> 0.1; seed: 3 -> 4. Resume with the same settings" in err, err


class CrashingLoader:
    """Wraps a Loader; raises KeyboardInterrupt when batch `at` of epoch `epoch` is due (a kill)."""

    def __init__(self, inner, epoch: int, at: int):
        self.inner, self.epoch, self.at = inner, epoch, at

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, epoch):
        self.inner.set_epoch(epoch)

    @property
    def skipped(self):
        return self.inner.skipped

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def __iter__(self):
        for batch in self.inner:
            state = self.inner.state_dict()  # the position already counts this batch
            if (state["epoch"], state["position"]) == (self.epoch, self.at + 1):
                raise KeyboardInterrupt("simulated kill")
            yield batch


def test_resume_mid_epoch_is_exact_with_real_pipeline(shards, tmp_path):
    """Killed mid-epoch 1 and resumed from last.pt: the same losses, step by step, as an uninterrupted run."""
    from tdsclip.config import load_config
    from tdsclip.distributed import init_distributed
    from tdsclip.metrics import MetricsLogger

    def build(run_dir, *extra):
        config = load_config(ROOT / "configs/demo.yaml", overrides(shards, run_dir, "logging.tensorboard=false", *extra))
        torch.manual_seed(config.seed)
        log = MetricsLogger(run_dir, tensorboard=False, progress="plain")
        return build_trainer(config, init_distributed(), log)

    full = build(tmp_path / "full")
    full.fit()
    killed = build(tmp_path / "run", "checkpoint.every_steps=2")
    killed.train_loader = CrashingLoader(killed.train_loader, epoch=1, at=3)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = build(tmp_path / "run")
    resumed.restore(resumed.checkpointer.load_last())
    assert (resumed.state.epoch, resumed.state.step, resumed.state.batch_in_epoch) == (1, 4, 2)
    resumed.fit()
    expected = [h["loss"] for h in full.history]
    assert len(expected) == 6  # 2 epochs x 6 batches / 2 accumulation steps
    assert len(killed.history) == 4
    assert [h["loss"] for h in killed.history + resumed.history] == expected


def test_a_mid_epoch_checkpoint_of_another_process_count_is_refused_before_anything_is_built(shards, tmp_path,
                                                                                              capsys):
    run_dir = tmp_path / "run"
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, run_dir, "schedule.epochs=1")]) == 0
    checkpoint = torch.load(run_dir / "last.pt", weights_only=False)
    checkpoint.update(world_size=2, batch_in_epoch=1, epoch=0)  # as if 2 processes had stopped mid-epoch
    del checkpoint["checksum"]
    write_checkpoint(checkpoint, run_dir / "last.pt")
    capsys.readouterr()
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "--resume", *overrides(shards, run_dir)]) == 1
    out, err = capsys.readouterr()
    assert "written mid-epoch by 2 processes and this run has 1" in err
    assert "batch:" not in out  # refused before the loaders and the model were built


def test_torchrun_two_processes_gloo(shards, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch.py",
         "--cfg", "configs/demo.yaml", *overrides(shards, run_dir, "schedule.epochs=1")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch: 4 videos per step = 2 processes x 2 per device x 1 accumulation step" in result.stdout
    assert result.stdout.count("epoch 1/1: val top-1") == 1  # rank 0 prints, rank 1 does not
    assert result.stdout.count("CLIP weights: none") == 1
    checkpoint = torch.load(run_dir / "last.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2 and len(checkpoint["data"]) == 2
    assert checkpoint["data"][0]["epoch"] == 1
    again = subprocess.run(result.args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode != 0 and again.stderr.count("of an earlier run: pass --resume") == 1  # said once


GOLDEN_SIZES = ["model.width=64", "model.layers=2", "model.side_dim=64", "model.num_classes=5"]


@pytest.fixture(scope="module")
def five_class_shards(shards) -> Path:
    """The val videos packed with a labels file of the golden checkpoint's 5 classes."""
    videos, out = shards.parent / "videos", shards.parent / "shards5"
    labels = out.parent / "labels5.csv"
    labels.write_text("id,name\n" + "".join(f"{i},class {i}\n" for i in range(5)))
    run_tool("tools/make_shards.py", str(videos / "val.txt"), "--root", str(videos), "--out", str(out),
             "--split", "val", "--short-side", "0", "--workers", "1", "--labels", str(labels))
    return out


def test_predict_tool_scores_videos_as_the_test_mode_does(shards, five_class_shards, tmp_path, capsys):
    from shards.sources import read_list
    from shards.synthetic import indexed_frames, write_frame_folder
    from tools import predict

    videos = shards.parent / "videos"
    config = ["--cfg", str(ROOT / "configs/demo.yaml"),  # overrides as launch.py takes them
              *overrides(shards, tmp_path / "unused", "data.test_split=val", "data.eval_batch_size=2", *GOLDEN_SIZES)]
    (tmp_path / "broken.mp4").write_text("not a video")
    folder = tmp_path / "frames"
    write_frame_folder(folder, indexed_frames(6, 24, 24))
    sources = read_list(videos / "val.txt")
    inputs = [str(videos / s.path) for s in sources]
    code = predict.main([*inputs, str(tmp_path / "broken.mp4"), str(tmp_path / "missing.mp4"), str(folder), *config,
                         "--weights", str(GOLDEN), "--short-side", "0", "--test-crops", "3", "--test-clips", "2",
                         "--top", "3", "--json", str(tmp_path / "out" / "p.json")])
    out, err = capsys.readouterr()
    assert code == 1  # some inputs were skipped: named, and the others scored
    assert f"skipped {tmp_path / 'broken.mp4'}: undecodable" in err
    assert f"skipped {tmp_path / 'missing.mp4'}: no such video file or frame folder" in err
    written = json.loads((tmp_path / "out" / "p.json").read_text())
    predicted = written["predictions"]
    assert [p["input"] for p in predicted] == [*inputs, str(folder)]
    assert [s["input"] for s in written["skipped"]] == [str(tmp_path / "missing.mp4"), str(tmp_path / "broken.mp4")]
    assert out.splitlines()[0] == inputs[0]  # stdout holds the results only
    for p in predicted:  # three classes each, most probable first
        probabilities = [t["probability"] for t in p["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-6

    run_dir = tmp_path / "test"
    args = ["--cfg", str(ROOT / "configs/demo.yaml"), "--test", "--weights", str(GOLDEN), "--test-crops", "3",
            "--test-clips", "2", *overrides(five_class_shards, run_dir, "data.test_split=val", "data.eval_batch_size=2",
                                            *GOLDEN_SIZES)]
    assert launch.main(args) == 0
    tested = {v["key"]: [t["class"] for t in v["top5"][:3]]
              for v in json.loads((run_dir / "test_checkpoint_3x2.json").read_text())["videos"]}
    assert [[t["class"] for t in p["top"]] for p in predicted[:-1]] == [tested[s.key] for s in sources]
    assert predict.main([inputs[0], *config, "--weights", str(tmp_path / "missing.pt")]) == 2  # before any work
    assert "checkpoint not found" in capsys.readouterr().err
    assert predict.main([inputs[0], *config, "--weights", str(GOLDEN), "--json", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "labels.csv").write_text("id,name\n0,a\n1,b\n")
    assert predict.main([inputs[0], *config, "--weights", str(GOLDEN), "--classes", str(tmp_path / "labels.csv")]) == 2
    assert "labels.csv: 2 classes, but the weights have 5" in capsys.readouterr().err  # before any work
    assert predict.main([inputs[0], *config, "--weights", str(GOLDEN), "--test-crops", "10"]) == 0
    assert "eval.test_crops=10 adds the mirror image of each crop" in capsys.readouterr().err  # data.flip: none


def test_multiview_test_on_official_checkpoint(five_class_shards, tmp_path, capsys):
    from shards.sources import read_list

    official = tdsclip.load_model(GOLDEN, num_segments=2)
    run_dir = tmp_path / "test"
    args = ["--cfg", str(ROOT / "configs/demo.yaml"), "--test", "--weights", str(GOLDEN), "--test-crops", "3",
            "--test-clips", "2", *overrides(five_class_shards, run_dir, "data.test_split=val", "data.eval_batch_size=2",
                                            *GOLDEN_SIZES)]
    assert launch.main(args) == 0
    assert "test (3 crops x 2 clips" in capsys.readouterr().out
    recorded = (run_dir / "test_config.yaml").read_text()
    assert "test_crops: 3" in recorded and "test_clips: 2" in recorded
    result = json.loads((run_dir / "test_checkpoint_3x2.json").read_text())  # named after the weights and views
    num_val = pipelines.Loader(shard_paths(five_class_shards, "val"), ClipSpec(split="val"), 4).num_videos
    assert result["num_videos"] == num_val and result["views"] == 6 and result["weights"] == str(GOLDEN)
    keys = [v["key"] for v in result["videos"]]
    assert len(set(keys)) == len(keys) == num_val  # every video once
    listed = {s.path for s in read_list(five_class_shards.parent / "videos" / "val.txt")}
    assert {v["source"] for v in result["videos"]} == listed  # each named by the input it was packed from
    hits = [v["top5"][0]["class"] == v["label"] for v in result["videos"]]
    assert result["top1"] == pytest.approx(100 * sum(hits) / len(hits))
    assert all(v["label_name"] == f"class {v['label']}" and v["top5"][0]["name"] == f"class {v['top5'][0]['class']}"
               for v in result["videos"])
    per_class = {c["class"]: c for c in result["per_class"]}
    for label in range(5):  # per-class accuracy from the per-video results
        mine = [v["top5"][0]["class"] == label for v in result["videos"] if v["label"] == label]
        assert per_class[label]["videos"] == len(mine)
        assert per_class[label]["top1"] == (pytest.approx(100 * sum(mine) / len(mine)) if mine else None)

    # the first video's prediction equals the softmax mean over its 6 views computed directly
    spec = ClipSpec(split="test", num_segments=2, image_size=16, resize=18, test_crops=3, test_clips=2)
    loader = pipelines.Loader(shard_paths(five_class_shards, "val"), spec, 1, seed=3)
    batch = next(iter(loader))
    with torch.no_grad():
        probs = official(batch["clips"]).softmax(-1).mean(0)  # (6 views, C) -> (C,)
    top = probs.topk(5)
    by_key = {v["key"]: v["top5"] for v in result["videos"]}
    assert [c["class"] for c in by_key[batch["key"][0]]] == top.indices.tolist()
    assert [c["probability"] for c in by_key[batch["key"][0]]] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_test_and_predict_configs_are_bound_to_the_checkpoint(shards, five_class_shards, tmp_path, capsys):
    from shards.sources import read_list

    run_dir = tmp_path / "run"
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, run_dir, "schedule.epochs=1")]) == 0
    capsys.readouterr()
    test = ["--cfg", str(ROOT / "configs/demo.yaml"), "--test", "--weights", str(run_dir / "last.pt")]
    for override, message in (("model.num_segments=4", "model.num_segments: 2 in the weights' training config, 4 here"),
                              ("data.resize=20", "data.resize: 18 in the weights' training config, 20 here"),
                              ("data.sampling=kinetics", "data.sampling: 'something' in the weights' training")):
        assert launch.main([*test, *overrides(shards, tmp_path / "t", override)]) == 1
        assert message in capsys.readouterr().err
    from tools import predict  # predict is bound the same way, before any work

    video = str(shards.parent / "videos" / read_list(shards.parent / "videos" / "val.txt")[0].path)
    assert predict.main([video, "--cfg", str(ROOT / "configs/demo.yaml"), "--weights", str(run_dir / "last.pt"),
                         *overrides(shards, tmp_path / "t", "model.num_segments=4")]) == 2
    assert "model.num_segments: 2 in the weights' training config, 4 here" in capsys.readouterr().err
    # views, batch size and threads are free
    free = overrides(shards, tmp_path / "t", "data.test_split=val", "data.eval_batch_size=3", "data.num_threads=2")
    assert launch.main([*test, *free, "--test-crops", "3"]) == 0
    capsys.readouterr()
    # an official checkpoint records no config: its tensors must fit the given sizes
    official = ["--cfg", str(ROOT / "configs/demo.yaml"), "--test", "--weights", str(GOLDEN)]
    assert launch.main([*official, *overrides(five_class_shards, tmp_path / "t", "data.test_split=val")]) == 1
    assert "model.width: 64 in the tensors, 32 in the config" in capsys.readouterr().err
    # weights of another class count than the shards': an error, not a silent score
    assert launch.main([*official, *overrides(shards, tmp_path / "t", "data.test_split=val", *GOLDEN_SIZES)]) == 1
    assert "names 3 classes and the weights" in capsys.readouterr().err


@pytest.mark.parametrize("rank, local_rank, printed", [(0, 0, {"config", "files", "samples", "loss"}),
                                                       (1, 1, {"samples"}), (2, 0, {"config", "files", "samples"})])
def test_errors_are_said_once_per_node_or_by_the_rank_they_concern(rank, local_rank, printed, capsys):
    from tdsclip.metrics import MetricsLogger
    from tdsclip.run import report_error
    from tdsclip.train import NonFiniteLossError

    world = World(rank=rank, world_size=4, local_rank=local_rank, device=torch.device("cpu"))
    errors = {"config": ConfigError("optim.lr: bad"), "files": FileNotFoundError("no /data/shards"),
              "samples": pipelines.ShardReadError("train-000001.tar: sample 'v7': frame 3 is not a JPEG"),
              "loss": NonFiniteLossError("training loss is nan at optimizer step 7")}
    said = set()
    for kind, error in errors.items():
        report_error(error, world, MetricsLogger("unused", tensorboard=False, progress="plain"))
        err = capsys.readouterr().err
        if err:
            said.add(kind)
            assert f"error (rank {rank}): {error}" in err
    assert said == printed


def test_help_and_config_errors_come_before_torch_is_imported():
    code = ("import sys, launch; status = launch.main(['--cfg', 'configs/demo.yaml', 'optim.lr=-1']); "
            "print(status, 'torch' in sys.modules, 'open_clip' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False", "False"], result.stderr
    assert result.stderr == "config error: configs/demo.yaml: optim.lr: must be > 0, got -1.0\n"


def test_a_run_prints_and_applies_its_cpu_budget(shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["--cfg", str(ROOT / "configs/demo.yaml"), *overrides(shards, run_dir, "schedule.epochs=1", "cpu.cpus=3",
                                                                 "cpu.torch_threads=1")]
    assert launch.main(args) == 0
    assert "CPU budget: 3 CPUs (set in the config) -> torch 1 thread(s), DALI 1 thread(s), 0 reader process(es)" \
        in capsys.readouterr().out  # data.num_threads=1 (TINY) sets DALI's share
    assert torch.get_num_threads() == 1
    assert launch.main(["--cfg", str(ROOT / "configs/demo.yaml"), "cpu.torch_threads=0"]) == 2
    assert "cpu.torch_threads: must be >= 1" in capsys.readouterr().err
