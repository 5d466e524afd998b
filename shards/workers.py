"""Encoding inputs in worker processes, results in input order, surviving a worker that dies.

A corrupt file can crash FFmpeg inside a worker (a segfault, not an exception). The pool then breaks;
we retry each unfinished input alone in a fresh process, reject the one that crashes again, and go
on with a new pool, so one bad file never stops (or, on rerun, re-stops) a long packing job.
"""

import multiprocessing
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator

from shards.encode import EncodedSample
from shards.manifest import Rejection
from shards.sources import Source

Result = EncodedSample | Rejection
CRASH_REASON = "undecodable: the decoder crashed (worker process died) on this input"


def _context():
    # forkserver: workers do not inherit the parent's threads (the progress bar's), which fork would copy.
    return multiprocessing.get_context("forkserver")


def _alone(encode: Callable[[Source], Result], source: Source) -> Result:
    """Encode one input in a process of its own; a crash becomes a Rejection."""
    with ProcessPoolExecutor(1, mp_context=_context()) as pool:
        try:
            return pool.submit(encode, source).result()
        except BrokenProcessPool:
            return Rejection(source=source.path, reason=CRASH_REASON)


def _submit(pool: ProcessPoolExecutor, encode: Callable[[Source], Result], source: Source) -> Future:
    """`pool.submit`, except that a pool a worker broke since the last call gives a failed future: the
    break is then handled where results are read, like one that happens after submission."""
    try:
        return pool.submit(encode, source)
    except BrokenProcessPool as broken:
        future: Future = Future()
        future.set_exception(broken)
        return future


def ordered_results(todo: list[Source], encode: Callable[[Source], Result], workers: int) -> Iterator[Result]:
    """`encode(source)` for every source, in order; in this process when workers is 1 (no crash guard)."""
    if workers <= 1:
        yield from map(encode, todo)
        return
    window = 2 * workers  # inputs in flight: keeps workers busy without holding many results in memory
    pending: deque[tuple[Source, Future]] = deque()
    upcoming = iter(todo)
    pool = ProcessPoolExecutor(workers, mp_context=_context())
    try:
        while True:
            while len(pending) < window and (source := next(upcoming, None)) is not None:
                pending.append((source, _submit(pool, encode, source)))
            if not pending:
                return
            source, future = pending.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                retry = [source] + [s for s, _ in pending]
                pending.clear()
                for s in retry:  # which input crashed is unknown: each runs alone until past the culprit
                    yield _alone(encode, s)
                pool = ProcessPoolExecutor(workers, mp_context=_context())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
