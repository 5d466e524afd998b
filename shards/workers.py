"""Encoding inputs in worker processes, results in input order, surviving a worker that dies.

A corrupt file can crash FFmpeg inside a worker (a segfault, not an exception). The pool then breaks;
we retry each unfinished input alone in a fresh process, reject the one that crashes again, and go
on with a new pool, so one bad file never stops (or, on rerun, re-stops) a long packing job.

Workers live and die with the process that packs: they never see Ctrl-C (a terminal sends it to the
whole process group; the main process alone handles it, then kills them, so no traceback comes from
each and no unfinished video holds up the exit), and they exit within a second or so when that
process dies, even by kill -9 (the kernel's parent-death signal, with a polling thread as fallback).
"""

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import forkserver, resource_tracker
from typing import Callable, Iterator

from shards.encode import EncodedSample
from shards.manifest import Rejection
from shards.sources import Source

Result = EncodedSample | Rejection
CRASH_REASON = "undecodable: the decoder crashed (worker process died) on this input"


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_POLL_SECONDS = 0.5


def _context():
    """forkserver: workers do not inherit the parent's threads (the progress bar's), which fork would copy.

    The fork server is started with SIGINT blocked, and every worker it forks inherits the block from
    its first instruction on: no window at start-up in which a Ctrl-C gives a worker's traceback.
    """
    context = multiprocessing.get_context("forkserver")
    resource_tracker.ensure_running()  # first: starting it unblocks SIGINT in the calling thread
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return context


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=_context(), initializer=_tie_to_parent, initargs=(os.getpid(),))


def _tie_to_parent(packer: int) -> None:
    """In a worker: ignore Ctrl-C (a fork server that was already running unblocked), and exit when the
    packing process `packer` or the fork server (our parent, which exits when `packer` dies) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    if sys.platform.startswith("linux"):  # the kernel kills us the moment the fork server exits
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    threading.Thread(target=_exit_when_orphaned, args=(parent, packer), daemon=True).start()


def _exit_when_orphaned(parent: int, packer: int) -> None:
    """Poll: the fallback where prctl does not exist, or where the parent died before prctl was called."""
    while True:
        try:
            os.kill(packer, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass  # the pid is alive (another user's process now holds it: we are orphaned, caught below)
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(PARENT_POLL_SECONDS)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill the workers and drop their unfinished inputs: after an interrupt nobody wants those results,
    and finishing them (a long video takes ~10 s) would hold up the exit."""
    for process in list((pool._processes or {}).values()):  # no public API lists an executor's processes
        process.kill()
    pool.shutdown(wait=True, cancel_futures=True)


def _alone(encode: Callable[[Source], Result], source: Source) -> Result:
    """Encode one input in a process of its own; a crash becomes a Rejection."""
    pool = _new_pool(1)
    try:
        return pool.submit(encode, source).result()
    except BrokenProcessPool:
        return Rejection(source=source.path, reason=CRASH_REASON)
    except BaseException:
        _stop(pool)
        raise
    finally:
        pool.shutdown(wait=True)


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
    pool = _new_pool(workers)
    try:
        while True:
            while len(pending) < window and (source := next(upcoming, None)) is not None:
                pending.append((source, _submit(pool, encode, source)))
            if not pending:
                break
            source, future = pending.popleft()
            try:
                yield future.result()
            except BrokenProcessPool:
                pool.shutdown(wait=True, cancel_futures=True)
                retry = [source] + [s for s, _ in pending]
                pending.clear()
                for s in retry:  # which input crashed is unknown: each runs alone until past the culprit
                    yield _alone(encode, s)
                pool = _new_pool(workers)
    except BaseException:  # Ctrl-C, or the caller closed us early (it stopped on an error)
        _stop(pool)
        raise
    pool.shutdown(wait=False)  # idle workers: they exit on their own (joined at the latest at interpreter exit)
