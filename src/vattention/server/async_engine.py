"""AsyncEngine: the LLMEngine on a thread of its own, driven from asyncio.

    handler ── add / abort ──> commands (queue.Queue) ──> engine thread
    engine thread: drain commands, then LLMEngine.step() while work exists, else block on the queue
    engine thread ── RequestOutput ──> RequestStream (a deque, call_soon_threadsafe) ──> handler

The engine thread builds, runs and closes the LLMEngine (so on CUDA the context it maps pages in
is its own), and publishes engine.stats() after every loop. Other threads only read what never
changes after loading: tokenizer, limits, config.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from ..config import EngineConfig
from ..engine import LLMEngine
from ..engine.stats import EngineStats
from ..outputs import RequestOutput, RequestOutputKind
from ..sampling_params import SamplingParams
from .limits import release_freed_memory

log = logging.getLogger("vattention.server")


class EngineOverloadedError(Exception):
    """Too many requests wait for admission; the client should retry later (HTTP 503)."""


class EngineStoppedError(Exception):
    """The engine is shutting down or has failed; it takes no new request (HTTP 503)."""


class RequestFailedError(Exception):
    """The engine failed while running the request, or gave up on it at shutdown."""


@dataclass(frozen=True)
class ServingStats:
    """What the engine thread publishes after every loop, for /metrics and /health."""

    engine: EngineStats | None = None  # engine.stats() after the loop; None before loading or after a failure
    failure: str | None = None  # why the engine stopped serving, if it broke


class RequestStream:
    """One request's outputs in order: the engine thread puts, the HTTP handler iterates.
    The outputs are deltas (or one FINAL_ONLY output), so a reader that fell behind gets the
    queued ones merged into one (merge_delta) rather than any of them skipped. The stream owns
    what it is handed: the engine keeps no reference to an output it returned."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self.finished = False  # the last output (or an error) has been read
        self._loop = loop
        self._items: deque[RequestOutput | Exception] = deque()  # event loop only
        self._arrived = asyncio.Event()  # set while _items is not empty

    def put(self, item: RequestOutput | Exception) -> None:
        """Called on the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._push, item)
        except RuntimeError:  # the event loop has closed: nobody is reading any more
            pass

    def _push(self, item: RequestOutput | Exception) -> None:
        self._items.append(item)
        self._arrived.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await self._arrived.wait()
        item = self._items.popleft()
        # Merge the outputs queued behind; an error is raised on its own, after the outputs before it.
        while (isinstance(item, RequestOutput) and self._items
               and isinstance(self._items[0], RequestOutput)):
            merge_delta(item, self._items.popleft())
        if not self._items:
            self._arrived.clear()
        self.finished = isinstance(item, Exception) or item.finished
        if isinstance(item, Exception):
            raise item
        return item


def merge_delta(into: RequestOutput, later: RequestOutput) -> None:
    """Append delta output `later` to `into` (in place): per choice index, text, token ids and
    logprobs are concatenated; the finish state and token count are the later one's."""
    by_index = {c.index: c for c in into.outputs}
    for c in later.outputs:
        mine = by_index.get(c.index)
        if mine is None:
            into.outputs.append(c)
            continue
        mine.text += c.text
        mine.token_ids += c.token_ids
        if c.logprobs is not None:
            mine.logprobs += c.logprobs
            mine.top_logprobs += c.top_logprobs
        mine.finish_reason, mine.stop_reason = c.finish_reason, c.stop_reason
        mine.error, mine.num_tokens = c.error, c.num_tokens
    into.finished, into.num_cached_tokens = later.finished, later.num_cached_tokens
    into.first_token_time = into.first_token_time if into.first_token_time is not None else later.first_token_time
    into.scheduled_time = into.scheduled_time if into.scheduled_time is not None else later.scheduled_time


