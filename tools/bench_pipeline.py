"""Benchmark the DALI pipelines against an official-style loader on the same videos, in one run.

Ours: tools/make_shards.py packs the videos (layouts `frames` and `video`), then pipelines.Loader
yields train and test batches on --device. Baseline: what the official TDS-CLIP code does, a torch
DataLoader whose workers open each original video with decord, take the 40 needed frames one by
one, and run PIL group transforms (scale 256 bicubic, random-sized crop 224 bilinear, flip,
grayscale; test: scale + centre crop), then ToTensor + normalize; with RandAugment, timm's
rand-m7-n4-mstd0.5-inc1 first, on the decoded frames, as the official code. Both get the same cores.

Peer: what a user would pick today on the original files, a keyframe-aware PyAV reader in a thread
pool with torchvision.transforms.v2 (`PyAVClips`; torchcodec needs FFmpeg's shared libraries, which
PyAV's wheel does not provide to other packages).

Prints clips/s, clips/s per core, the ratios ours/baseline and ours/peer, frames decoded per clip
against the 40 needed, and where the time of the train pipeline goes (decode, crop+resize, augment+normalize,
hand-over to torch).

    python tools/bench_pipeline.py                      # synthetic 640x360 H.264 videos, CPU
    python tools/bench_pipeline.py --content natural    # camera-like synthetic videos (grain, smooth texture)
    python tools/bench_pipeline.py --device cuda        # GPU decode + augment (DALI mixed)
    python tools/bench_pipeline.py --list my.txt --root /videos   # your videos: '<path> <label>' lines
"""

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import pipelines
from pipelines import augment, params, sampling
from pipelines.batches import GPU_PY_WORKERS
from pipelines.config import parse_randaugment
from pipelines.plan import ClipSpec

ROOT = Path(__file__).resolve().parents[1]


# --- inputs ----------------------------------------------------------------------------------
CONTENTS = ("blocky", "natural")


def make_videos(out: Path, count: int, frames: int, width: int, height: int, seed: int,
                content: str = "blocky") -> Path:
    """Synthetic H.264 MP4s with texture and motion, a keyframe every 2 s (as web video commonly has).

    content "blocky": a random 8x8-block texture panning rigidly plus a moving square: motion
    compensation predicts it almost exactly (cheap H.264 frames), and its sharp random blocks are
    JPEG's worst case (~95 KB per 456x256 frame at quality 95). "natural": shards.synthetic's
    natural_video (gradient, smooth multi-scale texture, a disc crossing, per-frame sensor grain), whose
    statistics are camera footage's: the grain has to be coded in every H.264 frame, JPEGs are ~45 KB.
    """
    import av

    from shards.synthetic import natural_video

    out = out / content
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for v in range(count):
        path = out / f"video{v:03d}.mp4"
        lines.append(f"{path.name} {v % 10}")
        if path.exists():
            continue
        images = (natural_video(frames, height, width, rng) if content == "natural"
                  else _blocky_video(frames, height, width, rng))
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", "x264-params": "keyint=50:min-keyint=50"}
            for image in images:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())
    (out / "list.txt").write_text("\n".join(lines) + "\n")
    return out / "list.txt"


def _blocky_video(frames: int, height: int, width: int, rng: np.random.Generator):
    """(H, W, 3) uint8 frames: a random 8x8-block texture panning 1 px down and 2 right per frame, a square crossing."""
    texture = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    texture = np.kron(texture, np.ones((8, 8, 1), np.uint8))  # blocky base
    for f in range(frames):
        image = np.roll(texture, (f, 2 * f), axis=(0, 1))[:height, :width].copy()
        x = (7 * f) % (width - 64)
        image[100:164, x:x + 64] = (255 - 3 * f % 255, 80, 160)
        yield image


