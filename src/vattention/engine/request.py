"""Request: one sequence's state, advanced by counters (never by phase).

  tokens:   | prompt ........................ | output ...... | pending |
            0                  num_computed_tokens ^           ^ num_tokens
  Each step computes tokens [num_computed_tokens, num_computed_tokens + n). When that reaches
  num_tokens + num_pending the step samples one more token. Chunked prefill, decode and
  recompute after preemption (num_computed_tokens back to 0) are the same loop.

With the overlapped loop a sampled token's id stays on the device until the host reads it one
step later: the scheduler counts it as pending (num_pending) when it schedules the step, and the
next step reads its id on the device. The scheduler advances num_computed_tokens when it
schedules a step, so the next step can be scheduled before this one has run.
"""

from __future__ import annotations

import enum
import time
from typing import Any
from dataclasses import dataclass, field

import torch

from ..outputs import Logprob
from ..sampling_params import SamplingParams
from .detokenizer import IncrementalDetokenizer


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's list operations must not compare every field
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: set[int]  # tokens that end the output unless params.ignore_eos
    max_tokens: int  # output tokens at most (max_tokens capped by the context length)
    prompt: str | None = None  # the prompt text, when given as text
    sample_index: int = 0  # which of the params.num_candidates samples this request is
    generator: torch.Generator | None = None  # seeded requests sample from their own stream
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache, or in a step already scheduled
    num_pending: int = 0  # sampled tokens still on the device (scheduled steps not yet collected)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0  # times its KV was dropped to be recomputed
    text: str = ""  # detokenized output so far (stop string removed)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: str | None = None  # why it failed, when finish_reason is "error"
    stop_reason: str | int | None = None  # the stop string or token that ended it
    logprobs: list[Logprob] = field(default_factory=list)  # sampled token's, when asked for
    cumulative_logprob: float = 0.0  # sum of the sampled tokens' logprobs (where the sampler computes them)
    top_logprobs: list[list[Logprob]] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    scheduled_time: float | None = None  # when it was first admitted (left the queue)
    detokenizer: IncrementalDetokenizer | None = None  # made by the output processor at the first token
    matcher: Any = None  # structured outputs: its grammar matcher (xgrammar), fed every token
    # prompt_logprobs: entry i is prompt token i+1's (logprob, [(id, logprob) most likely first])
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    num_sent_tokens: int = 0  # DELTA outputs: output tokens (and their logprobs) handed out so far
    num_sent_chars: int = 0  # DELTA outputs: characters of text handed out so far
    done_sent: bool = False  # its last output (finished) has been handed out
    cache_salt: str | None = None  # prefix caching: only requests with the same salt share
    prefix_keys: list[bytes] = field(default_factory=list)  # keys of its full cache units so far
    num_cached_tokens: int = 0  # prompt tokens its first admission found cached (not computed)
    num_units_published: int = 0  # its leading cache units offered to the KV manager

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens_with_pending(self) -> int:
        return len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without copying the whole sequence."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        if end <= p:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
