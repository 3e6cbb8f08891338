"""Scheduler: owns every request's state; continuous batching by counters under a per-step token
budget, and the one place a step's results are applied.

    schedule()                 which tokens of which requests the next step computes
    update_from_output(s, r)   step s's sampled tokens appended, stop rules applied, requests finished
    finish / fail              a request ends (its KV freed), whoever decides it

Each step: running requests first (in arrival order), each taking min(remaining, budget) tokens;
a request whose KV cannot grow preempts the newest running request (its KV is dropped and
recomputed later). Then waiting requests are admitted while budget, slots and KV memory allow.
Scheduling advances a request's num_computed_tokens at once, and a chunk that samples counts
one pending token, so the next step can be scheduled before this one's tokens are known (the
overlapped loop): a request whose pending token is its last (max_tokens) is not scheduled
again, and one that stops at that token otherwise (EOS, stop string) has computed one extra
token by then, which update_from_output discards.

A request whose KV allocation raises (a driver error, say) fails alone: it is finished with
finish_reason "error" and listed in the output's `failed`; the rest of the batch is scheduled.

Prefix caching (when the KV manager has a cache unit): a request being admitted from scratch
asks the KV manager for the cached start of its tokens and begins computing after it. After
each schedule the requests' newly filled units are offered for reuse (their KV is issued by
then, and any later reader runs after it on the device); a request that ends or is preempted
offers its tail too. A step that never ran clears the cache: it may list KV never written.
"""

from __future__ import annotations

import time
from collections import deque

from ..kv import KVManager, PrefixHit, extend_keys
from .output_processor import OutputProcessor
from .request import Request, RequestStatus
from .step_io import ScheduledRequest, SchedulerOutput, StepResult


