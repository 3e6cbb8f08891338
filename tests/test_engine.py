"""The engine against Hugging Face transformers, and the invariances of its scheduling:
greedy tokens equal HF for each architecture family; logprobs close; chunked prefill, batching,
preemption and slot reuse do not change outputs; no slot or page leaks; bad input is refused
with a specific error while other requests keep running."""

from __future__ import annotations

import json

import pytest
import torch

from vattention import LLM, SamplingParams

from engine_helpers import FAMILIES, hf_greedy, make_checkpoint

PROMPTS = [[5, 9, 13], list(range(20, 61)), [7], list(range(100, 117))]  # mixed lengths
NUM_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)


def make_llm(path, **kwargs) -> LLM:
    options = dict(device="cpu", dtype="float32", kv_cache_memory_gib=0.05, page_size=64 << 10)
    options.update(kwargs)
    return LLM(model=str(path), **options)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return path, make_checkpoint(request.param, path)


def generate_tokens(llm: LLM, prompts=PROMPTS, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_greedy_tokens_and_logprobs_match_hf(checkpoint, kv_cache):
    """Every family and KV design: greedy tokens identical to HF for a mixed-length batch;
    logprobs within 1e-4."""
    path, hf = checkpoint
    llm = make_llm(path, kv_cache=kv_cache)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        want_tokens, want_logprobs = hf_greedy(hf, prompt, NUM_TOKENS)
        got = out.outputs[0]
        assert got.token_ids == want_tokens, f"prompt of {len(prompt)} tokens"
        diffs = [abs(lp.logprob - w) for lp, w in zip(got.logprobs, want_logprobs)]
        assert max(diffs) < 1e-4, f"logprob differs by {max(diffs):.2e}"
        assert got.finish_reason == "length"
    llm.close()


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_reference_attention_gives_the_same_tokens(checkpoint, kv_cache):
    """The SDPA fast path equals the float64 reference attention backend (contiguous and paged)."""
    path, _ = checkpoint
    fast = generate_tokens(make_llm(path, kv_cache=kv_cache))
    slow = generate_tokens(make_llm(path, kv_cache=kv_cache, attention_backend="reference"))
    assert fast == slow


@pytest.mark.parametrize("block_size", [16, 5])
def test_flex_paged_backend_gives_the_same_tokens(checkpoint, block_size):
    """FlexAttention + PagedAttention (eager on CPU) gives SDPA's greedy tokens on the paged cache,
    chunked prefill included."""
    path, _ = checkpoint
    options = dict(kv_cache="paged", block_size=block_size, kv_cache_memory_gib=0.005,
                   max_num_batched_tokens=9)
    want = generate_tokens(make_llm(path, **options))
    assert generate_tokens(make_llm(path, attention_backend="flex", **options)) == want


@pytest.mark.parametrize("options", [
    dict(max_num_batched_tokens=5),  # prompts prefilled in chunks of <= 5 tokens
    dict(max_num_seqs=1),  # one request at a time: slots reused
    dict(layout="per_layer"),
    dict(kv_cache="paged", block_size=16),
    dict(kv_cache="paged", block_size=128, max_num_batched_tokens=7),
    dict(kv_cache="static", max_num_seqs=2),
], ids=["chunked-prefill", "one-at-a-time", "per-layer", "paged-16", "paged-128-chunked",
        "static"])
def test_scheduling_does_not_change_greedy_outputs(checkpoint, options):
    path, _ = checkpoint
    assert generate_tokens(make_llm(path, **options)) == generate_tokens(make_llm(path))


TIGHT = 48 * 4096 / (1 << 30)  # 48 x 4 KiB: 384 tokens of this model; 4 x 160 do not fit at once


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_preemption_recomputes_to_the_same_output(tmp_path, kv_cache):
    """A KV budget too small for all requests forces preemption mid-decode; the preempted
    requests later finish with exactly the output they would have had (greedy and seeded)."""
    hf = make_checkpoint("llama", tmp_path)
    prompts = [list(range(10 + i, 50 + i)) for i in range(4)]
    long = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=120, ignore_eos=True)
    roomy = make_llm(tmp_path)
    tight = make_llm(tmp_path, kv_cache=kv_cache, page_size=4096, block_size=8, kv_cache_memory_gib=TIGHT)
    for params in (long, seeded):
        want = generate_tokens(roomy, prompts, params)
        got = generate_tokens(tight, prompts, params)
        assert got == want
    preempted = tight.engine.scheduler
    assert not preempted.running and not preempted.waiting
    assert hf_greedy(hf, prompts[0], 10)[0] == generate_tokens(roomy, prompts[:1], long)[0][:10]


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_preemption_happened_in_the_tight_run(tmp_path, kv_cache):
    make_checkpoint("llama", tmp_path)
    llm = make_llm(tmp_path, kv_cache=kv_cache, page_size=4096, block_size=8, kv_cache_memory_gib=TIGHT)
    engine = llm.engine
    for i in range(4):
        engine.add_request(list(range(10 + i, 50 + i)),
                           SamplingParams(temperature=0, max_tokens=120, ignore_eos=True))
    preemptions = 0
    while engine.has_unfinished():
        engine.step()
        preemptions = max(preemptions, sum(r.num_preemptions for g in engine._groups.values() for r in g))
    assert preemptions > 0


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_no_slot_or_page_leaks_after_many_requests(tmp_path, kv_cache):
    """40 requests through 3 slots: afterwards no request holds KV and nothing stays committed
    (vattention: every mapped page belongs to an idle slot and trim() returns them all)."""
    make_checkpoint("qwen2", tmp_path)
    llm = make_llm(tmp_path, max_num_seqs=3, kv_cache=kv_cache)
    prompts = [list(range(3, 3 + (i * 7) % 50 + 1)) for i in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=1 + i % 9, ignore_eos=True) for i in range(40)]
    outs = llm.generate(prompts, params)
    assert [len(o.outputs[0].token_ids) for o in outs] == [1 + i % 9 for i in range(40)]
    usage = llm.engine.kv.usage()
    assert usage.num_requests == 0 and usage.bytes_used == 0 and not llm.engine._groups
    assert usage.bytes_saved == 0 and usage.pages_shared == 0
    assert (usage.num_cached_units > 0) == (kv_cache != "static")  # the prompts share starts
    llm.engine.kv.reset_prefix_cache()  # what the prefix cache kept goes back too
    if kv_cache == "vattention":
        llm.engine.kv.cache.trim()
        st = llm.engine.kv.cache.stats()
        assert (st.pages_mapped, st.pages_held, st.num_units) == (0, 0, 0), st
    else:
        assert llm.engine.kv.usage().bytes_committed == 0


