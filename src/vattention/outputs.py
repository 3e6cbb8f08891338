"""What generate() returns: one RequestOutput per prompt, one CompletionOutput per sample.

How much an output holds is the request's SamplingParams.output_kind:
  CUMULATIVE  each step's output holds everything generated so far (text, token_ids, logprobs)
  DELTA       each output holds only what is new since the request's previous output; the text
              of a delta is final (never retracted: text a stop string could still cut is held
              back until it cannot), so the concatenated deltas equal the final text
  FINAL_ONLY  one output, when the request finishes, holding everything (LLM.generate's kind)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class Logprob:
    """A token's log-probability under the model (before temperature and penalties)."""

    token_id: int
    logprob: float
    decoded: str = ""  # the token's text


@dataclass
class CompletionOutput:
    index: int  # which of the n samples
    text: str  # generated text (stop string removed); with DELTA, only the new part
    token_ids: list[int]  # generated tokens; with DELTA, only the new ones
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token), "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[Logprob] | None = None  # per token: the sampled one (when requested)
    top_logprobs: list[list[Logprob]] | None = None  # per token: the most likely ones
    error: str | None = None  # why this sample failed (finish_reason "error"); other requests are unaffected
    num_tokens: int = 0  # tokens generated so far in all (the same as len(token_ids) unless DELTA)
    cumulative_logprob: float | None = None  # sum of the tokens' logprobs (with logprobs or best_of; vLLM's)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the prompt text, when given as text
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)  # DELTA: only the samples that progressed
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused instead of computed
    first_token_time: float | None = None  # time.monotonic() when the engine had the first token of any sample
    scheduled_time: float | None = None  # time.monotonic() when the engine first admitted any sample
    # with SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first, which
    # nothing predicts) and, per token, the most likely tokens at its position (vLLM's shape,
    # as lists); complete once the request has finished its prompt
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_top_logprobs: list[list[Logprob]] | None = None

    @property
    def error(self) -> str | None:
        """The first failed sample's error, or None when none failed."""
        return next((c.error for c in self.outputs if c.error is not None), None)
