"""What passes between the scheduler and the model runner each step, in plain values:

    Scheduler.schedule ─> SchedulerOutput ─> ModelRunner.launch / sample ─> StepResult
        ─> Scheduler.update_from_output
    StepInputs: one forward pass as rank 0 sends it to every tensor-parallel rank
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import Request


@dataclass
class ScheduledRequest:
    request: Request
    start: int  # computes tokens [start, start + num_new_tokens)
    num_new_tokens: int
    samples: bool  # the chunk reaches the end of the known and pending tokens: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch order
    preempted: list[Request] = field(default_factory=list)  # dropped this step, to be recomputed
    failed: list[Request] = field(default_factory=list)  # finished with an error while scheduling
    num_batched_tokens: int = 0  # sum of num_new_tokens


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None  # under the raw model distribution, when asked for
    top_logprobs: list[tuple[int, float]]  # (token, logprob), most likely first, when asked for


@dataclass
class StepResult:
    """What one step produced for its requests."""

    sampled: dict[str, SampledToken]  # request id -> its new token (requests whose chunk completed)
    failed: dict[str, str]  # request id -> why choosing its token failed (only that request ends)
    # request id -> (first prompt position, [(logprob of the token after it, [(id, logprob) most
    # likely first]) for each position of the step's chunk]): prompt logprobs, when asked for
    prompt_logprobs: dict[str, tuple[int, list]] = field(default_factory=dict)


@dataclass
class StepInputs:
    """One forward pass in plain values: what rank 0 sends every tensor-parallel rank."""

    token_ids: list[int]  # the step's tokens, sequence after sequence (0 where pending)
    positions: list[int]  # each token's position in its sequence
    request_ids: list[str]  # the sequences, in batch order
    query_lens: list[int]  # tokens each sequence adds
    seq_lens: list[int]  # tokens each sequence holds after the step
    sample_rows: list[int]  # rows whose logits are sampled (last token of each finishing chunk)
    pending_rows: list[int] = field(default_factory=list)  # rows whose token id is still on the device ...
    pending_from: list[int] = field(default_factory=list)  # ... at this row of the previous step's sample
    prompt_rows: list[int] = field(default_factory=list)  # rows whose next prompt token's logprob is asked for
    prompt_targets: list[int] = field(default_factory=list)  # ... that token, row by row
    prompt_top: int = 0  # most likely tokens to return at each of those rows
    prompt_spans: list[tuple[str, int, int]] = field(default_factory=list)  # (request, first position, rows)