def test_n_samples_and_seeds(checkpoint):
    path, _ = checkpoint
    llm = make_llm(path)
    params = SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=10, ignore_eos=True)
    first = llm.generate([PROMPTS[1]], params)[0]
    again = llm.generate([PROMPTS[1]], params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1, "the n samples should differ"


def test_best_of_returns_the_n_most_likely_of_its_candidates(tmp_path):
    """best_of=5, n=2, seeded: the two of the five samples n=5 draws from that seed with the
    highest cumulative logprob, most likely first, re-indexed; cumulative_logprob is their sum
    of token logprobs; a streamed (DELTA) best_of > n is refused."""
    make_checkpoint("llama", tmp_path)
    llm = make_llm(tmp_path)
    base = dict(temperature=1.5, seed=11, max_tokens=8, ignore_eos=True)
    every = llm.generate([PROMPTS[1]], SamplingParams(n=5, logprobs=0, **base))[0].outputs
    best = llm.generate([PROMPTS[1]], SamplingParams(n=2, best_of=5, **base))[0].outputs
    sums = [sum(lp.logprob for lp in o.logprobs) for o in every]
    order = sorted(range(5), key=lambda i: -sums[i])[:2]
    assert len({tuple(o.token_ids) for o in every}) == 5  # five different candidates to rank
    assert [o.token_ids for o in best] == [every[i].token_ids for i in order]
    assert [o.index for o in best] == [0, 1] and best[0].logprobs is None
    assert all(abs(o.cumulative_logprob - sums[i]) < 1e-4 for o, i in zip(best, order))
    assert llm.generate([PROMPTS[1]], SamplingParams(n=1, **base))[0].outputs[0].cumulative_logprob is None
    with pytest.raises(ValueError, match="best_of > n cannot stream"):
        SamplingParams(best_of=2, output_kind="delta")
    with pytest.raises(ValueError, match="best_of must be an integer >= n"):
        SamplingParams(n=3, best_of=2)
    llm.close()


def test_stop_token_ids_and_eos(checkpoint):
    """A stop token ends the output where greedy decoding first reaches it, or the EOS does
    where that comes first."""
    path, hf = checkpoint
    llm = make_llm(path)
    want, _ = hf_greedy(hf, PROMPTS[0], NUM_TOKENS)
    stop_at = want[4]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=NUM_TOKENS,
                                                    stop_token_ids=[stop_at]))[0].outputs[0]
    eos = llm.engine.eos_token_ids
    end = next(i for i, t in enumerate(want) if t == stop_at or t in eos)
    assert out.token_ids == want[:end + 1]
    assert out.finish_reason == "stop" and out.stop_reason == (stop_at if want[end] == stop_at else None)


def test_min_tokens_holds_back_eos_and_stop_ids_and_the_rest_is_unchanged(checkpoint):
    """The model's EOS forced (logit_bias +100): it ends the output at once, unless min_tokens
    keeps it out for that many tokens, which are then the greedy tokens of the model with EOS
    and the stop id banned (checked against HF's greedy path where it does not pick them)."""
    path, hf = checkpoint
    llm = make_llm(path)
    eos = min(llm.engine.eos_token_ids)
    forced = dict(temperature=0, max_tokens=NUM_TOKENS, logit_bias={eos: 100})
    out = llm.generate([PROMPTS[0]], SamplingParams(**forced))[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    out = llm.generate([PROMPTS[0]], SamplingParams(**forced, min_tokens=4))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]
    assert out.finish_reason == "stop"
    free, _ = hf_greedy(hf, PROMPTS[0], NUM_TOKENS)
    stop_at = free[1]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True,
                                                    stop_token_ids=[stop_at], min_tokens=3))[0].outputs[0]
    assert stop_at not in out.token_ids[:3] and len(out.token_ids) >= 3
    if stop_at not in free[:1]:
        assert out.token_ids[0] == free[0]  # before the ban bites, the model's own choice


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=7), dict(kv_cache="paged", block_size=4)],
                         ids=["whole", "chunked", "paged"])
