"""The OpenAI wire format: request bodies, responses, stream chunks and the error envelope.

Requests name sampling parameters as OpenAI and vLLM do; `to_sampling_params` turns them into the
engine's SamplingParams, whose own checks are the single source of the valid ranges (a ValueError
from them becomes a 400 naming the parameter). A streamed request asks the engine for deltas, any
other for one output at the end. Unknown fields are refused, as OpenAI refuses them, so a misspelt
parameter is never silently ignored.
"""

from __future__ import annotations

import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..outputs import Logprob, RequestOutputKind
from ..sampling_params import SamplingParams, StructuredOutputs
from .tools import NamedToolChoice, ToolCall, ToolCallDelta, ToolDef, call_schema

# ---- errors ---------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str  # invalid_request_error, not_found_error, server_error, ...
    param: str | None = None  # the request field at fault, when known
    code: str | int | None = None  # machine-readable reason, e.g. context_length_exceeded


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An error the client caused or should retry; the app answers it as the OpenAI envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status  # HTTP status
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)


# ---- requests -------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JSONSchemaFormat(_Strict):
    name: str = Field(default="schema", max_length=64)
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # a JSON schema
    strict: bool | None = None  # accepted: the output always follows the schema here


class ResponseFormat(_Strict):
    """OpenAI's response_format: text (no constraint), json_object (any JSON object) or
    json_schema (the output validates against the schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsField(_Strict):
    """vLLM's structured_outputs request field: exactly one of these."""

    json_: dict | str | None = Field(default=None, alias="json")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False  # one more chunk at the end: no choices, the usage


MAX_N = 128  # choices per request, as OpenAI allows

_PARAM_OF_FIELD = re.compile(r"^invalid SamplingParams: (\w+)")


class _SamplingRequest(_Strict):
    """Fields both endpoints share. None means "the default", as some clients send nulls."""

    model: str | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; 0 or -1 = all tokens
    min_p: float | None = None  # vLLM extension
    repetition_penalty: float | None = None  # vLLM extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    min_tokens: int | None = None  # vLLM extension: no EOS, stop token or stop string before this many tokens
    skip_special_tokens: bool = True  # vLLM extension
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility; unused
    metadata: dict[str, str] | None = None  # OpenAI's stored-completion fields: accepted, unused
    store: bool | None = None
    service_tier: str | None = None
    cache_salt: str | None = Field(default=None, min_length=1)  # vLLM extension: only requests with the same salt share cached prefixes
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias in [-100, 100]
    structured_outputs: StructuredOutputsField | None = None  # vLLM extension: json schema, json_object, regex or choice

    def _sampling_params(self, max_tokens: int, logprobs: int | None, param_names: dict[str, str],
                         defaults: dict, **fields) -> SamplingParams:
        """fields: the endpoint's own SamplingParams fields (completions' best_of)."""
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
        given = {"n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                 "top_k": self.top_k, "min_p": self.min_p,
                 "repetition_penalty": self.repetition_penalty,
                 "presence_penalty": self.presence_penalty,
                 "frequency_penalty": self.frequency_penalty, "seed": self.seed,
                 "stop": self.stop, "stop_token_ids": self.stop_token_ids, "min_tokens": self.min_tokens,
                 **fields}
        kwargs = {**defaults, **{k: v for k, v in given.items() if v is not None}}
        structured = self._structured()
        if structured is not None:
            try:
                kwargs["structured_outputs"] = StructuredOutputs(**structured)
            except ValueError as e:
                raise APIError(400, str(e).removeprefix("invalid SamplingParams: "),
                               param=self._structured_param) from None
        if self.logit_bias:
            kwargs["logit_bias"] = self.logit_bias_ids()
        try:
            return SamplingParams(**kwargs, max_tokens=max_tokens, logprobs=logprobs,
                                  ignore_eos=self.ignore_eos,
                                  skip_special_tokens=self.skip_special_tokens,
                                  output_kind=(RequestOutputKind.DELTA if self.stream
                                               else RequestOutputKind.FINAL_ONLY))
        except ValueError as e:
            # SamplingParams names the field first: "invalid SamplingParams: top_p must be ..."
            m = _PARAM_OF_FIELD.match(str(e))
            field = m.group(1) if m else None
            raise APIError(400, str(e).removeprefix("invalid SamplingParams: "),
                           param=param_names.get(field, field)) from None

    _structured_param = "structured_outputs"

    def _structured(self) -> dict | None:
        """StructuredOutputs' fields from the request, or None."""
        s = self.structured_outputs
        if s is None:
            return None
        return {k: v for k, v in dict(json=s.json_, json_object=s.json_object, regex=s.regex,
                                      choice=s.choice).items() if v not in (None, False)}

    def logit_bias_ids(self) -> dict[int, float]:
        """logit_bias with integer keys; a key that is not a token id is a 400."""
        ids = {}
        for key, bias in (self.logit_bias or {}).items():
            try:
                ids[int(key)] = bias
            except ValueError:
                raise APIError(400, f"logit_bias keys must be token ids, got {key!r}",
                               param="logit_bias") from None
        return ids

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions; None = up to the context
    logprobs: int | None = None  # the sampled token's logprob and this many most likely ones
    echo: bool = False  # the prompt text goes before the completion
    suffix: str | None = None  # OpenAI's insertion mode: refused by name (no fill-in-the-middle here)
    best_of: int | None = None  # candidates sampled server-side, the n most likely returned (>= n; not with stream)

    def to_sampling_params(self, max_tokens: int, defaults: dict) -> SamplingParams:
        """defaults: the model's sampling defaults, for the parameters the request leaves unset."""
        if self.suffix is not None:
            raise APIError(400, "suffix is not supported: this server has no insertion "
                                "(fill-in-the-middle) mode", param="suffix")
        if self.best_of is not None and self.stream and self.best_of != (self.n or 1):
            raise APIError(400, f"best_of={self.best_of} with stream is not supported: the best "
                                f"{self.n or 1} are known only when all candidates finish", param="best_of")
        if self.echo and self.logprobs is not None and self.stream:
            raise APIError(400, "echo with logprobs is not supported when streaming (the prompt's "
                                "logprobs come in a non-streamed response)", param="echo")
        params = self._sampling_params(max_tokens, self.logprobs, {}, defaults, best_of=self.best_of)
        if self.echo and self.logprobs is not None:  # what evaluation harnesses score prompts with
            params.prompt_logprobs = self.logprobs
        return params


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # chat templates may read more keys (name, ...)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]  # OpenAI's roles
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict:
        """The message as the chat template reads it: content as one string."""
        message = self.model_dump(exclude_none=True)
        if isinstance(self.content, list):
            others = [p.type for p in self.content if p.type != "text"]
            if others:
                raise APIError(400, f"only text content parts are supported, got {others[0]!r}",
                               param="messages")
            message["content"] = "".join(p.text or "" for p in self.content)
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None  # None (with max_tokens None) = up to the context
    logprobs: bool = False  # return each output token's logprob
    top_logprobs: int | None = None  # and this many most likely tokens at each position
    response_format: ResponseFormat | None = None  # OpenAI's: text, json_object or json_schema
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True

    @property
    def tools_on(self) -> bool:
        """Tools are rendered and calls parsed (tools given, tool_choice not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def tool_schema(self) -> dict | None:
        return call_schema(self.tools or [], self.tool_choice, self.parallel_tool_calls) if self.tools_on else None

    def check_tools(self) -> None:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools or []}:
            raise APIError(400, f"tool_choice names {self.tool_choice.function.name!r}, which is not "
                                f"among the tools", param="tool_choice")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise APIError(400, "tools must have distinct names", param="tools")

    def _structured(self) -> dict | None:
        schema = self.tool_schema
        if schema is not None:
            if self.response_format is not None and self.response_format.type != "text":
                raise APIError(400, "a required or named tool_choice cannot be combined with "
                                    "response_format", param="tool_choice")
            self._structured_param = "tool_choice"
            return {"json": schema}
        f = self.response_format
        if f is None or f.type == "text":
            return super()._structured()
        if self.structured_outputs is not None:
            raise APIError(400, "give response_format or structured_outputs, not both", param="response_format")
        self._structured_param = "response_format"
        if f.type == "json_object":
            return {"json_object": True}
        if f.json_schema is None:
            raise APIError(400, "response_format json_schema needs its json_schema", param="response_format")
        return {"json": f.json_schema.schema_ or {"type": "object"}}

    @property
    def requested_max_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_sampling_params(self, max_tokens: int, defaults: dict) -> SamplingParams:
        """defaults: the model's sampling defaults, for the parameters the request leaves unset."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        names = {"logprobs": "top_logprobs", "max_tokens": "max_tokens"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return self._sampling_params(max_tokens, logprobs, names, defaults)


