"""The trainer with stand-ins (a tiny module, a list-like fake loader): exact resume, the
non-finite loss guard, atomic checkpoints, multi-view evaluation, batch split and mixup,
TensorBoard scalars."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tdsclip.build import build_mixup, derive_batch
from tdsclip.checkpoint import Checkpointer
from tdsclip.checkpoint_file import CheckpointError, write_checkpoint
from tdsclip.config import CheckpointSection, ConfigError, EvalSection, LoggingSection, OptimSection
from tdsclip.distributed import World
from tdsclip.evaluate import evaluate
from tdsclip.metrics import MetricsLogger
from tdsclip.optim import WarmupCosineSchedule, build_optimizer
from tdsclip.train import NonFiniteLossError, Trainer

CLIP_SHAPE = (2, 1, 3, 4, 4)  # (T, M, 3, H, W)
NUM_CLASSES = 3


@dataclass
class TinyConfig:
    num_classes: int = NUM_CLASSES


class TinyModel(nn.Module):
    """Frozen 'backbone', a side layer with BatchNorm and dropout (uses the RNG), a head."""

    def __init__(self):
        super().__init__()
        self.config = TinyConfig()
        self.backbone = nn.Linear(96, 16)
        self.backbone.requires_grad_(False)
        self.side = nn.Linear(16, 16)
        self.side_bn = nn.BatchNorm1d(16)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, clips):
        x = self.backbone(clips.flatten(1))  # (B, 96) -> (B, 16)
        return self.head(self.dropout(torch.relu(self.side_bn(self.side(x)))))


class FakeLoader:
    """Deterministic batches per (seed, epoch, position); resumable like pipelines' Loader."""

    def __init__(self, num_batches=5, batch_size=4, seed=0, views=1, crash_at=None, nan_from_epoch=None):
        self.num_batches, self.batch_size, self.seed, self.views = num_batches, batch_size, seed, views
        self.epoch, self.position = 0, 0
        self.crash_at, self.nan_from_epoch = crash_at, nan_from_epoch
        self.closed = 0
        self.skipped = []

    def __len__(self):
        return self.num_batches

    def set_epoch(self, epoch):
        self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = state["epoch"], state["position"]

    def close(self):
        self.closed += 1

    def __iter__(self):
        if self.position >= self.num_batches:  # a finished epoch: the next iteration is the next epoch
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < self.num_batches:
            if self.crash_at == (self.epoch, self.position):
                raise KeyboardInterrupt("simulated crash")
            g = torch.Generator().manual_seed(self.seed * 10_000 + self.epoch * 100 + self.position)
            labels = torch.randint(NUM_CLASSES, (self.batch_size,), generator=g)
            clips = torch.randn(self.batch_size, *CLIP_SHAPE, generator=g) + labels.view(-1, 1, 1, 1, 1, 1)
            if self.nan_from_epoch is not None and self.epoch >= self.nan_from_epoch:
                clips = clips * float("nan")
            self.position += 1
            yield {"clips": clips.repeat_interleave(self.views, 0), "label": labels.repeat_interleave(self.views, 0),
                   "key": [f"v{self.epoch}_{self.position}_{i}" for i in range(self.batch_size)]}


def make_trainer(tmp_path, *, epochs=2, accum=2, checkpoint_every=0, loader=None, seed=0, tensorboard=False):
    torch.manual_seed(seed)
    model = TinyModel()
    optimizer = build_optimizer(model, lr=0.05, weight_decay=0.15)
    return Trainer(
        model=model, train_model=model, eval_model=model, optimizer=optimizer,
        schedule=WarmupCosineSchedule(optimizer, epochs=epochs, warmup_epochs=0.5),
        train_loader=loader or FakeLoader(), val_loader=FakeLoader(num_batches=2, seed=99),
        checkpointer=Checkpointer(tmp_path),
        metrics=MetricsLogger(tmp_path, tensorboard=tensorboard, progress="plain"),
        world=World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
        optim=OptimSection(lr=0.05, label_smoothing=0.1), checkpointing=CheckpointSection(every_steps=checkpoint_every),
        evaluation=EvalSection(), logging=LoggingSection(log_every=1), accum_steps=accum,
    )


