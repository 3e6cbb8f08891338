"""The overlapped loop on the GPU, where its copies really are asynchronous: the same scenario as
tests/test_engine_loop.py (preemption or admission waits, an abort, a stop token, penalties, n = 2) gives the
synchronous loop's tokens and logprobs.

float32 with SDPA (eager): exact tokens, logprobs within 1e-5, for vattention and paged.
bf16 as the engine runs by default (our Triton decode, FA2 prefill, CUDA graphs): greedy tokens
equal until a near-tie (each side's token in the other's top-5), since a step of the overlapped
loop may carry a finished request's row that the synchronous one does not.
"""

from __future__ import annotations

import pytest
import torch

from vattention import LLM, SamplingParams

from engine_helpers import make_checkpoint
from test_engine_gpu import CHECKPOINT, TOP, check_tokens_close
from test_engine_loop import PROMPTS, assert_same, params_for, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine)")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama")
    make_checkpoint("llama", p, **CHECKPOINT)
    return p


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_overlapped_equals_synchronous_float32(path, kv_cache):
    # 2 KiB of KV per token: paged gets 40 blocks of 8 tokens (these requests preempt); a 2 MiB
    # vattention page holds 1024 tokens of one slot, so 3 pages admit 3 requests at a time
    budget = 3 * 2 / 1024 if kv_cache == "vattention" else 40 * 8 * 2048 / (1 << 30)
    options = dict(device="cuda", dtype="float32", attention_backend="sdpa", kv_cache=kv_cache,
                   kv_cache_memory_gib=budget, block_size=8, max_num_batched_tokens=256)
    sync = LLM(model=str(path), async_scheduling=False, **options)
    probe, _ = run(sync, params_for(None))
    params = params_for(probe["r0"][0][0][20])
    want, sync_preemptions = run(sync, params)
    sync.close()
    overlapped = LLM(model=str(path), async_scheduling=True, **options)
    got, async_preemptions = run(overlapped, params)
    assert_same(got, want)
    if kv_cache == "paged":
        assert sync_preemptions > 0 and async_preemptions > 0
    assert overlapped.engine.stats().kv.num_requests == 0
    overlapped.close()


def test_overlapped_equals_synchronous_bf16_with_graphs(path):
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=TOP)
    results = []
    for overlap in (False, True):
        llm = LLM(model=str(path), device="cuda", dtype="bfloat16", kv_cache_memory_gib=1.0,
                  max_num_batched_tokens=512, async_scheduling=overlap)
        assert llm.engine.runner.graphs is not None
        results.append(llm.generate(PROMPTS, params))
        llm.close()
    for want, got in zip(*results):
        a, b = want.outputs[0], got.outputs[0]
        tops = [[{lp.token_id for lp in step} for step in c.top_logprobs] for c in (a, b)]
        check_tokens_close(b.token_ids, tops[1], a.token_ids, tops[0])
