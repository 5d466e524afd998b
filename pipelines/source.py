"""The external source: turns epoch plans into DALI samples, reading only the bytes needed.

One call per batch (batch mode). The source is an endless stream: call i gives batch `start + i`
counted over consecutive epochs (epoch = g // batches_per_epoch), each epoch's plan made by a
`Planner` when its first batch is read. So one DALI pipeline serves every epoch of a run: no
rebuild, and its prefetch queue runs across epoch boundaries. Two modes (pipelines/pipeline.py):
- "frame": one DALI sample per frame: (jpeg, params...); a batch holds B videos x F frames; the
  clip's params are repeated for each of its frames.
- "video": one DALI sample per video: (webm, frame indices, params...).
Outputs are named (`ClipSource.output_names`; pipelines/pipeline.py looks them up by name): ENCODED,
then FRAME_INDICES (video mode), then FRAME_SIZE, the stored frame size (H, W) (int32), when the graph
runs RandAugment (it works on the stored frames, whose translations are a share of their size), then
WINDOW_ANCHOR and WINDOW_SHAPE with `crop_decode` (frame mode: the part of the frame the views read,
[x0, y0] and [w, h] per frame, float32, params.decode_window; the graph decodes only that, and every
ROI is then given relative to it); then,
for each of the O views, the ViewParams fields it uses, named "<field>/<view>": roi_start (y0, x0),
roi_end (y1, x1), mirror, gray (bool) when the graph converts to grayscale, draws (the RandAugment
draws, (3, n) int32) when it augments.
Each param output is one dense array over the batch, not a list of per-sample arrays: DALI (and,
with reader processes, the shared-memory hand-over) then pays per batch, not per frame, which made
the host-side feed 2-3x faster (docs/benchmarks.md, "Host-side feed").

Reads: a clip's 40 frames come in 8 windows of 5 consecutive frames, whose JPEG members are
adjacent in the tar; byte ranges closer than MERGE_GAP are read with one pread and sliced without
a copy, so a clip costs ~8 preads instead of 40. All reads of a batch land in one buffer, which
the process that made the source reuses from batch to batch (see ClipSource._read).
The callable is picklable (no open files; the Planner ships without its plans) so DALI can run it
in worker processes.
"""

import os
from typing import NamedTuple

import numpy as np

from pipelines.params import decode_window
from pipelines.plan import Planner
from pipelines.reader import JPEG_PROBLEMS, ShardFiles, ShardReadError, jpeg_problems

MODES = ("frame", "video")
MERGE_GAP = 4096  # bytes: a tar header (512) plus padding (< 512) between adjacent frames, with room
ENCODED, FRAME_INDICES, FRAME_SIZE = "encoded", "frame_indices", "frame_size"
WINDOW_ANCHOR, WINDOW_SHAPE = "window_anchor", "window_shape"


class ViewParams(NamedTuple):
    """The per-view outputs, by name; a graph that does not convert to grayscale or augment has no
    gray / draws output (None here on the graph's side)."""

    roi_start: object
    roi_end: object
    mirror: object
    gray: object = None
    draws: object = None


def view_output(field: str, view: int) -> str:
    """The output name of ViewParams field `field` of view `view`."""
    return f"{field}/{view}"


