"""`Loader`: batches of clips from shards, on the training device, one epoch per iteration (built from a
DataConfig by pipelines.build_loader, or from tar paths and a ClipSpec here)."""

import contextlib
import os
import signal
from multiprocessing import resource_tracker
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from nvidia.dali import types

from pipelines.config import ON_ERROR
from pipelines.pipeline import eval_pipeline, train_pipeline
from pipelines.plan import ClipSpec, EpochPlan, Planner
from pipelines.reader import ShardFiles, ShardReadError, SharedRanges, check_sample, read_samples
from pipelines.source import ClipSource

# Reader processes on CUDA (py_workers=None). One process feeds well over 400 clips/s on a 2-core
# CPU (docs/benchmarks.md, "Host-side feed"): 4 give the target a wide margin, overlap reads that
# miss the page cache, and keep the training loop's thread free. They share the byte-range index
# through one mapped file.
GPU_PY_WORKERS = 4


class Loader:
    """Iterable over the batches of one epoch of one rank.

    Batches are dicts, B = videos x views clips: `clips` (B, T, M, 3, S, S) normalized, on `device`, in
    `dtype`; `label` (B,) int64 on `device` (after the flip swap); `valid` (B,) bool on `device` (False
    on padding); `flipped` (B,) bool on `device`: the clip is mirrored (a train flip, or a mirrored test
    crop); `label_swapped` (B,) bool on `device`: its label was swapped because it was mirrored
    (data.flip "swap"); `key` list of B str. A video's views are adjacent (view-major: crop/sample
    outer, temporal clip inner).

    Every rank yields len(self) batches per epoch (see plan.rank_rows for padding and dropping).
    The position advances as batches are yielded; after the last batch of epoch e the loader
    stands at epoch e+1, batch 0. set_epoch(e) moves to epoch e (keeping the position if the
    loader is already in epoch e); state_dict()/load_state_dict() save and restore it.

    One DALI pipeline serves consecutive epochs: its source streams batch after batch over epoch
    boundaries (pipelines/source.py), so a new epoch costs no build and finds the pipeline's
    prefetch queue already filled. It is rebuilt only when the position jumps (set_epoch to
    another epoch, load_state_dict) or after a skipped sample.
    """

    def __init__(self, tars: list[str], spec: ClipSpec, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device=None, dtype: torch.dtype = torch.float32,
                 num_threads: int | None = None, on_error: str = "raise", py_workers: int | None = None,
                 hw_decoder_load: float | None = None, classes: list[str] | None = None):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        batch_size = int(batch_size)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        self.spec, self.batch_size, self.rank, self.world_size = spec, batch_size, rank, world_size
        self.seed, self.dtype, self.on_error = seed, dtype, on_error
        self.samples = read_samples(tars)
        self.classes = classes  # the manifest's class names (build_loader); None when built from tar paths
        self.mode = "video" if self.samples[0].layout == "video" else "frame"
        self.device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.num_threads = num_threads or _default_threads()
        cuda = self.device.type == "cuda"
        if cuda and not torch.cuda.is_available():
            raise ValueError(f"device {self.device}: CUDA is not available here; use device='cpu' (or None)")
        self.py_workers = py_workers if py_workers is not None else GPU_PY_WORKERS if cuda else 0
        if self.py_workers < 0:
            raise ValueError(f"py_workers must be >= 0, got {py_workers}")
        self.hw_decoder_load = hw_decoder_load
        self._shared = SharedRanges(self.samples) if self.py_workers else None
        self._skipped_ids: set[int] = set()
        self._epoch, self._position = 0, 0
        self._planner = self._new_planner()  # raises on a bad rank
        self._batches_per_epoch = self._planner.num_batches
        self._pipe, self._pipe_planner, self._pipe_next = None, None, -1  # global batch the pipe yields next

    # --- size and position -----------------------------------------------------------------
    def __len__(self) -> int:
        return self._batches_per_epoch

    @property
    def num_videos(self) -> int:
        """Videos in the shards this loader reads (all ranks together)."""
        return len(self.samples)

    @property
    def num_samples(self) -> int:
        """This rank's real (valid) videos per epoch."""
        return int(self._plan(self._epoch).valid.sum())

    @property
    def skipped(self) -> list[str]:
        """"shard:key" of every sample skipped after a read or decode error (on_error="skip")."""
        return [f"{self.samples[i].tar}:{self.samples[i].key}" for i in sorted(self._skipped_ids)]

    @property
    def views(self) -> int:
        """Clips per video in a batch: num_sample (train), test_crops * test_clips (test), 1 (val)."""
        return self.spec.num_views * self.spec.num_clips

    @property
    def epoch(self) -> int:
        return self._cursor()[0]

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (its own shuffle); stays put mid-epoch if already there (resume)."""
        if epoch != self._cursor()[0]:
            self._epoch, self._position = epoch, 0

    def state_dict(self) -> dict:
        epoch, position = self._cursor()
        return {"epoch": epoch, "position": position, "seed": self.seed, "world_size": self.world_size,
                "num_videos": len(self.samples), "skipped": sorted(self._skipped_ids)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by state_dict(); the data, seed and world size must match."""
        for name, mine in (("seed", self.seed), ("world_size", self.world_size), ("num_videos", len(self.samples))):
            if state[name] != mine:
                raise ValueError(f"loader state: {name} {state[name]} was saved, this loader has {mine}")
        self._skipped_ids = set(state.get("skipped", ()))
        self._epoch, self._position = state["epoch"], state["position"]

    def _cursor(self) -> tuple[int, int]:
        if self._position >= len(self):
            return self._epoch + 1, 0
        return self._epoch, self._position

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """The plan of `epoch` (default: the current one): videos, frames and crops of every batch."""
        return self._plan(self._cursor()[0] if epoch is None else epoch)

    def _plan(self, epoch: int) -> EpochPlan:
        return self.planner(epoch)

    def _new_planner(self) -> Planner:
        return Planner(self.samples, self.spec, self.batch_size, rank=self.rank, world_size=self.world_size,
                       seed=self.seed, skipped=frozenset(self._skipped_ids), shared=self._shared)

    @property
    def planner(self) -> Planner:
        """The epoch plans this loader's pipeline reads (remade when a sample is skipped): e.g. for a
        ClipSource of one's own, as tools/bench_pipeline.py builds cut graphs on ours."""
        if self._planner.skipped != frozenset(self._skipped_ids):
            self._planner = self._new_planner()
        return self._planner

    # --- iteration -------------------------------------------------------------------------
    def __iter__(self):
        self._epoch, self._position = self._cursor()
        epoch, per_epoch = self._epoch, len(self)
        while self._position < per_epoch:
            batch_index = self._position
            target = epoch * per_epoch + batch_index
            planner = self.planner
            if self._pipe is None or self._pipe_next != target or self._pipe_planner is not planner:
                self._close_pipe()
                self._pipe, self._pipe_planner, self._pipe_next = self._build(planner, target), planner, target
            try:
                outputs = self._pipe.run()
            except Exception as error:  # DALI reports decode and read errors here
                self._close_pipe()
                self._handle_failure(target, error)
                continue
            self._pipe_next += 1
            batch = self._assemble(outputs, planner(epoch), batch_index)
            self._position = batch_index + 1
            yield batch

    def close(self) -> None:
        """Release the DALI pipeline (its prefetched batches, GPU buffers, reader processes) now; the
        next iteration builds a new one. E.g. for a validation loader between evaluations."""
        self._close_pipe()
        if self.device.type == "cuda":  # a dropped pipeline's device memory goes back to DALI's pool, not to CUDA
            from nvidia.dali.backend import ReleaseUnusedMemory

            ReleaseUnusedMemory()

    def _close_pipe(self) -> None:
        pipe, self._pipe, self._pipe_planner, self._pipe_next = self._pipe, None, None, -1
        if pipe is not None:
            shut_down(pipe)

    def _build(self, planner: Planner, start: int):
        """A pipeline streaming this rank's batches from global batch `start` (= epoch * len + batch) on."""
        spec = self.spec
        cuda = self.device.type == "cuda"
        # CPU decode of frames reads only the window the crops need (docs/pipelines.md, "Crop decode"); the
        # GPU's hardware JPEG decoder decodes whole frames, and RandAugment works on the whole frame.
        source = ClipSource(planner, self.mode, start, grayscale=spec.train and spec.grayscale_prob > 0,
                            randaugment=spec.randaugment is not None,
                            crop_decode=self.mode == "frame" and spec.randaugment is None and not cuda)
        frames = spec.frames_per_video if self.mode == "frame" else 1
        decoder_options = {}
        if cuda and self.hw_decoder_load is not None and self.mode == "frame":
            decoder_options["hw_decoder_load"] = self.hw_decoder_load
        seed = int(np.random.SeedSequence([self.seed, self.rank, start]).generate_state(1)[0] >> 1)
        options = dict(batch_size=self.batch_size * frames, num_threads=self.num_threads, seed=seed,
                       device_id=_cuda_index(self.device) if cuda else None, prefetch_queue_depth=2,
                       py_num_workers=max(1, self.py_workers), py_start_method="spawn",
                       image_size=spec.image_size, decode_device="mixed" if cuda else "cpu",
                       dtype=types.FLOAT16 if self.dtype == torch.float16 else types.FLOAT,
                       parallel=self.py_workers, decoder_options=decoder_options)
        if spec.train:
            pipe = train_pipeline(source, randaugment_levels=spec.randaugment[0] if spec.randaugment else 0,
                                  **options)
        else:
            pipe = eval_pipeline(source, **options)
        with ctrl_c_held() if self.py_workers else contextlib.nullcontext():
            pipe.build()  # starts the reader processes (py_workers)
        return pipe

    def _assemble(self, outputs, plan: EpochPlan, batch_index: int) -> dict:
        rows = slice(batch_index * plan.batch_size, (batch_index + 1) * plan.batch_size)
        spec, size = self.spec, self.spec.image_size
        views = _to_torch(outputs, self.device)  # (O, B*F, 3, S, S) or (O, B, F, 3, S, S); F = K*T*M
        views = views.view(spec.num_views, plan.batch_size, -1, 3, size, size)
        clips = rearrange(views, "o b (k t m) c h w -> (b o k) t m c h w", k=spec.num_clips,
                          t=spec.num_segments).to(self.dtype)  # a video's views adjacent, as evaluate() expects
        per_clip = _clip_order(spec.num_clips)
        original = np.array([self.samples[i].label for i in plan.sample[rows]], np.int64)  # (B,) before any swap
        valid = np.repeat(plan.valid[rows], spec.num_views * spec.num_clips)
        keys = [self.samples[i].key for i in plan.sample[rows] for _ in range(spec.num_views * spec.num_clips)]
        arrays = {"label": per_clip(plan.label[rows]), "valid": valid, "flipped": per_clip(plan.mirror[rows] != 0),
                  "label_swapped": per_clip(plan.label[rows] != original[:, None])}
        return {"clips": clips, **{name: torch.from_numpy(a).to(self.device) for name, a in arrays.items()},
                "key": keys}

    def _handle_failure(self, target: int, error: Exception) -> None:
        """Find the sample(s) that broke global batch `target`; raise naming them, or record them as skipped."""
        files, bad, rows = ShardFiles(), {}, []
        for g in range(target, target + 3):  # the failure may come from a prefetched batch
            plan = self._plan(g // len(self))
            first = (g % len(self)) * plan.batch_size
            rows += [(plan.sample[r], plan.frames[r]) for r in range(first, first + plan.batch_size)]
        for index, frames in rows:
            index = int(index)
            if index in bad or index in self._skipped_ids:
                continue
            try:
                check_sample(files, self.samples[index], frames)
            except ShardReadError as failure:
                bad[index] = failure
        files.close()
        if not bad:
            keys = ", ".join(f"{Path(self.samples[i].tar).name}:{self.samples[i].key}" for i, _ in rows)
            raise ShardReadError(f"DALI failed on a batch of [{keys}]: {error}") from error
        if self.on_error == "raise":
            raise next(iter(bad.values())) from error
        self._skipped_ids.update(bad)


def shut_down(pipe) -> None:
    """Stop a DALI pipeline's threads and reader processes now, in the caller's thread.

    DALI 2.4 has no public call for this: a pipeline shuts down in its __del__, which takes ~0.3 s,
    and Python drops a Ctrl-C that arrives inside __del__ (the run would go on). Its private
    `_shutdown` is what __del__ calls; this is the one place that uses it.
    """
    pipe._shutdown()


@contextlib.contextmanager
def ctrl_c_held():
    """Block Ctrl-C (SIGINT) in this thread meanwhile; one that arrives is not lost: it is delivered as
    KeyboardInterrupt when the block lifts (or at once through another thread that does not block it).

    Processes started meanwhile (DALI's reader processes) inherit the block through fork and exec and
    keep it for life, so a Ctrl-C, which a terminal sends to every process of the group, never
    interrupts them, not even while they start: the main process alone stops, and shuts them down
    (each would otherwise print a traceback).
    """
    resource_tracker.ensure_running()  # multiprocessing unblocks SIGINT when it starts this helper process
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _default_threads() -> int:
    """This process's share of the cores: torchrun starts LOCAL_WORLD_SIZE processes per node."""
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def _clip_order(num_clips: int):
    """(B, O) per-view plan values -> (B*O*K,) per clip, in the batch's order (each of a view's K
    temporal clips shares its value)."""
    return lambda values: np.repeat(values, num_clips, axis=1).reshape(-1)


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _to_torch(outputs, device: torch.device) -> torch.Tensor:
    """O dense DALI TensorLists of one shape as one (O, ...) torch tensor on `device`.

    CPU: zero-copy through DLPack. DALI's default (dynamic) executor allocates outputs per
    iteration and keeps them alive while referenced, so a batch stays valid however long the
    caller holds it; copying instead cost ~0.5 s per 8-clip batch in page faults. GPU: one
    device copy on torch's current stream (cheap, and ordered with the training stream).
    """
    tensors = [output.as_tensor() for output in outputs]
    if device.type == "cpu":
        views = [torch.from_dlpack(tensor) for tensor in tensors]
        return views[0][None] if len(views) == 1 else torch.stack(views)
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dtype = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16}[tensors[0].dtype]
    result = torch.empty((len(tensors), *tensors[0].shape()), dtype=dtype, device=device)
    for view, tensor in zip(result, tensors):
        feed_ndarray(tensor, view, cuda_stream=torch.cuda.current_stream(device))
    return result
