"""CUDA-graph decode steps on the GPU against the same engine run eagerly.

float32, exact: graphs captured over the SDPA backend's padded decode (attached by hand: the
engine enables graphs for flash and triton, which have no float32 prefill) must give the eager
tokens and logprobs within 1e-4 for every KV design, while batches shrink across graph sizes,
finished requests' slots are reused (more requests than max_num_seqs) and a prompt decodes across
a page boundary (pages mapped underneath captured graphs).
bf16, as the engine runs by default (FA2 for contiguous caches, our Triton kernel for paged):
graphs vs enforce_eager agree up to near-ties (a graph's attention is sized for the whole
context, so its float sums may split differently).
"""

from __future__ import annotations

import pytest
import torch

from vattention import LLM, SamplingParams
from vattention.engine.graphs import DecodeGraphs

from engine_helpers import make_checkpoint
from test_engine_gpu import CHECKPOINT, TOP, check_tokens_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine)")

# 2 KiB of fp32 KV per token in this model: a 2 MiB cross-layer page holds 1024 tokens, so the
# 1000-token prompt maps a new page mid-decode.
PROMPTS = [[5, 9, 13], list(range(20, 300)), [7], list(range(100, 1100)), [3, 4, 5, 6],
           list(range(40, 90)), [11] * 30, list(range(500, 620)), [8, 1], list(range(60, 75))]
MAX_TOKENS = [40, 64, 9, 64, 30, 50, 17, 64, 5, 33]


def _generate(path, dtype: str, graphs: str, **options):
    """graphs: "engine" (as the engine sets them up), "sdpa" (attached by hand), "eager"."""
    llm = LLM(model=str(path), device="cuda", dtype=dtype, kv_cache_memory_gib=1.0, max_model_len=2048,
              max_num_seqs=6, max_num_batched_tokens=512, enforce_eager=graphs != "engine", **options)
    engine = llm.engine
    if graphs == "sdpa":
        engine.runner.graphs = DecodeGraphs(engine.model, engine.kv, engine.runner.backend, engine.device,
                                            6, engine.max_model_len)
    assert (engine.runner.graphs is None) == (graphs == "eager")
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=TOP) for m in MAX_TOKENS]
    outs = [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    replays = engine.runner.graphs.num_replays if engine.runner.graphs is not None else 0
    llm.close()
    return outs, replays


def _tops(out):
    return [{t.token_id: t.logprob for t in step} for step in out.top_logprobs]


@pytest.mark.parametrize("options", [
    dict(kv_cache="vattention"),
    dict(kv_cache="vattention", layout="per_layer"),
    dict(kv_cache="paged", block_size=16),
    dict(kv_cache="static"),
], ids=["vattention", "per-layer", "paged-16", "static"])
def test_float32_graphs_give_the_eager_outputs(tmp_path, options):
    make_checkpoint("llama", tmp_path, **CHECKPOINT)
    options = dict(attention_backend="sdpa", **options)
    eager, _ = _generate(tmp_path, "float32", "eager", **options)
    graphed, replays = _generate(tmp_path, "float32", "sdpa", **options)
    assert replays >= max(MAX_TOKENS) - 4  # (nearly) every decode step replayed a graph
    for i, (e, g) in enumerate(zip(eager, graphed)):
        assert g.token_ids == e.token_ids, f"prompt {i}"
        worst = max(abs(a.logprob - b.logprob) for a, b in zip(g.logprobs, e.logprobs))
        assert worst < 1e-4, f"prompt {i}: logprobs differ by {worst:.2e}"


@pytest.mark.parametrize("kv_cache", ["vattention", "paged", "static"])
def test_bf16_engine_graphs_agree_with_eager(tmp_path, kv_cache):
    make_checkpoint("llama", tmp_path, **CHECKPOINT)
    eager, _ = _generate(tmp_path, "bfloat16", "eager", kv_cache=kv_cache)
    graphed, replays = _generate(tmp_path, "bfloat16", "engine", kv_cache=kv_cache)
    assert replays >= max(MAX_TOKENS) - 4  # (nearly) every decode step replayed a graph
    same = 0
    for e, g in zip(eager, graphed):
        check_tokens_close(g.token_ids, _tops(g), e.token_ids, _tops(e))
        same += g.token_ids == e.token_ids
    assert same >= len(PROMPTS) // 2, f"only {same} of {len(PROMPTS)} outputs identical"