def make_shards(list_file: Path, root: Path, out: Path, layout: str) -> Path:
    directory = out / layout
    if not (directory / "train.manifest.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools/make_shards.py"), str(list_file), "--root", str(root),
                        "--out", str(directory), "--split", "train", "--layout", layout], check=True)
    return directory


# --- measuring -------------------------------------------------------------------------------
def cpu_seconds() -> float:
    """CPU time of this process and its live children (DataLoader / reader workers), from /proc."""
    tick, me, total = os.sysconf("SC_CLK_TCK"), os.getpid(), 0
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:  # fields[1]: parent pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def measure(batches, seconds: float, warmup: int = 1) -> tuple[float, float]:
    """(clips per wall second, clips per CPU second) over `seconds` (at least 3 batches) after warm-up.

    Clips per CPU second is the per-core rate, and unlike wall time it holds on a shared, busy machine.
    """
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    clips, count, start, cpu = 0, 0, time.perf_counter(), cpu_seconds()
    while count < 3 or time.perf_counter() - start < seconds:
        batch = next(iterator)
        clips += batch["clips"].shape[0] if isinstance(batch, dict) else batch[0].shape[0]
        count += 1
    return clips / (time.perf_counter() - start), clips / (cpu_seconds() - cpu)


def endless(make):
    """Batches of epoch after epoch (a fresh loader iteration each epoch)."""
    while True:
        yield from make()


def our_loader(tars: list[str], split: str, args, *, randaugment: str | None = None, py_workers: int | None = None,
               **spec_options) -> pipelines.Loader:
    """Our Loader over tar paths (repeated to make epochs long): the low-level constructor, no manifest."""
    spec = ClipSpec(split=split, num_segments=args.num_segments, image_size=args.image_size,
                    randaugment=parse_randaugment(randaugment) if randaugment else None, **spec_options)
    return pipelines.Loader(tars, spec, args.batch_size, num_threads=args.threads, device=args.device,
                            py_workers=py_workers, hw_decoder_load=args.hw_decoder_load)


def ours(tars: list[str], split: str, args, **options):
    data = our_loader(tars, split, args, py_workers=args.py_workers, **options)
    return endless(lambda: iter(data))


# --- baseline: the official recipe -----------------------------------------------------------
class OfficialStyleVideos(torch.utils.data.Dataset):
    """decord + PIL group transforms, as the official Video_dataset + get_augmentation do.

    With `randaugment`, timm's rand-m7-n4-mstd0.5-inc1 (bicubic) runs first, on the decoded frames,
    as the official Something-Something recipe does.
    """

    def __init__(self, paths: list[str], num_segments: int, train: bool, randaugment: bool = False):
        self.paths, self.num_segments, self.train = paths, num_segments, train
        self.randaugment = _official_rand_augment() if randaugment else None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        import decord
        from PIL import Image

        video = decord.VideoReader(self.paths[index], num_threads=1)
        n = len(video)
        centres = (sampling.train_centres(n, self.num_segments, np.random.default_rng())
                   if self.train else sampling.val_centres(n, self.num_segments))
        images = [Image.fromarray(video[int(p)].asnumpy()) for p in sampling.window(centres, n).reshape(-1)]
        if self.randaugment is not None:
            images = _rand_augment_clip(images, self.randaugment)
        images = [img.resize(_short_side(img.size, 256), Image.BICUBIC) for img in images]
        images = _train_transform(images) if self.train else _centre_crop(images, 224)
        array = np.concatenate([np.asarray(img) for img in images], axis=2)  # (H, W, 3*40)
        tensor = torch.from_numpy(array).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(augment.CLIP_MEAN * len(images)).view(-1, 1, 1)
        std = torch.tensor(augment.CLIP_STD * len(images)).view(-1, 1, 1)
        return (tensor - mean) / std, 0


def _official_rand_augment():
    from PIL import Image
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform("rand-m7-n4-mstd0.5-inc1", {"translate_const": int(256 * 0.45),
                                                              "interpolation": Image.BICUBIC})


