"""Turning one input (a video file or a frame folder) into one verified shard sample.

Frames are decoded with PyAV (FFmpeg), shrunk to a fixed short side with swscale (a smaller video keeps
its own size: upscaling would only add bytes), and stored either as one VP9 WebM stream (layout `video`)
or as one JPEG per frame (layout `frames`, libjpeg-turbo via Pillow, quality 95 and 4:2:0 chroma by
default: the official data preparation's, mmaction2's frame extraction with OpenCV). Frame folders that
already hold JPEGs go into layout `frames` as they are, without re-encoding.
Frame i of the sample is frame i of the source. A video whose frames cover less than 75% of the
duration its header declares is rejected as truncated (FFmpeg decodes a cut WebM to its end without
an error). Every sample is decoded back once and its frame count checked before it is accepted; any
failure becomes a `Rejection` with a reason instead of an exception, so one bad input never stops a run.
"""

import io
import itertools
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

import av
from PIL import Image, UnidentifiedImageError

from shards import format as fmt
from shards.manifest import Rejection
from shards.sources import IMAGE_TMPL, Source, check_image_tmpl

JPEG_MAGIC = b"\xff\xd8\xff"
DEFAULT_FPS = 30.0
RESIZE_INTERPOLATION = "AREA"
# A video whose frames cover less than this share of the duration its header declares is truncated.
# Lenient: durations are rounded, and the last frame's own duration is only estimated.
TRUNCATED_BELOW = 0.75


@dataclass(frozen=True, kw_only=True)
class EncodeOptions:
    """How samples are stored; the defaults are the ones docs/shards.md chose by measurement."""

    layout: str = "frames"
    short_side: int = 256  # 0 keeps the source size, as does a source whose short side is smaller
    quality: int = 95  # JPEG quality, layout frames: OpenCV's default, which mmaction2's extraction uses
    crf: int = 32  # VP9 constant quality, layout video
    gop: int = 32  # VP9 keyframe interval, layout video
    speed: int = 6  # libvpx cpu-used, layout video
    deadline: str = "good"  # libvpx deadline, layout video: "realtime" encodes ~6x faster, ~40% larger
    folder_fps: float = DEFAULT_FPS  # frame folders carry no frame rate
    image_tmpl: str = IMAGE_TMPL

    def __post_init__(self):
        if self.layout not in fmt.LAYOUTS:
            raise ValueError(f"layout must be one of {fmt.LAYOUTS}, got {self.layout!r}")
        if self.short_side < 0 or self.short_side % 2:
            raise ValueError(f"short_side must be 0 (keep) or a positive even number, got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {self.quality}")
        if not 0 <= self.crf <= 63:
            raise ValueError(f"crf must be in 0..63, got {self.crf}")
        if self.gop < 1:
            raise ValueError(f"gop must be >= 1, got {self.gop}")
        if not 0 <= self.speed <= 8:
            raise ValueError(f"speed must be in 0..8, got {self.speed}")
        if self.deadline not in ("good", "realtime"):
            raise ValueError(f"deadline must be 'good' or 'realtime', got {self.deadline!r}")
        if self.folder_fps <= 0:
            raise ValueError(f"folder_fps must be > 0, got {self.folder_fps}")
        check_image_tmpl(self.image_tmpl)

    def encoding(self) -> dict[str, Any]:
        """The parameters recorded in the manifest."""
        common = {"short_side": self.short_side, "resize": RESIZE_INTERPOLATION.lower()}
        if self.layout == "video":
            return {"codec": "vp9", "container": "webm", "pix_fmt": "yuv420p", "crf": self.crf, "gop": self.gop,
                    "speed": self.speed, "deadline": self.deadline, **common}
        return {"codec": "jpeg", "quality": self.quality, "frame_folders": "jpeg copied as stored", **common}


@dataclass(frozen=True)
class EncodedSample:
    """A verified sample: its metadata and either `video` bytes or one JPEG per frame."""

    meta: dict[str, Any]
    video: bytes | None = None
    frames: list[bytes] | None = None

    @property
    def num_bytes(self) -> int:
        return len(self.video) if self.video is not None else sum(len(f) for f in self.frames)


class _Reject(Exception):
    """Raised inside encoding with the reason the input is rejected."""


def encode_source(source: Source, root: Path, options: EncodeOptions) -> EncodedSample | Rejection:
    """Encode and verify one input; every failure comes back as a Rejection naming the cause."""
    try:
        if source.is_frame_folder:
            return _encode_folder(source, Path(root) / source.path, options)
        return _encode_video_file(source, Path(root) / source.path, options)
    except _Reject as reason:
        return Rejection(source=source.path, reason=str(reason))
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as error:
        return Rejection(source=source.path, reason=f"undecodable: {type(error).__name__}: {error}")