def test_resume_matches_uninterrupted_run_step_by_step(tmp_path):
    full = make_trainer(tmp_path / "full", epochs=3)
    full.fit()
    expected = [h["loss"] for h in full.history]
    assert len(expected) == 6  # 3 epochs x floor(5 batches / 2 accumulation): the 5th makes no whole step

    crashed = make_trainer(tmp_path / "run", epochs=3, checkpoint_every=2, loader=FakeLoader(crash_at=(1, 4)))
    with pytest.raises(KeyboardInterrupt):
        crashed.fit()
    first_part = [h["loss"] for h in crashed.history]  # steps 1..4 (last.pt written at step 4, then the crash)
    assert len(first_part) == 4

    resumed = make_trainer(tmp_path / "run", epochs=3, seed=123)  # other init and RNG: restore must overwrite
    resumed.restore(resumed.checkpointer.load_last())
    assert (resumed.state.epoch, resumed.state.step, resumed.state.batch_in_epoch) == (1, 4, 4)
    resumed.fit()
    assert first_part + [h["loss"] for h in resumed.history] == expected  # exactly equal, not approx
    for name, tensor in full.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3, loader=FakeLoader(nan_from_epoch=1))
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at optimizer step 3 \(epoch 2\).*last.pt.*"
                                                 r"rerun the same command with --resume optim.lr=0.005"):
        trainer.fit()
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, 2)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values() if t.is_floating_point())


def test_a_failed_checkpoint_write_keeps_the_old_file_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    write_checkpoint({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"cannot write .*last\.pt: OSError: disk full .*GiB free.*the previous "
                                              r"last\.pt is kept"):
        write_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary left behind


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "copy"])
def test_best_keeps_its_epoch_while_last_moves_on(tmp_path, monkeypatch, links):
    if not links:
        monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError("no links here")))
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save({"epoch": 1}, best=True)
    checkpointer.save({"epoch": 2})
    assert torch.load(tmp_path / "best.pt")["epoch"] == 1
    assert torch.load(tmp_path / "last.pt")["epoch"] == 2
    checkpointer.save({"epoch": 3}, best=True)
    assert torch.load(tmp_path / "best.pt")["epoch"] == 3
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temporary left behind


