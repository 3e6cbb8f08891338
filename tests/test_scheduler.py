"""The scheduler on its own (a real paged KV manager, no model): pending tokens, the
one-step-ahead schedule, preemption, finishing while a step is in flight, and results applied
only through update_from_output."""

from __future__ import annotations

import torch

from vattention.engine.output_processor import OutputProcessor
from vattention.engine.request import Request
from vattention.engine.scheduler import Scheduler
from vattention.engine.step_io import SampledToken, StepResult
from vattention.kv import PagedKVManager
from vattention.memory import KVCacheSpec
from vattention.sampling_params import SamplingParams

SPEC = KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=4, dtype=torch.float32, max_seqs=4, max_seq_len=64)


def make(num_blocks: int = 64, budget_tokens: int = 8, max_seqs: int = 4) -> tuple[Scheduler, PagedKVManager]:
    kv = PagedKVManager(SPEC, torch.device("cpu"), num_blocks * 4 * SPEC.bytes_per_token, block_size=4)
    return Scheduler(kv, OutputProcessor(None, SPEC.max_seq_len), max_seqs, budget_tokens), kv


def request(name: str, prompt_len: int, max_tokens: int, stop_token: int | None = None) -> Request:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                            stop_token_ids=[stop_token] if stop_token is not None else [])
    return Request(name, list(range(1, prompt_len + 1)), params, set(), max_tokens)


def tokens_for(sched, token: int = 7) -> StepResult:
    return StepResult({i.request.request_id: SampledToken(token, None, []) for i in sched.scheduled if i.samples}, {})


def test_chunked_prefill_then_decode_counts_the_pending_token():
    s, _ = make(budget_tokens=4)
    req = request("a", 6, 3)
    s.add(req)
    first = s.schedule()  # tokens [0, 4): no sample
    assert [(i.start, i.num_new_tokens, i.samples) for i in first.scheduled] == [(0, 4, False)]
    second = s.schedule()  # scheduled before the first is collected: tokens [4, 6), samples
    assert [(i.start, i.num_new_tokens, i.samples) for i in second.scheduled] == [(4, 2, True)]
    assert req.num_computed_tokens == 6 and req.num_pending == 1
    third = s.schedule()  # the pending token's KV, one step ahead of the host
    assert [(i.start, i.num_new_tokens, i.samples) for i in third.scheduled] == [(6, 1, True)]
    assert req.num_pending == 2 and req.output_token_ids == []
    assert s.update_from_output(first, tokens_for(first)) == []
    assert s.update_from_output(second, tokens_for(second)) == [req]
    assert req.output_token_ids == [7] and req.num_pending == 1


def test_a_request_whose_last_token_is_pending_is_not_scheduled_again():
    s, kv = make()
    req = request("a", 3, 2)
    s.add(req)
    steps = [s.schedule(), s.schedule()]  # prefill (token 1), decode (token 2): max_tokens reached
    assert req.num_output_tokens_with_pending == 2
    assert s.schedule().scheduled == []  # nothing more to compute
    for step in steps:
        s.update_from_output(step, tokens_for(step))
    assert req.finished and req.finish_reason == "length" and req.output_token_ids == [7, 7]
    assert kv.usage().num_requests == 0 and not s.has_unfinished()


def test_a_token_for_a_request_finished_meanwhile_is_discarded():
    """Overlap: step 2 is scheduled before step 1's stop token is known; step 2's token is
    computed and thrown away, and the request's KV is freed when it stops."""
    s, kv = make()
    req = request("a", 3, 10, stop_token=9)
    s.add(req)
    one, two = s.schedule(), s.schedule()
    assert s.update_from_output(one, tokens_for(one, 9)) == [req]
    assert req.finished and req.stop_reason == 9 and kv.usage().num_requests == 0
    assert s.update_from_output(two, tokens_for(two, 5)) == []
    assert req.output_token_ids == [9] and req.num_pending == 0


def test_an_abort_in_flight_discards_the_token_and_frees_the_kv():
    s, kv = make()
    req = request("a", 3, 10)
    s.add(req)
    step = s.schedule()
    s.finish(req, "abort")
    assert kv.usage().num_requests == 0 and not s.has_unfinished()
    assert s.update_from_output(step, tokens_for(step)) == [] and req.output_token_ids == []


def test_preemption_frees_the_newest_and_its_pending_token_still_lands():
    """Two requests, room for one to grow: the newer is preempted while its token is on the
    device; the token is appended when collected, and it is re-admitted only after that."""
    s, kv = make(num_blocks=3, budget_tokens=16)
    a, b = request("a", 4, 10), request("b", 4, 10)
    s.add(a)
    s.add(b)
    prefill = s.schedule()  # both prompts: 2 blocks
    assert [i.request for i in prefill.scheduled] == [a, b]
    grow = s.schedule()  # a takes the last free block; b cannot grow and preempts itself
    assert grow.preempted == [b] and [i.request for i in grow.scheduled] == [a]
    assert b.num_computed_tokens == 0 and b.num_pending == 1 and kv.usage().num_requests == 1
    s.update_from_output(prefill, tokens_for(prefill))
    assert b.output_token_ids == [7] and b.num_pending == 0 and b in s.waiting
    assert s.num_preemptions == 1 and b.num_preemptions == 1


def test_admission_waits_for_a_preempted_requests_pending_token():
    s, _ = make(num_blocks=3, budget_tokens=16)
    a, b = request("a", 4, 10), request("b", 4, 10)
    s.add(a)
    s.add(b)
    s.schedule()
    s.schedule()  # b preempted with its token pending
    s.finish(a, "abort")  # room again, but b's token is still on the device
    assert b.num_pending == 1 and s.schedule().scheduled == []


def test_forget_step_undoes_what_scheduling_counted():
    s, kv = make()
    req = request("a", 5, 4)
    s.add(req)
    step = s.schedule()
    s.forget_step(step)
    assert req.num_pending == 0 and req.num_computed_tokens == 0 and req in s.waiting
    assert kv.usage().num_requests == 0 and s.num_preemptions == 0
    again = s.schedule()
    assert [(i.start, i.num_new_tokens, i.samples) for i in again.scheduled] == [(0, 5, True)]


def test_a_failing_kv_allocation_fails_only_that_request():
    s, kv = make()
    good, bad = request("good", 3, 4), request("bad", 3, 4)
    s.add(good)
    s.add(bad)
    allocate = kv.allocate

    def failing(request_id, num_tokens, hit=None):
        if request_id == "bad":
            raise RuntimeError("injected")
        return allocate(request_id, num_tokens, hit)

    kv.allocate = failing
    out = s.schedule()
    assert [i.request for i in out.scheduled] == [good] and out.failed == [bad]
    assert bad.finish_reason == "error" and "injected" in bad.error