def _rand_augment_clip(images, transform):
    """timm RandAugment with one set of draws for all frames (the official video AugmentOp)."""
    for op in np.random.choice(transform.ops, transform.num_layers):
        state = random.getstate()  # each frame replays the op's draws: p, magnitude
        for i, image in enumerate(images):
            random.setstate(state)
            images[i] = op(image)
    return images


def _short_side(size, short):
    w, h = size
    return (short, int(short * h / w)) if w <= h else (int(short * w / h), short)


def _train_transform(images):
    from PIL import Image, ImageOps

    w, h = images[0].size
    y, x, ch, cw = params.random_resized_crop(h, w, np.random.default_rng(random.getrandbits(32)))
    images = [img.crop((x, y, x + cw, y + ch)).resize((224, 224), Image.BILINEAR) for img in images]
    if random.random() < 0.5:
        images = [img.transpose(Image.FLIP_LEFT_RIGHT) for img in images]
    if random.random() < 0.2:
        images = [ImageOps.grayscale(img).convert("RGB") for img in images]
    return images


def _centre_crop(images, size):
    w, h = images[0].size
    x, y = int(round((w - size) / 2)), int(round((h - size) / 2))
    return [img.crop((x, y, x + size, y + size)) for img in images]


def baseline(paths: list[str], train: bool, args, randaugment: bool = False):
    dataset = OfficialStyleVideos(paths, args.num_segments, train, randaugment)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=train,
                                         num_workers=args.threads, drop_last=True, persistent_workers=True)
    return endless(lambda: iter(loader))


# --- peer: what a user would pick today ------------------------------------------------------
class PyAVClips:
    """The strongest peer that installs here: PyAV (FFmpeg) reading the original files, keyframe-aware,
    clips in a thread pool, torchvision.transforms.v2 on uint8 tensors (one set of random parameters
    per clip, as v2 applies to a (F, C, H, W) tensor).

    Keyframe-aware: each video's keyframes and frame timestamps come from one demux pass when the
    peer is made (not timed, as our packing is not); a clip then seeks to the keyframe before a needed
    frame only when that keyframe lies past the decoder's position, else decodes forward: the fewest
    frames a seek-and-decode reader can decode (`decoded_frames`). One decoder thread per video
    (FFmpeg threads inside a pool of clip threads would only oversubscribe the cores). Train: RRC
    straight from the source frame (one antialiased resampling, as ours), flip, grayscale p=0.2;
    test: resize 256 + centre crop; both: float, CLIP normalization.
    """

    def __init__(self, paths: list[str], num_segments: int, train: bool, image_size: int = 224):
        from torchvision.transforms import v2

        self.paths, self.num_segments, self.train = paths, num_segments, train
        self.index = {path: _frame_index(path) for path in set(paths)}  # path -> (timestamps, keyframe indices)
        normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.CLIP_MEAN, augment.CLIP_STD)]
        spatial = ([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(),
                    v2.RandomGrayscale(0.2)] if train else [v2.Resize(256, antialias=True), v2.CenterCrop(image_size)])
        self.transform = v2.Compose(spatial + normalize)

    def clip(self, path: str, rng: np.random.Generator) -> torch.Tensor:
        """(T, M, 3, S, S) float32 normalized: one clip of `path`."""
        timestamps, keyframes = self.index[path]
        n = len(timestamps)
        centres = sampling.train_centres(n, self.num_segments, rng) if self.train else sampling.val_centres(
            n, self.num_segments)
        needed = sampling.window(centres, n)  # (T, M)
        frames = _decode_frames(path, np.unique(needed), timestamps, keyframes)  # index -> (3, H, W) uint8
        video = torch.stack([frames[int(i)] for i in needed.reshape(-1)])  # (T*M, 3, H, W)
        return self.transform(video).unflatten(0, needed.shape)