def target_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side `short_side` and the long side scaled to the nearest even number;
    the source's own size when `short_side` is 0 or not below the source's short side (never upscaled: the
    pipelines scale to the official frame from the source size anyway, so upscaling would only add bytes)."""
    if short_side == 0 or short_side >= min(width, height):
        return width, height
    if width <= height:
        return short_side, max(2, 2 * round(height * short_side / width / 2))
    return max(2, 2 * round(width * short_side / height / 2)), short_side


def _meta(source: Source, layout: str, num_frames: int, fps: float, size: tuple[int, int],
          source_size: tuple[int, int]) -> dict[str, Any]:
    """A sample's JSON: stored (width, height) and the source's, from which the pipelines compute the
    official scaled frame (a resized frame rounds its long side to even: 640x360 is stored 456x256,
    the official scale of the source gives 455x256)."""
    return {"key": source.key, "label": source.label, "num_frames": num_frames, "fps": fps, "width": size[0],
            "height": size[1], "source_width": source_size[0], "source_height": source_size[1],
            "source": source.path, "layout": layout}


def _open_video(path: Path) -> av.container.InputContainer:
    if not path.exists():
        raise _Reject(f"missing: {path} not found")
    if not path.is_file():
        raise _Reject(f"unreadable: {path} is not a file")
    if path.stat().st_size == 0:
        raise _Reject(f"empty: {path} has 0 bytes")
    try:
        return av.open(str(path))
    except PermissionError as error:
        raise _Reject(f"unreadable: {error}") from None
    except av.FFmpegError as error:
        raise _Reject(f"undecodable: not a readable video ({error})") from None


def _encode_video_file(source: Source, path: Path, options: EncodeOptions) -> EncodedSample:
    with _open_video(path) as container:
        if not container.streams.video:
            raise _Reject("undecodable: no video stream")
        stream = container.streams.video[0]
        # Slice threads only: frame threading swallows decode errors, and a truncated or corrupt file
        # must be rejected rather than packed short. Workers give the parallelism.
        stream.thread_type = "SLICE"
        rate = stream.average_rate or stream.guessed_rate or Fraction(DEFAULT_FPS)
        declared_end = declared_end_time(container, stream, rate)
        span: list[float] = []  # the earliest and the latest decoded frame time
        try:
            sample = _encode_frames(source, _timed(container.decode(stream), span), Fraction(rate), options)
        except av.FFmpegError as error:
            raise _Reject(f"undecodable: decoding failed ({error}); the file is truncated or corrupt") from None
    if declared_end is not None and span:  # FFmpeg stops quietly at a cut WebM's end: compare the time covered
        first, end = span[0], span[1] + 1 / float(rate)
        if end - first < TRUNCATED_BELOW * (declared_end - first):
            raise _Reject(f"undecodable: its frames cover {end - first:.2f} s of the {declared_end - first:.2f} s "
                          "its header declares; the file is truncated")
    return sample


def declared_end_time(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
                      rate: Fraction) -> float | None:
    """When the file says the video stream ends (s): the stream's start plus its duration (after MP4
    edit lists), else Matroska's per-track DURATION tag (an end time), else the container's end when
    the video is its only stream; for AVI also its header's frame count, which a cut leaves intact."""
    start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
    ends = []
    if stream.duration and stream.time_base:
        ends.append(start + float(stream.duration * stream.time_base))
    elif match := re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", stream.metadata.get("DURATION", "")):
        hours, minutes, secs = match.groups()
        ends.append(int(hours) * 3600 + int(minutes) * 60 + float(secs))
    elif container.duration and len(container.streams) == 1:  # another stream may run longer
        ends.append(((container.start_time or 0) + container.duration) / av.time_base)
    if stream.frames and container.format.name == "avi":  # constant rate; its duration shrinks with a cut
        ends.append(start + stream.frames / float(rate))
    return max(ends, default=None)


def _timed(frames: Iterator[av.VideoFrame], span: list[float]) -> Iterator[av.VideoFrame]:
    """The frames, keeping in `span` the earliest and the latest frame time seen."""
    for frame in frames:
        if frame.time is not None:
            span[:] = [min(span[0], frame.time), max(span[1], frame.time)] if span else [frame.time, frame.time]
        yield frame