class ClipSource:
    """Per-batch callback for `fn.external_source(batch=True, batch_info=True)`, from global batch `start` on."""

    def __init__(self, planner: Planner, mode: str, start: int = 0, *, grayscale: bool = False,
                 randaugment: bool = False, crop_decode: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if crop_decode and (mode != "frame" or randaugment):  # RandAugment reads the whole frame
            raise ValueError("crop_decode needs mode 'frame' and no RandAugment")
        self.crop_decode = crop_decode
        self.planner, self.mode, self.start = planner, mode, start
        self.grayscale, self.randaugment = grayscale, randaugment
        self.batches_per_epoch = planner.num_batches
        self.frames_per_video = planner.spec.frames_per_video
        self.num_views = planner.spec.num_views
        self.files = ShardFiles()
        self._owner = os.getpid()  # the process whose buffer may be reused (see _read)
        self._buffer = np.empty(0, np.uint8)

    @property
    def view_fields(self) -> tuple[str, ...]:
        """The ViewParams fields this source gives for each view."""
        return ViewParams._fields[:3] + ("gray",) * self.grayscale + ("draws",) * self.randaugment

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs, in the order __call__ returns them."""
        inputs = ((ENCODED,) + (FRAME_INDICES,) * (self.mode == "video") + (FRAME_SIZE,) * self.randaugment
                  + (WINDOW_ANCHOR, WINDOW_SHAPE) * self.crop_decode)
        return inputs + tuple(view_output(f, v) for v in range(self.num_views) for f in self.view_fields)

    @property
    def num_outputs(self) -> int:
        return len(self.output_names)

    def position(self, iteration: int) -> tuple[int, int]:
        """(epoch, batch) of call `iteration`."""
        return divmod(self.start + iteration, self.batches_per_epoch)

    def __call__(self, info) -> list:
        """Batch `info.iteration` of the stream, one entry per output_names: a list of B (or B*F) encoded
        samples, or one dense array whose first axis is the batch (one copy into DALI, not one per sample)."""
        batch = self.batch(info.iteration)
        return [batch[name] for name in self.output_names]

    def batch(self, iteration: int) -> dict:
        """Batch `iteration` of the stream by output name."""
        epoch, batch = self.position(iteration)
        plan = self.planner(epoch)
        samples = self.planner.samples
        rows = slice(batch * plan.batch_size, (batch + 1) * plan.batch_size)
        repeat = self.frames_per_video if self.mode == "frame" else 1  # frame mode: params for every frame
        columns = self._params(plan, rows)
        if self.crop_decode:
            columns.update(self._windows(plan, rows, columns))
        outputs = {name: np.repeat(column, repeat, axis=0) if repeat > 1 else column
                   for name, column in columns.items()}
        if self.randaugment:
            sizes = np.array([(samples[i].height, samples[i].width) for i in plan.sample[rows]], np.int32)
            outputs[FRAME_SIZE] = np.repeat(sizes, repeat, axis=0) if repeat > 1 else sizes
        if self.mode == "frame":
            clips = [(samples[plan.sample[row]], plan.frames[row]) for row in range(rows.start, rows.stop)]
            jpegs, starts = self._read([(sample, *_frame_spans(sample.ranges[frames])) for sample, frames in clips])
            _check_jpegs(self._buffer, starts, jpegs, clips)
            outputs[ENCODED] = jpegs
        else:
            webms, _ = self._read([(sample, [tuple(sample.ranges[0])], [(0, 0, sample.ranges[0][1])])
                                   for sample in (samples[i] for i in plan.sample[rows])])
            outputs[ENCODED], outputs[FRAME_INDICES] = webms, np.ascontiguousarray(plan.frames[rows])
        return outputs

    def _windows(self, plan, rows: slice, columns: dict) -> dict[str, np.ndarray]:
        """WINDOW_ANCHOR, WINDOW_SHAPE (B, 2) of the clips in `rows`; shifts the views' ROIs in `columns`
        into the window (exact: whole-pixel offsets of float32 coordinates)."""
        stored = np.array([(s.height, s.width) for s in map(self.planner.samples.__getitem__, plan.sample[rows])])
        anchor, shape = decode_window(plan.roi[rows], stored, self.planner.spec.image_size)
        for view in range(self.num_views):
            for field in ("roi_start", "roi_end"):
                columns[view_output(field, view)] = columns[view_output(field, view)] - anchor[:, ::-1]
        return {WINDOW_ANCHOR: anchor, WINDOW_SHAPE: shape}

    def _read(self, clips: list) -> tuple[list[np.ndarray], list[int]]:
        """The pieces of each (sample, spans, pieces) clip, in order, as views of one buffer holding every
        span (self._buffer), and where each piece starts in it.

        One buffer per batch instead of one allocation per read; in the process that made the source, the
        same one for every batch (source alone 1.5-2x faster): there DALI calls the source from its own
        thread and copies what it is fed before the next call. Its worker processes (a parallel external
        source) do not: they hand a batch to a thread that copies it to shared memory while the next
        batch is read, so there each batch gets a new buffer.
        """
        total = sum(int(length) for _, spans, _ in clips for _, length in spans)
        if os.getpid() != self._owner or len(self._buffer) < total:
            self._buffer = np.empty(int(total * 1.25), np.uint8)
        outputs, piece_starts, at = [], [], 0
        for sample, spans, pieces in clips:
            span_starts = []
            for begin, length in spans:
                self.files.pread_into(sample.tar, sample.key, begin, self._buffer[at:at + length])
                span_starts.append(at)
                at += length
            for span, offset, size in pieces:
                piece_starts.append(span_starts[span] + offset)
                outputs.append(self._buffer[piece_starts[-1]:piece_starts[-1] + size])
        return outputs, piece_starts

    def __getstate__(self):  # the buffer does not travel
        return {**self.__dict__, "_buffer": np.empty(0, np.uint8)}

    def _params(self, plan, rows: slice) -> dict[str, np.ndarray]:
        """Per view: roi_start (B, 2), roi_end (B, 2), mirror (B,), [gray (B,)], [draws (B, 3, n)]."""
        outputs = {}
        for view in range(self.num_views):
            roi = plan.roi[rows, view]
            columns = {"roi_start": roi[:, :2], "roi_end": roi[:, 2:], "mirror": plan.mirror[rows, view],
                       "gray": plan.gray[rows, view], "draws": plan.ra[rows, view] if self.randaugment else None}
            for field in self.view_fields:  # slices of (R, O, ...) plan arrays
                outputs[view_output(field, view)] = np.ascontiguousarray(columns[field])
        return outputs


def _check_jpegs(buffer: np.ndarray, starts: list[int], jpegs: list[np.ndarray], clips: list) -> None:
    """Raise ShardReadError naming the shard, key and frame unless every frame is a whole JPEG (see
    jpeg_problems): the loader then names the sample once, or skips it (data.on_error).

    Damaged headers must never reach DALI: its 2.4 CPU image decoder can crash the process (a segfault,
    not an error) when a batch of more than ~60 images, i.e. any batch at 8 segments, holds one whose
    header it cannot parse. A JPEG cut short or zeroed past its header decodes with a libjpeg warning
    per frame that names no sample, into grey rows: it is refused here too.
    """
    problems = jpeg_problems(buffer, np.asarray(starts), np.fromiter(map(len, jpegs), np.int64, len(jpegs)))
    if problems.any():
        i = int(np.flatnonzero(problems)[0])
        sample, frames = clips[i // len(clips[0][1])]
        raise ShardReadError(f"{sample.tar}: sample {sample.key!r}: frame {int(frames[i % len(frames)])} "
                             f"{JPEG_PROBLEMS[int(problems[i])]}")


def _frame_spans(ranges: np.ndarray) -> tuple[list, list]:
    """Byte spans covering the frames of (F, 2) [offset, size] `ranges`, adjacent ones coalesced.

    Returns spans [(begin, length)] and, in frame order (repeats included), pieces [(span, offset in
    span, size)]. A clip's 40 frames lie in 8 runs of 5 adjacent tar members: ~8 spans.
    """
    ranges = ranges.astype(np.int64)
    order = np.argsort(ranges[:, 0], kind="stable")
    spans, pieces = [], [None] * len(ranges)
    i = 0
    while i < len(order):
        j, begin = i, ranges[order[i], 0]
        end = begin + ranges[order[i], 1]
        while j + 1 < len(order) and ranges[order[j + 1], 0] <= end + MERGE_GAP:
            j += 1
            end = max(end, ranges[order[j], 0] + ranges[order[j], 1])
        for k in order[i:j + 1]:
            pieces[k] = (len(spans), int(ranges[k, 0] - begin), int(ranges[k, 1]))
        spans.append((int(begin), int(end - begin)))
        i = j + 1
    return spans, pieces
