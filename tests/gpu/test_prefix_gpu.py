"""Prefix caching on the GPU: an aliased unit is one physical page at two addresses, read-only
at the second (cuMemSetAccess PROT_READ) — reads and FA2 through it see the data, a write
through it is a CUDA error; and the engine with caching on gives the tokens caching off does
(bf16, every design), with the hits and the shared memory it should have."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from vattention import LLM, SamplingParams
from vattention.memory import KVCacheSpec, VirtualKVCache

from engine_helpers import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine)")

SPEC = dict(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, max_seqs=4, max_seq_len=1024)


def test_an_aliased_unit_is_the_same_memory_and_attention_reads_it():
    with VirtualKVCache(KVCacheSpec(**SPEC), device="cuda", memory_budget_bytes=64 << 20) as cache:
        ut = cache.layout.unit_tokens
        assert ut == (2 << 20) // (2 * 4 * 8 * 128 * 2)  # cross_layer: one 2 MiB page = 128 tokens
        a = cache.alloc_slot()
        cache.ensure(a, 2 * ut + 7)
        for layer in range(4):
            for t in cache.kv(layer):
                t[a, :2 * ut + 7] = torch.randn_like(t[a, :2 * ut + 7])
        units = [cache.hold(a, 0), cache.hold(a, 1)]
        b = cache.alloc_slot(2 * ut + 3, prefix=units)
        cache.ensure(b, 2 * ut + 3)
        st = cache.stats()
        assert st.pages_shared == 2 and st.num_mappings == st.pages_mapped + 2
        assert cache.driver.num_live_mappings == st.num_mappings
        k, v = cache.kv(0)
        assert torch.equal(k[b, :2 * ut], k[a, :2 * ut]) and torch.equal(v[b, :2 * ut], v[a, :2 * ut])
        # FA2 through the alias equals FA2 on the original rows
        q = torch.randn(1, 32, 128, device="cuda", dtype=torch.bfloat16)
        outs = []
        for slot in (a, b):
            kk, vv = k[slot, :2 * ut].unsqueeze(0), v[slot, :2 * ut].unsqueeze(0)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                q.unsqueeze(0).transpose(1, 2), kk.transpose(1, 2).repeat_interleave(4, 1),
                vv.transpose(1, 2).repeat_interleave(4, 1)))
        assert torch.equal(outs[0], outs[1])
        k[b, 2 * ut:2 * ut + 3] = 1.0  # b's own page past the prefix is writable
        torch.cuda.synchronize()
        cache.free(b)
        for u in units:
            cache.release(u)
        cache.free(a)
        cache.trim()
        assert cache.stats().pages_mapped == 0 and cache.driver.num_live_mappings == 0


WRITE_SCRIPT = r"""
import sys, torch
from vattention.memory import KVCacheSpec, VirtualKVCache
spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, max_seqs=4, max_seq_len=1024)
cache = VirtualKVCache(spec, device="cuda", memory_budget_bytes=64 << 20)
ut = cache.layout.unit_tokens
a = cache.alloc_slot(); cache.ensure(a, ut + 1)
b = cache.alloc_slot(ut + 1, prefix=[cache.hold(a, 0)]); cache.ensure(b, ut + 1)
k, _ = cache.kv(0)
k[b, :ut].float().sum().item()
print("read ok", flush=True)
row = 5 if sys.argv[1] == "alias" else ut
k[b, row] = 3.0
torch.cuda.synchronize()
print("write ok", flush=True)
"""


@pytest.mark.parametrize("where", ["alias", "own"])
def test_a_write_through_the_read_only_alias_is_a_cuda_error(where):
    proc = subprocess.run([sys.executable, "-c", WRITE_SCRIPT, where], capture_output=True, text=True,
                          timeout=120)
    print(proc.stdout, proc.stderr[-1500:])
    assert "read ok" in proc.stdout
    if where == "alias":
        assert proc.returncode != 0 and "write ok" not in proc.stdout
        assert "CUDA error" in proc.stderr or "illegal" in proc.stderr.lower(), proc.stderr[-1500:]
    else:
        assert proc.returncode == 0 and "write ok" in proc.stdout, proc.stderr[-1500:]


# 8 layers x 8 KV heads x 32 x bf16 x (K, V) = 8 KiB a token: cross_layer units are 256 tokens
# (one 2 MiB page), so the shared 600 tokens are two aliased units and a copied tail
CHECKPOINT = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096,
                  initializer_range=0.1)


@pytest.mark.parametrize("design", [dict(kv_cache="vattention", layout="cross_layer"),
                                    dict(kv_cache="vattention", layout="per_layer"),
                                    dict(kv_cache="paged")], ids=["cross_layer", "per_layer", "paged"])
def test_caching_on_gives_the_tokens_of_caching_off_in_bf16(tmp_path, design):
    make_checkpoint("llama", tmp_path, **CHECKPOINT)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(3, 2048, (600,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 2048, (n,), generator=g).tolist() for n in (5, 40, 300, 1)]
    prompts += [shared[:37] + [9, 9, 9], shared[:300]]  # part of a unit (paged: of a block), many units
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    runs = {}
    for caching in (False, True):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="bfloat16", kv_cache_memory_gib=1.0,
                  max_num_batched_tokens=512, enable_prefix_caching=caching, **design)
        first = llm.generate(prompts[:1], params)  # caches the shared prefix
        rest = llm.generate(prompts[1:], params)
        runs[caching] = first + rest
        stats = llm.engine.stats()
        if caching:
            assert stats.prefix_cache_hits > 0.6 * stats.prefix_cache_queries
            assert rest[0].num_cached_tokens >= 600 - 16
            if design.get("layout") == "cross_layer":
                assert llm.engine.kv.cache_unit == 256
                assert llm.engine.kv.usage().counters["pages_aliased"] > 0
        llm.close()
    for j, (off, on) in enumerate(zip(runs[False], runs[True])):
        a, b = off.outputs[0], on.outputs[0]
        for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)):
            if x != y:  # bf16 near-tie: each in the other's top 5, and nothing compared after it
                assert x in {lp.token_id for lp in b.top_logprobs[i]}, (j, i, x, y)
                assert y in {lp.token_id for lp in a.top_logprobs[i]}, (j, i, x, y)
                break
            # bf16: the cached prefix was computed in another batch, chunk and kernel call
            assert abs(a.logprobs[i].logprob - b.logprobs[i].logprob) < 0.25, \
                (j, i, a.logprobs[i].logprob, b.logprobs[i].logprob)
    same = sum(off.outputs[0].token_ids == on.outputs[0].token_ids for off, on in zip(runs[False], runs[True]))
    assert same >= len(prompts) - 2, same
