"""Scheduler: continuous batching by counters under a per-step token budget.

Each step: running requests first (in arrival order), each taking min(remaining, budget) tokens;
a request whose KV cannot grow preempts the newest running request (its KV is dropped and
recomputed later). Then waiting requests are admitted while budget, slots and KV memory allow.
The output names exactly which tokens of which request the step computes.

A request whose KV allocation raises (a driver error, say) fails alone: it is finished with
finish_reason "error" and listed in the output's `failed`; the rest of the batch is scheduled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..kv import KVManager
from .request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int  # computes tokens [num_computed_tokens, num_computed_tokens + num_new_tokens)
    samples: bool  # the chunk reaches the end of the known tokens: sample the next one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # in batch order
    preempted: list[Request] = field(default_factory=list)  # dropped this step, to be recomputed
    failed: list[Request] = field(default_factory=list)  # finished with an error while scheduling
    num_batched_tokens: int = 0  # sum of num_new_tokens


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since the start

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        for req in list(self.running):
            if budget == 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(req.num_tokens - req.num_computed_tokens, budget)
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
        return ScheduledRequest(req, n, req.num_computed_tokens + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        """Drop the request's KV; it goes back to the front of the queue to be recomputed."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

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
