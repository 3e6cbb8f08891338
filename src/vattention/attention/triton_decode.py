"""Split-KV (flash-decoding) attention for one query token per sequence, in Triton, over either
kind of cache: the contiguous virtual tensors (vAttention) or a pool of fixed-size blocks (paged).

    q [B, H_q, D] ──> _split_kernel, grid (B, H_kv, num_splits): one program attends the whole GQA
                      group (the H_q / H_kv query heads sharing one kv head, so K/V are read once
                      per group) over one split of the sequence; online softmax in fp32
                  ──> partial out [B, H_q, num_splits, D] fp32 and its log2-sum-exp [B, H_q, num_splits]
                  ──> _combine_kernel, grid (B, H_q) ──> out [B, H_q, D] in q's dtype

The contiguous and the paged kernel are one kernel body; the constexpr PAGED changes only where
token t of sequence b lives, so timing one against the other isolates what paging costs:

    contiguous  offset = (kv_starts[b] + t) * stride_row
    paged       offset = block_tables[b, t // block_size] * stride_block + (t % block_size) * stride_token

Offsets are int64 throughout: a cross-layer cache view spans far more than 2^31 elements.

    split s of sequence b holds tokens [first + s * chunk, min(first + (s + 1) * chunk, seq_len)),
    chunk = ceil(ceil((seq_len - first) / num_splits) / BLOCK_N) * BLOCK_N   (empty splits write lse = -inf)
    first = 0, or with a window max(0, seq_len - window): a windowed layer reads only its window

With SOFTCAP the scaled score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_SPLIT_TOKENS = 256  # a split shorter than this costs more in partials than it adds in parallelism
MAX_SPLITS = 64
PROGRAMS_PER_SM = 4  # enough resident programs per SM to keep its memory pipe busy
DEFAULT_NUM_SMS = 132  # H100 / H200, used when the tensors are not on a GPU (the interpreter)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST (only under Triton's interpreter, whose bf16 dot multiplies the raw 16-bit
    patterns as integers) goes through fp32, which holds every bf16 value exactly."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _split_kernel(Q, K, V, KvStarts, BlockTables, SeqLens, OutPart, LsePart, scale, window, softcap,
                  stride_qb, stride_qh, stride_kr, stride_kt, stride_kh, stride_vr, stride_vt,
                  stride_vh, stride_bt, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                  PAGE_SIZE: tl.constexpr,
                  WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    first = tl.maximum(seq_len - window, 0) if WINDOWED else 0
    chunk = tl.cdiv(tl.cdiv(seq_len - first, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    lo = first + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)  # HEAD_DIM padded to a power of 2 (Phi-3's 96: 128)
    in_dim = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g  # [BLOCK_G] query heads of the group (padded rows masked)
    in_group = offs_g < GROUP
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=in_group[:, None] & in_dim[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    k_head = K + kv_head * stride_kh + offs_d[None, :]
    v_head = V + kv_head * stride_vh + offs_d[None, :]
    if PAGED:
        table = BlockTables + b * stride_bt
    else:
        start_row = tl.load(KvStarts + b).to(tl.int64)

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of scores (log2 units)
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        t = tile + offs_n  # [BLOCK_N] token positions
        valid = t < hi
        if PAGED:  # the only difference between the twins: where token t lives
            block = tl.load(table + t // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
            in_block = (t % PAGE_SIZE).to(tl.int64)
            k_off = block * stride_kr + in_block * stride_kt
            v_off = block * stride_vr + in_block * stride_vt
        else:
            row = start_row + t
            k_off = row * stride_kr
            v_off = row * stride_vr
        k = tl.load(k_head + k_off[:, None], mask=valid[:, None] & in_dim[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * scale  # [BLOCK_G, BLOCK_N]
        if SOFTCAP:  # softcap * tanh(s / softcap), tanh(x) = 1 - 2 / (exp(2x) + 1), x clamped where tanh is 1
            s = softcap - 2.0 * softcap / (tl.exp(tl.minimum(2.0 * s / softcap, 30.0)) + 1.0)
        s = tl.where(valid[None, :], s * 1.4426950408889634, float("-inf"))  # log2 units
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off[:, None], mask=valid[:, None] & in_dim[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m = m_new

    nonempty = l > 0
    out = acc / tl.where(nonempty, l, 1.0)[:, None]
    lse = tl.where(nonempty, m + tl.log2(tl.where(nonempty, l, 1.0)), float("-inf"))
    tl.store(OutPart + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             out, mask=in_group[:, None] & in_dim[None, :])
    tl.store(LsePart + b * stride_lb + heads * stride_lh + split, lse, mask=in_group)


@triton.jit
def _combine_kernel(OutPart, LsePart, Out, num_splits, stride_pb, stride_ph, stride_ps,
                    stride_lb, stride_lh, stride_ob, stride_oh,
                    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    in_dim = offs_d < HEAD_DIM
    used = offs_s < num_splits
    lse = tl.load(LsePart + b * stride_lb + h * stride_lh + offs_s, mask=used, other=float("-inf"))
    top = tl.max(lse, 0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # empty splits weigh 0
    part = tl.load(OutPart + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                   mask=used[:, None] & in_dim[None, :], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=in_dim)


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int | None,
                      num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Splits per sequence so batch * num_kv_heads * splits programs fill the GPU, each split
    at least MIN_SPLIT_TOKENS long. max_seq_len None (unknown without a device sync) assumes
    long sequences; short ones then leave trailing splits empty, which exit at once."""
    want = -(-PROGRAMS_PER_SM * num_sms // (batch * num_kv_heads))
    if max_seq_len is not None:
        want = min(want, -(-max_seq_len // MIN_SPLIT_TOKENS))
    return max(1, min(want, MAX_SPLITS))


def contiguous_decode(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                      kv_starts: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      num_splits: int | None = None, max_seq_len: int | None = None,
                      window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Decode attention over a contiguous cache: sequence b's token t is row kv_starts[b] + t.

    q [B, H_q, D]; k_flat, v_flat [rows, H_kv, D] (any row stride, last dim contiguous);
    kv_starts, seq_lens [B] int32. max_seq_len (a host int, if known) only sizes num_splits.
    window: attend to the last `window` tokens only; softcap: cap the scores (see above).
    Returns [B, H_q, D] in q's dtype."""
    _check_common(q, k_flat, v_flat, seq_lens, kv_dims=3)
    _check_index(kv_starts, "kv_starts", (q.shape[0],), q.device)
    k_strides = (k_flat.stride(0), 0, k_flat.stride(1))
    v_strides = (v_flat.stride(0), 0, v_flat.stride(1))
    return _decode(q, k_flat, v_flat, k_strides, v_strides, kv_starts, seq_lens, seq_lens, 0,
                   paged=False, page_size=1, scale=scale, num_splits=num_splits,
                   max_seq_len=max_seq_len, window=window, softcap=softcap)


def paged_decode(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 num_splits: int | None = None, max_seq_len: int | None = None,
                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Decode attention over a block pool: sequence b's token t is token t % block_size of block
    block_tables[b, t // block_size].

    q [B, H_q, D]; k_blocks, v_blocks [num_blocks, block_size, H_kv, D] (any strides, last dim
    contiguous); block_tables [B, max_blocks] int32; seq_lens [B] int32. Returns [B, H_q, D]."""
    _check_common(q, k_blocks, v_blocks, seq_lens, kv_dims=4)
    if block_tables.dim() != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables must be [B={q.shape[0]}, max_blocks], got {tuple(block_tables.shape)}")
    _check_index(block_tables, "block_tables", tuple(block_tables.shape), q.device)
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables must be contiguous along its last dim")
    page_size = k_blocks.shape[1]
    if page_size < 16 or page_size & (page_size - 1):
        raise ValueError(f"block_size must be a power of 2 >= 16, got {page_size}")
    k_strides = (k_blocks.stride(0), k_blocks.stride(1), k_blocks.stride(2))
    v_strides = (v_blocks.stride(0), v_blocks.stride(1), v_blocks.stride(2))
    return _decode(q, k_blocks, v_blocks, k_strides, v_strides, seq_lens, block_tables, seq_lens,
                   block_tables.stride(0), paged=True, page_size=page_size, scale=scale,
                   num_splits=num_splits, max_seq_len=max_seq_len, window=window, softcap=softcap)


def _decode(q, k, v, k_strides, v_strides, kv_starts, block_tables, seq_lens, stride_bt, *,
            paged: bool, page_size: int, scale: float, num_splits: int | None,
            max_seq_len: int | None, window: int | None = None, softcap: float | None = None,
            block_n: int = 32, num_warps: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """Launch the split kernel and the combine. kv_starts / block_tables: the one the variant
    does not use is any int32 tensor (never read). block_n, num_warps, num_stages: tuning knobs.
    Defaults from a sweep on an H200 (block_n 32/64/128 x warps 2/4/8 x stages 2/3, Llama-3-8B
    heads, B 1..128, L 2K..32K): fastest for both twins at B 32 and 128, within 2% of the best
    for the contiguous one at B 1 and 8. One config serves both twins, so that contiguous vs
    paged compares addressing only."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    group = num_q_heads // num_kv_heads
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 token, got {window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0, got {softcap}")
    if num_splits is None:
        num_sms = _num_sms(q.device) if q.device.type == "cuda" else DEFAULT_NUM_SMS
        span = max_seq_len if window is None or max_seq_len is None else min(window, max_seq_len)
        num_splits = choose_num_splits(batch, num_kv_heads, span, num_sms)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if num_warps is None:
        num_warps = 2 if head_dim <= 128 else 4
    out_part = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    _split_kernel[(batch, num_kv_heads, num_splits)](
        q, k, v, kv_starts, block_tables, seq_lens, out_part, lse_part, scale, window or 0,
        softcap or 1.0, q.stride(0), q.stride(1), *k_strides, *v_strides, stride_bt,
        out_part.stride(0), out_part.stride(1), out_part.stride(2), lse_part.stride(0), lse_part.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), PAGED=paged, PAGE_SIZE=page_size, WINDOWED=window is not None,
        SOFTCAP=softcap is not None, PRECISION=precision,
        UPCAST=_INTERPRETED and q.dtype == torch.bfloat16, num_warps=num_warps, num_stages=num_stages)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    _combine_kernel[(batch, num_q_heads)](
        out_part, lse_part, out, num_splits, out_part.stride(0), out_part.stride(1),
        out_part.stride(2), lse_part.stride(0), lse_part.stride(1), out.stride(0), out.stride(1),
        BLOCK_S=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim),
        num_warps=4)
    return out


def _block_d(head_dim: int) -> int:
    """The kernels' head-dim tile: head_dim rounded up to a power of 2, the padding masked."""
    return triton.next_power_of_2(head_dim)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check_common(q, k, v, seq_lens, kv_dims: int) -> None:
    """Shapes, dtypes and layouts both kernels need; raise with what was given and what works."""
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D] (one query token per sequence), got {tuple(q.shape)}")
    if k.dim() != kv_dims or v.shape != k.shape:
        raise ValueError(f"k and v must both be {kv_dims}-d with the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q has head_dim {head_dim} but k/v have {k.shape[-1]}")
    if head_dim < 16 or head_dim > 256 or head_dim % 8:
        raise ValueError(f"head_dim must be a multiple of 8 in [16, 256], got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride {t.stride(-1)})")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    _check_index(seq_lens, "seq_lens", (batch,), q.device)
    if q.device.type != "cuda" and not _INTERPRETED:
        raise ValueError("the Triton decode kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
                         "before vattention.attention.triton_decode is first imported")


def _check_index(t: torch.Tensor, name: str, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype != torch.int32 or tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"{name} must be int32 {list(shape)} on {device}, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")


_INTERPRETED = not isinstance(_split_kernel, triton.runtime.JITFunction)


def decode_reference(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                     scale: float, window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """The oracle, float64, one sequence at a time: keys[b], values[b] [seq_len_b, H_kv, D] are
    sequence b's tokens in order (gathered by the caller from whichever cache). [B, H_q, D] fp64."""
    out = []
    for qb, kb, vb in zip(q.double(), keys, values):
        if window is not None:
            kb, vb = kb[-window:], vb[-window:]
        group = qb.shape[0] // kb.shape[1]
        kb = kb.double().repeat_interleave(group, dim=1)  # [seq_len, H_q, D]
        vb = vb.double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", qb, kb) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        out.append(torch.einsum("ht,thd->hd", scores.softmax(-1), vb))
    return torch.stack(out)
