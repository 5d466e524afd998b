"""torchrun, with its own failures said in one line:

    python -m tdsclip.torchrun --nproc_per_node=8 launch.py --cfg configs/k400/vitb16.yaml --resume auto

torchrun (torch.distributed.run) prints a Python traceback of its own when a scheduler signals it
(SIGTERM on preemption, Ctrl-C) or when a worker fails, after the workers have said what happened.
This runs the same launcher with the same options and turns those two cases into one line and an
exit status: 128 + the signal's number, or the failed worker's status, as launch.py's own.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun_main


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun_main(argv)
    except SignalException as stop:
        name = signal.Signals(stop.sigval).name
        print(f"torchrun: stopped by {name}; the workers' lines above say what they saved", file=sys.stderr)
        return 128 + int(stop.sigval)
    except ChildFailedError as failure:
        rank, first = failure.get_first_failure()
        if first.exitcode < 0:  # ended by that signal, before it could say anything
            print(f"torchrun: worker rank {rank} was ended by {signal.Signals(-first.exitcode).name}",
                  file=sys.stderr)
            return 128 - first.exitcode
        print(f"torchrun: worker rank {rank} stopped with exit status {first.exitcode}; its line above says why",
              file=sys.stderr)
        return first.exitcode
    return 0


if __name__ == "__main__":
    sys.exit(main())
