"""The KVManager protocol every KV design implements, and KVUsage, the snapshot they report."""

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