@dataclass
class Submission:
    """One prompt of a request, as the engine takes it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None = None  # only requests with the same salt share cached prefixes


@dataclass
class _Add:
    submissions: list[Submission]  # admitted together or not at all (a batched request's prompts)
    streams: list[RequestStream]  # one per submission
    accepted: asyncio.Future  # on the caller's loop: result None, or the reason it was refused


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Shutdown:
    deadline: float  # time.monotonic() after which unfinished requests are aborted


class AsyncEngine:
    def __init__(self, config: EngineConfig, max_queued_requests: int = 1024):
        self.config = config
        self.max_queued_requests = max_queued_requests  # waiting sequences past which adds get 503
        self.stats = ServingStats()  # replaced (never mutated) by the engine thread
        self._engine: LLMEngine | None = None
        self._commands: queue.Queue[_Add | _Abort | _Shutdown] = queue.Queue()
        self._accepting = False
        self._accept_lock = threading.Lock()  # no add is queued behind the shutdown command
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vattention-engine", daemon=True)
        # Engine thread only:
        self._streams: dict[str, RequestStream] = {}
        self._deadline: float | None = None

    # ---- any thread ---------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model on the engine thread; returns once it serves (re-raising a load error)."""
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error
        self._accepting = True

    @property
    def engine(self) -> LLMEngine:
        """For reading what loading fixed (tokenizer, limits, config); never call it."""
        assert self._engine is not None, "AsyncEngine.start() has not loaded the engine"
        return self._engine

    async def add(self, request_id: str, prompt_token_ids: list[int],
                  params: SamplingParams) -> RequestStream:
        """Queue a request; returns its stream once the engine took it. Raises ValueError (bad
        input: add_request's RequestError, naming the field, comes through as it is),
        EngineOverloadedError or EngineStoppedError when it did not."""
        return (await self.add_all([Submission(request_id, prompt_token_ids, params)]))[0]

    async def add_all(self, submissions: list[Submission]) -> list[RequestStream]:
        """Queue several prompts as one request: all are admitted, or none (their n x prompts
        sequences count against max_queued_requests together)."""
        if any(s.params.output_kind is RequestOutputKind.CUMULATIVE for s in submissions):
            raise ValueError("AsyncEngine streams deltas: submit with output_kind DELTA or FINAL_ONLY")
        loop = asyncio.get_running_loop()
        streams = [RequestStream(s.request_id, loop) for s in submissions]
        accepted = loop.create_future()
        with self._accept_lock:
            if not self._accepting:
                raise EngineStoppedError("the server is shutting down")
            self._commands.put(_Add(submissions, streams, accepted))
        try:
            await accepted
        except asyncio.CancelledError:
            for s in submissions:  # the add may still land; these aborts are queued right behind it
                self.abort(s.request_id)
            raise
        return streams

    def abort(self, request_id: str) -> None:
        """Stop the request and free its KV memory (at the engine thread's next command drain)."""
        self._commands.put(_Abort(request_id))

    def shutdown(self, timeout_s: float) -> None:
        """Stop taking requests, let those in flight finish for up to timeout_s, abort the rest,
        close the engine. Blocks until the engine thread has ended."""
        with self._accept_lock:
            self._accepting = False
            if self._thread.is_alive():
                self._commands.put(_Shutdown(time.monotonic() + timeout_s))
        self._thread.join(timeout_s + 60)  # the last step and closing the KV cache may take a while
        if self._thread.is_alive():
            log.error("the engine thread did not stop within %.0f s", timeout_s + 60)

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine = LLMEngine(self.config)
        except BaseException as e:  # start() raises it in the caller
            self._load_error = e
            self._loaded.set()
            return
        self._loaded.set()
        engine = self._engine
        self._publish()
        worked = False  # since the engine was last idle
        while True:
            idle = not engine.has_unfinished() or self.stats.failure is not None
            if self._deadline is not None and (idle or time.monotonic() > self._deadline):
                break
            if idle and worked:
                # Steps free many buffers of batch-dependent sizes; glibc keeps that heap, so
                # RSS would creep up to the largest batch's. Give it back whenever work drains.
                release_freed_memory()
                worked = False
            worked = worked or engine.has_unfinished()
            for command in self._next_commands(block=idle):
                self._apply(command)
            if engine.has_unfinished() and self.stats.failure is None:
                self._step()
            self._publish()
        self._close()

    def _next_commands(self, block: bool) -> list[_Add | _Abort | _Shutdown]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: _Add | _Abort | _Shutdown) -> None:
        engine = self.engine
        if isinstance(command, _Shutdown):
            self._deadline = command.deadline
        elif isinstance(command, _Abort):
            if self._streams.pop(command.request_id, None) is not None:
                engine.abort(command.request_id)
        elif self.stats.failure is not None:
            _resolve(command, EngineStoppedError(f"the engine failed: {self.stats.failure}"))
        else:
            self._admit(command)

    def _admit(self, command: _Add) -> None:
        engine = self.engine
        waiting = engine.stats().num_waiting
        needed = sum(s.params.num_candidates for s in command.submissions)
        if waiting + needed > self.max_queued_requests:
            _resolve(command, EngineOverloadedError(
                f"the server is overloaded: {waiting} sequences are waiting and this request "
                f"adds {needed} (--max-queued-requests {self.max_queued_requests}); retry later"))
            return
        added = []
        try:
            for s in command.submissions:
                engine.add_request(s.prompt_token_ids, s.params, s.request_id, cache_salt=s.cache_salt)
                added.append(s.request_id)
        except Exception as e:
            for request_id in added:  # nothing half-admitted keeps running
                engine.abort(request_id)
            if isinstance(e, ValueError):
                _resolve(command, e)
            else:
                log.exception("add_request failed for %s", command.submissions[len(added)].request_id)
                _resolve(command, RequestFailedError(f"the engine could not add the request: {e}"))
            return
        for s, stream in zip(command.submissions, command.streams):
            self._streams[s.request_id] = stream
        _resolve(command, None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the requests in flight")
            self._fail_all(RequestFailedError(f"the engine failed: {e}"))
            if self.engine.has_unfinished():  # aborting did not clear it: stop serving
                self.stats = ServingStats(failure=f"{type(e).__name__}: {e}")
            return
        self._publish()  # stats first: a client that sees its request finish sees it gone from them
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error is not None:  # one of its samples failed alone: the request fails, no other
                log.warning("request %s failed: %s", out.request_id, out.error)
                stream.put(RequestFailedError(f"the request failed: {out.error}"))
                del self._streams[out.request_id]
                self.engine.abort(out.request_id)  # its other samples, if any still run
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, error: Exception) -> None:
        for request_id, stream in self._streams.items():
            stream.put(error)
            try:
                self.engine.abort(request_id)
            except Exception:
                log.exception("abort of %s failed", request_id)
        self._streams.clear()

    def _publish(self) -> None:
        if self.stats.failure is None:
            self.stats = ServingStats(engine=self.engine.stats())

    def _close(self) -> None:
        if self._streams:
            log.warning("shutdown: aborting %d unfinished requests", len(self._streams))
        self._fail_all(RequestFailedError("the server shut down before the request finished"))
        self._publish()
        self.engine.close()
        log.info("engine stopped")


def _resolve(command: _Add, error: Exception | None) -> None:
    """Settle the add's future on its own loop (a cancelled caller no longer waits for it)."""
    def settle():
        if command.accepted.done():
            return
        if error is None:
            command.accepted.set_result(None)
        else:
            command.accepted.set_exception(error)

    try:
        command.accepted.get_loop().call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop has closed
        pass
