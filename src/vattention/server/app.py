"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health,
/version, /metrics, /tokenize and /detokenize; CORS and the periodic stats log when configured.

A generation request is validated here, tokenized on a worker thread (so a large prompt never
stalls the event loop: /health and every stream keep going), submitted to the AsyncEngine with
all its prompts at once, then followed as a Generation (stream.py): chunks go out as server-sent
events while the engine produces them, or one JSON body at the end. If the client goes away first,
the request is aborted at once (its KV memory freed): Starlette cancels a streaming response when
the connection drops; a non-streaming one races its work against the http.disconnect message.
Errors and the API key check are in errors.py; body size, read deadlines and memory in limits.py.
What a request may be is the engine's rule (engine.limits, engine/validation.py), checked here as
early as it can be: a text far longer than the context could ever hold (more characters than
context x the longest token) is refused before it is tokenized. Its RequestError is a 400.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import jinja2
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from .. import __version__
from ..engine.validation import RequestError
from ..sampling_params import SamplingParams
from .async_engine import (AsyncEngine, EngineOverloadedError, EngineStoppedError,
                           RequestFailedError, Submission)
from .errors import add_error_handlers, bearer_check, parse_body
from .limits import BodyLimitMiddleware
from .metrics import ServerMetrics
from .stats_log import log_stats
from .tools import ToolCallDelta
from .tools import for_template as tools_for_template
from .tools import parse as parse_tool_calls
from .protocol import (APIError, AssistantMessage, ChatChoice, ChatCompletionChunk,
                       ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChatStreamChoice,
                       CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage,
                       DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList,
                       TokenizeRequest, TokenizeResponse, chat_logprobs, completion_logprobs,
                       prompt_completion_logprobs)
from .stream import (ChoiceDelta, DeltaTracker, Generation, finals, sse_events, unless_disconnected,
                     usage_of)

MAX_BATCHED_PROMPTS = 256  # prompts in one completions request (each is its own engine request)
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 << 20  # ~8 MB of prompt text at most fits any context we serve


def build_app(async_engine: AsyncEngine, served_model_name: str, api_key: str | None = None,
              shutdown_timeout_s: float = 30.0,
              max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES, options=None) -> FastAPI:
    """The app around a started AsyncEngine; the app's shutdown shuts the engine down.
    `options`: the ServerConfig, for the stats log and CORS (None: no stats log, no CORS)."""
    server = OpenAIServer(async_engine, served_model_name)
    interval = options.stats_log_interval_s if options is not None else 0

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(log_stats(lambda: async_engine.stats.engine, interval)) if interval else None
        yield
        if task is not None:
            task.cancel()
        await asyncio.to_thread(async_engine.shutdown, shutdown_timeout_s)

    app = FastAPI(title="vattention", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_request_body_bytes)
    if options is not None and options.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=options.allowed_origins,
                           allow_methods=options.allowed_methods or ["*"],
                           allow_headers=options.allowed_headers or ["*"],
                           allow_credentials=options.allow_credentials)
    add_error_handlers(app)
    auth = [Depends(bearer_check(api_key))] if api_key else []

    app.get("/health")(server.health)
    app.get("/version")(server.version)
    app.get("/metrics")(server.metrics_page)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.get("/v1/models", dependencies=auth)(server.models)
    app.post("/v1/completions", dependencies=auth)(server.completions)
    app.post("/v1/chat/completions", dependencies=auth)(server.chat)
    return app


