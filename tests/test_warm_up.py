"""The start-up warm-up (on by default on CUDA, where Triton compiles per shape): its throwaway
requests leave no trace — no cached prefix, zeroed counters and peaks, every page back — and the
engine's outputs are those of an engine that skipped it."""

from __future__ import annotations

import pytest

from vattention import LLM, SamplingParams
from vattention.config import ModelConfig

from engine_helpers import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("warm")
    make_checkpoint("llama", path, hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    return path


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_warm_up_leaves_no_trace(checkpoint, kv_cache):
    options = dict(model=str(checkpoint), device="cpu", dtype="float32", kv_cache=kv_cache,
                   kv_cache_memory_gib=0.05, page_size=4096, max_num_batched_tokens=64)
    warm, cold = LLM(**options, warm_up="on"), LLM(**options, warm_up="off")
    stats = warm.engine.stats()
    assert warm.engine.scheduler.num_prompt_tokens_computed == 0
    assert (stats.num_running, stats.num_waiting, stats.prefix_cache_queries, stats.prefix_cache_hits,
            stats.num_preemptions, stats.last_step) == (0, 0, 0, 0, 0, None)
    assert stats.kv.num_cached_units == 0 and stats.kv.bytes_used == 0 and stats.kv.num_requests == 0
    assert warm.engine.peak_bytes_used == 0
    if kv_cache == "vattention":  # it did run: its pages were mapped (and stay, for reuse)
        assert warm.engine.kv.usage().counters["pages_mapped_critical"] > 0
        assert cold.engine.kv.usage().counters["pages_mapped_critical"] == 0
    prompts = [[5 + i for i in range(70)], [9, 8, 7, 6, 5]]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    got, want = warm.generate(prompts, params), cold.generate(prompts, params)
    for a, b in zip(got, want):
        assert a.request_id == b.request_id  # the warm-up's ids are its own
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.num_cached_tokens == b.num_cached_tokens == 0  # nothing left cached to hit
        assert max(abs(x.logprob - y.logprob) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-5
    assert warm.engine.stats().num_preemptions == 0


def test_warm_up_values_are_checked():
    with pytest.raises(ValueError, match="warm_up"):
        ModelConfig(warm_up="yes")
