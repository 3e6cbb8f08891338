"""Worker processes of one machine: rank 0 (the caller) starts ranks 1..N-1 with the spawn
method, watches them, and stops them. A worker that dies is noticed at once (its sentinel pipe
closes) and, on NCCL, the watcher's callback aborts the compute group, so a rank-0 collective
waiting for the dead rank raises instead of hanging.

A worker's exit code is read only once its process has been reaped, and every wait for that is
bounded: the sentinel closes before the process can be reaped (and a process stuck in its
teardown may never be), and Process.join(timeout) stops honouring its timeout once the sentinel
has closed. The watcher thread only notices an end and never reaps, so it cannot race a join
elsewhere (the cause of a "code None" error once).
"""

from __future__ import annotations

import multiprocessing.connection
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch.multiprocessing as mp

REAP_POLL_S = 0.02  # how often a process that has ended is checked for having been reaped


@dataclass
class WorkerExit:
    """How one worker ended, for rank 0's error."""

    rank: int
    exit_code: int | None  # the process's exit code (-N: killed by signal N); None: not reaped in waited_s
    waited_s: float  # how long its reaping was waited for: what "stopped responding" means

    def __str__(self) -> str:
        code = self.exit_code
        if code is None:
            return (f"rank {self.rank} stopped responding "
                    f"(its process has not exited after {self.waited_s:g} s)")
        if code < 0:
            return f"rank {self.rank} was killed by signal {_signal_name(-code)} (exit code {code})"
        return f"rank {self.rank} exited with code {code}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"{signum}"


def _reap(proc, deadline: float) -> int | None:
    """proc's exit code once it has ended and been reaped, waiting until deadline (monotonic) at
    most; None if it has not by then. join(0) never blocks; join(t) would, once the sentinel is
    closed. A None from a concurrent reaper (waitpid's ECHILD) is retried until it stores the code."""
    multiprocessing.connection.wait([proc.sentinel], max(0.0, deadline - time.monotonic()))
    while True:
        proc.join(0)
        if proc.exitcode is not None or time.monotonic() >= deadline:
            return proc.exitcode
        time.sleep(REAP_POLL_S)


class WorkerProcesses:
    def __init__(self, target: Callable, args_of_rank: Callable[[int], tuple], world_size: int):
        ctx = mp.get_context("spawn")
        self.procs = {r: ctx.Process(target=target, args=args_of_rank(r), name=f"vattention-rank{r}",
                                     daemon=True) for r in range(1, world_size)}
        for p in self.procs.values():
            p.start()
        self._stopping = False
        self._lock = threading.Lock()  # the callback and whether a worker died, set from two threads
        self._died = False  # a worker ended before stop(): the callback is due
        self._on_failure: Callable[[], None] | None = None
        self._watcher = threading.Thread(target=self._watch, name="vattention-tp-watch", daemon=True)
        self._watcher.start()

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Called once when a worker dies before stop(): from the watcher thread, or at once if
        one already has."""
        with self._lock:
            self._on_failure = callback
            died = self._died
        if died:
            self._fire()

    def ended(self) -> list[int]:
        """Ranks whose process has ended (its sentinel closed), reaped or not; never waits."""
        ready = set(multiprocessing.connection.wait([p.sentinel for p in self.procs.values()], 0))
        return [r for r, p in self.procs.items() if p.sentinel in ready]

    def exits(self, wait_s: float) -> list[WorkerExit]:
        """How each worker that has ended ended, waiting up to wait_s in all for them to be reaped."""
        deadline = time.monotonic() + wait_s
        return [WorkerExit(r, _reap(self.procs[r], deadline), wait_s) for r in self.ended()]

    def _watch(self) -> None:
        pending = [p.sentinel for p in self.procs.values()]
        while pending:
            for sentinel in multiprocessing.connection.wait(pending):
                pending.remove(sentinel)
                if not self._stopping:
                    with self._lock:
                        self._died = True
                    self._fire()

    def _fire(self) -> None:
        with self._lock:
            callback, self._on_failure = self._on_failure, None
        if callback is not None:
            callback()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait up to timeout_s for workers told to exit; kill those that do not, waiting as long
        again for them to go."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        late = [p for p in self.procs.values() if _reap(p, deadline) is None]
        for p in late:
            p.kill()
        deadline = time.monotonic() + timeout_s
        for p in late:
            _reap(p, deadline)