def test_prompt_logprobs_equal_hf_and_never_come_from_the_cache(checkpoint, options):
    """Each prompt token's logprob (from the second) and the top 3 at each position, against a
    full HF forward, with the prompt in one step or in chunks of 7 tokens; run twice so the
    second finds its prefix cached, which a prompt-logprobs request must not use."""
    path, hf = checkpoint
    llm = make_llm(path, **options)
    prompt = PROMPTS[1] + PROMPTS[0]
    with torch.no_grad():
        want = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), dim=-1)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=3)
    for _ in range(2):
        out, = llm.generate([prompt], params)
        assert out.num_cached_tokens == 0 and out.prompt_logprobs[0] is None
        assert len(out.prompt_logprobs) == len(prompt) == len(out.prompt_top_logprobs)
        for i, (lp, top) in enumerate(zip(out.prompt_logprobs[1:], out.prompt_top_logprobs[1:])):
            assert lp.token_id == prompt[i + 1]
            assert abs(lp.logprob - want[i, prompt[i + 1]].item()) < 1e-4, i
            assert [t.token_id for t in top] == want[i].topk(3).indices.tolist(), i
            assert max(abs(t.logprob - want[i, t.token_id].item()) for t in top) < 1e-4
    plain, = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=2))
    assert plain.prompt_logprobs is None and plain.outputs[0].token_ids == out.outputs[0].token_ids


def test_bad_input_is_refused_and_others_keep_running(tmp_path):
    make_checkpoint("llama", tmp_path)
    llm = make_llm(tmp_path, max_model_len=64)
    engine = llm.engine
    good = engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="maximum context length is 64 tokens.*resulted in 80 tokens"):
        engine.add_request(list(range(3, 83)))
    with pytest.raises(ValueError, match="the prompt is empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match=r"token id -?\d+ is out of range \[0, 320\)"):
        engine.add_request([5, 999])
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [good]
    assert len(finished[0].outputs[0].token_ids) == 20


def test_output_stops_at_the_context_length(tmp_path):
    make_checkpoint("llama", tmp_path)
    llm = make_llm(tmp_path, max_model_len=32)
    out = llm.generate([list(range(3, 23))], SamplingParams(temperature=0, max_tokens=100,
                                                            ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_unknown_model_and_architecture_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a preset"):
        LLM(model=str(tmp_path / "nope"), device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"],
                                                      "hidden_size": 8}))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        LLM(model=str(tmp_path), device="cpu")
    with pytest.raises(TypeError, match="unknown engine option 'max_batch'"):
        LLM(model=str(tmp_path), device="cpu", max_batch=3)


def test_dummy_weights_at_a_preset_shape_run(tmp_path):
    """--load-format dummy builds random weights for any config; here a shrunken config dir."""
    cfg = {"architectures": ["LlamaForCausalLM"], "vocab_size": 500, "hidden_size": 32,
           "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 1, "max_position_embeddings": 256}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    llm = make_llm(tmp_path, load_format="dummy")
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        make_llm(tmp_path)


def test_logit_bias_outside_the_vocabulary_is_refused(tmp_path):
    make_checkpoint("llama", tmp_path)
    llm = make_llm(tmp_path)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 320\): \[320, 999\]"):
        llm.engine.add_request([5, 6], SamplingParams(logit_bias={3: 1.0, 320: 2.0, 999: -1.0}))
    assert not llm.engine.has_unfinished()
    out = llm.generate([[5, 6]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                logit_bias={17: 100.0}))
    assert out[0].outputs[0].token_ids == [17] * 4


def test_model_generation_config_gives_the_sampling_defaults(tmp_path):
    """generation_config.json's sampling keys (as vLLM reads them) fill what the caller leaves
    unset; generation_config="vattention" ignores them."""
    make_checkpoint("llama", tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "do_sample": True, "temperature": 0.0, "top_k": 5, "max_new_tokens": 3}))
    llm = make_llm(tmp_path)
    assert llm.engine.default_sampling == {"temperature": 0.0, "top_k": 5}
    params = llm.engine.default_sampling_params(max_tokens=6, ignore_eos=True)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.0, 5, 6)
    by_default = llm.generate([PROMPTS[1]])[0].outputs[0].token_ids  # no params: the model's (greedy)
    greedy = llm.generate([PROMPTS[1]], SamplingParams(temperature=0))[0].outputs[0].token_ids
    assert by_default == greedy and len(by_default) >= 1
    llm.close()
    own = make_llm(tmp_path, generation_config="vattention")
    assert own.engine.default_sampling == {} and own.engine.default_sampling_params().temperature == 1.0
    own.close()
