"""`vattention demo`: the memory library end to end on a real model's KV shape.

Maps pages as requests grow, writes and reads KV through the plain tensor views, frees and
reuses slots, and prints the memory stats after each step. Runs on CPU (host driver) or CUDA.
"""

from __future__ import annotations

import torch

from .memory import KVCacheSpec, VirtualKVCache

# SmolLM2-135M-Instruct, the project's default model: 30 layers, 3 KV heads of 64.
DEMO_SPEC = dict(num_layers=30, num_kv_heads=3, head_dim=64, max_seqs=8, max_seq_len=8192)


def run_demo(device: str = "cpu", layout: str = "cross_layer", page_size: int | None = None,
             budget_mib: int = 256) -> None:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    spec = KVCacheSpec(dtype=dtype, layout=layout, **DEMO_SPEC)
    with VirtualKVCache(spec, device=device, memory_budget_bytes=budget_mib << 20,
                        page_size=page_size) as cache:
        print(f"reserved {cache.layout.reservation_bytes / (1 << 30):.1f} GiB of virtual address "
              f"space for {spec.max_seqs} x {spec.max_seq_len} tokens ({layout}, "
              f"{cache.page_size >> 10} KiB pages, {cache.layout.tokens_in(1)} tokens per page "
              f"group, budget {budget_mib} MiB) on {cache.driver.name}")
        print(f"  start            {cache.stats().summary()}")
        prompts = {cache.alloc_slot(): n for n in (900, 3000, 40)}
        for slot, n in prompts.items():  # prefill: map the prompt, write its K/V in every layer
            assert cache.ensure(slot, n)
            for layer in range(spec.num_layers):
                k, v = cache.kv(layer)
                k[slot, :n] = slot + layer / 100
                v[slot, :n] = -slot
        print(f"  after prefill    {cache.stats().summary()}")
        lengths = dict(prompts)
        for _ in range(200):  # decode: the mapper maps the next step's pages in the background
            lengths = {slot: n + 1 for slot, n in lengths.items()}
            cache.prepare(lengths)
            for slot, n in lengths.items():
                assert cache.ensure(slot, n)
                for layer in range(spec.num_layers):  # the new token's K/V in every layer
                    k, v = cache.kv(layer)
                    k[slot, n - 1] = slot + layer / 100
                    v[slot, n - 1] = -slot
        print(f"  after 200 steps  {cache.stats().summary()}")
        for slot, n in lengths.items():  # the KV reads back as written, through the same views
            k, v = cache.kv(7)
            assert torch.all(k[slot, :n] == torch.tensor(slot + 0.07, dtype=dtype))
            assert torch.all(v[slot, :n] == -slot)
        print("  read back every token of layer 7: correct")
        first = next(iter(lengths))
        cache.free(first)
        print(f"  freed slot {first}     {cache.stats().summary()} (pages kept for reuse)")
        again = cache.alloc_slot(num_tokens=500)
        assert cache.ensure(again, 500)
        print(f"  reused slot {again}    {cache.stats().summary()}")
        for slot in list(lengths)[1:] + [again]:
            cache.free(slot)
        released = cache.trim()
        print(f"  freed all, trim  {cache.stats().summary()}; {released >> 20} MiB returned")
