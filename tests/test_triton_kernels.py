"""Our Triton split-KV decode kernels (contiguous and paged twins) against a float64 reference.

On CPU they run under Triton's interpreter (small shapes); with VATTENTION_TEST_DEVICE=cuda they
are compiled for the GPU and run larger shapes, plus a cross-layer view past 2^31 elements.
Errors are measured per sequence relative to the reference's largest output value there.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import sys

import pytest
import torch

on_cuda = os.environ.get("VATTENTION_TEST_DEVICE", "cpu").startswith("cuda")
if on_cuda and not torch.cuda.is_available():
    pytest.skip("VATTENTION_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton; its interpreter runs these tests on "
                "CPU)", allow_module_level=True)
DEVICE = "cuda" if on_cuda else "cpu"
KERNELS = "vattention.attention.triton_decode"


def _import_kernels():
    """On CPU the kernels run under Triton's interpreter, which triton picks when it decorates
    its own library and our kernels: TRITON_INTERPRET=1 must be set before triton is first
    imported, and stays set for this process. If triton was imported earlier without it, skip."""
    if on_cuda:
        return importlib.import_module(KERNELS)
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before this module without TRITON_INTERPRET=1; run "
                    "this file on its own or with TRITON_INTERPRET=1 set", allow_module_level=True)
    module = importlib.import_module(KERNELS)
    return module if module._INTERPRETED else importlib.reload(module)


td = _import_kernels()

# Max error / max |reference| per sequence: the output's own rounding (bf16 2^-8, fp16 2^-11)
# plus the fp32 softmax weights rounded to the input dtype before P @ V.
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 2e-5}
# Lengths: 1, non-multiples of every block size, and a few thousand (hundreds on the interpreter).
LENGTHS = [1, 17, 255, 1000, 4097, 16_385, 32_768] if on_cuda else [1, 17, 130, 257, 1500, 2049]


@pytest.fixture(scope="module", autouse=True)
def kernels_run_here():
    """Skip (with the reason) where Triton cannot run: no GPU and a broken interpreter."""
    q = torch.randn(1, 1, 16, device=DEVICE, dtype=torch.float16)
    k = torch.randn(4, 1, 16, device=DEVICE, dtype=torch.float16)
    index = torch.tensor([0], dtype=torch.int32, device=DEVICE)
    try:
        td.contiguous_decode(q, k, k, index, index + 4, 1.0, num_splits=1)
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain means "cannot test here"
        pytest.skip(f"Triton cannot run on {DEVICE} here ({type(e).__name__}: {e})")


# ---- caches with known contents ------------------------------------------------------------------

def rand(*shape, dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def contiguous_cache(lens: list[int], num_kv_heads: int, head_dim: int, dtype, cross_layer: bool):
    """k_flat, v_flat [rows, H_kv, D] with sequences at random starts (gaps between them).
    cross_layer: rows of a [rows, 3 layers, 2, H_kv, D] buffer, layer 1's K and V: row stride
    6 * H_kv * D, as in the virtual cache's cross-layer layout."""
    starts, row = [], 0
    for n in lens:
        row += random.randint(0, 40)
        starts.append(row)
        row += n
    rows = row + 3
    if cross_layer:
        buf = rand(rows, 3, 2, num_kv_heads, head_dim, dtype=dtype)
        k_flat, v_flat = buf[:, 1, 0], buf[:, 1, 1]
    else:
        k_flat, v_flat = (rand(rows, num_kv_heads, head_dim, dtype=dtype) for _ in range(2))
    keys = [k_flat[s:s + n] for s, n in zip(starts, lens)]
    values = [v_flat[s:s + n] for s, n in zip(starts, lens)]
    return k_flat, v_flat, index(starts), keys, values


