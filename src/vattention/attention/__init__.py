"""Attention over the KV cache. Backends take explicit metadata and the layer's cache tensors;
none reads global state, none imports the scheduler or engine.

    model layer ──(q, k, v, LayerKV, AttentionMetadata)──> backend.forward
        writes this step's k/v into the cache rows meta.kv_write_index, then attends
        over each sequence's [0, seq_len) tokens.

Contiguous caches (vattention, static) are read as dense strided tensors; paged caches through
block tables. See backends.py for the kernels behind each backend name.
"""

from .backends import (BACKENDS, FlashBackend, LayerKV, ReferenceBackend, SDPABackend,
                       TritonBackend, make_backend)
from .metadata import AttentionMetadata, build_contiguous_metadata, build_paged_metadata

__all__ = ["AttentionMetadata", "build_contiguous_metadata", "build_paged_metadata", "LayerKV",
           "FlashBackend", "TritonBackend", "SDPABackend", "ReferenceBackend", "BACKENDS",
           "make_backend"]
