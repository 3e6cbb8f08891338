"""KV managers: where each request's KV lives. The scheduler asks "can this request hold n
tokens?" (allocate) and the runner asks for the layer tensors; both go through this interface,
so other designs (paged, static) can sit behind it."""

from __future__ import annotations

from typing import Protocol

import torch

from ..attention import ContiguousKV
from ..memory import CacheStats, KVCacheSpec, VirtualKVCache


class KVManager(Protocol):
    slot_stride_tokens: int  # rows between consecutive slots in the flat layer views

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        """Make the request hold tokens [0, num_tokens); False (nothing changed) if memory is short."""

    def free(self, request_id: str) -> None: ...

    def slot_of(self, request_id: str) -> int: ...

    def prepare(self, lengths: dict[str, int]) -> None:
        """The next step's lengths, so memory can be readied while this step computes."""

    def layer_caches(self) -> list[ContiguousKV]: ...

    def stats(self) -> CacheStats: ...

    def close(self) -> None: ...


class VAttentionKVManager:
    """Each request owns one slot of a VirtualKVCache; growth maps pages on demand."""

    def __init__(self, spec: KVCacheSpec, device: torch.device, memory_budget_bytes: int,
                 page_size: int | None = None, eager_cushion_groups: int = 1):
        self.cache = VirtualKVCache(spec, device=device, memory_budget_bytes=memory_budget_bytes,
                                    page_size=page_size, eager_cushion_groups=eager_cushion_groups)
        self.slot_stride_tokens = self.cache.slot_stride_tokens
        self._slots: dict[str, int] = {}  # request id -> slot
        self._caches = []
        for layer in range(spec.num_layers):
            k, v = self.cache.kv(layer)
            k_flat, v_flat = self.cache.kv_flat(layer)
            self._caches.append(ContiguousKV(k, v, k_flat, v_flat))

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        slot = self._slots.get(request_id)
        new = slot is None
        if new:
            slot = self.cache.alloc_slot(num_tokens)
            if slot is None:
                return False
        if not self.cache.ensure(slot, num_tokens):
            if new:
                self.cache.free(slot)
            return False
        self._slots[request_id] = slot
        return True

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)

    def slot_of(self, request_id: str) -> int:
        return self._slots[request_id]

    def prepare(self, lengths: dict[str, int]) -> None:
        self.cache.prepare({self._slots[r]: n for r, n in lengths.items() if r in self._slots})

    def layer_caches(self) -> list[ContiguousKV]:
        return self._caches

    def stats(self) -> CacheStats:
        return self.cache.stats()

    def close(self) -> None:
        self.cache.close()