class Scheduler:
    def __init__(self, kv: KVManager, outputs: OutputProcessor, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.outputs = outputs
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since the start
        self.prefix_queries = 0  # tokens of requests admitted from scratch (prefix cache lookups)
        self.prefix_hits = 0  # of those, tokens found cached
        self.num_prompt_tokens_computed = 0  # prompt tokens scheduled for computing (recompute included)
        self.num_generated_tokens = 0  # output tokens appended to requests (after stop rules)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if req.num_output_tokens_with_pending >= req.max_tokens:
                continue  # its last token is on its way; it finishes when that arrives
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            while not self._allocate(req, req.num_computed_tokens + n, out):
                if req.finished:
                    break
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status is not RequestStatus.RUNNING:
                continue
            out.scheduled.append(self._schedule(req, n))
            budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            if req.num_pending:
                break  # preempted while its last token was on the device: admitted once it arrives
            hit = self._match_prefix(req, out)
            if req.finished:
                continue
            cached = hit.num_tokens if hit is not None else 0
            n = min(req.num_tokens - cached, budget)
            if not self._allocate(req, cached + n, out, hit):
                if req.finished:
                    continue  # it failed and left the queue
                break  # not enough KV memory now; retry when something finishes
            self.waiting.popleft()
            if req.scheduled_time is None:
                req.scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if self.kv.cache_unit:
                self.prefix_queries += req.num_tokens
                self.prefix_hits += cached
                if not req.num_preemptions:
                    req.num_cached_tokens = cached
            req.num_computed_tokens = cached
            req.num_units_published = cached // self.kv.cache_unit if self.kv.cache_unit else 0
            out.scheduled.append(self._schedule(req, n))
            budget -= n
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        # Prompt units are offered as their chunks are issued, so that requests arriving while
        # this one runs find its prompt; the units its decode fills are offered when it finishes
        # or is preempted (final): nothing but its own next turn could ask for them, and a
        # decode step then costs no prefix-cache work (measured ~3 % of a batch-256 step on an
        # H200 when every request filed each unit as it filled).
        for item in out.scheduled:
            if item.start < len(item.request.prompt_token_ids):
                self._publish(item.request, out)
        return out

    def _allocate(self, req: Request, num_tokens: int, out: SchedulerOutput,
                  hit: PrefixHit | None = None) -> bool:
        """kv.allocate, except that an error raised for this request fails only this request."""
        try:
            return self.kv.allocate(req.request_id, num_tokens, hit)
        except Exception as e:  # noqa: BLE001 - the error is this request's; the step goes on
            self.fail(req, f"KV allocation of {num_tokens} tokens failed: {type(e).__name__}: {e}")
            out.failed.append(req)
            return False

    # ---- prefix caching -----------------------------------------------------------------------

    def _match_prefix(self, req: Request, out: SchedulerOutput) -> PrefixHit | None:
        unit = self.kv.cache_unit
        if not unit or req.num_computed_tokens or req.params.prompt_logprobs is not None:
            return None  # prompt logprobs need every prompt position computed
        try:
            return self.kv.match_prefix(self._keyed_tokens(req), req.prefix_keys, req.cache_salt)
        except Exception as e:  # noqa: BLE001 - this request's alone
            self.fail(req, f"prefix cache lookup failed: {type(e).__name__}: {e}")
            out.failed.append(req)
            return None

    def _keyed_tokens(self, req: Request) -> list[int]:
        """The request's tokens, its prefix_keys brought up to them."""
        tokens = req.all_token_ids
        extend_keys(req.prefix_keys, tokens, self.kv.cache_unit, req.cache_salt)
        return tokens

    def _publish(self, req: Request, out: SchedulerOutput | None = None, final: bool = False) -> None:
        """Offer the request's computed (or issued) tokens to the prefix cache: its full units
        when a new one has filled, and with `final` (it is about to be freed) its tail."""
        unit = self.kv.cache_unit
        if not unit or req.status is not RequestStatus.RUNNING:
            return
        n = min(req.num_computed_tokens, req.num_tokens)
        if n // unit <= req.num_units_published and not (final and n % unit):
            return
        try:
            self.kv.cache_prefix(req.request_id, self._keyed_tokens(req), req.prefix_keys, n, final,
                                 req.cache_salt)
            req.num_units_published = n // unit
        except Exception as e:  # noqa: BLE001 - caching is an optimization; the request goes on
            req.num_units_published = n // unit  # not offered again
            if out is not None and not final:
                self.fail(req, f"prefix caching failed: {type(e).__name__}: {e}")
                out.failed.append(req)

    def _schedule(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        self.num_prompt_tokens_computed += max(0, min(start + n, len(req.prompt_token_ids)) - start)
        samples = start + n == req.num_tokens + req.num_pending
        req.num_computed_tokens += n
        req.num_pending += samples
        return ScheduledRequest(req, start, n, samples)

    def _preempt(self, req: Request, publish: bool = True) -> None:
        """Drop the request's KV (offered to the prefix cache first, so its recompute may find
        it); it goes back to the front of the queue to be recomputed (a token still pending for
        it is appended when its step is collected)."""
        if publish:
            self._publish(req, final=True)
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # ---- results ------------------------------------------------------------------------------

    def update_from_output(self, sched: SchedulerOutput, result: StepResult) -> list[Request]:
        """Apply a step's results; returns the requests whose state changed (in batch order,
        those that failed while it was scheduled first). A token for a request that finished
        after the step was scheduled (aborted, or stopped by the step before) is discarded."""
        touched = list(sched.failed)
        for item in sched.scheduled:
            got = result.prompt_logprobs.get(item.request.request_id)
            if got is not None and got[0] == len(item.request.prompt_logprobs):  # (a recompute repeats none)
                item.request.prompt_logprobs += got[1]
            if not item.samples:
                continue
            req = item.request
            req.num_pending -= 1
            if req.finished:
                continue
            error = result.failed.get(req.request_id)
            token = result.sampled.get(req.request_id)
            if error is None and token is None:
                continue
            if error is None:
                try:
                    reason = self.outputs.append(req, token)
                    self.num_generated_tokens += 1
                except Exception as e:  # noqa: BLE001 - e.g. detokenizing: this request's alone
                    error = f"processing its output failed: {type(e).__name__}: {e}"
                else:
                    if reason is not None:
                        self.finish(req, reason)
            if error is not None:
                self.fail(req, error)
            touched.append(req)
        return touched

    def forget_step(self, sched: SchedulerOutput) -> None:
        """A scheduled step that never ran (its forward failed, or it was abandoned with it):
        its requests drop their KV and recompute, so that no count claims what no step did."""
        for item in sched.scheduled:
            req = item.request
            req.num_pending -= item.samples
            if req.status is RequestStatus.RUNNING:
                self._preempt(req, publish=False)
                self.num_preemptions -= 1  # not a preemption for memory
                req.num_preemptions -= 1
            elif req.status is RequestStatus.WAITING:
                req.num_computed_tokens = 0
        self.kv.reset_prefix_cache()  # it may list units this step was to write

    def finish(self, req: Request, reason: str) -> None:
        if reason != "error":
            self._publish(req, final=True)
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        try:
            self.kv.free(req.request_id)
        finally:
            req.status = RequestStatus.FINISHED
            req.finish_reason = req.finish_reason or reason

    def fail(self, req: Request, error: str) -> None:
        """Finish the request because something went wrong with it alone (finish_reason "error")."""
        req.error = error
        try:
            self.finish(req, "error")
        except Exception:  # noqa: BLE001 - its KV could not be freed either; it is finished regardless
            pass
