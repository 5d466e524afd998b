"""What a run prints on rank 0: a rich progress bar in a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys


class Console:
    """Prints messages and, in a terminal (or progress='rich'), draws one progress bar per epoch."""

    def __init__(self, progress: str = "auto"):
        self.progress = None
        self.task = None
        if progress == "rich" or (progress == "auto" and sys.stdout.isatty()):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.progress.start()

    @property
    def draws_bar(self) -> bool:
        return self.progress is not None

    def print(self, message: str) -> None:
        """A line above the bar (through its console), or on stdout."""
        if self.progress is not None:
            self.progress.console.print(message)
        else:
            print(message, flush=True)

    def start_epoch(self, description: str, total: int, completed: int = 0) -> None:
        if self.progress is not None:
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(description, total=total, completed=completed, status="")

    def advance(self, completed: int, status: str) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=completed, status=status)

    def close(self) -> None:
        """Stop the bar (before printing a final message, or it draws over it)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
