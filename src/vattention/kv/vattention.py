"""The vAttention KV manager: each request owns one slot of a VirtualKVCache; growth maps pages
on demand, on the engine thread when the scheduler asks (allocate), which the overlapped loop
does while the device runs the previous step. The cache's background mapper (prepare, eager
cushion) is not used: measured on an H200 (benchmarks/results/engine_loop/), mapping in that
window gave the same step times with 1.2-2.1x less host time per step than the mapper thread,
whose Python work contends with the engine thread's.
The cache has one slot more than the scheduler runs: the padding slot, whose first token padded
CUDA-graph batches write and read (graphs.py), reserved the first time it is asked for.

Prefix caching: a request's complete units (the cache's sharing unit, whole pages and whole
tokens: 16 tokens for Llama-3-8B cross_layer on 2 MiB pages) are held in the PrefixIndex once
computed; a later request starting with the same tokens gets a slot that maps them (one that
does already, else they are aliased in read-only), and the tokens after its last complete unit
that a cached unit also starts with are copied into its own page (or, when that unit's slot is
free, the slot is simply taken with them). Cached units no running request maps are evicted,
least recently used first, when growth finds memory short, before the scheduler preempts.

Sliding-window layers (Mistral, Phi-3, Gemma 2 / 3) keep every token mapped and simply read the
last `window` rows of the same dense tensor: in the cross_layer layout a page holds all layers'
K/V for its tokens, so no page falls out of every layer's window while a global layer reads it;
freeing windowed layers' old tokens would need per-layer page tables for them (README, Models)."""

from __future__ import annotations

import dataclasses

import torch

from ..attention import AttentionMetadata, LayerKV, build_contiguous_metadata
from ..memory import KVCacheSpec, VirtualKVCache
from .base import KVUsage, TokenCounts
from .prefix import PrefixHit, PrefixIndex, root_key, unit_key