def _frame_index(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(presentation timestamps in frame order, indices of the keyframes) of a video's first stream."""
    import av

    with av.open(path) as container:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size and p.pts is not None]
    packets.sort()
    return np.array([pts for pts, _ in packets]), np.flatnonzero([key for _, key in packets])


def _decode_frames(path: str, wanted: np.ndarray, timestamps: np.ndarray, keyframes: np.ndarray) -> dict:
    """Frames `wanted` (sorted indices) of `path` as (3, H, W) uint8 tensors, seeking only across GOPs."""
    import av

    frames, position, decoded = {}, -1, None
    index_of = {int(t): i for i, t in enumerate(timestamps)}
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type, stream.codec_context.thread_count = "SLICE", 1
        for target in wanted:
            keyframe = keyframes[np.searchsorted(keyframes, target, side="right") - 1]
            if keyframe > position or decoded is None:  # the target's GOP starts past us: seek there
                container.seek(int(timestamps[keyframe]), stream=stream, backward=True)
                decoded = container.decode(stream)
            for frame in decoded:
                position = index_of.get(frame.pts, position + 1)
                if position == target:
                    frames[int(target)] = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    break
            if int(target) not in frames:
                raise RuntimeError(f"{path}: frame {int(target)} not decoded")
    return frames


def peer(paths: list[str], train: bool, args):
    """Batches of the PyAV + torchvision v2 peer: batch_size clips decoded by args.threads threads."""
    from concurrent.futures import ThreadPoolExecutor

    clips = PyAVClips(paths, args.num_segments, train, args.image_size)
    pool = ThreadPoolExecutor(args.threads)
    rng = np.random.default_rng(0)
    order = list(range(len(paths)))

    def epoch():
        if train:
            rng.shuffle(order)
        for first in range(0, len(order) - args.batch_size + 1, args.batch_size):
            seeds = rng.integers(0, 2**63, args.batch_size)
            batch = pool.map(lambda i, s: clips.clip(paths[i], np.random.default_rng(s)),
                             order[first:first + args.batch_size], seeds)
            yield {"clips": torch.stack(list(batch))}  # (B, T, M, 3, S, S)
    return endless(epoch)


# --- frames decoded per clip -----------------------------------------------------------------
def decoded_frames(keyframes: np.ndarray, needed: np.ndarray) -> int:
    """Frames a seek-to-keyframe-then-decode-forward reader decodes to produce `needed` (in order)."""
    position, decoded = -1, 0
    for frame in np.unique(needed):
        keyframe = keyframes[np.searchsorted(keyframes, frame, side="right") - 1]
        decoded += frame - keyframe + 1 if keyframe > position else frame - position
        position = frame
    return int(decoded)


def keyframes_of(data_or_path) -> tuple[np.ndarray, int]:
    """(keyframe indices, number of frames) of a video file or WebM bytes, from one demux pass."""
    import io

    import av

    source = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(source) as container:
        flags = [p.is_keyframe for p in container.demux(video=0) if p.size]
    return np.flatnonzero(flags), len(flags)


def amplification(sources: list, num_segments: int, clips: int = 20) -> float:
    """Mean frames decoded per clip of 40 training frames, over random clips of `sources`."""
    rng, total = np.random.default_rng(0), []
    for source in sources:
        keys, n = keyframes_of(source)
        for _ in range(clips):
            total.append(decoded_frames(keys, sampling.window(sampling.train_centres(n, num_segments, rng), n)))
    return float(np.mean(total))


