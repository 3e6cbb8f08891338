"""BackgroundMapper: one persistent thread that executes map jobs while the step computes.

The cache owns all state and the lock. The thread only asks it for the next job (blocking on the
cache's condition variable: no spinning), runs the driver calls, and hands any error back so the
caller's next ensure()/prepare()/wait() raises it. Pending work is recorded by the caller before
prepare() returns, never by this thread, so nobody can observe "not started yet" as "done".
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .slots import MapJob


class BackgroundMapper:
    def __init__(self, next_job: Callable[[], MapJob | None], execute: Callable[[MapJob], None],
                 on_error: Callable[[BaseException, bool], None], bind_thread: Callable[[], None]):
        self._next_job = next_job  # blocks until there is a job; None means stop
        self._execute = execute
        self._on_error = on_error  # (error, fatal): fatal means the thread has exited
        self._bind_thread = bind_thread  # e.g. make the CUDA context current in this thread
        self._thread = threading.Thread(target=self._run, name="vattention-mapper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _run(self) -> None:
        try:
            self._bind_thread()
        except BaseException as e:  # noqa: BLE001 - surfaced to the caller, not lost in a thread
            self._on_error(e, True)  # fatal: this thread is gone
            return
        while (job := self._next_job()) is not None:
            try:
                self._execute(job)
            except BaseException as e:  # noqa: BLE001 - the job rolled back; the caller sees the error
                self._on_error(e, False)
