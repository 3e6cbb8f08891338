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
"""

from __future__ import annotations

from collections import deque

from ..kv import KVManager
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
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._allocate(req, n, out):
                if req.finished:
                    continue  # it failed and left the queue
                break  # not enough KV memory now; retry when something finishes
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._schedule(req, n))
            budget -= n
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _allocate(self, req: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        """kv.allocate, except that an error raised for this request fails only this request."""
        try:
            return self.kv.allocate(req.request_id, num_tokens)
        except Exception as e:  # noqa: BLE001 - the error is this request's; the step goes on
            self.fail(req, f"KV allocation of {num_tokens} tokens failed: {type(e).__name__}: {e}")
            out.failed.append(req)
            return False

    def _schedule(self, req: Request, n: int) -> ScheduledRequest:
        start = req.num_computed_tokens
        samples = start + n == req.num_tokens + req.num_pending
        req.num_computed_tokens += n
        req.num_pending += samples
        return ScheduledRequest(req, start, n, samples)

    def _preempt(self, req: Request) -> None:
        """Drop the request's KV; it goes back to the front of the queue to be recomputed (a
        token still pending for it is appended when its step is collected)."""
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
                self._preempt(req)
                self.num_preemptions -= 1  # not a preemption for memory
                req.num_preemptions -= 1
            elif req.status is RequestStatus.WAITING:
                req.num_computed_tokens = 0

    def finish(self, req: Request, reason: str) -> None:
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
