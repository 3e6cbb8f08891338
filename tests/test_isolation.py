"""One request can never hurt another: a failure injected into one request's sampling, KV growth
or output processing finishes that request alone (finish_reason "error", with the reason) while
the others give exactly the tokens of a run without it; nothing stays queued and no KV page is
left held; values that validation accepts but overflow float32 sample safely."""

from __future__ import annotations

import pytest
import torch

from vattention import GenerationError, LLM, SamplingParams
from vattention.memory.drivers.base import DriverError
from vattention.sampling import Sampler

from engine_helpers import make_checkpoint

BYSTANDERS = [[5, 9, 13], list(range(20, 41)), [7, 8]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=1)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=10, ignore_eos=True)
POISON = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)  # max_tokens marks it


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", p)
    return p


def make_llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", kv_cache_memory_gib=0.05, page_size=64 << 10)
    return LLM(model=str(path), **{**options, **kwargs})


def bystander_params() -> list[SamplingParams]:
    return [GREEDY, SEEDED, GREEDY]


def reference(path, kv_cache: str) -> list[tuple[list[int], list[float] | None]]:
    llm = make_llm(path, kv_cache=kv_cache)
    outs = llm.generate(BYSTANDERS, bystander_params())
    llm.close()
    return [_tokens_and_logprobs(o) for o in outs]