def _encode_frames(source: Source, frames: Iterator[av.VideoFrame], rate: Fraction,
                   options: EncodeOptions) -> EncodedSample:
    """Resize and encode decoded frames in the chosen layout, then verify."""
    first = next(frames, None)
    if first is None:
        raise _Reject("empty: no video frames decode")
    original = first.width, first.height
    width, height = target_size(*original, options.short_side)
    stream = itertools.chain([first], frames)
    if options.layout == "video":
        video, count = _encode_vp9(stream, width, height, rate, options)
        _verify_video(video, count, width, height)
        return EncodedSample(_meta(source, "video", count, float(rate), (width, height), original), video=video)
    jpegs = [_encode_jpeg(f.reformat(width, height, "rgb24", interpolation=RESIZE_INTERPOLATION).to_image(),
                          options.quality) for f in stream]
    _verify_jpegs(jpegs, width, height)
    return EncodedSample(_meta(source, "frames", len(jpegs), float(rate), (width, height), original), frames=jpegs)


def _encode_vp9(frames: Iterator[av.VideoFrame], width: int, height: int, rate: Fraction,
                options: EncodeOptions) -> tuple[bytes, int]:
    """One VP9 stream in WebM, a frame per source frame (pts = index). Single-threaded and bitexact so
    the bytes depend on the input alone (reruns and any --workers give identical shards)."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm", container_options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream("libvpx-vp9", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        stream.codec_context.gop_size = options.gop
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.options = {"crf": str(options.crf), "b": "0", "cpu-used": str(options.speed),
                          "deadline": options.deadline, "threads": "1"}
        count = 0
        for frame in frames:
            frame = frame.reformat(width, height, "yuv420p", interpolation=RESIZE_INTERPOLATION)
            frame.pts, frame.time_base = count, stream.codec_context.time_base
            out.mux(stream.encode(frame))
            count += 1
        out.mux(stream.encode(None))
    return buffer.getvalue(), count


def _encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _verify_video(data: bytes, expected: int, width: int, height: int) -> None:
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(video=0))
    if len(frames) != expected:
        raise _Reject(f"verify: the encoded video decodes to {len(frames)} frames, the source has {expected}")
    if (frames[0].width, frames[0].height) != (width, height):
        raise _Reject(f"verify: the encoded video is {frames[0].width}x{frames[0].height}, not {width}x{height}")


def _verify_jpegs(jpegs: list[bytes], width: int, height: int) -> None:
    """One JPEG per decoded source frame by construction; each must decode, at the stored size."""
    for i, data in enumerate(jpegs):
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.size != (width, height):
                raise _Reject(f"verify: frame {i} is {image.size[0]}x{image.size[1]}, not {width}x{height}")


def _folder_frame(folder: Path, index: int, tmpl: str) -> tuple[Path, bytes]:
    path = folder / tmpl.format(index + 1)  # frame files are numbered from 1
    try:
        return path, path.read_bytes()
    except FileNotFoundError:
        hint = "; check --image-tmpl" if index == 0 else ""
        raise _Reject(f"missing: frame {index + 1} ({path}) not found{hint}") from None
    except OSError as error:
        raise _Reject(f"unreadable: frame {path}: {error}") from None


def _decode_image(path: Path, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.convert("RGB")
    except UnidentifiedImageError:  # its message names the in-memory buffer's address: not reproducible
        raise _Reject(f"undecodable: frame {path}: not an image format Pillow reads") from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise _Reject(f"undecodable: frame {path}: {error}") from None


def _encode_folder(source: Source, folder: Path, options: EncodeOptions) -> EncodedSample:
    if not folder.is_dir():
        raise _Reject(f"missing: frame folder {folder} not found")
    if source.num_frames < 1:
        raise _Reject(f"empty: the list gives {source.num_frames} frames")
    rate = Fraction(options.folder_fps).limit_denominator(1001)
    if options.layout == "video":
        images = (_decode_image(*_folder_frame(folder, i, options.image_tmpl)) for i in range(source.num_frames))
        frames = (av.VideoFrame.from_image(image) for image in images)
        return _encode_frames(source, frames, rate, options)
    jpegs, size = [], None
    for i in range(source.num_frames):
        path, data = _folder_frame(folder, i, options.image_tmpl)
        image = _decode_image(path, data)  # every stored frame is decoded once
        size = size or image.size
        if image.size != size:
            raise _Reject(f"undecodable: frame {path} is {image.size[0]}x{image.size[1]}, "
                          f"frame 1 is {size[0]}x{size[1]}")
        jpegs.append(data if data.startswith(JPEG_MAGIC) else _encode_jpeg(image, options.quality))
    meta = _meta(source, "frames", len(jpegs), float(rate), size, size)
    return EncodedSample(meta, frames=jpegs)