class VAttentionKVManager:
    kind = "contiguous"

    def __init__(self, spec: KVCacheSpec, device: torch.device, budget_bytes: int,
                 page_size: int | None = None, enable_prefix_caching: bool = True):
        self.cache = VirtualKVCache(dataclasses.replace(spec, max_seqs=spec.max_seqs + 1), device=device,
                                    memory_budget_bytes=budget_bytes, page_size=page_size,
                                    eager_cushion_groups=0)
        lay = self.cache.layout
        self.max_tokens_per_request = lay.tokens_in(self.cache.stats().pages_total // lay.num_tensors)
        self._slots: dict[str, int] = {}  # request id -> slot
        self.cache_unit = lay.unit_tokens if enable_prefix_caching else 0  # tokens per cached unit
        self._index = PrefixIndex()  # payloads: SharedUnit, one hold each
        self._entries_of: dict[int, list] = {}  # id(payload) -> its index entries (a tail that
        # grew whole is filed twice)
        self._published: dict[str, int] = {}  # request id -> its leading units the index has
        self.num_evictions = 0  # cached units evicted for memory
        self.num_reclaimed = 0  # cached units a new request took over with their slot
        self._tokens = TokenCounts()  # the padding slot's token is no request's
        self._padding_slot: int | None = None  # holds one token that padded graph batches overwrite
        self._caches = []
        for layer in range(spec.num_layers):
            k, v = self.cache.kv(layer)
            k_flat, v_flat = self.cache.kv_flat(layer)
            self._caches.append(LayerKV(k_flat, v_flat, k=k, v=v))

    def allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        slot = self._slots.get(request_id)
        if slot is None:
            slot = self._new_slot(num_tokens, hit)
            if slot is None:
                return False
            self._published[request_id] = hit.num_units if hit else 0
        elif not self._grow(slot, num_tokens):
            return False
        self._slots[request_id] = slot
        self._tokens.set(request_id, num_tokens)
        return True

    def _new_slot(self, num_tokens: int, hit: PrefixHit | None) -> int | None:
        tail = hit.tail if hit else None
        if tail is not None:
            self.cache.retain(tail)  # evicting for this request's pages must not reclaim it
        slot = None
        try:
            # a tail the request extends whole (the next turn of a chat) is taken in place;
            # one it shares only a start with stays cached for others and is copied from
            slot = self.cache.alloc_slot(num_tokens, prefix=hit.payloads if hit else (), partial=tail,
                                         take_partial=hit.tail_whole if hit else False,
                                         reclaim=bool(self.cache_unit))
            for u in self.cache.take_dead():  # cached units the slot's new owner took over
                self.num_reclaimed += u is not tail  # (a tail taken whole is its next turn)
                for e in list(self._entries_of.get(id(u), ())):
                    self._drop(e)
            if slot is None:
                return None
            if not self._grow(slot, num_tokens):
                self.cache.free(slot)
                return None
            if tail is not None:
                self.cache.copy_tokens(tail, slot, hit.tail_tokens)
            return slot
        except BaseException:
            if slot is not None:
                self.cache.free(slot)
            raise
        finally:
            if tail is not None:
                self.cache.release(tail)

    def _grow(self, slot: int, num_tokens: int) -> bool:
        """ensure(), evicting cached units no running request maps (least recently used first,
        1, 2, 4, ... at a time) while memory is short."""
        count = 1
        while not self.cache.ensure(slot, num_tokens):
            evicted = self._index.evict(count, lambda e: e.payload.num_busy_maps == 0)
            if not evicted:
                return False
            for e in evicted:
                self._forget(e)
                self.cache.release(e.payload)
            self.num_evictions += len(evicted)
            count *= 2
        return True

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        self._published.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)
            self._tokens.drop(request_id)

    # ---- prefix caching -----------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], keys: list[bytes], salt: str | None = None) -> PrefixHit | None:
        """The cached start of `token_ids` (`keys`: its full units' keys), at most all tokens
        but the last; None when nothing is cached. Changes nothing but the LRU order."""
        unit = self.cache_unit
        if not unit or len(token_ids) < 2:
            return None
        entries = []
        for key in keys[:(len(token_ids) - 1) // unit]:
            e = self._index.get(key)
            if e is None or e.payload.dead:
                break
            entries.append(e)
        start = len(entries) * unit
        parent = entries[-1].key if entries else root_key(salt)
        want = token_ids[start:min(start + unit, len(token_ids) - 1)]
        tail, k = self._index.longest_start(parent, want, lambda e: not e.payload.dead and bool(e.payload.slots))
        self._index.touch(entries + ([tail] if tail is not None else []))
        if start + k == 0:
            return None
        return PrefixHit(start + k, len(entries), [e.payload for e in entries],
                         tail.payload if k else None, k, k == len(tail.tokens) if k else False)

    def cache_prefix(self, request_id: str, token_ids: list[int], keys: list[bytes], num_tokens: int,
                     final: bool = False, salt: str | None = None) -> None:
        """Offer tokens [0, num_tokens) of the request (computed, or in a step already issued)
        to the cache: its complete units not cached yet are held; with `final` (it is about to
        be freed) the tail after them too."""
        slot = self._slots.get(request_id)
        if slot is None or not self.cache_unit:
            return
        unit = self.cache_unit
        full = min(num_tokens // unit, len(keys))
        for i in range(self._published[request_id], full):
            parent = keys[i - 1] if i else root_key(salt)
            self._file(keys[i], parent, token_ids[i * unit:(i + 1) * unit], slot, i, tail=False)
        self._published[request_id] = max(self._published[request_id], full)
        if final and num_tokens > full * unit and full == num_tokens // unit:
            parent = keys[full - 1] if full else root_key(salt)
            tokens = token_ids[full * unit:num_tokens]
            self._file(unit_key(parent, tokens), parent, tokens, slot, full, tail=True)

    def _file(self, key: bytes, parent: bytes, tokens: list[int], slot: int, unit: int, tail: bool) -> None:
        """Hold unit `unit` of `slot` under `key`, unless a live entry has it already."""
        e = self._index.get(key)
        if e is not None and e.payload.dead:
            self._drop(e)
            e = None
        if e is None:
            e = self._index.add(key, parent, tokens, self.cache.hold(slot, unit, tail=tail))
            self._entries_of.setdefault(id(e.payload), []).append(e)

    def _drop(self, entry) -> None:
        self._index.remove(entry)
        self._forget(entry)
        self.cache.release(entry.payload)

    def _forget(self, entry) -> None:
        entries = self._entries_of[id(entry.payload)]
        entries.remove(entry)
        if not entries:
            del self._entries_of[id(entry.payload)]

    def reset_prefix_cache(self) -> None:
        """Forget every cached unit (those running requests map stay theirs)."""
        for e in self._index.clear():
            self.cache.release(e.payload)
        self._entries_of.clear()

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
        counters = dict(vars(st.counters), prefix_evictions=self.num_evictions, prefix_reclaimed=self.num_reclaimed)
        return KVUsage(self._tokens.total * self.cache.spec.bytes_per_token,
                       st.bytes_mapped + st.pages_held * st.page_size, st.pages_total * st.page_size,
                       len(self._slots), st.page_size, st.pages_total, st.pages_mapped + st.pages_held,
                       st.pages_free, counters=counters, bytes_saved=st.bytes_saved,
                       pages_shared=st.pages_shared, num_cached_units=len(self._index))

    def close(self) -> None:
        self.cache.close()