@contextlib.contextmanager
def unused_outputs_allowed():
    """Silence DALI's note that a source's outputs go unused: the cut graphs leave them so on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The external source node .* outputs at the indices")
        yield


# --- where the time goes ---------------------------------------------------------------------
def stage_cost(data: "pipelines.Loader", args) -> dict[str, tuple[float, float]]:
    """(CPU-ms, wall-ms) per clip of the train graph cut after decode, after crop+resize, and whole."""
    from nvidia.dali import pipeline_def, types

    from pipelines.pipeline import read_clips, train_pipeline
    from pipelines.source import ClipSource

    @pipeline_def(enable_conditionals=True)
    def cut(source, stage: str, decode_device: str):
        images, _, views = read_clips(source, decode_device, 0, {})
        if stage == "decode":
            return images
        start, end = views[0][:2]
        return augment.crop_resize(images, start, end, args.image_size, augment.INTERP["train"])

    plan, cuda, planner = data.plan(), data.device.type == "cuda", data.planner
    frames = plan.frames.shape[1]
    common = dict(batch_size=plan.batch_size * frames, num_threads=args.threads, seed=0,
                  device_id=torch.cuda.current_device() if cuda else None)
    decode_device = "mixed" if cuda else "cpu"
    cost = {}
    for stage in ("decode", "crop+resize", "all"):
        source = ClipSource(planner, "frame", grayscale=True, crop_decode=not cuda)  # as the loader's
        if stage == "all":
            pipe = train_pipeline(source, image_size=args.image_size, decode_device=decode_device,
                                  dtype=types.FLOAT, **common)
        else:
            pipe = cut(source, stage, decode_device, **common)
        with unused_outputs_allowed():
            pipe.build()
        batches = min(plan.num_batches - 1, max(3, int(args.seconds)))
        pipe.run()
        start, wall = cpu_seconds(), time.perf_counter()
        for _ in range(batches):
            pipe.run()
        clips = batches * plan.batch_size
        cost[stage] = (1000 * (cpu_seconds() - start) / clips, 1000 * (time.perf_counter() - wall) / clips)
        del pipe
    return cost


def source_rate(data: "pipelines.Loader", seconds: float = 3.0) -> tuple[float, float]:
    """(clips/s, preads per clip) of the external source alone in this thread: reads + DALI input lists.

    On a GPU this Python callable is what the CPU still does per frame; it must outpace the GPU.
    """
    from types import SimpleNamespace

    from pipelines.source import ClipSource

    source = ClipSource(data.planner, data.mode, grayscale=True)
    calls = 0
    pread = source.files.pread_into

    def counted(*a):
        nonlocal calls
        calls += 1
        return pread(*a)

    source.files.pread_into = counted
    source(SimpleNamespace(iteration=0))  # plan made, files opened
    calls, clips, iteration, start = 0, 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        source(SimpleNamespace(iteration=iteration))
        iteration, clips = iteration + 1, clips + data.batch_size
    return clips / (time.perf_counter() - start), calls / clips


def feed_rate(data: "pipelines.Loader", py_workers: int, threads: int, seconds: float = 5.0) -> float:
    """Clips/s of the host side of the loader: the external source (reads, params) feeding a DALI
    pipeline that decodes nothing, with `py_workers` reader processes (0: in the pipeline's thread).

    On a GPU, decode and augment leave the CPU; this is then the CPU's ceiling for the whole loader.
    """
    from nvidia.dali import fn, pipeline_def

    from pipelines.source import ClipSource

    source = ClipSource(data.planner, data.mode, grayscale=True)
    parallel = {"parallel": True, "prefetch_queue_depth": py_workers + 1} if py_workers else {}

    @pipeline_def(batch_size=data.batch_size * data.spec.frames_per_video, num_threads=threads,
                  device_id=None, py_num_workers=max(1, py_workers), py_start_method="spawn")
    def feed():
        outputs = fn.external_source(source=source, num_outputs=source.num_outputs, batch=True, batch_info=True,
                                     **parallel)
        return outputs[-1]  # every output is fed (one callback, one op); only this small one is copied out

    pipe = feed()
    with unused_outputs_allowed():
        pipe.build()
    pipe.run()
    clips, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pipe.run()
        clips += data.batch_size
    rate = clips / (time.perf_counter() - start)
    del pipe
    return rate


# --- main ------------------------------------------------------------------------------------
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", type=Path, help="'<video> <label>' list (default: synthetic videos)")
    parser.add_argument("--root", type=Path, help="directory the list's paths are relative to")
    parser.add_argument("--work", type=Path, help="where videos and shards go (default: a temp dir)")
    parser.add_argument("--num-videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=250, help="frames per synthetic video")
    parser.add_argument("--size", default="640x360", help="synthetic video WxH")
    parser.add_argument("--content", choices=CONTENTS, default="blocky",
                        help="synthetic video content (see make_videos): blocky (cheap H.264, dear JPEG) or natural")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-segments", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU cores for each loader: DALI threads / DataLoader workers")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per loader")
    parser.add_argument("--py-workers", type=int, default=None,
                        help="reader processes of our loaders (default: the loader's, 4 on cuda, 0 on cpu)")
    parser.add_argument("--hw-decoder-load", type=float, default=None,
                        help="share of JPEGs for the GPU's hardware decoder (default: DALI's 0.65); try 0.9, 0.99")
    parser.add_argument("--skip-baseline", action="store_true", help="no official-style decord + PIL loader")
    parser.add_argument("--skip-peer", action="store_true", help="no PyAV + torchvision v2 peer")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    generated = args.list is None
    if generated:
        width, height = (int(v) for v in args.size.split("x"))
        args.list = make_videos(work / "videos", args.num_videos, args.frames, width, height, seed=0,
                                content=args.content)
        args.root = args.list.parent
    root = args.root or args.list.parent
    paths = [str(root / line.split()[0]) for line in args.list.read_text().splitlines() if line.strip()]
    shard_dir = work / "shards" / (args.content if generated else "list")
    shards = {layout: make_shards(args.list, root, shard_dir, layout) for layout in ("frames", "video")}
    tars = {layout: [str(p) for p in sorted(d.glob("train-*.tar"))] for layout, d in shards.items()}
    repeat = max(1, math.ceil(args.batch_size * (args.seconds + 4) * 4 / len(paths)))  # epochs long enough
    train_options = dict(flip="plain", grayscale_prob=0.2)

    rows = []

    def run(name, batches, frames_per_clip):
        wall, per_cpu_second = measure(batches, args.seconds)
        rows.append((name, wall, per_cpu_second, frames_per_clip))
        print(f"  {name:<40} {wall:8.2f} clips/s {per_cpu_second:8.2f} clips/CPU-s", flush=True)

    content = f"synthetic {args.content}" if generated else str(args.list)
    print(f"device {args.device}, {args.threads} cores, batch {args.batch_size}, {len(paths)} videos ({content})",
          flush=True)
    needed = 5 * args.num_segments
    frames = tars["frames"] * repeat
    run("ours train, frames (JPEG per frame)", ours(frames, "train", args, **train_options), needed)
    run("ours train + RandAugment, frames", ours(frames, "train", args, randaugment="rand-m7-n4-mstd0.5",
                                                 **train_options), needed)
    run("ours test 1 crop x 1 clip, frames", ours(frames, "test", args), needed)
    run("ours train, video (VP9 WebM)", ours(tars["video"] * repeat, "train", args, **train_options),
        amplification(_webm_bytes(tars["video"]), args.num_segments))
    if not args.skip_baseline:
        original = amplification(paths, args.num_segments)
        run("baseline train (decord + PIL)", baseline(paths * repeat, True, args), original)
        run("baseline train + RandAugment (timm)", baseline(paths * repeat, True, args, randaugment=True), original)
        run("baseline test (decord + PIL)", baseline(paths * repeat, False, args), original)
    if not args.skip_peer:
        torch.set_num_threads(1)  # the peer's parallelism is its clip threads; torch's own would oversubscribe
        original = amplification(paths, args.num_segments)
        run("peer train (PyAV + torchvision v2)", peer(paths * repeat, True, args), original)
        run("peer test (PyAV + torchvision v2)", peer(paths * repeat, False, args), original)
    data = our_loader(frames, "train", args, **train_options)
    cost = stage_cost(data, args)
    rate, preads = source_rate(data)
    print(f"external source alone (one Python thread, page cache warm): {rate:.0f} clips/s, "
          f"{preads:.1f} preads per clip", flush=True)
    for workers in sorted({0, GPU_PY_WORKERS if args.py_workers is None else args.py_workers}):
        print(f"external source feeding DALI, no decode, {workers} reader processes: "
              f"{feed_rate(data, workers, args.threads):.0f} clips/s", flush=True)
    report(rows, cost, needed, args)


def _webm_bytes(tars: list[str]) -> list[bytes]:
    from pipelines.reader import ShardFiles, read_samples

    files = ShardFiles()
    return [files.pread(s.tar, s.key, *s.ranges[0]).tobytes() for s in read_samples(tars)]


def report(rows, cost: dict[str, tuple[float, float]], needed: int, args) -> None:
    """Print the table, the ratios (against the official-style baseline and the PyAV peer) and the
    stage split; write --json."""
    def find(prefix: str):
        return next((r for r in rows if r[0].startswith(prefix)), None)

    base = {kind: find(f"baseline {kind}") for kind in ("train", "test", "train + RandAugment")}
    peers = {kind: find(f"peer {kind}") for kind in ("train", "test")}
    print(f"\n{'loader':<40} {'clips/s':>8} {'/core':>6} {'vs base':>8} {'clips/CPU-s':>12} {'vs base':>8} "
          f"{'vs peer':>8} {'frames decoded/clip':>20}")
    for name, wall, per_cpu, frames in rows:
        kind = "test" if " test" in name else "train + RandAugment" if "RandAugment" in name else "train"
        ref, peer_row = base[kind], peers.get(kind)
        ours_row = name.startswith("ours")
        ratio_wall = f"{wall / ref[1]:7.2f}x" if ours_row and ref else ""
        ratio_cpu = f"{per_cpu / ref[2]:7.2f}x" if ours_row and ref else ""
        ratio_peer = f"{per_cpu / peer_row[2]:7.2f}x" if ours_row and peer_row else ""
        print(f"{name:<40} {wall:8.2f} {wall / args.threads:6.2f} {ratio_wall:>8} {per_cpu:12.2f} {ratio_cpu:>8} "
              f"{ratio_peer:>8} {frames:13.1f} of {needed}")
    if peers["train"]:
        for layout, target in (("frames", 2.5), ("video", 1.0)):
            row = find(f"ours train, {layout}")
            print(f"per CPU-second against the peer, train, {layout} layout: {row[2]:.2f} / {peers['train'][2]:.2f} "
                  f"clips/CPU-s = {row[2] / peers['train'][2]:.2f}x (target >= {target}x)")
    totals = (1000 / rows[0][2], 1000 / rows[0][1])  # the whole loader, CPU and wall
    split = {}
    print()
    for i, unit in enumerate(("CPU-ms", "wall-ms")):
        part = {"decode": cost["decode"][i], "crop+resize": cost["crop+resize"][i] - cost["decode"][i],
                "grayscale+flip+normalize": cost["all"][i] - cost["crop+resize"][i],
                "to torch + feeding (rest)": totals[i] - cost["all"][i]}
        split[unit] = part
        print(f"train pipeline (frames), {unit} per clip: total {totals[i]:.1f} = "
              + ", ".join(f"{k} {v:.1f}" for k, v in part.items()))
    print("(stages come from separate runs of a cut graph: small or negative differences are noise)")
    if args.json:
        results = {"device": args.device, "cores": args.threads, "content": args.content, "batch_size": args.batch_size,
                   "rows": [{"loader": n, "clips_per_s": w, "clips_per_cpu_s": c, "frames_decoded_per_clip": f}
                            for n, w, c, f in rows], "train_ms_per_clip": split}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
