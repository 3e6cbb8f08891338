"""Worker processes of one machine: rank 0 (the caller) starts ranks 1..N-1 with the spawn
method, watches them, and stops them. A worker that dies makes `failed` say so at once; on NCCL
the watcher also aborts the compute group, so a rank-0 collective waiting for the dead rank
raises instead of hanging."""

from __future__ import annotations

import multiprocessing.connection
import socket
import threading
from collections.abc import Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcesses:
    def __init__(self, target: Callable, args_of_rank: Callable[[int], tuple], world_size: int):
        ctx = mp.get_context("spawn")
        self.procs = {r: ctx.Process(target=target, args=args_of_rank(r), name=f"vattention-rank{r}",
                                     daemon=True) for r in range(1, world_size)}
        for p in self.procs.values():
            p.start()
        self.failed: dict[int, int] = {}  # rank -> exit code of a worker that ended on its own
        self._stopping = False
        self._on_failure: Callable[[], None] | None = None
        self._watcher = threading.Thread(target=self._watch, name="vattention-tp-watch", daemon=True)
        self._watcher.start()

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Called once, from the watcher thread, when a worker dies before stop()."""
        self._on_failure = callback

    def _watch(self) -> None:
        pending = {p.sentinel: r for r, p in self.procs.items()}
        while pending:
            for sentinel in multiprocessing.connection.wait(list(pending)):
                rank = pending.pop(sentinel)
                if self._stopping:
                    continue
                self.procs[rank].join()
                self.failed[rank] = self.procs[rank].exitcode
                if self._on_failure is not None:
                    self._on_failure()
                    self._on_failure = None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Wait for workers told to exit; terminate those that do not."""
        self._stopping = True
        for p in self.procs.values():
            p.join(timeout_s)
            if p.is_alive():
                p.kill()
                p.join()
