"""GPU-only checks of the CUDA driver: FA2 reads the virtual tensors, errors name the call,
memory returns to the device. Run on the device machine (see benchmarks/results/README.md);
the device-generic suites run there too with VATTENTION_TEST_DEVICE=cuda."""

from __future__ import annotations

import pytest
import torch

from vattention.memory import DriverError, KVCacheSpec, VirtualKVCache, make_driver

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine)")

GIB = 1 << 30


def flash_varlen(q, k_flat, v_flat, cu_q, starts, seqused, max_q, max_k, causal):
    """FA2 varlen through the aten op: K/V rows for request i start at starts[i] in k_flat."""
    cu_k = torch.cat([starts, starts[-1:]]).to(torch.int32)
    out = torch.ops.aten._flash_attention_forward(
        q, k_flat, v_flat, cu_q, cu_k, max_q, max_k, 0.0, causal, False, seqused_k=seqused)
    return out[0]


def sdpa_reference(q, k, v, causal):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] contiguous copies; float32 math; bottom-right causal."""
    hq, hkv = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(hq // hkv, dim=1)
    v = v.float().repeat_interleave(hq // hkv, dim=1)
    lq, lk = q.shape[0], k.shape[0]
    mask = None
    if causal:
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    return out.transpose(0, 1)


@pytest.mark.parametrize("layout", ["cross_layer", "per_layer"])
@pytest.mark.parametrize("q_len", [1, 37])  # decode, and a chunked-prefill chunk
def test_fa2_on_virtual_tensors_matches_sdpa_on_copies(layout, q_len):
    """FA2 with seqused_k reads each request's KV straight from its slot in the virtual
    tensor (slots out of order, lengths crossing pages) and matches SDPA on dense copies."""
    torch.manual_seed(0)
    spec = KVCacheSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                       max_seqs=16, max_seq_len=9000, layout=layout)
    with VirtualKVCache(spec, device="cuda", memory_budget_bytes=4 * GIB) as cache:
        slots = [cache.alloc_slot() for _ in range(spec.max_seqs)]
        chosen = [slots[i] for i in (11, 2, 7, 0, 15, 5)]
        lengths = [8999, 1, 2049, 777, 4096, 63]
        lengths = [max(n, q_len) for n in lengths]
        for slot, n in zip(chosen, lengths):
            assert cache.ensure(slot, n)
        for layer in range(spec.num_layers):
            for t in cache.kv(layer):
                for slot, n in zip(chosen, lengths):
                    t[slot, :n] = torch.randn(n, 8, 128, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        hq = 32
        q = torch.randn(len(chosen) * q_len, hq, 128, device="cuda", dtype=torch.bfloat16)
        cu_q = torch.arange(0, len(chosen) + 1, device="cuda", dtype=torch.int32) * q_len
        starts = torch.tensor(chosen, device="cuda", dtype=torch.int32) * cache.slot_stride_tokens
        seqused = torch.tensor(lengths, device="cuda", dtype=torch.int32)
        for layer in range(spec.num_layers):
            k_flat, v_flat = cache.kv_flat(layer)
            out = flash_varlen(q, k_flat, v_flat, cu_q, starts, seqused, q_len, max(lengths), True)
            k, v = cache.kv(layer)
            for i, (slot, n) in enumerate(zip(chosen, lengths)):
                qi = q[i * q_len:(i + 1) * q_len]
                ref = sdpa_reference(qi, k[slot, :n].clone(), v[slot, :n].clone(), causal=True)
                got = out[i * q_len:(i + 1) * q_len].float()
                err = (got - ref).norm() / ref.norm()
                assert err < 1e-2, f"layer {layer} request {i} (slot {slot}, len {n}): rel err {err:.2e}"


def test_driver_errors_name_the_call_and_address():
    driver = make_driver("cuda")
    addr = driver.reserve(4 * driver.page_size)
    handle = driver.create()
    try:
        with pytest.raises(DriverError, match=r"cuMemMap at 0x[0-9a-f]+ failed"):
            driver.map(addr + 1, handle)  # misaligned
    finally:
        driver.release(handle)
        driver.free_reservation(addr, 4 * driver.page_size)
    assert driver.num_live_handles == 0 and driver.num_live_reservations == 0


def test_close_returns_device_memory():
    """Pages created for the budget hold device memory; close() gives all of it back."""
    torch.cuda.synchronize()
    free_before, _ = torch.cuda.mem_get_info()
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                       max_seqs=64, max_seq_len=8192)
    cache = VirtualKVCache(spec, device="cuda", memory_budget_bytes=2 * GIB)
    slot = cache.alloc_slot()
    assert cache.ensure(slot, 8192)
    free_during, _ = torch.cuda.mem_get_info()
    assert free_before - free_during >= 2 * GIB * 0.99
    cache.close()
    free_after, _ = torch.cuda.mem_get_info()
    assert free_after >= free_before - 64 * (1 << 20), (free_before, free_after)


def test_background_mapper_runs_on_the_gpu_context():
    """prepare() maps in the mapper thread (which must bind the CUDA context) while a kernel
    runs; the data written afterwards reads back intact."""
    spec = KVCacheSpec(num_layers=8, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16,
                       max_seqs=8, max_seq_len=4096, layout="per_layer")
    with VirtualKVCache(spec, device="cuda", memory_budget_bytes=GIB,
                        eager_cushion_groups=0) as cache:
        slots = [cache.alloc_slot() for _ in range(4)]
        a = torch.randn(4096, 4096, device="cuda")
        for length in (1, 600, 1500, 4096):
            cache.prepare({s: length for s in slots})
            a = a @ a.T / 4096  # queued on the GPU while the mapper maps
            cache.wait()
            for s in slots:
                assert cache.ensure(s, length)
        c = cache.stats().counters
        assert c.pages_mapped_background > 0 and c.pages_mapped_critical == 0, c
        k, _ = cache.kv(7)
        for s in slots:
            k[s, :4096] = float(s)
        torch.cuda.synchronize()
        for s in slots:
            assert torch.all(k[s, :4096] == float(s))