class OpenAIServer:
    """What the endpoints do, apart from routing."""

    def __init__(self, async_engine: AsyncEngine, served_model_name: str):
        self.async_engine = async_engine
        self.model_name = served_model_name
        self.metrics = ServerMetrics(lambda: async_engine.stats, served_model_name)
        engine = async_engine.engine
        self.tokenizer = engine.tokenizer  # None for token-id-only models
        self.limits = engine.limits  # what a request may be: context, vocabulary, text length
        self.max_model_len = engine.limits.max_model_len
        self.sampling_defaults = engine.default_sampling  # the model's, for what a request leaves unset

    # ---- small endpoints ----------------------------------------------------------------------

    async def health(self) -> Response:
        failure = self.async_engine.stats.failure
        if failure is not None:
            raise APIError(503, f"the engine failed: {failure}", type="server_error")
        return Response(status_code=200)

    async def version(self) -> dict:
        return {"version": __version__}

    async def metrics_page(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.model_name, max_model_len=self.max_model_len)])

    async def tokenize(self, request: HTTPRequest) -> TokenizeResponse:
        body = await parse_body(request, TokenizeRequest)
        self._check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = await self._chat_prompt(body.messages, body.add_generation_prompt)
        else:
            tokenizer = self._need_tokenizer()
            self.limits.check_text_length(len(body.prompt), "prompt")
            ids = await asyncio.to_thread(tokenizer.encode, body.prompt,
                                          add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=self.max_model_len)

    async def detokenize(self, request: HTTPRequest) -> DetokenizeResponse:
        body = await parse_body(request, DetokenizeRequest)
        self._check_model(body.model)
        self.limits.check_token_ids(body.tokens, "tokens")
        text = await asyncio.to_thread(self._need_tokenizer().decode, body.tokens,
                                       skip_special_tokens=False)
        return DetokenizeResponse(prompt=text)

    # ---- generation ---------------------------------------------------------------------------

    async def completions(self, request: HTTPRequest) -> Response:
        """One prompt or a batch of them (a list of strings or of token-id lists, as OpenAI takes):
        prompt p's choices are indexed p * n + 0 .. p * n + n - 1, and usage sums the prompts."""
        body = await parse_body(request, CompletionRequest)
        self._check_model(body.model)
        prompts = await self._completion_prompts(body.prompt)
        submissions = []  # (prompt ids, sampling params, echoed text) per prompt, all checked first
        for prompt_ids, prompt_text in prompts:
            params = self._sampling_params(body, body.max_tokens, len(prompt_ids), "prompt")
            echo = ""
            if body.echo:
                echo = prompt_text or self._need_tokenizer().decode(prompt_ids)
            submissions.append((prompt_ids, params, echo))
        gens = await self._submit("cmpl", [(ids, params) for ids, params, _ in submissions],
                                  body.cache_salt)
        first, n = gens[0], submissions[0][1].n

        def chunk(d: ChoiceDelta, p: int) -> CompletionResponse:
            logprobs = None
            if d.logprobs is not None:
                logprobs = completion_logprobs(d.logprobs, d.top_logprobs, d.text_offset)
            choice = CompletionChoice(index=p * n + d.index, text=d.text, logprobs=logprobs,
                                      finish_reason=d.finish_reason, stop_reason=d.stop_reason)
            return CompletionResponse(id=first.request_id, created=first.created,
                                      model=self.model_name, choices=[choice])

        if body.stream:
            usage_chunk = CompletionResponse(id=first.request_id, created=first.created,
                                             model=self.model_name, choices=[])
            trackers = [DeltaTracker(echo) for _, _, echo in submissions]
            return _sse(sse_events(gens, trackers, chunk, usage_chunk, body.include_usage))
        outs = await unless_disconnected(request, finals(gens))
        if outs is None:
            return Response(status_code=499)  # nobody is listening
        choices = []
        for p, (out, (prompt_ids, _, echo)) in enumerate(zip(outs, submissions)):
            for c in out.outputs:
                logprobs = None
                if c.logprobs is not None:
                    logprobs = completion_logprobs(c.logprobs, c.top_logprobs, len(echo))
                    if out.prompt_logprobs is not None:  # echo: the prompt's tokens come first
                        head = prompt_completion_logprobs(prompt_ids, out.prompt_logprobs, out.prompt_top_logprobs,
                                                          self._need_tokenizer().token_to_str)
                        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
                            setattr(logprobs, name, getattr(head, name) + getattr(logprobs, name))
                choices.append(CompletionChoice(index=p * n + c.index, text=echo + c.text,
                                                logprobs=logprobs, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason))
        return _json(CompletionResponse(id=first.request_id, created=first.created,
                                        model=self.model_name, choices=choices,
                                        usage=usage_of(gens)))

    async def chat(self, request: HTTPRequest) -> Response:
        body = await parse_body(request, ChatCompletionRequest)
        self._check_model(body.model)
        body.check_tools()
        tools = tools_for_template(body.tools) if body.tools_on else None
        prompt_ids = await self._chat_prompt(body.messages, add_generation_prompt=True, tools=tools)
        params = self._sampling_params(body, body.requested_max_tokens, len(prompt_ids), "messages")
        [gen] = await self._submit("chatcmpl", [(prompt_ids, params)], body.cache_salt)
        constrained = body.tool_schema is not None
        names = {t.function.name for t in body.tools or []}
        held: dict[int, list[str]] = {}  # tool streams: each choice's text until it ends

        def chunk(d: ChoiceDelta) -> ChatCompletionChunk | None:
            logprobs = None if d.logprobs is None else chat_logprobs(d.logprobs, d.top_logprobs)
            content, calls, finish = d.text or None, None, d.finish_reason
            if body.tools_on:
                held.setdefault(d.index, []).append(d.text)
                if finish is None and not d.first:
                    return None
                content = None
                if finish is not None:
                    content, found = parse_tool_calls("".join(held.pop(d.index)), constrained, names)
                    calls = [ToolCallDelta(index=i, **c.model_dump()) for i, c in enumerate(found)] or None
                    finish = "tool_calls" if found else finish
            delta = DeltaMessage(role="assistant" if d.first else None, content=content, tool_calls=calls)
            choice = ChatStreamChoice(index=d.index, delta=delta, logprobs=logprobs,
                                      finish_reason=finish, stop_reason=d.stop_reason)
            return ChatCompletionChunk(id=gen.request_id, created=gen.created,
                                       model=self.model_name, choices=[choice])

        if body.stream:
            usage_chunk = ChatCompletionChunk(id=gen.request_id, created=gen.created,
                                              model=self.model_name, choices=[])
            return _sse(sse_events([gen], [DeltaTracker()], lambda d, _: chunk(d), usage_chunk,
                                   body.include_usage))
        out = await unless_disconnected(request, gen.final())
        if out is None:
            return Response(status_code=499)
        choices = []
        for c in out.outputs:
            content, calls, finish = c.text, [], c.finish_reason
            if body.tools_on:
                content, calls = parse_tool_calls(c.text, constrained, names)
                finish = "tool_calls" if calls else finish
            choices.append(ChatChoice(
                index=c.index, message=AssistantMessage(content=content, tool_calls=calls or None),
                logprobs=None if c.logprobs is None else chat_logprobs(c.logprobs, c.top_logprobs),
                finish_reason=finish, stop_reason=c.stop_reason))
        return _json(ChatCompletionResponse(id=gen.request_id, created=gen.created,
                                            model=self.model_name, choices=choices,
                                            usage=usage_of([gen])))

    # ---- request checks -----------------------------------------------------------------------

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves "
                                f"`{self.model_name}`.", param="model", code="model_not_found")

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise APIError(400, "this model has no tokenizer; send prompts as token ids")
        return self.tokenizer

    async def _completion_prompts(self, prompt) -> list[tuple[list[int], str | None]]:
        """(token ids, text if given as text) of each prompt: a str, a list[int], or a batch of
        either (a list of str or of list[int]). Text is tokenized on a worker thread."""
        batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if len(batch) > MAX_BATCHED_PROMPTS:
            raise APIError(400, f"{len(batch)} prompts in one request; at most {MAX_BATCHED_PROMPTS}",
                           param="prompt")
        texts = [p for p in batch if isinstance(p, str)]
        if texts:
            tokenizer = self._need_tokenizer()
            for text in texts:
                self.limits.check_text_length(len(text), "prompt")
            encoded = iter(await asyncio.to_thread(lambda: [tokenizer.encode(t) for t in texts]))
        prompts = []
        for p in batch:
            ids, text = (next(encoded), p) if isinstance(p, str) else (list(p), None)
            self.limits.check_prompt(ids, "prompt")
            prompts.append((ids, text))
        return prompts

    async def _chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool,
                           tools: list[dict] | None = None) -> list[int]:
        tokenizer = self._need_tokenizer()
        conversation = [m.for_template() for m in messages]
        self.limits.check_text_length(sum(len(m.get("content") or "") for m in conversation), "messages")

        def render_and_encode() -> list[int]:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                 tools=tools)
            # The template already holds the BOS text; encode without adding special tokens again.
            return tokenizer.encode(text, add_special_tokens=False)

        try:
            return await asyncio.to_thread(render_and_encode)
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(400, f"the chat template could not render the messages: {e}",
                           param="messages") from None

    def _sampling_params(self, body: CompletionRequest | ChatCompletionRequest, requested: int | None,
                         prompt_len: int, field: str) -> SamplingParams:
        """The request's SamplingParams, checked against the limits; max_tokens is as asked, else
        all the room the prompt leaves."""
        room = self.limits.room(prompt_len, field)
        max_tokens = requested if requested is not None else room
        params = body.to_sampling_params(max_tokens, self.sampling_defaults)
        self.limits.check_params(params)
        self.limits.check_context(prompt_len, max_tokens, field)
        return params

    async def _submit(self, kind: str, prompts: list[tuple[list[int], SamplingParams]],
                      cache_salt: str | None = None) -> list[Generation]:
        """Submit a request's prompts together (all admitted or none); one Generation each."""
        needed = sum(params.num_candidates for _, params in prompts)
        limit = self.async_engine.max_queued_requests
        if needed > limit:
            raise APIError(400, f"this request needs {needed} sequences (n or best_of x prompts); this "
                                f"server queues at most {limit} (--max-queued-requests)",
                           param="n")
        submissions = [Submission(f"{kind}-{uuid.uuid4().hex}", ids, params, cache_salt)
                       for ids, params in prompts]
        arrival = time.monotonic()
        try:
            streams = await self.async_engine.add_all(submissions)
        except RequestError:
            raise  # a limit the engine checked again: errors.py answers it with its param
        except ValueError as e:
            raise APIError(400, str(e)) from None
        except EngineOverloadedError as e:
            raise APIError(503, str(e), type="server_error", code="overloaded") from None
        except EngineStoppedError as e:
            raise APIError(503, str(e), type="server_error", code="unavailable") from None
        except RequestFailedError as e:
            raise APIError(500, str(e), type="server_error") from None
        return [Generation(stream, len(ids), params, self.async_engine, self.metrics, arrival)
                for stream, (ids, params) in zip(streams, prompts)]


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _json(payload) -> Response:
    return Response(payload.model_dump_json(), media_type="application/json")
