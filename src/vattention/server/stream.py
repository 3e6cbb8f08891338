"""Following one request from the engine to its client.

    RequestStream (delta outputs, merged when the reader lags)
        ─> Generation (per choice: tokens so far, finish reason; abort + metrics on close)
        ─> DeltaTracker (what each chunk carries) ─> sse_events: `data: {json}` ... `data: [DONE]`
    or, submitted FINAL_ONLY: Generation.final() raced against the client's disconnect
        (unless_disconnected)

A streamed request is submitted with output_kind DELTA: each output holds, per choice that
progressed, only its new tokens and its new text, which is already final (the engine holds back
what a stop string could still cut and never hands out part of a UTF-8 character), so the chunks
add up to the non-streamed text. The server only frames the deltas.
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
from .protocol import APIError, ErrorInfo, ErrorResponse, PromptTokensDetails, UsageInfo

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
    """Turns one prompt's delta outputs into ChoiceDeltas: a choice's first chunk carries the
    prefix (completions' echo); text_offset follows each choice's text for its logprobs."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.text_offset: dict[int, int] = {}  # choice index -> text length sent, prefix included

    def update(self, out: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for c in out.outputs:
            if not (c.text or c.logprobs or c.finished):
                continue  # tokens whose text is held back, and nobody asked for their logprobs
            first = c.index not in self.text_offset
            offset = self.text_offset.get(c.index, len(self.prefix))
            deltas.append(ChoiceDelta(c.index, first, (self.prefix if first else "") + c.text, offset,
                                      c.logprobs, c.top_logprobs, c.finish_reason, c.stop_reason))
            self.text_offset[c.index] = offset + sum(len(lp.decoded) for lp in c.logprobs or [])
        return deltas


class Generation:
    """A submitted request as its handler follows it. close() ends it: aborts it in the engine if
    it has not finished (the client left) and records its metrics."""

    def __init__(self, stream: RequestStream, prompt_len: int, params: SamplingParams,
                 async_engine: AsyncEngine, metrics: ServerMetrics, arrival: float):
        self.request_id = stream.request_id
        self.created = int(time.time())  # every chunk of a stream carries the same timestamp
        self.prompt_len = prompt_len
        self.num_cached_tokens = 0  # of the prompt, found in the prefix cache
        self.num_tokens = [0] * params.n  # per choice: tokens generated so far (usage, metrics)
        self.finish_reasons: list[str | None] = [None] * params.n  # per choice, once it finished
        self._stream = stream
        self._async_engine = async_engine
        self._metrics = metrics
        self._arrival = arrival  # time.monotonic() when the request was submitted
        self._first_token: float | None = None  # when the engine had the first output token
        self._scheduled: float | None = None  # when the engine admitted it
        self._last: RequestOutput | None = None  # the newest output read
        self._closed = False

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self._stream.__anext__()
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        for c in out.outputs:
            self.num_tokens[c.index] = c.num_tokens
            self.finish_reasons[c.index] = c.finish_reason
        if self._first_token is None:  # the engine's time: a FINAL_ONLY output comes only at the end
            self._first_token = out.first_token_time
        if self._scheduled is None:
            self._scheduled = out.scheduled_time
        self._last = out
        return out

    async def final(self) -> RequestOutput:
        """The request's one output, once it has finished (submitted FINAL_ONLY)."""
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
        self._metrics.record([reason or "abort" for reason in self.finish_reasons], self.prompt_len,
                             sum(self.num_tokens), self._arrival, self._first_token, time.monotonic(),
                             self._scheduled)


def usage_of(gens: list[Generation]) -> UsageInfo:
    """Tokens of one request, summed over a batched request's prompts."""
    prompt = sum(gen.prompt_len for gen in gens)
    completion = sum(sum(gen.num_tokens) for gen in gens)
    cached = PromptTokensDetails(cached_tokens=sum(gen.num_cached_tokens for gen in gens))
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=cached)


async def sse_events(gens: list[Generation], trackers: list[DeltaTracker],
                     chunk: Callable[[ChoiceDelta, int], BaseModel | None], usage_chunk: BaseModel,
                     include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events for one request's generations (one per prompt of a batched request):
    chunk(delta, prompt index) per choice that progressed, in the order they progress; then
    usage_chunk with the usage of all of them if asked for; then [DONE]. Cancelling or closing
    this generator (the client left) aborts every generation."""
    try:
        async for i, out in _merged(gens):
            for delta in trackers[i].update(out):
                c = chunk(delta, i)
                if c is not None:  # None: held back (a tool-call stream sends its choice at the end)
                    yield _event(c)
        if include_usage:
            usage_chunk.usage = usage_of(gens)
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
