"""Scheduler: continuous batching by counters under a per-step token budget.

Each step: running requests first (in arrival order), each taking min(remaining, budget) tokens;
a request whose KV cannot grow preempts the newest running request (its KV is dropped and
recomputed later). Then waiting requests are admitted while budget, slots and KV memory allow.
The output names exactly which tokens of which request the step computes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_manager import KVManager
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
    num_batched_tokens: int = 0  # sum of num_new_tokens


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

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
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + n):
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
            if not self.kv.allocate(req.request_id, n):
                break  # not enough KV memory now; retry when something finishes
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(self._schedule(req, n))
            budget -= n
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _schedule(self, req: Request, n: int) -> ScheduledRequest:
        return ScheduledRequest(req, n, req.num_computed_tokens + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        """Drop the request's KV; it goes back to the front of the queue to be recomputed."""
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = req.finish_reason or reason
