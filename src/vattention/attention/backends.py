"""Contiguous-cache attention backends: each writes the step's K/V, then attends.

All take q [num_tokens, H_q, D], k/v [num_tokens, H_kv, D] for the step's new tokens and return
[num_tokens, H_q, D]. The layer's cache comes as a ContiguousKV (the memory library's views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


@dataclass
class ContiguousKV:
    """One layer's cache as the memory library hands it out (zero-copy views)."""

    k: torch.Tensor  # [max_seqs, max_seq_len, H_kv, D]
    v: torch.Tensor  # [max_seqs, max_seq_len, H_kv, D]
    k_flat: torch.Tensor  # [max_seqs * slot_stride_tokens, H_kv, D]
    v_flat: torch.Tensor  # [max_seqs * slot_stride_tokens, H_kv, D]


def write_kv(cache: ContiguousKV, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the step's new K/V in place at their (slot, position) rows."""
    cache.k_flat.index_copy_(0, meta.kv_write_index, k.to(cache.k_flat.dtype))
    cache.v_flat.index_copy_(0, meta.kv_write_index, v.to(cache.v_flat.dtype))


def causal_mask(query_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """[query_len, seq_len] bool: query j (at position seq_len - query_len + j) sees keys <= it.
    None when every query sees every key (a single decode token)."""
    if query_len == 1:
        return None
    pos = torch.arange(seq_len - query_len, seq_len, device=device)
    return torch.arange(seq_len, device=device)[None, :] <= pos[:, None]


class SDPABackend:
    """Any device: scaled_dot_product_attention per sequence on its slot's strided view."""

    name = "sdpa"

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q, k, v, cache: ContiguousKV, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(cache, k, v, meta)
        out = torch.empty_like(q)
        start = 0
        for slot, n_q, n_kv in zip(meta.slots, meta.query_lens, meta.seq_lens):
            qi = q[start:start + n_q].transpose(0, 1)  # [H_q, n_q, D]
            ki = cache.k[slot, :n_kv].transpose(0, 1).to(q.dtype)  # [H_kv, n_kv, D]
            vi = cache.v[slot, :n_kv].transpose(0, 1).to(q.dtype)
            mask = causal_mask(n_q, n_kv, q.device)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale,
                                                enable_gqa=qi.shape[0] != ki.shape[0])
            out[start:start + n_q] = oi.transpose(0, 1)
            start += n_q
        return out


class FlashBackend:
    """CUDA: one FA2 varlen call for the whole batch, reading K/V straight from the virtual
    tensors: cu_seqlens_k = each slot's first row, seqused_k = its length."""

    name = "flash"

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q, k, v, cache: ContiguousKV, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(cache, k, v, meta)
        cu_k = torch.cat([meta.kv_starts, meta.kv_starts[-1:]])
        out = torch.ops.aten._flash_attention_forward(
            q, cache.k_flat, cache.v_flat, meta.query_start_loc, cu_k, meta.max_query_len,
            meta.max_seq_len, 0.0, True, False, scale=self.scale, seqused_k=meta.seq_lens_t)[0]
        return out


class ReferenceBackend:
    """The oracle: explicit float64 softmax attention, one query at a time."""

    name = "reference"

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q, k, v, cache: ContiguousKV, meta: AttentionMetadata) -> torch.Tensor:
        write_kv(cache, k, v, meta)
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        start = 0
        for slot, n_q, n_kv in zip(meta.slots, meta.query_lens, meta.seq_lens):
            keys = cache.k[slot, :n_kv].double().repeat_interleave(group, dim=1)  # [n_kv, H_q, D]
            values = cache.v[slot, :n_kv].double().repeat_interleave(group, dim=1)
            for j in range(n_q):
                visible = n_kv - n_q + j + 1
                scores = torch.einsum("hd,khd->hk", q[start + j].double(), keys[:visible]) * self.scale
                out[start + j] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[:visible]).to(q.dtype)
            start += n_q
        return out


def make_backend(name: str, head_dim: int, device: torch.device):
    """`auto` = flash on CUDA, sdpa elsewhere."""
    scale = 1.0 / math.sqrt(head_dim)
    if name == "auto":
        name = "flash" if device.type == "cuda" else "sdpa"
    backends = {"flash": FlashBackend, "sdpa": SDPABackend, "reference": ReferenceBackend}
    if name not in backends:
        raise ValueError(f"unknown attention backend {name!r}; choose from {sorted(backends)} or auto")
    if name == "flash" and device.type != "cuda":
        raise ValueError("the flash backend needs a CUDA device; use sdpa on CPU")
    return backends[name](scale)
