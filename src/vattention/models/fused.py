"""The decoder's elementwise work as one call per op: an eager PyTorch version (CPU, and CUDA
without Triton) and a Triton kernel (CUDA, fused_kernels.py) that computes the same thing in one
pass over memory. Each function dispatches on its input's device.

    rms_norm(x, w, eps)                 -> w * rmsnorm(x)
    add_rms_norm(x, residual, w, eps)   -> (w * rmsnorm(residual + x), residual + x)   [vLLM's
                                           fused_add_rms_norm: the sum is written into residual]
    rotary_qk(q, k, positions, inv_freq) -> (rope(q), rope(k))   cos/sin from positions directly
                                           (eager: rotary_cos_sin's tables, once per step)
    rotary_qk_store(q, k, v, positions, inv_freq, k_cache, v_cache, rows)
                                        -> (rope(q), rope(k)), and rope(k), v written to the
                                           caches at rows (the step's K/V write, same pass)
    silu_and_mul(gate_up)               -> silu(gate) * up        gate_up = [gate | up] columns
    linear(x, w, b)                     -> F.linear(x, w, b)       (CUDA, <= 16 rows: skinny GEMM)
    gelu_tanh_and_mul, gemma_rms_norm   Gemma's GeGLU and norm (1 + w, float32 throughout), the
                                           same kernels with a flag

The eager versions are the decoder's arithmetic before fusion (float32 inside the norm, output
in the input dtype; cos/sin in float32 cast to the activation dtype), which the tests keep as the
reference; the kernels round wherever those store in the activation dtype.

Why our own Triton kernels rather than torch.compile: a Triton kernel compiles once per dtype
and shape class (hidden size, head counts), while inductor compiles per static shape, i.e. once
for each of the 35 decode batch sizes the engine captures as CUDA graphs at start, which must
take under 90 s; and compiled code guards on the module's per-layer weights, which plain
function calls on tensors do not have.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, hidden] -> weight * x / rms(x), computed in float32, returned in x's dtype."""
    kernels = _kernels(x)
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (in place); returns (rms_norm(residual), residual). x, residual [T, hidden]."""
    kernels = _kernels(x)
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps, residual=residual), residual
    residual.add_(x)
    return rms_norm(residual, weight, eps), residual


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The eager path's cos/sin tables [T, 1, D] in dtype, computed once per step for all layers;
    None on CUDA, where the kernel computes them itself from positions."""
    if _kernels(positions) is not None:
        return None
    freqs = positions.float()[:, None] * inv_freq.float()[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [T, H_q, D] and k [T, H_kv, D] (HF rotate_half convention) at
    positions [T], inv_freq [D/2] float32. Returns new tensors; q and k may be strided views.
    cos_sin: rotary_cos_sin's tables for these positions, when the caller keeps them."""
    kernels = _kernels(q)
    if kernels is not None:
        return kernels.rotary_qk(q, k, positions, inv_freq)
    cos, sin = cos_sin if cos_sin is not None else rotary_cos_sin(positions, inv_freq, q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotary_qk_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                    inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    rows: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary_qk, then cache row rows[t] of k_cache / v_cache [rows, H_kv, D] gets token t's
    rotated k / its v (cast to the caches' dtype). On CUDA one kernel does all of it."""
    kernels = _kernels(q)
    if kernels is not None:
        return kernels.rotary_qk(q, k, positions, inv_freq, store=(v, k_cache, v_cache, rows))
    q, k = rotary_qk(q, k, positions, inv_freq, cos_sin)
    k_cache.index_copy_(0, rows, k.to(k_cache.dtype))
    v_cache.index_copy_(0, rows, v.to(v_cache.dtype))
    return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] -> silu(gate_up[:, :I]) * gate_up[:, I:] [T, I]."""
    kernels = _kernels(gate_up)
    if kernels is not None:
        return kernels.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


SKINNY_MAX_ROWS = 16  # up to this many rows (decode batches), projections skip cuBLAS
SKINNY_DTYPES = (torch.float16, torch.bfloat16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; on CUDA, for a few rows of 16-bit x and no bias, our skinny GEMM instead.

    Why: at 1-16 rows a projection only streams its weight, and cuBLAS's kernels for that shape
    (split-K plus a reduce kernel) are slower than one Triton kernel that puts the weight's rows
    on the tensor cores' M side: on an H200, for Llama-3-8B at 1 row, q/k/v 17.4 -> 15.3 us,
    o 13.7 -> 11.7, down 33.2 -> 32.2, the lm_head 253 -> 239, gate/up level (59.0 / 58.2)
    (benchmarks/results/skinny/diag_decode_kernels*_h200.txt); in the engine's step at batch 1,
    GPU busy 4.47 -> 4.32 ms. Fusing silu(gate) * up into the down projection's loads was tried
    and dropped: 93 us against 35 for the two kernels."""
    kernels = _skinny_kernels(x, weight) if bias is None else None
    if kernels is not None:
        return kernels.skinny_linear(x, weight, **_skinny_tiling(weight))
    return F.linear(x, weight, bias)


def _skinny_kernels(x: torch.Tensor, weight: torch.Tensor) -> ModuleType | None:
    """The kernels when the skinny GEMM takes this product (see linear), else None."""
    if x.dim() == 2 and 0 < x.shape[0] <= SKINNY_MAX_ROWS and x.dtype in SKINNY_DTYPES \
            and x.stride(-1) == 1 and weight.dtype == x.dtype and weight.is_contiguous():
        return _kernels(x)
    return None


def _skinny_tiling(weight: torch.Tensor) -> dict:
    """The sweeps' best tilings (results/skinny/diag_decode_kernels*_h200.txt): many output rows
    (gate/up, the vocabulary) want shallower tiles, so that two programs fit an SM's shared memory."""
    if weight.shape[0] >= 65536:
        return dict(block_n=128, block_k=128, num_stages=4)
    if weight.shape[0] >= 16384:
        return dict(block_n=64, block_k=128, num_stages=4)
    return dict(block_n=64, block_k=256, num_stages=4)


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma): gelu_tanh(gate_up[:, :I]) * gate_up[:, I:]."""
    kernels = _kernels(gate_up)
    if kernels is not None:
        return kernels.silu_and_mul(gate_up, gelu=True)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """Gemma's norm: x / rms(x) * (1 + weight), all in float32 and cast once at the end (where
    the Llama norm casts before its weight); with a residual, residual += x first (in place)
    and the sum is normalized, as add_rms_norm."""
    kernels = _kernels(x)
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps, residual=residual, gemma=True)
    if residual is not None:
        x = residual.add_(x)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def _kernels(x: torch.Tensor) -> ModuleType | None:
    """The Triton kernels for a CUDA tensor, None (the eager path) otherwise."""
    return _triton_kernels() if x.is_cuda else None


@functools.cache
def _triton_kernels() -> ModuleType | None:
    """Imported on first use only: importing triton decides whether it interprets (tests)."""
    try:
        from . import fused_kernels
    except ImportError:  # a CUDA build of torch without triton
        return None
    return fused_kernels
