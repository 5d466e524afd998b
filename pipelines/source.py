"""The external source: turns an epoch plan into DALI samples, reading only the bytes needed.

Called once per batch (batch mode: the Python cost per frame is one pread and a few list appends,
which matters at GPU rates of 16,000 frames/s). Three modes, one per decode path
(see pipelines/pipeline.py):
- "frame": one DALI sample per frame: (jpeg, params...); a batch holds B videos x F frames.
- "stack": one DALI sample per video: (jpeg_0 .. jpeg_{F-1}, params...), stacked after decoding.
- "video": one DALI sample per video: (webm, frame indices, params...).
params are, for each of the O views: roi_start (y0, x0), roi_end (y1, x1), mirror, and gray
(bool) when the graph converts to grayscale.
The callable is picklable (no open files, compact arrays) so DALI can run it in worker processes.
"""

import numpy as np

from pipelines.plan import EpochPlan
from pipelines.reader import Sample, ShardFiles

MODES = ("frame", "stack", "video")


class ClipSource:
    """Per-batch callback for `fn.external_source(batch=True, batch_info=True)`, from batch `start` on."""

    def __init__(self, plan: EpochPlan, samples: list[Sample], mode: str, start: int = 0,
                 grayscale: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        first = start * plan.batch_size
        rows = plan.sample[first:]
        self.mode, self.grayscale, self.batch_size = mode, grayscale, plan.batch_size
        self.frames = plan.frames[first:]  # (R, F)
        self.roi, self.mirror, self.gray = plan.roi[first:], plan.mirror[first:], plan.gray[first:]
        self.tars = sorted({samples[i].tar for i in rows})
        tar_id = {tar: i for i, tar in enumerate(self.tars)}
        self.tar = np.array([tar_id[samples[i].tar] for i in rows], dtype=np.int32)
        self.key = [samples[i].key for i in rows]
        if mode == "video":
            self.ranges = np.stack([samples[i].ranges[:1] for i in rows])  # (R, 1, 2)
        else:  # only the F frames each video needs: (R, F, 2)
            self.ranges = np.stack([samples[i].ranges[f] for i, f in zip(rows, self.frames)])
        self.files = ShardFiles()

    @property
    def num_outputs(self) -> int:
        encoded = {"frame": 1, "stack": self.frames.shape[1], "video": 2}[self.mode]
        return encoded + self.params_per_view * self.roi.shape[1]

    @property
    def params_per_view(self) -> int:
        return 4 if self.grayscale else 3

    def __call__(self, info) -> list[list[np.ndarray]]:
        """Batch `info.iteration` (relative to `start`): one list per output, B (or B*F) samples each."""
        first = info.iteration * self.batch_size
        if first >= len(self.key):
            raise StopIteration
        outputs = [[] for _ in range(self.num_outputs)]
        for row in range(first, first + self.batch_size):
            params = self._params(row)
            for frame in range(self.frames.shape[1]) if self.mode == "frame" else (None,):
                for column, value in zip(outputs, self._encoded(row, frame) + params):
                    column.append(value)
        return outputs

    def _encoded(self, row: int, frame: int | None) -> tuple:
        tar, key = self.tars[self.tar[row]], self.key[row]
        if self.mode == "frame":
            return (self.files.pread(tar, key, *self.ranges[row, frame]),)
        if self.mode == "stack":
            return tuple(self.files.pread(tar, key, offset, size) for offset, size in self.ranges[row])
        return self.files.pread(tar, key, *self.ranges[row, 0]), self.frames[row]

    def _params(self, row: int) -> tuple:
        outputs = []
        for view in range(self.roi.shape[1]):
            roi = self.roi[row, view]
            outputs += [roi[:2], roi[2:], np.asarray(self.mirror[row, view])]
            if self.grayscale:
                outputs.append(np.asarray(self.gray[row, view]))
        return tuple(outputs)
