"""KV managers: where each request's KV lives. The scheduler asks "can this request hold n
tokens?" (allocate); the runner asks for the step's attention metadata and the layer tensors.
Three designs sit behind this one interface, so they can be compared in one engine:

  vattention  slots of contiguous virtual tensors, physical pages mapped on demand (kv_vattention.py)
  paged       a vLLM-style pool of fixed-size blocks and per-request block tables (kv_paged.py)
  static      max_model_len reserved per admitted request up front, ordinary memory (kv_static.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..attention import AttentionMetadata, LayerKV
from ..memory import KVCacheSpec


@dataclass
class KVUsage:
    """A snapshot of KV memory, comparable across designs."""

    bytes_used: int  # bytes of tokens the running requests hold
    bytes_committed: int  # bytes set aside for them: mapped pages, allocated blocks, reservations
    bytes_capacity: int  # the budget
    num_requests: int  # requests holding KV now
    page_bytes: int  # the design's unit of memory: a physical page, a block, or one request's reservation
    pages_total: int  # units in the budget
    pages_mapped: int  # units mapped/allocated/reserved now (busy or kept for reuse)
    pages_free: int  # units free to hand out now
    counters: dict = field(default_factory=dict)  # design-specific running totals (e.g. pages mapped in background)

    @property
    def utilization(self) -> float:
        return self.bytes_used / self.bytes_committed if self.bytes_committed else 1.0


class KVManager(Protocol):
    kind: str  # "contiguous" or "paged": which attention backends can read it
    max_tokens_per_request: int  # the most tokens one request can ever hold (budget and context)

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Make the request hold tokens [0, num_tokens); False (nothing changed) if memory is short."""

    def free(self, request_id: str) -> None: ...

    def prepare(self, lengths: dict[str, int]) -> None:
        """The next step's lengths, so memory can be readied while this step computes."""

    def build_metadata(self, request_ids: list[str], query_lens: list[int], seq_lens: list[int],
                       device: torch.device) -> AttentionMetadata: ...

    def layer_caches(self) -> list[LayerKV]: ...

    def padding_row(self) -> int:
        """A flat KV row (mapped, owned by no request) that padded CUDA-graph batches may write
        and read; reserved on the first call, the same one after."""

    def usage(self) -> KVUsage: ...

    def close(self) -> None: ...


def make_kv_manager(kind: str, spec: KVCacheSpec, device: torch.device, budget_bytes: int,
                    page_size: int | None = None, eager_cushion_groups: int = 1,
                    block_size: int = 16) -> KVManager:
    if kind == "vattention":
        from .kv_vattention import VAttentionKVManager
        return VAttentionKVManager(spec, device, budget_bytes, page_size, eager_cushion_groups)
    if kind == "paged":
        from .kv_paged import PagedKVManager
        return PagedKVManager(spec, device, budget_bytes, block_size)
    if kind == "static":
        from .kv_static import StaticKVManager
        return StaticKVManager(spec, device, budget_bytes)
    raise ValueError(f"unknown kv_cache {kind!r}; choose vattention, paged or static")
