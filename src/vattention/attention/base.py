"""What every attention backend receives and provides: LayerKV (one layer's cache, as a KV
manager hands it out) and the AttentionBackend protocol.

    KV manager ─ layer_caches()[l] ─> LayerKV ──────────┐
    KV manager ─ build_metadata() ──> AttentionMetadata ┤
    model layer ─ q, k, v of the step's new tokens ──────┴─> backend.forward ─> [num_tokens, H_q, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .metadata import AttentionMetadata


@dataclass
class LayerKV:
    """One layer's cache as a KV manager hands it out (views, never copies)."""

    k_flat: torch.Tensor  # [num_rows, H_kv, D]: row = where one token's K lives
    v_flat: torch.Tensor  # [num_rows, H_kv, D]
    k: torch.Tensor | None = None  # contiguous: [max_seqs, max_seq_len, H_kv, D]
    v: torch.Tensor | None = None
    k_blocks: torch.Tensor | None = None  # paged: [num_blocks, block_size, H_kv, D]
    v_blocks: torch.Tensor | None = None


@runtime_checkable
class AttentionBackend(Protocol):
    """Attends over a cache that already holds the step's K/V (stored at meta.kv_write_index
    before forward). Which backend serves which cache kind: select.py."""

    name: str  # the --attention-backend name; the engine captures CUDA graphs only for some (graphs.py)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV,
                meta: AttentionMetadata, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        """q [num_tokens, H_q, D], k/v [num_tokens, H_kv, D]: the step's new tokens, sequences in
        meta's order -> [num_tokens, H_q, D]. Query j of sequence i sees that sequence's tokens up
        to its own position, reading them from `cache` (k/v may serve as a shortcut for them).
        The layer's own attention shape (models/config.py), both None for most layers:
          window   it sees only its last `window` tokens (key k from the query at p: p - window < k <= p)
          softcap  scores (scaled q.k) become softcap * tanh(score / softcap) before the softmax
        A backend that cannot do one refuses it at construction (select.py), never silently."""
