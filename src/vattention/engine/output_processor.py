"""After each step: append sampled tokens, detokenize, decide whether each request stops."""

from __future__ import annotations

import time

from ..outputs import CompletionOutput, Logprob, RequestOutput
from .request import Request
from .runner import SampledToken


class OutputProcessor:
    """Applies stop rules in vLLM's order: stop token, EOS, stop string, max tokens, context."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer  # None for token-id-only models (dummy presets)
        self.max_model_len = max_model_len

    def append(self, req: Request, sampled: SampledToken) -> str | None:
        """Add the token; returns a finish reason ("stop", "length") or None to continue."""
        token = sampled.token_id
        req.output_token_ids.append(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if req.params.logprobs is not None:
            req.logprobs.append(Logprob(token, sampled.logprob, self._piece(token)))
            req.top_logprobs.append([Logprob(t, lp, self._piece(t)) for t, lp in sampled.top_logprobs])
        previous = len(req.text)
        if self.tokenizer is not None:
            req.text = self.tokenizer.decode(req.output_token_ids,
                                             skip_special_tokens=req.params.skip_special_tokens)
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


def make_request_output(group: list[Request]) -> RequestOutput:
    """One RequestOutput for the n samples of a prompt."""
    first = group[0]
    outputs = [CompletionOutput(
        index=r.sample_index, text=r.text, token_ids=list(r.output_token_ids),
        finish_reason=r.finish_reason, stop_reason=r.stop_reason,
        logprobs=list(r.logprobs) if r.params.logprobs is not None else None,
        top_logprobs=list(r.top_logprobs) if r.params.logprobs is not None else None,
        error=r.error)
        for r in group]
    return RequestOutput(request_id=first.request_id.rsplit("#", 1)[0], prompt=first.prompt,
                         prompt_token_ids=first.prompt_token_ids, outputs=outputs,
                         finished=all(r.finished for r in group))
