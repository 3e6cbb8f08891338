"""The vAttention KV manager: each request owns one slot of a VirtualKVCache; growth maps pages
on demand, on the engine thread when the scheduler asks (allocate), which the overlapped loop
does while the device runs the previous step. The cache's background mapper (prepare, eager
cushion) is not used: measured on an H200 (benchmarks/results/engine_loop/), mapping in that
window gave the same step times with 1.2-2.1x less host time per step than the mapper thread,
whose Python work contends with the engine thread's.
The cache has one slot more than the scheduler runs: the padding slot, whose first token padded
CUDA-graph batches write and read (graphs.py), reserved the first time it is asked for."""

from __future__ import annotations

import dataclasses

import torch

from ..attention import AttentionMetadata, LayerKV, build_contiguous_metadata
from ..memory import KVCacheSpec, VirtualKVCache
from .base import KVUsage, TokenCounts


class VAttentionKVManager:
    kind = "contiguous"

    def __init__(self, spec: KVCacheSpec, device: torch.device, budget_bytes: int,
                 page_size: int | None = None):
        self.cache = VirtualKVCache(dataclasses.replace(spec, max_seqs=spec.max_seqs + 1), device=device,
                                    memory_budget_bytes=budget_bytes, page_size=page_size,
                                    eager_cushion_groups=0)
        lay = self.cache.layout
        self.max_tokens_per_request = lay.tokens_in(self.cache.stats().pages_total // lay.num_tensors)
        self._slots: dict[str, int] = {}  # request id -> slot
        self._tokens = TokenCounts()  # the padding slot's token is no request's
        self._padding_slot: int | None = None  # holds one token that padded graph batches overwrite
        self._caches = []
        for layer in range(spec.num_layers):
            k, v = self.cache.kv(layer)
            k_flat, v_flat = self.cache.kv_flat(layer)
            self._caches.append(LayerKV(k_flat, v_flat, k=k, v=v))

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
        self._tokens.set(request_id, num_tokens)
        return True

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)
            self._tokens.drop(request_id)

    def build_metadata(self, request_ids, query_lens, seq_lens, device, staging=None) -> AttentionMetadata:
        stride = self.cache.slot_stride_tokens
        return build_contiguous_metadata([self._slots[r] * stride for r in request_ids],
                                         query_lens, seq_lens, device, staging)

    def layer_caches(self) -> list[LayerKV]:
        return self._caches

    def padding_row(self) -> int:
        if self._padding_slot is None:
            slot = self.cache.alloc_slot(1)
            if slot is None or not self.cache.ensure(slot, 1):
                raise RuntimeError("no KV memory left for the CUDA-graph padding slot; reserve it "
                                   "before admitting requests, or run with enforce_eager")
            self._padding_slot = slot
            lay = self.cache.layout  # the padding slot's groups are out of every request's reach
            total_groups = self.cache.stats().pages_total // lay.num_tensors
            self.max_tokens_per_request = min(self.max_tokens_per_request,
                                              lay.tokens_in(total_groups - lay.groups_for(1)))
        return self._padding_slot * self.cache.slot_stride_tokens

    def usage(self) -> KVUsage:
        st = self.cache.stats()
        return KVUsage(self._tokens.total * self.cache.spec.bytes_per_token, st.bytes_mapped,
                       st.pages_total * st.page_size,
                       len(self._slots), st.page_size, st.pages_total, st.pages_mapped,
                       st.pages_free, counters=vars(st.counters))

    def close(self) -> None:
        self.cache.close()