class TokenizeRequest(_Strict):
    """Either a prompt (tokenized as /v1/completions does) or messages (as /v1/chat does)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt only: the tokenizer's BOS etc.
    add_generation_prompt: bool = True  # messages only: end with the assistant's turn opening


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


# ---- responses ------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)  # where each token starts in the text
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None  # "stop" or "length"; "abort" if the server gave up
    stop_reason: str | int | None = None  # vLLM extension: the stop string or token id hit


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None  # in streams: only in the include_usage chunk


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None  # UTF-8 bytes of token


class ChatLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None  # "assistant" in each choice's first chunk
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "vattention"
    max_model_len: int | None = None  # vLLM extension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- logprobs in each endpoint's shape --------------------------------------------------------


def completion_logprobs(sampled: list[Logprob], top: list[list[Logprob]],
                        text_offset: int) -> CompletionLogProbs:
    """Completions shape; text_offset is where the first of these tokens starts in the text.
    Each top_logprobs dict holds the sampled token too, as vLLM's does."""
    out = CompletionLogProbs()
    for lp, alternatives in zip(sampled, top):
        out.text_offset.append(text_offset)
        out.tokens.append(lp.decoded)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({a.decoded: a.logprob for a in [*alternatives, lp]})
        text_offset += len(lp.decoded)
    return out


def prompt_completion_logprobs(prompt_ids: list[int], own: list[Logprob | None], top: list[list[Logprob]],
                               piece) -> CompletionLogProbs:
    """The echoed prompt's part of a completion's logprobs (the first token's is null: nothing
    predicts it); piece(token id) is the token's text."""
    out, offset = CompletionLogProbs(), 0
    for token, lp, alternatives in zip(prompt_ids, own, top):
        text = piece(token)
        out.text_offset.append(offset)
        out.tokens.append(text)
        out.token_logprobs.append(None if lp is None else lp.logprob)
        out.top_logprobs.append(None if lp is None else {piece(a.token_id): a.logprob for a in [*alternatives, lp]})
        offset += len(text)
    return out


def chat_logprobs(sampled: list[Logprob], top: list[list[Logprob]]) -> ChatLogprobs:
    def entry(lp: Logprob) -> TopLogprob:
        return TopLogprob(token=lp.decoded, logprob=lp.logprob, bytes=list(lp.decoded.encode()))

    return ChatLogprobs(content=[ChatLogprobEntry(**entry(lp).model_dump(),
                                                  top_logprobs=[entry(a) for a in alternatives])
                                 for lp, alternatives in zip(sampled, top)])