def paged_cache(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype,
                strided: bool):
    """Blocks [num_blocks, block_size, H_kv, D] handed out in shuffled order; block table rows
    padded with other sequences' blocks (never read). strided: K and V are views into one
    [num_blocks, block_size, 2, H_kv, D] pool."""
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 2
    if strided:
        pool = rand(num_blocks, block_size, 2, num_kv_heads, head_dim, dtype=dtype)
        k_blocks, v_blocks = pool[:, :, 0], pool[:, :, 1]
    else:
        k_blocks, v_blocks = (rand(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
                              for _ in range(2))
    order = torch.randperm(num_blocks).tolist()
    tables, used = [], 0
    for n in need:
        mine = order[used:used + n]
        used += n
        tables.append(mine + order[:max(need) + 1 - n])
    block_tables = torch.tensor(tables, dtype=torch.int32, device=DEVICE)

    def gather(blocks, b):
        t = torch.arange(lens[b], device=DEVICE)
        return blocks[block_tables[b, t // block_size].long(), t % block_size]

    keys = [gather(k_blocks, b) for b in range(len(lens))]
    values = [gather(v_blocks, b) for b in range(len(lens))]
    return k_blocks, v_blocks, block_tables, keys, values


def index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def assert_close(out: torch.Tensor, ref: torch.Tensor, lens: list[int], tol: float, what: str):
    """Per sequence: max |out - ref| / max |ref| <= tol; the message names the worst element."""
    assert out.shape == ref.shape and out.dtype != torch.float64, f"{what}: got {out.shape} {out.dtype}"
    err = (out.double() - ref).abs()  # [B, H_q, D]
    rel = err.amax(dim=(1, 2)) / ref.abs().amax(dim=(1, 2)).clamp_min(1e-12)
    b = int(rel.argmax())
    if rel[b] > tol:
        h, d = divmod(int(err[b].argmax()), ref.shape[2])
        raise AssertionError(
            f"{what}: sequence {b} (length {lens[b]}) relative error {rel[b]:.2e} > {tol:.1e}; "
            f"worst at head {h} dim {d}: got {out[b, h, d].item():.6g}, want {ref[b, h, d].item():.6g} "
            f"(diff {err[b, h, d].item():.3g}); per-sequence errors {[f'{r:.1e}' for r in rel.tolist()]}")


def pick_lengths(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.choice(LENGTHS) for _ in range(count - 1)] + [max(LENGTHS)]


# ---- the kernels against the reference ---------------------------------------------------------

# Every GQA ratio x head dim; on the interpreter (which pays per tile) each with one of the dtypes.
SHAPES = [(group, head_dim, dtype) for group in (1, 4, 8) for head_dim in (64, 128)
          for dtype in (torch.bfloat16, torch.float16)
          if on_cuda or (dtype == torch.bfloat16) == ((group + head_dim // 64) % 2 == 0)]
SHAPES += [(1, 96, torch.bfloat16), (4, 256, torch.float16)]  # Phi-3's head dim (padded to 128), Gemma's


@pytest.mark.parametrize("group,head_dim,dtype", SHAPES, ids=str)
def test_contiguous_decode_matches_reference(group, head_dim, dtype):
    """Contiguous kernel = float64 softmax attention, on strided cross-layer and plain views."""
    seed = SHAPES.index((group, head_dim, dtype))
    random.seed(seed)
    torch.manual_seed(seed)
    num_kv_heads = 2 if group < 8 else 1
    lens = pick_lengths(seed, 16 if on_cuda else 3)
    cross_layer = seed % 2 == 0
    k_flat, v_flat, starts, keys, values = contiguous_cache(lens, num_kv_heads, head_dim, dtype, cross_layer)
    q = rand(len(lens), num_kv_heads * group, head_dim, dtype=dtype) * (1 + seed % 3)
    scale = 1 / math.sqrt(head_dim)
    splits = None if on_cuda else 4  # the interpreter pays per program
    out = td.contiguous_decode(q, k_flat, v_flat, starts, index(lens), scale, num_splits=splits)
    assert_close(out, td.decode_reference(q, keys, values, scale), lens, TOLERANCE[dtype],
                 f"contiguous G={group} D={head_dim} {dtype} {'cross-layer' if cross_layer else 'plain'}")


PAGED = [(16, 8, 128, torch.bfloat16, True), (16, 1, 64, torch.float16, False),
         (128, 4, 128, torch.float16, True), (128, 8, 64, torch.bfloat16, False),
         (256, 1, 128, torch.bfloat16, True), (256, 4, 64, torch.float16, False),
         (16, 4, 96, torch.float16, True)]


@pytest.mark.parametrize("block_size,group,head_dim,dtype,strided", PAGED, ids=str)
def test_paged_decode_matches_reference(block_size, group, head_dim, dtype, strided):
    """Paged kernel = float64 reference, through shuffled block tables, block sizes 16/128/256."""
    seed = 100 + PAGED.index((block_size, group, head_dim, dtype, strided))
    random.seed(seed)
    torch.manual_seed(seed)
    num_kv_heads = 2
    lens = pick_lengths(seed, 16 if on_cuda else 3)
    k_blocks, v_blocks, tables, keys, values = paged_cache(lens, block_size, num_kv_heads, head_dim,
                                                           dtype, strided)
    q = rand(len(lens), num_kv_heads * group, head_dim, dtype=dtype)
    scale = 1 / math.sqrt(head_dim)
    out = td.paged_decode(q, k_blocks, v_blocks, tables, index(lens), scale,
                          num_splits=None if on_cuda else 3)
    assert_close(out, td.decode_reference(q, keys, values, scale), lens, TOLERANCE[dtype],
                 f"paged block_size={block_size} G={group} D={head_dim} {dtype}")


def test_twins_differ_only_in_addressing():
    """The same tokens through kv_starts or through a block table give bit-identical outputs."""
    torch.manual_seed(7)
    lens, block_size = [5, 300, 1029], 16
    k_blocks, v_blocks, tables, keys, values = paged_cache(lens, block_size, 2, 128, torch.bfloat16, True)
    starts = [0, 5, 305]
    k_flat, v_flat = torch.cat(keys), torch.cat(values)
    q = rand(3, 8, 128, dtype=torch.bfloat16)
    paged = td.paged_decode(q, k_blocks, v_blocks, tables, index(lens), 0.1, num_splits=5)
    flat = td.contiguous_decode(q, k_flat, v_flat, index(starts), index(lens), 0.1, num_splits=5)
    diff = (paged.float() - flat.float()).abs().max().item()
    assert torch.equal(paged, flat), f"paged and contiguous outputs differ by up to {diff}"


@pytest.mark.parametrize("num_splits", [1, 3, 40, None])
def test_any_split_count_combines_exactly(num_splits):
    """One split, uneven splits, more splits than tiles (empty ones) and the automatic choice."""
    torch.manual_seed(num_splits or 0)
    lens = [1, 64, 65, 900]
    k_flat, v_flat, starts, keys, values = contiguous_cache(lens, 1, 64, torch.float16, True)
    q = rand(4, 4, 64, dtype=torch.float16)
    out = td.contiguous_decode(q, k_flat, v_flat, starts, index(lens), 0.125, num_splits=num_splits,
                               max_seq_len=max(lens))
    assert_close(out, td.decode_reference(q, keys, values, 0.125), lens, TOLERANCE[torch.float16],
                 f"num_splits={num_splits}")


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("window,softcap", [(1, None), (40, None), (2000, None), (None, 3.0), (100, 3.0)])
def test_windowed_and_softcapped_decode_matches_reference(paged, window, softcap):
    """Gemma's layers: a window (1 token, shorter and longer than the sequences) reads only the
    last `window` tokens; a soft-cap caps the scores; both twins, every split count's edge."""
    torch.manual_seed(5)
    lens = [1, 39, 41, 700]
    q = rand(4, 8, 64, dtype=torch.float16) * 4  # large scores, so that the cap matters
    if paged:
        k, v, where, keys, values = paged_cache(lens, 16, 2, 64, torch.float16, True)
        out = td.paged_decode(q, k, v, where, index(lens), 0.125, num_splits=3, window=window, softcap=softcap)
    else:
        k, v, where, keys, values = contiguous_cache(lens, 2, 64, torch.float16, True)
        out = td.contiguous_decode(q, k, v, where, index(lens), 0.125, num_splits=3, window=window,
                                   softcap=softcap)
    want = td.decode_reference(q, keys, values, 0.125, window, softcap)
    assert_close(out, want, lens, TOLERANCE[torch.float16], f"window={window} softcap={softcap}")
    if window is not None and window < max(lens):  # and it differs from attending to everything
        assert not torch.allclose(out.double(), td.decode_reference(q, keys, values, 0.125, None, softcap))


def test_float32_is_exact_to_fp32_rounding():
    """fp32 inputs use IEEE dots (no TF32), so errors stay at fp32 rounding."""
    torch.manual_seed(3)
    lens = [33, 700]
    k_flat, v_flat, starts, keys, values = contiguous_cache(lens, 2, 64, torch.float32, False)
    q = rand(2, 8, 64, dtype=torch.float32)
    out = td.contiguous_decode(q, k_flat, v_flat, starts, index(lens), 0.125, num_splits=2)
    assert_close(out, td.decode_reference(q, keys, values, 0.125), lens, TOLERANCE[torch.float32], "fp32")


def test_num_splits_fills_the_gpu_but_not_beyond_the_work():
    """Small batches split long sequences (about 4 programs per SM); short ones are not split."""
    assert td.choose_num_splits(1, 8, 32_768, num_sms=132) == td.MAX_SPLITS
    assert td.choose_num_splits(1, 8, 300, num_sms=132) == 2
    assert td.choose_num_splits(128, 8, 32_768, num_sms=132) == 1
    assert td.choose_num_splits(1, 1, None, num_sms=132) == td.MAX_SPLITS


@pytest.mark.parametrize("case,match", [
    ("head_dim", "multiple of 8"), ("dtype", "share one dtype"), ("block_size", "block_size"),
    ("index_dtype", "int32"), ("heads", "multiple"), ("last_dim", "contiguous along head_dim")])
def test_unsupported_inputs_raise_clearly(case, match):
    """Unsupported shapes and dtypes are refused with a message naming the problem."""
    d = 100 if case == "head_dim" else 64
    q = rand(2, 6 if case == "heads" else 8, d, dtype=torch.float16)
    k = rand(4, 16 if case != "block_size" else 8, 4, d, dtype=torch.bfloat16 if case == "dtype" else torch.float16)
    if case == "last_dim":
        k = rand(4, 16, 4, 2 * d, dtype=torch.float16)[..., ::2]
    lens = torch.tensor([3, 5], dtype=torch.int64 if case == "index_dtype" else torch.int32, device=DEVICE)
    tables = index([[0], [1]])
    with pytest.raises(ValueError, match=match):
        td.paged_decode(q, k, k, tables, lens, 0.1)


@pytest.mark.skipif(not on_cuda, reason="a >2^31-element view needs GPU memory; the interpreter "
                                        "indexes with numpy int64 anyway")
def test_cross_layer_view_past_2_31_elements():
    """Sequences at the far end of a cross-layer view spanning > 2^31 elements (64-bit offsets)."""
    torch.manual_seed(11)
    num_layers, heads, dim = 32, 8, 128
    row = num_layers * 2 * heads * dim  # elements per token row
    rows = (1 << 31) // row + 4096  # ~2.2e9 elements, 4.3 GB of bf16
    buf = torch.empty(rows, num_layers, 2, heads, dim, device=DEVICE, dtype=torch.bfloat16)
    k_flat, v_flat = buf[:, num_layers - 1, 0], buf[:, num_layers - 1, 1]
    lens, starts = [4000, 3000], [rows - 4000, rows - 7100]
    for s, n in zip(starts, lens):
        k_flat[s:s + n] = rand(n, heads, dim, dtype=torch.bfloat16)
        v_flat[s:s + n] = rand(n, heads, dim, dtype=torch.bfloat16)
    keys = [k_flat[s:s + n] for s, n in zip(starts, lens)]
    values = [v_flat[s:s + n] for s, n in zip(starts, lens)]
    q = rand(2, 32, dim, dtype=torch.bfloat16)
    out = td.contiguous_decode(q, k_flat, v_flat, index(starts), index(lens), dim ** -0.5)
    assert_close(out, td.decode_reference(q, keys, values, dim ** -0.5), lens,
                 TOLERANCE[torch.bfloat16], "cross-layer view > 2^31 elements")