def test_load_last_names_a_damaged_or_foreign_file(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    assert checkpointer.load_last() is None
    (tmp_path / "last.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match=r"last\.pt.*truncated"):
        checkpointer.load_last()
    torch.save({"model": {}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="not a resumable tdsclip training checkpoint"):
        checkpointer.load_last()


def test_a_failing_validation_keeps_the_trained_epoch(tmp_path):
    trainer = make_trainer(tmp_path, epochs=2)
    trainer.val_loader = FakeLoader(num_batches=2, crash_at=(0, 1))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    last = trainer.checkpointer.load_last()
    assert (last["epoch"], last["batch_in_epoch"], last["step"]) == (1, 0, 2) and last["validation_due"]
    assert not (tmp_path / "best.pt").exists()
    resumed = make_trainer(tmp_path, epochs=2)
    resumed.restore(last)
    resumed.fit()  # validates epoch 1 first, then trains and validates epoch 2
    assert [v["epoch"] for v in resumed.val_history] == [1, 2] and (tmp_path / "best.pt").exists()
    assert not resumed.checkpointer.load_last()["validation_due"]


def test_a_redone_validation_no_longer_due_clears_the_flag(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.val_loader = FakeLoader(num_batches=2, crash_at=(0, 1))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    resumed = make_trainer(tmp_path, epochs=3, checkpoint_every=1, loader=FakeLoader(crash_at=(1, 3)))
    resumed.evaluation = EvalSection(skip_epochs=[0])  # the resume no longer validates after epoch 1
    resumed.restore(resumed.checkpointer.load_last())
    with pytest.raises(KeyboardInterrupt):
        resumed.fit()
    last = resumed.checkpointer.load_last()
    assert last["batch_in_epoch"] > 0 and not last["validation_due"]  # a mid-epoch state owes no validation


def test_resume_on_other_data_is_a_checkpoint_error(tmp_path):
    make_trainer(tmp_path, epochs=1).fit()
    other = make_trainer(tmp_path, epochs=1)

    def refuse(state):  # what pipelines.Loader says when the shards hold another number of videos
        raise ValueError("loader state: num_videos 12 was saved, this loader has 15")

    other.train_loader.load_state_dict = refuse
    with pytest.raises(CheckpointError, match="num_videos 12 .*: the training data differ"):
        other.restore(other.checkpointer.load_last())


def test_skipped_samples_are_named_once(tmp_path, capsys):
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.train_loader.skipped = ["train-000000.tar:bad_video"]
    trainer.fit()
    out = capsys.readouterr().out
    assert out.count("train-000000.tar:bad_video") == 1
    assert "skipped 1 unreadable sample(s)" in out


def test_checkpoint_holds_contract_keys_and_best(tmp_path):
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.fit()
    checkpoint = torch.load(tmp_path / "last.pt", weights_only=False)
    assert checkpoint["format"] == "tdsclip" and checkpoint["version"] == 1
    assert checkpoint["model_config"] == {"num_classes": NUM_CLASSES}
    assert set(checkpoint["model"]) == set(trainer.model.state_dict())
    assert {"optimizer", "schedule", "rng", "data", "step", "epoch", "config"} <= set(checkpoint)
    assert (tmp_path / "best.pt").is_file()


def test_each_validation_sees_every_batch_and_then_releases_the_loader(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.fit()
    assert [v["epoch"] for v in trainer.val_history] == [1, 2, 3]
    assert trainer.val_loader.epoch == 2 and trainer.val_loader.position == trainer.val_loader.num_batches
    assert trainer.val_loader.closed == 3  # its pipeline (GPU buffers, prefetched batches) freed for training


class ViewLogits(nn.Module):
    """Returns the first NUM_CLASSES numbers of each clip as its logits."""

    def forward(self, clips):
        return clips.flatten(1)[:, :NUM_CLASSES]


def test_evaluate_averages_softmax_over_views_and_skips_padding():
    def clip(*logits):
        x = torch.zeros(1, *CLIP_SHAPE)
        x.view(1, -1)[0, :NUM_CLASSES] = torch.tensor(logits)
        return x

    # video a (label 0): views disagree; softmax mean picks 0 (logit mean would pick 1)
    # video b (label 2): both views say 2; video c (label 1): predicted 0; d: padding (valid False)
    clips = torch.cat([clip(10, 0, 0), clip(0, 4, 0), clip(0, 0, 5), clip(0, 0, 5),
                       clip(3, 0, 0), clip(3, 0, 0), clip(9, 9, 9), clip(9, 9, 9)])
    batch = {"clips": clips, "label": torch.tensor([0, 0, 2, 2, 1, 1, 0, 0]),
             "valid": torch.tensor([True] * 6 + [False] * 2), "key": list("aabbccdd")}
    result = evaluate(ViewLogits(), [batch], views=2, num_classes=NUM_CLASSES, device=torch.device("cpu"),
                      keep_predictions=True)
    assert result["num_videos"] == 3
    assert result["top1"] == pytest.approx(100 * 2 / 3)
    assert result["top5"] == pytest.approx(100.0)  # 3 classes: top-5 holds every class
    assert result["mean_class_acc"] == pytest.approx(100 * (1 + 0 + 1) / 3)
    assert [p["key"] for p in result["predictions"]] == ["a", "b", "c"]
    assert [p["top5"][0] for p in result["predictions"]] == [0, 2, 0]


@pytest.mark.parametrize("global_batch, world, cap, expected", [
    (128, 8, 16, (16, 1)), (128, 1, 16, (16, 8)), (128, 2, 16, (16, 4)), (12, 1, 5, (4, 3)), (8, 2, 16, (4, 1)),
])
def test_derive_batch(global_batch, world, cap, expected):
    assert derive_batch(global_batch, world, cap) == expected


def test_derive_batch_rejects_indivisible_world():
    with pytest.raises(ConfigError, match="global_batch_size=128 is not divisible by the 3 processes"):
        derive_batch(128, 3, 16)


def test_mixup_mixes_clips_and_soft_targets():
    mixup = build_mixup(num_classes=NUM_CLASSES, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                        label_smoothing=0.1)
    clips = torch.randn(4, *CLIP_SHAPE)
    mixed, targets = mixup(clips.clone(), torch.tensor([0, 1, 2, 0]))
    assert mixed.shape == clips.shape and targets.shape == (4, NUM_CLASSES)
    assert torch.allclose(targets.sum(-1), torch.ones(4))
    assert not torch.equal(mixed, clips)


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, epochs=2, tensorboard=True)
    trainer.fit()
    trainer.metrics.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/clips_per_s", "train/step_time_s", "train/data_wait_frac",
            "sys/host_rss_gib", "val/top1", "val/top5"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.value for e in losses] == pytest.approx([h["loss"] for h in trainer.history])
    assert all(0 <= e.value <= 1 for e in events.Scalars("train/data_wait_frac"))
    assert all(e.value > 0 for e in events.Scalars("train/clips_per_s"))


def test_logged_losses_are_the_mean_over_ranks_and_a_nan_on_any_rank_stops_every_rank(tmp_path, monkeypatch):
    import tdsclip.train as train_module

    trainer = make_trainer(tmp_path)
    trainer.world = World(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    other_rank = torch.tensor([3.0, 5.0])
    monkeypatch.setattr(train_module, "all_reduce_sum", lambda t: t + other_rank)  # what rank 1 adds
    assert trainer._check_finite([torch.tensor(1.0), torch.tensor(2.0)]) == [2.0, 3.5]
    other_rank = torch.tensor([3.0, float("nan")])  # only the other rank diverged
    with pytest.raises(NonFiniteLossError, match="at optimizer step 0"):
        trainer._check_finite([torch.tensor(1.0), torch.tensor(2.0)])


def test_a_resumed_run_hides_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path, monkeypatch):
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    interrupted = MetricsLogger(tmp_path)
    interrupted.start_at(1)
    for step in range(1, 11):  # checkpoint at step 5, then steps 6-10 logged before the interruption
        interrupted.log(step, {"train/loss": 1.0})
    interrupted.close()
    later = time.time() + 60  # event files are read in name order, and their names start with the time
    monkeypatch.setattr(time, "time", lambda: later)
    resumed = MetricsLogger(tmp_path)
    resumed.start_at(6)
    for step in range(6, 9):
        resumed.log(step, {"train/loss": 2.0})
    resumed.close()
    assert sorted(os.listdir(tmp_path))[-1].startswith(f"events.out.tfevents.{int(later)}")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(s, 1.0) for s in range(1, 6)] + [
        (s, 2.0) for s in range(6, 9)]


def test_validation_runs_at_eval_precision_not_the_training_one(tmp_path, monkeypatch):
    import tdsclip.train as train_module

    seen = []
    real = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **kw: seen.append(kw["precision"]) or real(*a, **kw))
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.precision, trainer.evaluation = "bf16", EvalSection(precision="fp32")
    trainer.fit()
    assert seen == ["fp32"]


def read_images(run_dir, tag: str) -> list:
    """The images TensorBoard holds under `tag`, decoded to (H, W, 3) uint8 arrays."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    return [np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")) for e in events.Images(tag)]


def test_tensorboard_shows_the_clips_the_model_sees_and_each_validations_confusion_matrix(tmp_path):
    import numpy as np

    from tdsclip import pictures

    names = ["left", "right", "still"]
    trainer = make_trainer(tmp_path, epochs=2, accum=1, tensorboard=True)
    trainer.class_names = names
    trainer.fit()
    trainer.metrics.close()
    shown = read_images(tmp_path, "train/clips")
    assert len(shown) == 2  # at the start of training and of the next epoch
    for epoch, image in enumerate(shown):
        loader = FakeLoader()
        loader.set_epoch(epoch)
        expected, captions = pictures.batch_sheet(next(iter(loader)), names, count=4)  # the loader's frames de-normalised
        assert np.array_equal(image, expected) and captions[0].split(" | ")[0] in names

    confusion = read_images(tmp_path, "val/confusion")[-1]  # after the last epoch, with the final weights
    val = FakeLoader(num_batches=2, seed=99)
    val.set_epoch(1)  # the second pass over the val loader
    result = evaluate(trainer.eval_model, val, views=1, num_classes=NUM_CLASSES, device=torch.device("cpu"),
                      keep_predictions=True)
    assert np.array_equal(confusion, pictures.confusion_image(np.asarray(result["confusion"]), names))
    matrix = pictures.confusion_matrix([p["label"] for p in result["predictions"]],
                                       [p["top5"][0] for p in result["predictions"]], NUM_CLASSES)
    assert matrix.tolist() == result["confusion"]  # the matrix the image shows is the test results' own


def test_a_tie_with_the_best_top1_saves_the_later_epoch_as_the_official_loop(tmp_path, monkeypatch):
    import tdsclip.train as train_module

    scores = iter([50.0, 40.0, 50.0])  # epoch 3 ties epoch 1
    real = train_module.evaluate

    def scripted(*args, **kwargs):
        result = real(*args, **kwargs)
        return dict(result, top1=next(scores))

    monkeypatch.setattr(train_module, "evaluate", scripted)
    trainer = make_trainer(tmp_path, epochs=3)
    trainer.fit()
    assert (trainer.state.best_top1, trainer.state.best_epoch) == (50.0, 2)
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 3
