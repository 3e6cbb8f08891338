"""The FlexAttention + PagedAttention backend against the float64 reference backend, on the same
paged pool: decode-only, prefill-only and mixed steps (chunks that continue earlier context),
GQA, shuffled block tables and batches that are not powers of two (padding rows).

On CPU flex_attention runs its eager form; with VATTENTION_TEST_DEVICE=cuda it is compiled and
the blocks are flex's KV tile (128) or a multiple of it.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from vattention.attention import (FlexPagedBackend, LayerKV, ReferenceBackend, build_paged_metadata, write_kv,
                                  make_backend)
from vattention.attention.flex_paged import causal_block_counts

on_cuda = os.environ.get("VATTENTION_TEST_DEVICE", "cpu").startswith("cuda")
if on_cuda and not torch.cuda.is_available():
    pytest.skip("VATTENTION_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
DEVICE = torch.device("cuda" if on_cuda else "cpu")
BLOCK_SIZES = [128, 256] if on_cuda else [4, 16]
DTYPE = torch.bfloat16 if on_cuda else torch.float32
TOLERANCE = 2e-2 if on_cuda else 1e-5  # max |error| / max |reference|, per step

STEPS = {  # (query_lens, seq_lens): what each sequence adds this step and holds after it
    "decode": ([1, 1, 1], [5, 300, 129]),
    "prefill": ([40, 7], [40, 7]),
    "mixed": ([1, 33, 1, 200, 2], [1, 70, 517, 200, 260]),  # chunks 33 and 2 continue context
}


def paged_layer(num_blocks: int, block_size: int, heads: int, dim: int) -> LayerKV:
    k, v = (torch.randn(num_blocks, block_size, heads, dim, device=DEVICE).to(DTYPE) for _ in range(2))
    return LayerKV(k.view(-1, heads, dim), v.view(-1, heads, dim), k_blocks=k, v_blocks=v)


def copy_layer(layer: LayerKV) -> LayerKV:
    k, v = layer.k_blocks.clone(), layer.v_blocks.clone()
    return LayerKV(k.view(layer.k_flat.shape), v.view(layer.v_flat.shape), k_blocks=k, v_blocks=v)


SHAPES = {"causal": (None, None), "window-37": (37, None), "window-1": (1, None),
          "softcap-2": (None, 2.0), "window-softcap": (37, 2.0)}  # (window, softcap): Gemma's layers


@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_flex_matches_reference(step, block_size, group, shape):
    """Same pool, same step: flex output within tolerance of the float64 reference, and both wrote
    the same new K/V; windowed and soft-capped layers too."""
    window, softcap = SHAPES[shape]
    query_lens, seq_lens = STEPS[step]
    rng = random.Random(block_size * 10 + group)
    kv_heads, dim = 2, 64
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    order = list(range(num_blocks))
    rng.shuffle(order)
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n])
        used += n
    meta = build_paged_metadata(tables, block_size, query_lens, seq_lens, DEVICE)
    tokens = sum(query_lens)
    q = torch.randn(tokens, kv_heads * group, dim, device=DEVICE).to(DTYPE)
    k, v = (torch.randn(tokens, kv_heads, dim, device=DEVICE).to(DTYPE) for _ in range(2))
    layer = paged_layer(num_blocks, block_size, kv_heads, dim)
    ref_layer = copy_layer(layer)
    scale = 1 / math.sqrt(dim)
    write_kv(layer, k, v, meta)  # what the model's layer does before attending
    write_kv(ref_layer, k, v, meta)
    out = FlexPagedBackend(scale, block_size, DEVICE).forward(q, k, v, layer, meta, window, softcap)
    ref = ReferenceBackend(scale).forward(q, k, v, ref_layer, meta, window, softcap)
    assert torch.equal(layer.k_blocks, ref_layer.k_blocks) and torch.equal(layer.v_blocks, ref_layer.v_blocks)
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < TOLERANCE, f"{step}, block {block_size}, GQA {group}: relative error {err:.2e}"


def test_one_block_mask_per_step_serves_every_layer():
    """Layers of one step reuse the step's block masks; a new step builds new ones."""
    meta = build_paged_metadata([[2, 0], [1]], BLOCK_SIZES[0], [1, 3], [BLOCK_SIZES[0] + 1, 3], DEVICE)
    backend = FlexPagedBackend(0.125, BLOCK_SIZES[0], DEVICE)
    layer = paged_layer(3, BLOCK_SIZES[0], 1, 64)
    q = torch.randn(4, 1, 64, device=DEVICE).to(DTYPE)
    backend.forward(q, q, q, layer, meta)
    masks = backend._masks[1]
    backend.forward(q, q, q, layer, meta)
    assert backend._masks[1] is masks and len(masks[None]) == 2  # decode group and chunk group
    backend.forward(q, q, q, layer, meta, window=2)  # a windowed layer: its own masks, kept too
    assert backend._masks[1] is masks and sorted(masks, key=str) == [2, None]
    meta2 = build_paged_metadata([[2, 0], [1]], BLOCK_SIZES[0], [1, 3], [BLOCK_SIZES[0] + 1, 3], DEVICE)
    backend.forward(q, q, q, layer, meta2)
    assert backend._masks[1] is not masks


