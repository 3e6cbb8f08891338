"""KV views address the bytes the layout says, and data survives growth, reuse and reclamation."""

from __future__ import annotations

import random

import pytest
import torch

from vattention.memory import HostDriver, KVCacheSpec, KVLayout, VirtualKVCache

from conftest import check, fill, make_cache, new_driver, small_spec


def reference_offset(spec: KVCacheSpec, lay: KVLayout, layer, kv, slot, token, head, elem) -> int:
    """Byte offset from the reservation base, computed from first principles (not from KVLayout)."""
    e = spec.itemsize
    hd = spec.num_kv_heads * spec.head_dim * e
    if spec.layout == "per_layer":
        tensor = 2 * layer + kv
        slot_bytes = lay.slot_stride_tokens * hd
        return (tensor * spec.max_seqs * slot_bytes + slot * slot_bytes + token * hd
                + head * spec.head_dim * e + elem * e)
    row = spec.num_layers * 2 * hd
    return (slot * lay.slot_stride_tokens * row + token * row + (layer * 2 + kv) * hd
            + head * spec.head_dim * e + elem * e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_address_reference_bytes(layout, dtype):
    """Every element of kv(layer) and kv_flat(layer) lives at the reference byte offset."""
    spec = small_spec(layout, dtype=dtype, num_kv_heads=3, head_dim=5, max_seq_len=700)
    with make_cache(spec=spec, budget_pages=None) as cache:
        base = cache._base
        # Every byte of the reservation as one flat tensor: reads that bypass the views' strides.
        raw = cache.driver.tensor(base, (cache.layout.reservation_bytes,), torch.uint8, (1,))
        for slot in range(spec.max_seqs):
            assert cache.alloc_slot() is not None
            assert cache.ensure(slot, spec.max_seq_len)
        rng = random.Random(0)
        e = spec.itemsize
        for _ in range(300):
            layer, kv = rng.randrange(spec.num_layers), rng.randrange(2)
            slot, token = rng.randrange(spec.max_seqs), rng.randrange(spec.max_seq_len)
            head, elem = rng.randrange(spec.num_kv_heads), rng.randrange(spec.head_dim)
            want = base + reference_offset(spec, cache.layout, layer, kv, slot, token, head, elem)
            view = cache.kv(layer)[kv]
            flat = cache.kv_flat(layer)[kv]
            assert view.shape == (spec.max_seqs, spec.max_seq_len, spec.num_kv_heads, spec.head_dim)
            got = view[slot, token, head, elem].data_ptr()
            got_flat = flat[slot * cache.slot_stride_tokens + token, head, elem].data_ptr()
            assert got == want and got_flat == want, (layer, kv, slot, token, head, elem)
            # A value written through the view is the value at those bytes.
            value = torch.tensor(rng.uniform(-100, 100), dtype=dtype)
            view[slot, token, head, elem] = value
            got_value = raw[want - base:want - base + e].cpu().view(dtype)[0]
            assert got_value == value, (got_value, value)


def test_slot_stride_is_whole_pages_and_whole_tokens(layout):
    """The slot stride covers max_seq_len, is page aligned, and is a whole number of tokens,
    even when a token's bytes do not divide the page (3 heads x 64 x 2 bytes = 384)."""
    spec = KVCacheSpec(num_layers=5, num_kv_heads=3, head_dim=64, dtype=torch.float16,
                       max_seqs=2, max_seq_len=3000, layout=layout)
    lay = KVLayout(spec, 2 << 20)
    assert lay.slot_stride_bytes % lay.page_size == 0
    assert lay.slot_stride_bytes == lay.slot_stride_tokens * lay.token_bytes
    assert lay.slot_stride_tokens >= spec.max_seq_len


def test_data_survives_growth_reuse_and_reclamation(layout):
    """Tokens written before each growth are still there after it, after other slots are
    freed and reclaimed, and a reused slot's new owner sees its own writes."""
    spec = small_spec(layout, max_seq_len=12000)
    lay = KVLayout(spec, new_driver().page_size)
    # Room for slot a at full length plus 3 groups: b's 8 groups must be reclaimed for a to grow.
    with make_cache(spec=spec, budget_pages=(lay.pages_per_slot + 3) * lay.num_tensors) as cache:
        tokens_per_group = cache.layout.tokens_in(1)
        a, b = cache.alloc_slot(), cache.alloc_slot()
        length = 0
        for step, end in enumerate([5, tokens_per_group, tokens_per_group + 1, 3 * tokens_per_group + 7]):
            assert cache.ensure(a, end)
            fill(cache, a, tag=1, start=length, end=end)
            length = end
            check(cache, a, tag=1, end=length)
        assert cache.ensure(b, 8 * tokens_per_group)
        fill(cache, b, tag=2, start=0, end=8 * tokens_per_group)
        cache.free(b)
        # Slot a grows into pages reclaimed from idle slot b; its old tokens are untouched.
        big = spec.max_seq_len
        assert cache.ensure(a, big)
        assert cache.stats().counters.pages_reclaimed > 0
        check(cache, a, tag=1, end=length)
        fill(cache, a, tag=1, start=length, end=big)
        check(cache, a, tag=1, end=big)
        # Reuse: a new owner of b rewrites and reads back its own data.
        c = cache.alloc_slot()
        assert cache.ensure(c, 100)
        fill(cache, c, tag=3, start=0, end=100)
        check(cache, c, tag=3, end=100)
        check(cache, a, tag=1, end=big)


def test_host_page_size_must_be_os_page_multiple():
    with pytest.raises(ValueError, match="multiple of the OS page"):
        HostDriver(page_size=1000)


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="layout"):
        KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, layout="paged")
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCacheSpec(num_layers=1, num_kv_heads=1, head_dim=8, max_seq_len=0)


def test_budget_smaller_than_one_group_is_refused():
    spec = small_spec("per_layer")
    with pytest.raises(ValueError, match="cannot hold one page group"):
        driver = new_driver()
        VirtualKVCache(spec, driver=driver, memory_budget_bytes=driver.page_size)
