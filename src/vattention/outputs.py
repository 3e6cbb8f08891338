"""What generate() returns: one RequestOutput per prompt, one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability under the model (before temperature and penalties)."""

    token_id: int
    logprob: float
    decoded: str = ""  # the token's text


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str  # generated text (stop string removed)
    token_ids: list[int]  # generated tokens
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token), "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[Logprob] | None = None  # per token: the sampled one (when requested)
    top_logprobs: list[list[Logprob]] | None = None  # per token: the most likely ones
    error: str | None = None  # why this sample failed (finish_reason "error"); other requests are unaffected

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text, when given as text
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False

    @property
    def error(self) -> str | None:
        """The first failed sample's error, or None when none failed."""
        return next((c.error for c in self.outputs if c.error is not None), None)
