"""Attention over the KV cache. Backends take explicit metadata and the layer's cache tensors;
none reads global state, none imports the scheduler or engine.

    model layer ──(q, k, v, layer, AttentionMetadata)──> backend.forward
        writes this step's k/v into the cache rows meta.kv_write_index, then attends
        over each sequence's [0, seq_len) tokens.

Contiguous backends (the vAttention path) read the cache as dense strided tensors:
`flash` (FA2 varlen through torch.ops.aten._flash_attention_forward, CUDA), `sdpa` (any device)
and `reference` (float64 loops: the oracle in tests).
"""

from .backends import ContiguousKV, FlashBackend, ReferenceBackend, SDPABackend, make_backend
from .metadata import AttentionMetadata, build_metadata

__all__ = ["AttentionMetadata", "build_metadata", "ContiguousKV", "FlashBackend", "SDPABackend",
           "ReferenceBackend", "make_backend"]
