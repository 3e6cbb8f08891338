"""After each step: append sampled tokens, detokenize incrementally, decide whether each request
stops, and hand out what is new.

  token ─> Request.output_token_ids, logprobs ─> IncrementalDetokenizer.step ─> Request.text
        ─> stop rules (vLLM's order: stop token, EOS, stop string, max tokens, context)
  requests that progressed ─> make_request_output (by params.output_kind) ─> RequestOutput

The work per token is proportional to the token, not to the request's history: the text grows
by the detokenizer's new piece, a stop string is searched for only where it could newly end,
and a DELTA output carries only what the request has not handed out yet.
"""

from __future__ import annotations

import dataclasses
import math
import time

from ..outputs import CompletionOutput, Logprob, RequestOutput, RequestOutputKind
from .detokenizer import IncrementalDetokenizer
from .request import Request
from .step_io import SampledToken


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer  # None for token-id-only models (dummy presets)
        self.max_model_len = max_model_len

    def append(self, req: Request, sampled: SampledToken) -> str | None:
        """Add the token; returns a finish reason ("stop", "length") or None to continue."""
        token = sampled.token_id
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if sampled.logprob is not None:
            req.cumulative_logprob += sampled.logprob
        if req.params.logprobs is not None:
            req.logprobs.append(Logprob(token, sampled.logprob, self._piece(token)))
            req.top_logprobs.append([Logprob(t, lp, self._piece(t)) for t, lp in sampled.top_logprobs])
        previous = len(req.text)
        if self.tokenizer is not None:
            if req.detokenizer is None:
                req.detokenizer = IncrementalDetokenizer(self.tokenizer, req.params.skip_special_tokens)
            req.text += req.detokenizer.step(token)
        reason = self._stop_reason(req, token, previous)
        if req.matcher is not None and reason is None:
            if not req.matcher.accept_token(token):
                raise ValueError(f"token {token} breaks the request's structured-output grammar")
            if req.matcher.is_terminated():
                reason = "stop"  # the grammar is complete (its stop token, or nothing may follow)
        if reason is not None and req.detokenizer is not None and not isinstance(req.stop_reason, str):
            req.text += req.detokenizer.flush()  # e.g. a character the last token left incomplete
        return reason

    def _stop_reason(self, req: Request, token: int, previous: int) -> str | None:
        if len(req.output_token_ids) <= req.params.min_tokens:  # the sampler kept EOS/stop ids out
            if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
                return "length"
            return None
        if token in req.params.stop_token_ids:
            req.stop_reason = token
            return "stop"
        if not req.params.ignore_eos and token in req.eos_token_ids:
            return "stop"
        if req.params.stop and self._cut_at_stop_string(req, previous):
            return "stop"
        if len(req.output_token_ids) >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _cut_at_stop_string(self, req: Request, previous: int) -> bool:
        longest = max(len(s) for s in req.params.stop)
        search_from = max(0, previous - longest + 1)  # a stop string may straddle old and new text
        hits = [(req.text.find(s, search_from), s) for s in req.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        req.text = req.text[:index]
        req.stop_reason = stop
        return True

    def _piece(self, token: int) -> str:
        return self.tokenizer.token_to_str(token) if self.tokenizer is not None else ""


def make_request_output(group: list[Request]) -> RequestOutput | None:
    """The RequestOutput for the n samples of a prompt after a step that touched them, as their
    params.output_kind asks; None when there is nothing to hand out (FINAL_ONLY before the end,
    DELTA when no sample has anything new)."""
    first = group[0]
    kind = first.params.output_kind
    finished = all(r.finished for r in group)
    ranked = first.params.num_candidates > first.params.n  # best_of: the n best, at the end
    if (kind is RequestOutputKind.FINAL_ONLY or ranked) and not finished:
        return None
    # prompt logprobs: in every output, or (DELTA) in the first one, when the prompt is done
    with_prompt = first.params.prompt_logprobs is not None and (
        kind is not RequestOutputKind.DELTA or all(r.num_sent_tokens == 0 for r in group))
    if kind is RequestOutputKind.DELTA:
        outputs = [_delta(r) for r in group if _has_news(r)]
        if not outputs:
            return None
    elif ranked:
        best = sorted(group, key=_rank)[:first.params.n]
        outputs = [dataclasses.replace(_cumulative(r), index=i) for i, r in enumerate(best)]
    else:
        outputs = [_cumulative(r) for r in group]
    for r in group:
        r.done_sent = r.done_sent or r.finished
    times = [r.first_token_time for r in group if r.first_token_time is not None]
    admitted = [r.scheduled_time for r in group if r.scheduled_time is not None]
    return RequestOutput(request_id=first.request_id.rsplit("#", 1)[0], prompt=first.prompt,
                         prompt_token_ids=first.prompt_token_ids, outputs=outputs, finished=finished,
                         first_token_time=min(times, default=None), scheduled_time=min(admitted, default=None),
                         num_cached_tokens=max(r.num_cached_tokens for r in group),
                         **(_prompt_logprobs(first) if with_prompt else {}))


def _prompt_logprobs(r: Request) -> dict:
    """RequestOutput's prompt_logprobs / prompt_top_logprobs (token text is left to the caller)."""
    if len(r.prompt_logprobs) < len(r.prompt_token_ids) - 1:
        return {}  # not all of the prompt computed yet
    entries = r.prompt_logprobs[:len(r.prompt_token_ids) - 1]
    own = [None] + [Logprob(t, lp) for t, (lp, _) in zip(r.prompt_token_ids[1:], entries)]
    top = [[]] + [[Logprob(i, v) for i, v in alternatives] for _, alternatives in entries]
    return {"prompt_logprobs": own, "prompt_top_logprobs": top}


def _rank(r: Request) -> tuple:
    """best_of's order: the highest cumulative logprob first, failed candidates last, then by index."""
    failed = r.finish_reason == "error" or math.isnan(r.cumulative_logprob)
    return (failed, -r.cumulative_logprob if not failed else 0.0, r.sample_index)


def _cumulative(r: Request) -> CompletionOutput:
    wants = r.params.logprobs is not None
    return CompletionOutput(
        index=r.sample_index, text=r.text, token_ids=list(r.output_token_ids),
        finish_reason=r.finish_reason, stop_reason=r.stop_reason,
        logprobs=list(r.logprobs) if wants else None, top_logprobs=list(r.top_logprobs) if wants else None,
        error=r.error, num_tokens=len(r.output_token_ids),
        cumulative_logprob=r.cumulative_logprob if r.params.computed_logprobs is not None else None)


def _has_news(r: Request) -> bool:
    return len(r.output_token_ids) > r.num_sent_tokens or (r.finished and not r.done_sent)


def _delta(r: Request) -> CompletionOutput:
    """What r has not handed out yet. Text that a stop string could still cut (its last
    longest-stop - 1 characters) waits until the request finishes or more text follows."""
    holdback = max((len(s) for s in r.params.stop), default=1) - 1
    end = len(r.text) if r.finished else max(r.num_sent_chars, len(r.text) - holdback)
    text, r.num_sent_chars = r.text[r.num_sent_chars:end], end
    start, r.num_sent_tokens = r.num_sent_tokens, len(r.output_token_ids)
    wants = r.params.logprobs is not None
    return CompletionOutput(
        index=r.sample_index, text=text, token_ids=r.output_token_ids[start:],
        finish_reason=r.finish_reason, stop_reason=r.stop_reason,
        logprobs=r.logprobs[start:] if wants else None, top_logprobs=r.top_logprobs[start:] if wants else None,
        error=r.error, num_tokens=len(r.output_token_ids))
