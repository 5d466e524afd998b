"""Stopping a run cleanly on a signal: SIGTERM (SLURM, Kubernetes before a kill), SIGUSR1 (SLURM's
`--signal` ahead of the time limit) and Ctrl-C (SIGINT).

While a run starts (loaders, model, compile) or tests, a signal stops it at once: there is nothing new
to save. Once training runs (`defer()`), the handler only records the signal; the trainer asks
`requested()` at each step boundary, all ranks agree (one tiny all-reduce), so every rank stops after
the same step and writes one last.pt together. A second Ctrl-C does not wait for the step: it raises
KeyboardInterrupt at once.
"""

from __future__ import annotations

import signal

import torch

from tdsclip.distributed import all_reduce_max

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequested(Exception):
    """The run stopped on a signal; `saved`: after writing last.pt (or with last.pt holding its state)."""

    def __init__(self, signal_name: str, where: str, *, saved: bool = True):
        super().__init__(f"stopped by {signal_name} {where}")
        self.signal_name, self.saved = signal_name, saved

    @property
    def exit_status(self) -> int:
        """128 + the signal number, as a shell reports a process that a signal ended."""
        return 128 + int(signal.Signals[self.signal_name])


class StopSignals:
    """Records SIGTERM / SIGUSR1 / SIGINT while installed (main thread only)."""

    def __init__(self, before: str = "before training") -> None:
        self.before = before  # where a signal that stops at once finds the run, for its message
        self.received: int = 0
        self.deferred = False  # True while training: stop at the next step boundary
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignals":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def defer(self) -> None:
        """From now on, record signals for `requested()` instead of stopping at once."""
        self.deferred = True

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if not self.deferred:
            raise StopRequested(signal.Signals(signum).name, self.before, saved=False)
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        self.received = self.received or signum

    def requested(self) -> str | None:
        """The signal any rank has received, agreed by all ranks (collective: every rank calls at the same steps)."""
        received = int(all_reduce_max(torch.tensor([self.received])).item())
        return signal.Signals(received).name if received else None
