"""TensorBoard event files of a run: scalars and images, written by rank 0 into output_dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class TensorBoardSink:
    """Creates its event file at the first record, so a run that fails at start leaves no empty one."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.purge_step: int | None = None
        self.writer = None

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self.writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        writer = self._writer()
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 image."""
        self._writer().add_image(tag, image, step, dataformats="HWC")

    def text(self, tag: str, step: int, text: str) -> None:
        self._writer().add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
