"""Following one request from the engine to its client.

    RequestStream ─> Generation (first-token time, abort + metrics on close)
        ─> DeltaTracker (what each chunk carries) ─> sse_events: `data: {json}` ... `data: [DONE]`
        or Generation.final() raced against the client's disconnect (unless_disconnected)

DeltaTracker: what each streamed chunk carries, cut from the engine's full-state outputs.

The engine reports each choice's whole text so far; a chunk carries what the client has not seen.
Text is sent only once it is final, so the concatenated deltas equal the non-streamed text:

    text so far:  | sent ............ | safe to send ....... | held back |
                                                              └ last (longest stop string - 1)
                                                                chars, and a trailing U+FFFD
A stop string completed by a later token cuts the text where it starts, which can only be inside
the held-back tail; an incomplete UTF-8 character decodes as U+FFFD until its last byte arrives.
When the choice finishes, everything left is sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request as HTTPRequest
from pydantic import BaseModel

from ..outputs import Logprob, RequestOutput
from ..sampling_params import SamplingParams
from .async_engine import AsyncEngine, RequestFailedError, RequestStream
from .metrics import ServerMetrics
from .protocol import APIError, ErrorInfo, ErrorResponse, usage_of

REPLACEMENT_CHAR = "\ufffd"
T = TypeVar("T")


@dataclass
class ChoiceDelta:
    """What one choice gained since its last chunk."""

    index: int  # which of the n choices
    first: bool  # the choice's first chunk (chat sends the assistant role in it)
    text: str  # new text (with the echoed prompt in front, in the first chunk)
    text_offset: int  # where the first new token starts in the choice's text (completions logprobs)
    logprobs: list[Logprob] | None  # the new tokens' logprobs, when requested
    top_logprobs: list[list[Logprob]] | None  # the most likely tokens at each new position
    finish_reason: str | None  # set in the choice's last chunk
    stop_reason: str | int | None  # the stop string or token that ended it


class DeltaTracker:
    def __init__(self, params: SamplingParams, prefix: str = ""):
        self.n = params.n
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.prefix = prefix  # goes before each choice's text (completions' echo)
        self.sent_text = [""] * self.n  # text each choice has sent, prefix not included
        self.sent_tokens = [0] * self.n  # tokens whose logprobs each choice has sent
        self.text_offset = [len(prefix)] * self.n  # text length of those tokens, after the prefix
        self.started = [False] * self.n
        self.done = [False] * self.n

    def update(self, out: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for c in out.outputs:
            i = c.index
            if self.done[i]:
                continue
            visible = c.text if c.finished else self._safe(c.text)
            sent = self.sent_text[i]
            text = visible[len(sent):] if visible.startswith(sent) or c.finished else ""
            new_logprobs = new_top = None
            if c.logprobs is not None:
                new_logprobs = c.logprobs[self.sent_tokens[i]:]
                new_top = c.top_logprobs[self.sent_tokens[i]:]
            if not (text or c.finished or new_logprobs):
                continue
            first = not self.started[i]
            deltas.append(ChoiceDelta(i, first, (self.prefix if first else "") + text,
                                      self.text_offset[i], new_logprobs, new_top,
                                      c.finish_reason, c.stop_reason))
            self.started[i] = True
            self.done[i] = c.finished
            self.sent_text[i] = sent + text
            if new_logprobs is not None:
                self.sent_tokens[i] += len(new_logprobs)
                self.text_offset[i] += sum(len(lp.decoded) for lp in new_logprobs)
        return deltas

    def _safe(self, text: str) -> str:
        """The part of an unfinished choice's text that no later token can change."""
        return text[:max(0, len(text) - self.holdback)].rstrip(REPLACEMENT_CHAR)


class Generation:
    """A submitted request as its handler follows it. close() ends it: aborts it in the engine if
    it has not finished (the client left) and records its metrics."""

    def __init__(self, stream: RequestStream, prompt_len: int, async_engine: AsyncEngine,
                 metrics: ServerMetrics, arrival: float):
        self.request_id = stream.request_id
        self.created = int(time.time())  # every chunk of a stream carries the same timestamp
        self.prompt_len = prompt_len
        self._stream = stream
        self._async_engine = async_engine
        self._metrics = metrics
        self._arrival = arrival  # time.monotonic() when the request was submitted
        self._first_token: float | None = None  # when the first output token arrived
        self._last: RequestOutput | None = None  # the newest output read
        self._closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self._stream.__anext__()
        if self._first_token is None and any(c.token_ids for c in out.outputs):
            self._first_token = time.monotonic()
        self._last = out
        return out

    async def final(self) -> RequestOutput:
        """The last output, once the request has finished."""
        try:
            async for _ in self:
                pass
            return self._last
        except RequestFailedError as e:
            raise APIError(500, str(e), type="server_error") from None
        finally:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self._stream.finished:
            self._async_engine.abort(self.request_id)
        outputs = self._last.outputs if self._last is not None else []
        self._metrics.record([c.finish_reason or "abort" for c in outputs] or ["abort"],
                             self.prompt_len, sum(len(c.token_ids) for c in outputs),
                             self._arrival, self._first_token, time.monotonic())


async def sse_events(gens: list[Generation], trackers: list[DeltaTracker],
                     chunk: Callable[[ChoiceDelta, int], BaseModel], usage_chunk: BaseModel,
                     include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events for one request's generations (one per prompt of a batched request):
    chunk(delta, prompt index) per choice that progressed, in the order they progress; then
    usage_chunk with the usage of all of them if asked for; then [DONE]. Cancelling or closing
    this generator (the client left) aborts every generation."""
    finals: list[RequestOutput] = []
    try:
        async for i, out in _merged(gens):
            for delta in trackers[i].update(out):
                yield _event(chunk(delta, i))
            if out.finished:
                finals.append(out)
        if include_usage:
            usage_chunk.usage = usage_of(*finals)
            yield _event(usage_chunk)
    except RequestFailedError as e:
        yield _event(ErrorResponse(error=ErrorInfo(message=str(e), type="server_error")))
    finally:
        for gen in gens:
            gen.close()
    yield "data: [DONE]\n\n"


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(generation index, output) from all of gens as each arrives; a failure of one raises."""
    if len(gens) == 1:
        async for out in gens[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for out in gen:
                await queue.put((i, out, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            await queue.put((i, None, e))

    tasks = [asyncio.ensure_future(pump(i, gen)) for i, gen in enumerate(gens)]
    try:
        running = len(gens)
        while running:
            i, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                running -= 1
                continue
            yield i, out
    finally:
        for task in tasks:
            task.cancel()


def _event(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"


async def finals(gens: list[Generation]) -> list[RequestOutput]:
    """The last output of each generation; if one fails, the others are closed (aborted) at
    once rather than left running for nobody, and its error is raised."""
    tasks = [asyncio.ensure_future(gen.final()) for gen in gens]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for gen, task in zip(gens, tasks):
            if not task.done():
                task.cancel()
            gen.close()
        await asyncio.gather(*tasks, return_exceptions=True)  # retrieved: nothing logs "never retrieved"


async def unless_disconnected(request: HTTPRequest, work: Awaitable[T]) -> T | None:
    """The result of `work`, or None if the client disconnects first (then `work` is cancelled
    and awaited, so its outcome is retrieved and nothing is logged about it)."""
    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return task.result() if not task.cancelled() else None