def assert_same_outputs(got, want) -> None:
    """Tokens exactly; logprobs to float32 rounding (a batch of another size may block its
    matmuls differently, so the last bits of a logit can change with the batch around it)."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want], "a bystander's output changed"
    for (_, a), (_, b) in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert a == pytest.approx(b, abs=1e-5), "a bystander's logprobs changed"


def _tokens_and_logprobs(out):
    c = out.outputs[0]
    return c.token_ids, None if c.logprobs is None else [lp.logprob for lp in c.logprobs]


def run_with_poison(llm: LLM) -> tuple[list, object]:
    """The bystanders with the poisoned request in the middle of the batch; GenerationError
    must carry every output."""
    prompts = BYSTANDERS[:1] + [[3, 4, 5, 6]] + BYSTANDERS[1:]
    params = bystander_params()[:1] + [POISON] + bystander_params()[1:]
    with pytest.raises(GenerationError, match="1 of 4 prompts failed: prompt 1: ") as e:
        llm.generate(prompts, params)
    outs = e.value.outputs
    return [o for i, o in enumerate(outs) if i != 1], outs[1]


def assert_engine_clean(llm: LLM) -> None:
    engine = llm.engine
    assert not engine.has_unfinished(), "a failed request stayed queued"
    assert engine.kv.usage().bytes_used == 0 and engine.kv.usage().num_requests == 0
    # the engine serves again, unaffected
    again = llm.generate([[5, 9, 13]], GREEDY)[0].outputs[0]
    assert again.finish_reason == "length" and len(again.token_ids) == 10


class PoisonedSampler(Sampler):
    """Raises for any batch that holds the poisoned request, as a numerical failure would."""

    def sample(self, logits, batch):
        if any(p.max_tokens == POISON.max_tokens for p in batch.params):
            raise RuntimeError("injected sampling failure")
        return super().sample(logits, batch)


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_a_failure_in_one_requests_sampling_finishes_only_that_request(path, kv_cache):
    want = reference(path, kv_cache)
    llm = make_llm(path, kv_cache=kv_cache)
    llm.engine.runner.sampler = PoisonedSampler()
    bystanders, poison = run_with_poison(llm)
    assert_same_outputs([_tokens_and_logprobs(o) for o in bystanders], want)
    assert all(o.outputs[0].finish_reason == "length" for o in bystanders)
    failed = poison.outputs[0]
    assert failed.finish_reason == "error" and "injected sampling failure" in failed.error
    assert failed.token_ids == []  # the failed draw left no token behind
    llm.engine.runner.sampler = Sampler()
    assert_engine_clean(llm)
    llm.close()


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_a_failure_in_one_requests_kv_growth_finishes_only_that_request(path, kv_cache):
    """The poisoned request's KV allocation raises once it has grown past its prompt (a
    driver error mid-decode); its memory is given back and the others run on."""
    want = reference(path, kv_cache)
    llm = make_llm(path, kv_cache=kv_cache)
    kv = llm.engine.kv
    allocate = kv.allocate
    poisoned_ids = set()

    def failing_allocate(request_id, num_tokens, hit=None):
        if request_id in poisoned_ids and num_tokens > 6:
            raise DriverError("cuMemMap", "injected failure", 0x1000)
        return allocate(request_id, num_tokens, hit)

    kv.allocate = failing_allocate
    add_request = llm.engine.add_request

    def add_marking_the_poison(prompt, params=None, request_id=None):
        rid = add_request(prompt, params, request_id)
        if params is not None and params.max_tokens == POISON.max_tokens:
            poisoned_ids.add(f"{rid}#0")
        return rid

    llm.engine.add_request = add_marking_the_poison
    bystanders, poison = run_with_poison(llm)
    assert_same_outputs([_tokens_and_logprobs(o) for o in bystanders], want)
    failed = poison.outputs[0]
    assert failed.finish_reason == "error"
    assert "KV allocation of 7 tokens failed" in failed.error and "injected failure" in failed.error
    # tokens 1-3 came before its growth to 7 tokens failed; with the overlapped loop the growth
    # is asked for while token 3 is still on the device, and the failure discards it
    assert len(failed.token_ids) == (2 if llm.engine.async_scheduling else 3)
    assert_engine_clean(llm)
    llm.close()


def test_a_failure_in_one_requests_output_processing_finishes_only_that_request(path):
    want = reference(path, "vattention")
    llm = make_llm(path)
    processor = llm.engine.outputs
    append = processor.append

    def failing_append(req, sampled):
        if req.params.max_tokens == POISON.max_tokens:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return append(req, sampled)

    processor.append = failing_append
    bystanders, poison = run_with_poison(llm)
    assert_same_outputs([_tokens_and_logprobs(o) for o in bystanders], want)
    assert "processing its output failed: UnicodeDecodeError" in poison.outputs[0].error
    assert_engine_clean(llm)
    llm.close()


def test_a_failed_step_leaves_nothing_queued_for_the_next_generate(path):
    """An error of the step as a whole raises from generate; that call's requests are aborted,
    so the next generate runs normally (before: every later generate raised)."""
    llm = make_llm(path)
    model = llm.engine.runner.model
    forward = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("injected forward failure"))
    with pytest.raises(RuntimeError, match="injected forward failure"):
        llm.generate(BYSTANDERS, GREEDY)
    model.forward = forward
    assert_engine_clean(llm)
    llm.close()


@pytest.mark.parametrize("extreme", [
    dict(top_p=1e-50), dict(top_p=1e-300), dict(repetition_penalty=1e-40),
    dict(repetition_penalty=1e40), dict(repetition_penalty=1e-300, top_p=1e-50),
    dict(temperature=1e-5), dict(temperature=1e30), dict(temperature=1e300),
    dict(min_p=1.0), dict(top_k=1, top_p=1e-9, min_p=1.0),
])
def test_values_validation_accepts_never_break_a_step(path, extreme):
    """Numerically extreme but valid parameters sample a real token; a top-p that rounds to
    nothing keeps the most likely token, so its output is the greedy one (without penalty)."""
    llm = make_llm(path)
    params = SamplingParams(**{"temperature": 1.0, "max_tokens": 6, "ignore_eos": True, **extreme})
    outs = llm.generate(BYSTANDERS + [[3, 4, 5, 6]], [GREEDY, SEEDED, GREEDY, params])
    token_ids = outs[3].outputs[0].token_ids
    assert len(token_ids) == 6 and all(0 <= t < llm.engine.model.config.vocab_size for t in token_ids)
    if set(extreme) == {"top_p"} or "top_k" in extreme:
        greedy = llm.generate([[3, 4, 5, 6]], SamplingParams(temperature=0, max_tokens=6,
                                                              ignore_eos=True))[0].outputs[0]
        assert token_ids == greedy.token_ids
    llm.close()


def test_sample_isolated_reports_the_failing_row_and_keeps_the_others_exact():
    """A NaN row (what a broken penalty would produce) fails alone; the greedy and seeded rows
    get exactly the tokens of a batch without it. Row 1's generator has drawn before row 2
    fails, so this holds only if it is put back before the rows are sampled one by one."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    logits[2] = float("nan")
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=5),
              SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=0.7, seed=9, logprobs=2)]

    def batch(rows):
        from vattention.sampling import SamplingBatch
        gens = [None if params[i].seed is None else torch.Generator().manual_seed(params[i].seed)
                for i in rows]
        return SamplingBatch([params[i] for i in rows], [[1, 2]] * len(rows), [[3]] * len(rows), gens)

    with pytest.raises(RuntimeError):
        Sampler()(logits, batch(range(4)))  # the plain batched call does raise
    sample, errors = Sampler().sample_isolated(logits, batch(range(4)))
    out = sample.start_copy().result()
    assert list(errors) == [2] and out.token_ids[2] == -1
    clean = Sampler()(logits[[0, 1, 3]], batch([0, 1, 3]))
    assert [out.token_ids[i] for i in (0, 1, 3)] == clean.token_ids
    assert out.top_logprobs[3] == clean.top_logprobs[2]
