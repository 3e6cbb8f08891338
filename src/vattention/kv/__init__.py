"""KV managers: where each request's KV lives. The scheduler asks "can this request hold n
tokens?" (allocate); the runner asks for the step's attention metadata and the layer tensors.
Three designs sit behind one typed protocol (base.KVManager), so they can be compared in one engine:

  vattention  slots of contiguous virtual tensors, physical pages mapped on demand (vattention.py)
  paged       a vLLM-style pool of fixed-size blocks and per-request block tables (paged.py)
  static      max_model_len reserved per admitted request up front, ordinary memory (static.py)

vattention and paged cache prefixes (prefix.py: unit keys and the LRU index they share).

Nothing here imports the engine: the scheduler and runner (engine/) use these, never the reverse.
"""

from __future__ import annotations

import torch

from ..memory import KVCacheSpec
from .base import KVManager, KVUsage
from .prefix import PrefixHit, extend_keys
from .paged import PagedKVManager
from .static import StaticKVManager
from .vattention import VAttentionKVManager

__all__ = ["KVManager", "KVUsage", "PrefixHit", "extend_keys", "VAttentionKVManager", "PagedKVManager", "StaticKVManager",
           "make_kv_manager"]


def make_kv_manager(kind: str, spec: KVCacheSpec, device: torch.device, budget_bytes: int,
                    page_size: int | None = None, block_size: int = 16,
                    enable_prefix_caching: bool = True) -> KVManager:
    if kind == "vattention":
        return VAttentionKVManager(spec, device, budget_bytes, page_size, enable_prefix_caching)
    if kind == "paged":
        return PagedKVManager(spec, device, budget_bytes, block_size, enable_prefix_caching)
    if kind == "static":
        return StaticKVManager(spec, device, budget_bytes)
    raise ValueError(f"unknown kv_cache {kind!r}; choose vattention, paged or static")