def test_flex_refuses_what_it_cannot_serve():
    """Clear errors: blocks smaller than flex's KV tile on CUDA, a contiguous cache."""
    with pytest.raises(ValueError, match="multiple of 128"):
        FlexPagedBackend(0.1, 16, torch.device("cuda"))
    with pytest.raises(ValueError, match="does not serve a contiguous cache"):
        make_backend("flex", "contiguous", 64, DEVICE)
    assert isinstance(make_backend("flex", "paged", 64, DEVICE, BLOCK_SIZES[0]), FlexPagedBackend)


@pytest.mark.parametrize("q_block,page", [(4, 4), (4, 8), (8, 4), (128, 16)])
def test_causal_block_counts_match_brute_force(q_block, page):
    """Full blocks are exactly the leading blocks every query of the row sees; every block any
    query of the row sees is full or partial; partial blocks each hold a key some query sees."""
    rng = random.Random(q_block * 100 + page)
    q_lens = [rng.randint(1, 40) for _ in range(6)] + [0]  # the last: a padding row
    offsets = [rng.randint(0, 50) for _ in range(6)] + [0]
    num_rows = -(-max(q_lens) // q_block)
    full, partial = causal_block_counts(torch.tensor(q_lens), torch.tensor(offsets), q_block, page, num_rows)
    for b, (n_q, off) in enumerate(zip(q_lens, offsets)):
        for r in range(num_rows):
            queries = range(r * q_block, min((r + 1) * q_block, n_q))
            num_kv_blocks = -(-(off + n_q) // page)
            seen = [[off + j >= kv for j in queries for kv in range(c * page, (c + 1) * page)]
                    for c in range(num_kv_blocks)]
            whole = [c for c in range(num_kv_blocks) if seen[c] and all(seen[c])]
            some = [c for c in range(num_kv_blocks) if any(seen[c])]
            f, p = int(full[b, r]), int(partial[b, r])
            assert whole == list(range(f)), f"seq {b} row {r}: full {f}, whole blocks {whole}"
            assert some == list(range(f + p)), f"seq {b} row {r}: {f}+{p} blocks, seen {some}"


def test_physical_block_mask_lists_each_sequences_own_blocks():
    """After PagedAttention's conversion, each query row's KV blocks are the physical blocks its
    block table names for the logical blocks it sees, and nothing else (padding rows: none)."""
    page = BLOCK_SIZES[0]
    tables = [[5, 2, 7], [0], [3, 6]]
    seq_lens, query_lens = [2 * page + 3, 1, page + 1], [1, 1, 1]
    meta = build_paged_metadata(tables, page, query_lens, seq_lens, DEVICE)
    backend = FlexPagedBackend(0.1, page, DEVICE)
    mask, batch, q_len, _ = backend._block_mask(meta, (0, 1, 2), 8, DEVICE)
    assert (batch, q_len) == (4, 1)
    dense = mask.to_dense()[:, 0, 0].cpu()  # [B, num_blocks]: which physical blocks row 0 reads
    want = torch.zeros(4, 8, dtype=dense.dtype)
    for b, table in enumerate(tables):
        want[b, table] = 1
    assert torch.equal(dense[:, :8], want), f"{dense}"
