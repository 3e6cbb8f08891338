"""Attention over the KV cache. Backends take explicit metadata and the layer's cache tensors;
none reads global state, none imports the scheduler or engine.

    model layer ── stores this step's k/v at the cache rows meta.kv_write_index (inside its
        rotary kernel; write_kv does it alone) ──(q, k, v, LayerKV, AttentionMetadata)──>
        backend.forward: attends over each sequence's [0, seq_len) tokens.

Contiguous caches (vattention, static) are read as dense strided tensors; paged caches through
block tables. base.py holds the AttentionBackend protocol every backend satisfies; backends.py and
flex_paged.py the kernels behind each name; select.py the choice.
"""

from .backends import FlashBackend, ReferenceBackend, SDPABackend, TritonBackend, write_kv
from .base import AttentionBackend, LayerKV
from .flex_paged import FlexPagedBackend
from .metadata import AttentionMetadata, build_contiguous_metadata, build_paged_metadata
from .staging import StepStaging, to_device
from .select import BACKENDS, make_backend

__all__ = ["AttentionBackend", "AttentionMetadata",
           "build_contiguous_metadata", "build_paged_metadata", "StepStaging", "to_device",
           "LayerKV", "write_kv",
           "FlashBackend", "TritonBackend", "SDPABackend", "ReferenceBackend", "FlexPagedBackend",
           "BACKENDS", "make_backend"]
