"""The overlapped engine loop gives exactly the synchronous loop's tokens and logprobs, for every
KV design, with preemption, aborts, stop tokens and strings, penalties and n > 1; and the parts
it is built from (pending tokens, deltas) hold their invariants."""

from __future__ import annotations

import pytest

from vattention import LLM, SamplingParams
from vattention.outputs import RequestOutputKind

from conftest import needs_model
from engine_helpers import make_checkpoint

TIGHT = 40 * 4096 / (1 << 30)  # 40 x 4 KiB: 320 tokens of this model, so these requests preempt
PROMPTS = [list(range(10 + i, 50 + i)) for i in range(4)] + [[7, 8, 9], [3] * 70]
ABORT_AFTER = 5  # tokens request "r2" has produced when the test aborts it


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", p)
    return p


def make_llm(path, async_scheduling: bool, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", kv_cache_memory_gib=0.05, page_size=64 << 10)
    return LLM(model=str(path), async_scheduling=async_scheduling, **{**options, **kwargs})


def params_for(stop_token: int | None) -> list[SamplingParams]:
    """Greedy with logprobs, seeded sampling with history-dependent penalties, n = 2, a stop
    token, a short max_tokens and one to abort."""
    return [SamplingParams(temperature=0, max_tokens=80, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.9, top_p=0.9, seed=3, repetition_penalty=1.3,
                           frequency_penalty=0.5, max_tokens=70, ignore_eos=True, logprobs=0),
            SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
            SamplingParams(temperature=1.0, top_k=20, seed=5, n=2, max_tokens=60, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=50, ignore_eos=True,
                           stop_token_ids=[stop_token] if stop_token is not None else [])]


def run(llm: LLM, params: list[SamplingParams]) -> tuple[dict, int]:
    """Drive the engine by hand (aborting "r2" once it has ABORT_AFTER tokens); returns each
    request's last output as (tokens, logprobs, finish reason) per sample, and preemptions."""
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        engine.add_request(prompt, p, request_id=f"r{i}")
    last: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            last[out.request_id] = [(c.token_ids, [lp.logprob for lp in c.logprobs or []], c.finish_reason)
                                    for c in out.outputs]
            if out.request_id == "r2" and len(out.outputs[0].token_ids) >= ABORT_AFTER and not out.finished:
                engine.abort("r2")
    return last, engine.stats().num_preemptions


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for request_id in want:
        for (tokens, logprobs, reason), (want_tokens, want_logprobs, want_reason) in zip(got[request_id],
                                                                                       want[request_id]):
            assert tokens == want_tokens, request_id
            assert reason == want_reason, request_id
            # another batch around a row can change a float32 logit's last bits
            assert logprobs == pytest.approx(want_logprobs, abs=1e-5), request_id


@pytest.fixture(scope="module")
def probe(path) -> dict:
    return run(make_llm(path, False), params_for(None))[0]


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_overlapped_loop_gives_the_synchronous_tokens_and_logprobs(path, probe, kv_cache):
    tight = dict(page_size=4096, block_size=8, kv_cache_memory_gib=TIGHT) if kv_cache != "static" else \
        dict(max_model_len=160, max_num_seqs=4)
    stop_token = probe["r0"][0][0][20]  # a token greedy decoding of r0 reaches: r5's stop token
    params = params_for(stop_token)
    want, sync_preemptions = run(make_llm(path, False, kv_cache=kv_cache, **tight), params)
    got, async_preemptions = run(make_llm(path, True, kv_cache=kv_cache, **tight), params)
    assert_same(got, want)
    assert want["r2"][0][0] == probe["r2"][0][0][:ABORT_AFTER] and want["r2"][0][2] is None
    assert want["r4"][0][2] == "length" and len(want["r4"][0][0]) == 1
    if kv_cache != "static":  # the static design admits only what it can hold to the end
        assert sync_preemptions > 0 and async_preemptions > 0


def test_overlap_really_runs_one_step_ahead(path):
    """With async scheduling a step returns the tokens of the step before it: the first call
    after admitting a prompt returns nothing, and a request whose last token is on the device
    is not scheduled again."""
    llm = make_llm(path, True)
    engine = llm.engine
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.step() == [] and engine.last_step.num_seqs == 1  # prefill launched, not collected
    shapes, counts = [], []
    while engine.has_unfinished():
        outs = engine.step()
        shapes.append(engine.last_step.num_seqs)
        counts += [len(o.outputs[0].token_ids) for o in outs]
    # the two decode steps overlap the collection of the step before; the last call only collects
    assert shapes == [1, 1, 0] and counts == [1, 2, 3]


def test_a_finished_requests_extra_token_is_never_emitted(path):
    """A request that stops on a token has, with overlap, already been scheduled once more; that
    token is computed and discarded, and its KV freed with the rest."""
    sync, overlapped = make_llm(path, False), make_llm(path, True)
    first = sync.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0]
    stop = first.outputs[0].token_ids[6]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    want = sync.generate([[5, 6, 7]], params)[0].outputs[0]
    got = overlapped.generate([[5, 6, 7]], params)[0].outputs[0]
    assert got.token_ids == want.token_ids == first.outputs[0].token_ids[:7]
    assert got.finish_reason == want.finish_reason == "stop" and got.stop_reason == stop
    usage = overlapped.engine.stats().kv
    assert usage.bytes_used == 0 and usage.num_requests == 0


@needs_model
def test_stop_strings_and_deltas_on_the_default_model(model_dir):
    """Text, stop strings and n > 1 on a real tokenizer: overlapped == synchronous, and the
    deltas of a streamed request concatenate to the final text, never retracting any."""
    prompts = ["Once upon a time", "The capital of France is", "1, 2, 3,"]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[" the", "."]),
              SamplingParams(temperature=0.8, seed=1, n=2, max_tokens=24, stop=["\n"]),
              SamplingParams(temperature=0, max_tokens=20, stop=[" 7"], logprobs=1)]
    finals = []
    for overlap in (False, True):
        llm = LLM(model=str(model_dir), device="cpu", dtype="float32", async_scheduling=overlap)
        finals.append([[(c.text, c.token_ids, c.finish_reason, c.stop_reason) for c in o.outputs]
                       for o in llm.generate(prompts, params)])
        engine = llm.engine
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(prompt, SamplingParams(**{**vars(p), "output_kind": RequestOutputKind.DELTA}), f"s{i}")
        text: dict[tuple[str, int], str] = {}
        tokens: dict[tuple[str, int], list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                for c in out.outputs:
                    key = (out.request_id, c.index)
                    text[key] = text.get(key, "") + c.text
                    tokens[key] = tokens.get(key, []) + c.token_ids
                    assert c.num_tokens == len(tokens[key])
        streamed = [[(text[(f"s{i}", j)], tokens[(f"s{i}", j)]) for j in range(p.n)] for i, p in enumerate(params)]
        assert streamed == [[(t, ids) for t, ids, _, _ in choices] for choices in finals[-1]]
        llm.close()
    assert finals[0] == finals[1]
    assert any(reason == "stop" and isinstance(stop, str) for choices in finals[0] for _, _, reason, stop in choices)
