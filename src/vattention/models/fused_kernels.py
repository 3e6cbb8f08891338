"""The Triton kernels behind fused.py: each reads its inputs once and writes its outputs once,
where the eager code makes a float32 copy, a reduction, casts and products as separate passes.

    _rms_norm_kernel     grid (T,): one program per token row, the whole hidden vector in one
                         block; HAS_RESIDUAL adds the residual first and stores the sum in place
    _rotary_kernel       grid (T, ceil(H_q / BLOCK_H) + ceil(H_kv / BLOCK_H)): one program per
                         token and block of q heads, or of k heads; cos/sin from the position and
                         inv_freq in registers, shared by the block's heads; STORE: a k program
                         also writes its rotated heads and the same v heads to the token's cache
                         row (the step's K/V write, which was two index_copy kernels per layer)
    _silu_and_mul_kernel grid (T, ceil(I / BLOCK)): one program per token and block of columns
    _skinny_gemm_kernel  grid (ceil(N / BLOCK_N), SPLIT_K): y = x @ W^T for a few rows of x
                         (decode at small batches), computed as W @ x^T so the weight's rows fill
                         the tensor cores' M side and the batch pads only their N side; with
                         SPLIT_K > 1 each split writes float32 partials that _sum_splits_kernel
                         adds in a fixed order (deterministic, unlike atomics)

Every rounding the eager code makes is made here too, in the same order (a value computed in
float32 and cast to the activation dtype wherever eager PyTorch would store it in that dtype),
so float32 results agree with eager to float32 rounding and 16-bit results agree closely.

On CPU they run under Triton's interpreter, which triton picks when it decorates these kernels:
TRITON_INTERPRET=1 must be set before triton is first imported (tests/test_fused_kernels.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HIDDEN = 1 << 16  # the norm holds a whole row in registers
SKINNY_SHARED_BYTES = 200 << 10  # the skinny GEMM's pipeline buffers (H100 / H200: 227 KiB an SM)


@triton.jit
def _rms_norm_kernel(X, Residual, Weight, Out, stride_x, stride_r, stride_o, eps,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     GEMMA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:  # residual += x, rounded to the activation dtype as torch's add rounds it
        r_ptr = Residual + row * stride_r + cols
        x = (x.to(tl.float32) + tl.load(r_ptr, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(r_ptr, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    w = tl.load(Weight + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:  # x / rms(x) * (1 + w), all in float32, cast once
        out = xf * inv_rms * (1.0 + w)
    else:
        normed = (xf * inv_rms).to(X.dtype.element_ty)  # eager: xf.to(x.dtype) before the weight
        out = w * normed.to(tl.float32)
    tl.store(Out + row * stride_o + cols, out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """x (float32) as the activation dtype would hold it, back in float32."""
    return x.to(DTYPE).to(tl.float32)


@triton.jit
def _rotate_heads(X, Out, Cache, first_head, num_heads, stride_xh, stride_oh, stride_ch, cos, sin,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                  STORE: tl.constexpr):
    """Heads [first_head, first_head + BLOCK_H) of one token, HF rotate_half convention:
    out = x * cos + cat(-x2, x1) * sin, each product and the sum rounded as eager rounds them.
    STORE: the result also goes to Cache (the token's cache row), in the cache's dtype."""
    heads = first_head + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (offs_d < HALF)[None, :]
    src = X + heads[:, None].to(tl.int64) * stride_xh + offs_d[None, :]  # [BLOCK_H, BLOCK_D] first halves
    dst = Out + heads[:, None].to(tl.int64) * stride_oh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = (_round(x1 * cos, dtype) - _round(x2 * sin, dtype)).to(dtype)
    out2 = (_round(x2 * cos, dtype) + _round(x1 * sin, dtype)).to(dtype)
    tl.store(dst, out1, mask=mask)
    tl.store(dst + HALF, out2, mask=mask)
    if STORE:
        cached = Cache + heads[:, None].to(tl.int64) * stride_ch + offs_d[None, :]
        tl.store(cached, out1.to(Cache.dtype.element_ty), mask=mask)
        tl.store(cached + HALF, out2.to(Cache.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(X, Cache, first_head, num_heads, stride_xh, stride_ch,
                HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Heads [first_head, first_head + BLOCK_H) of one token's V into its cache row."""
    heads = first_head + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x = tl.load(X + heads[:, None].to(tl.int64) * stride_xh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(Cache + heads[:, None].to(tl.int64) * stride_ch + offs_d[None, :],
             x.to(Cache.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, V, QOut, KOut, KCache, VCache, Rows, Positions, InvFreq,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_qot, stride_qoh, stride_kot, stride_koh, stride_kcr, stride_kch,
                   stride_vcr, stride_vch,
                   NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, NUM_Q_BLOCKS: tl.constexpr,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                   STORE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Programs of axis 1 below NUM_Q_BLOCKS rotate a block of q heads, the rest a block of k
    heads (and, with STORE, write those k heads and the same v heads to the token's cache row)."""
    t = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    # eager: positions.float() * inv_freq, cos/sin in float32, cast to the activation dtype
    freqs = tl.load(Positions + t).to(tl.float32) * tl.load(InvFreq + offs_d, mask=offs_d < HALF, other=0.0)
    if LIBDEVICE:  # CUDA's accurate cosf/sinf (what torch calls), whatever the argument's size
        cos, sin = libdevice.cos(freqs), libdevice.sin(freqs)
    else:  # Triton's interpreter has no libdevice; numpy's float32 cos/sin
        cos, sin = tl.cos(freqs), tl.sin(freqs)
    dtype = Q.dtype.element_ty
    cos, sin = _round(cos, dtype)[None, :], _round(sin, dtype)[None, :]  # [1, BLOCK_D]
    if block < NUM_Q_BLOCKS:
        _rotate_heads(Q + t * stride_qt, QOut + t * stride_qot, QOut, block * BLOCK_H, NUM_Q_HEADS,
                      stride_qh, stride_qoh, 0, cos, sin, HALF, BLOCK_H, BLOCK_D, False)
    else:
        first = (block - NUM_Q_BLOCKS) * BLOCK_H
        row = tl.load(Rows + t).to(tl.int64)  # without STORE, Rows is any int tensor of [T]
        _rotate_heads(K + t * stride_kt, KOut + t * stride_kot, KCache + row * stride_kcr, first,
                      NUM_KV_HEADS, stride_kh, stride_koh, stride_kch, cos, sin, HALF, BLOCK_H,
                      BLOCK_D, STORE)
        if STORE:
            _copy_heads(V + t * stride_vt, VCache + row * stride_vcr, first, NUM_KV_HEADS,
                        stride_vh, stride_vch, 2 * HALF, BLOCK_H, 2 * BLOCK_D)


@triton.jit
def _silu_and_mul_kernel(X, Out, stride_x, stride_o, WIDTH: tl.constexpr, BLOCK: tl.constexpr,
                         GELU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + WIDTH + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU:  # F.gelu(approximate="tanh"): 0.5 g (1 + tanh(y)), y = sqrt(2 / pi) (g + 0.044715 g^3),
        # with 1 + tanh(y) = 2 - 2 / (exp(2y) + 1) (the interpreter has no libdevice tanh); past
        # y = 15 tanh is 1 in float32, and the clamp keeps exp finite
        y = tl.minimum(0.7978845608028654 * (g + 0.044715 * g * g * g), 15.0)
        act = _round(0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * y) + 1.0)), gate.dtype)
    else:  # F.silu, stored in the activation dtype
        act = _round(g / (1.0 + tl.exp(-g)), gate.dtype)
    tl.store(Out + row * stride_o + cols, (act * up.to(tl.float32)).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _skinny_gemm_kernel(X, W, Out, M, N, K, k_per_split, stride_xm, stride_wn, stride_os, stride_om,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: rows of W
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    in_n = rows < N
    in_m = offs_m < M
    w_ptr = W + rows.to(tl.int64)[:, None] * stride_wn
    x_ptr = X + offs_m[None, :] * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    lo = split * k_per_split
    for k0 in range(lo, tl.minimum(lo + k_per_split, K), BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            w_mask = in_n[:, None]
            x_mask = in_m[None, :]
        else:
            w_mask = in_n[:, None] & (kk[None, :] < K)
            x_mask = in_m[None, :] & (kk[:, None] < K)
        w = tl.load(w_ptr + kk[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
        x = tl.load(x_ptr + kk[:, None], mask=x_mask, other=0.0)  # [BLOCK_K, BLOCK_M]
        if UPCAST:  # the interpreter's bf16 dot multiplies raw bit patterns (see triton_decode)
            acc += tl.dot(w.to(tl.float32), x.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(w, x, input_precision=PRECISION)
    out = Out + split * stride_os + offs_m[None, :] * stride_om + rows[:, None]
    tl.store(out, acc.to(Out.dtype.element_ty), mask=in_n[:, None] & in_m[None, :])


@triton.jit
def _sum_splits_kernel(Part, Out, N, num_splits, stride_ps, stride_pm, stride_om, BLOCK: tl.constexpr):
    m = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(num_splits):
        acc += tl.load(Part + s * stride_ps + m * stride_pm + cols, mask=mask, other=0.0)
    tl.store(Out + m * stride_om + cols, acc.to(Out.dtype.element_ty), mask=mask)


_INTERPRETED = not isinstance(_rms_norm_kernel, triton.runtime.JITFunction)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None, gemma: bool = False) -> torch.Tensor:
    """x [T, hidden] -> weight * rmsnorm(x) [T, hidden]; with a residual, residual += x first
    (in place) and the sum is normalized. gemma: Gemma's norm, (1 + weight) * rmsnorm(x)."""
    _check(x, "x", 2)
    hidden = x.shape[1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be [{hidden}] {x.dtype} on {x.device}, got "
                         f"{list(weight.shape)} {weight.dtype} on {weight.device}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds the norm kernel's {MAX_HIDDEN}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(1) != 1):
        raise ValueError(f"residual must be {list(x.shape)} {x.dtype} with contiguous rows, got "
                         f"{list(residual.shape)} {residual.dtype} strides {residual.stride()}")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        return out
    block = triton.next_power_of_2(hidden)
    res = x if residual is None else residual  # never read without HAS_RESIDUAL
    _rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, x.stride(0), res.stride(0), out.stride(0), eps,
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None, GEMMA=gemma,
        num_warps=min(16, max(1, block // 256)))
    return out


def rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
              block_h: int = 8, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H_q, D], k [T, H_kv, D] (any token/head strides, e.g. views of one qkv projection;
    D contiguous); positions [T] int; inv_freq [D/2] float32. Returns rotated copies, contiguous.

    store = (v [T, H_kv, D], k_cache, v_cache [rows, H_kv, D], rows [T] int): also writes the
    rotated k and v into the caches at rows (in the caches' dtype), in the same pass.
    block_h (heads per program) and num_warps are tuning knobs."""
    _check(q, "q", 3)
    _check(k, "k", 3)
    t, num_q_heads, head_dim = q.shape
    if k.shape[0] != t or k.shape[2] != head_dim or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k must be [{t}, H_kv, {head_dim}] {q.dtype} on {q.device}, got "
                         f"{list(k.shape)} {k.dtype} on {k.device}")
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for the half-split rotation, got {head_dim}")
    half = head_dim // 2
    if (positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64)
            or positions.device != q.device):
        raise ValueError(f"positions must be int32/int64 [{t}] on {q.device}, got {positions.dtype} "
                         f"{list(positions.shape)} on {positions.device}")
    if inv_freq.shape != (half,) or inv_freq.dtype != torch.float32 or inv_freq.device != q.device:
        raise ValueError(f"inv_freq must be float32 [{half}] on {q.device}, got {inv_freq.dtype} "
                         f"{list(inv_freq.shape)} on {inv_freq.device}")
    if store is not None:
        v, k_cache, v_cache, rows = store
        _check_store(k, v, k_cache, v_cache, rows)
    else:
        v, k_cache, v_cache, rows = k, k, k, positions  # never read without STORE
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    num_kv_heads = k.shape[1]
    block_h = min(block_h, triton.next_power_of_2(max(num_q_heads, num_kv_heads)))
    num_q_blocks = triton.cdiv(num_q_heads, block_h)
    grid = (t, num_q_blocks + triton.cdiv(num_kv_heads, block_h))
    _rotary_kernel[grid](
        q, k, v, q_out, k_out, k_cache, v_cache, rows, positions, inv_freq.contiguous(),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, NUM_Q_BLOCKS=num_q_blocks, HALF=half,
        BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half), STORE=store is not None,
        LIBDEVICE=not _INTERPRETED, num_warps=num_warps)
    return q_out, k_out


def _check_store(k, v, k_cache, v_cache, rows) -> None:
    """What rotary_qk's cache write needs: v like k, caches [rows, H_kv, D], rows [T] int."""
    _check(v, "v", 3)
    if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must be {list(k.shape)} {k.dtype} on {k.device} like k, got "
                         f"{list(v.shape)} {v.dtype} on {v.device}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check(cache, name, 3)
        if cache.shape[1:] != k.shape[1:] or cache.device != k.device:
            raise ValueError(f"{name} must be [rows, {k.shape[1]}, {k.shape[2]}] on {k.device}, "
                             f"got {list(cache.shape)} on {cache.device}")
    if rows.shape != (k.shape[0],) or rows.dtype not in (torch.int32, torch.int64) or rows.device != k.device:
        raise ValueError(f"rows must be int32/int64 [{k.shape[0]}] on {k.device}, got {rows.dtype} "
                         f"{list(rows.shape)} on {rows.device}")


def silu_and_mul(gate_up: torch.Tensor, block: int = 1024, gelu: bool = False) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate columns, then up columns) -> silu(gate) * up [T, I]; with
    gelu, gelu_tanh(gate) * up (Gemma's GeGLU)."""
    _check(gate_up, "gate_up", 2)
    t, double_width = gate_up.shape
    if double_width % 2:
        raise ValueError(f"gate_up must have an even number of columns, got {double_width}")
    width = double_width // 2
    out = torch.empty(t, width, dtype=gate_up.dtype, device=gate_up.device)
    if t == 0:
        return out
    block = min(block, triton.next_power_of_2(width))
    _silu_and_mul_kernel[(t, triton.cdiv(width, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), WIDTH=width, BLOCK=block, GELU=gelu,
        num_warps=max(1, min(8, block // 256)))
    return out


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, block_n: int = 64, block_k: int = 256,
                  split_k: int = 1, num_warps: int = 4, num_stages: int = 4) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T -> [M, N] in x's dtype, for M <= 64 (decode batches), float32
    accumulation. split_k > 1 splits K over that many programs per column block (their float32
    partials summed in order by a second kernel). The knobs' defaults: the best tiling of
    benchmarks/diag_decode_kernels.py on an H200 for most of Llama-3-8B's projections."""
    _check(x, "x", 2)
    _check(weight, "weight", 2)
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must be [N, {k}] {x.dtype} on {x.device}, got {list(weight.shape)} "
                         f"{weight.dtype} on {weight.device}")
    if not 1 <= m <= 64:
        raise ValueError(f"skinny_linear takes 1..64 rows, got {m}")
    if split_k < 1 or block_k < 16 or block_k & (block_k - 1) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"bad tiling: block_n={block_n}, block_k={block_k} (powers of 2 >= 16), "
                         f"split_k={split_k} (>= 1)")
    block_m = max(16, triton.next_power_of_2(m))
    # Triton buffers num_stages - 1 tiles of W and x in shared memory: fewer stages for wide dtypes
    tile_bytes = (block_n + block_m) * block_k * x.element_size()
    num_stages = max(1, min(num_stages, 1 + SKINNY_SHARED_BYTES // tile_bytes))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no empty splits
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    part = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    _skinny_gemm_kernel[(triton.cdiv(n, block_n), split_k)](
        x, weight, part, m, n, k, k_per_split, x.stride(0), weight.stride(0),
        part.stride(0) if split_k > 1 else 0, part.stride(-2),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=k % block_k == 0, PRECISION=precision, UPCAST=_INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    if split_k > 1:
        block = min(1024, triton.next_power_of_2(n))
        _sum_splits_kernel[(m, triton.cdiv(n, block))](part, out, n, split_k, part.stride(0),
                                                      part.stride(1), out.stride(0), BLOCK=block,
                                                      num_warps=4)
    return out


def _check(x: torch.Tensor, name: str, dims: int) -> None:
    if x.dim() != dims or x.dtype not in DTYPES or x.stride(-1) != 1:
        raise ValueError(f"{name} must be a {dims}-d tensor of {DTYPES} contiguous along its last "
                         f"dim, got {list(x.shape)} {x.dtype} strides {x.stride()}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError("the fused Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set "
                         "before vattention.models.fused_kernels is first imported")
