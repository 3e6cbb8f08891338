"""The KVManager protocol every KV design implements, and KVUsage, the snapshot they report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..attention import AttentionMetadata, LayerKV, StepStaging
from .prefix import PrefixHit


@dataclass
class KVUsage:
    """A snapshot of KV memory, comparable across designs."""

    bytes_used: int  # bytes of tokens the running requests hold
    bytes_committed: int  # pages_mapped * page_bytes: mapped pages, allocated blocks, reservations
    bytes_capacity: int  # the budget
    num_requests: int  # requests holding KV now
    page_bytes: int  # the design's unit of memory: a physical page, a block, or one request's reservation
    pages_total: int  # units in the budget
    pages_mapped: int  # units mapped/allocated/reserved now: busy, kept for reuse, or the padding unit
    pages_free: int  # units free to hand out now: pages_total - pages_mapped (less pages a map job holds)
    counters: dict = field(default_factory=dict)  # design-specific running totals (e.g. pages mapped in background)
    bytes_saved: int = 0  # of bytes_used, bytes held once for several requests (shared prefixes)
    pages_shared: int = 0  # units two or more running requests use (counted once in pages_mapped)
    num_cached_units: int = 0  # prefix-cache entries (units or blocks) kept for later requests

    @property
    def bytes_physical(self) -> int:
        """Bytes the running requests' tokens take, a shared prefix counted once."""
        return self.bytes_used - self.bytes_saved

    @property
    def utilization(self) -> float:
        return self.bytes_used / self.bytes_committed if self.bytes_committed else 1.0


@runtime_checkable
class KVManager(Protocol):
    """Where each request's KV lives. usage() runs every engine step: O(1), from running counters."""

    kind: str  # "contiguous" or "paged": which attention backends can read it
    max_tokens_per_request: int  # the most tokens one request can ever hold (budget and context)
    cache_unit: int  # prefix caching: tokens per cached unit (0: no prefix caching)

    def allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Make the request hold tokens [0, num_tokens); False (nothing changed) if memory is
        short. A new request with `hit` (from match_prefix just before) starts with its tokens."""

    def match_prefix(self, token_ids: list[int], keys: list[bytes], salt: str | None = None) -> PrefixHit | None:
        """The cached start of `token_ids` (`keys` = prefix.extend_keys over cache_unit), at
        most all tokens but the last; None when nothing is. Pure but for the LRU order."""

    def cache_prefix(self, request_id: str, token_ids: list[int], keys: list[bytes], num_tokens: int,
                     final: bool = False, salt: str | None = None) -> None:
        """Offer the request's tokens [0, num_tokens) (their KV computed or issued) for reuse;
        `final`: it is about to be freed."""

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (what running requests use stays theirs)."""

    def free(self, request_id: str) -> None: ...

    def build_metadata(self, request_ids: list[str], query_lens: list[int], seq_lens: list[int],
                       device: torch.device, staging: StepStaging | None = None) -> AttentionMetadata:
        """The step's attention metadata; its device arrays go through `staging` when given
        (the runner's persistent pinned buffers, committed before the forward)."""

    def layer_caches(self) -> list[LayerKV]: ...

    def padding_row(self) -> int:
        """A flat KV row (mapped, owned by no request) that padded CUDA-graph batches may write
        and read; reserved on the first call, the same one after."""

    def usage(self) -> KVUsage: ...

    def close(self) -> None: ...


class TokenCounts:
    """Tokens each request holds and their sum, kept as they change (usage() runs every step)."""

    def __init__(self):
        self._by_request: dict[str, int] = {}
        self.total = 0

    def set(self, request_id: str, num_tokens: int) -> None:
        self.total += num_tokens - self._by_request.get(request_id, 0)
        self._by_request[request_id] = num_tokens

    def drop(self, request_id: str) -> None:
        self.total -= self._by_request.pop(request_id, 0)
