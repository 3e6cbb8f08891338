"""The PagedAttention baseline (vLLM style): one pool of fixed-size blocks per layer, allocated
up front; a request's tokens live in the blocks its block table lists, in order.

  block table [7, 2, 9]   token t -> block table[t // block_size], offset t % block_size

Each request's table also lives in a row of one int32 array, written where blocks are added,
so a step's padded tables are one gather of rows, not a rebuild of every list.

Prefix caching as vLLM does it: a full block, once computed, is filed under its key (a hash
chain over the tokens, prefix.py) and reference-counted; a later request starting with the same
blocks lists them in its own table. A freed block whose count drops to zero stays cached, in an
LRU list (a request's blocks enter it last block first, so a prefix's tail is evicted before
its start); allocation takes never-cached free blocks first, then evicts from that list.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention import AttentionMetadata, LayerKV, build_paged_metadata
from ..memory import KVCacheSpec
from collections import OrderedDict

from .base import KVUsage, TokenCounts
from .prefix import PrefixHit, PrefixIndex, root_key


class PagedKVManager:
    kind = "paged"

    def __init__(self, spec: KVCacheSpec, device: torch.device, budget_bytes: int, block_size: int = 16,
                 enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.spec = spec
        self.block_size = block_size
        self.block_bytes = block_size * spec.bytes_per_token  # one block across all layers, K and V
        self.num_blocks = budget_bytes // self.block_bytes
        if self.num_blocks == 0:
            raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of {block_size} "
                             f"tokens ({self.block_bytes} bytes); raise the budget")
        self.max_tokens_per_request = min(spec.max_seq_len, self.num_blocks * block_size)
        shape = (self.num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
        self._caches = []
        for _ in range(spec.num_layers):
            # zeroed: a kernel that multiplies the unused tail of a partly filled block by zero
            # weights (FlexAttention does) must not meet NaN there
            k = torch.zeros(shape, dtype=spec.dtype, device=device)
            v = torch.zeros(shape, dtype=spec.dtype, device=device)
            self._caches.append(LayerKV(k.view(-1, *shape[2:]), v.view(-1, *shape[2:]),
                                        k_blocks=k, v_blocks=v))
        self._free_blocks = list(range(self.num_blocks - 1, -1, -1))  # a stack: pop() is the next
        self._tables: dict[str, list[int]] = {}  # request id -> its blocks in token order
        self._tokens = TokenCounts()
        self._padding_block: int | None = None  # padded graph batches write and read its first row
        width = -(-self.max_tokens_per_request // block_size)
        self._array = np.zeros((spec.max_seqs, width), dtype=np.int32)  # row i: a request's table, 0-padded
        self._rows: dict[str, int] = {}  # request id -> its row of _array
        self._free_rows = list(range(spec.max_seqs - 1, -1, -1))
        self.cache_unit = block_size if enable_prefix_caching else 0
        self._refs = [0] * self.num_blocks  # requests listing each block
        self._key_of: dict[int, bytes] = {}  # cached block -> its key in _index
        self._index = PrefixIndex()  # payloads: block ids
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks no request lists, LRU first
        self._published: dict[str, int] = {}  # request id -> its leading blocks the index has
        self._num_shared_refs = 0  # sum over blocks of max(0, refs - 1)
        self._num_shared_blocks = 0  # blocks two or more requests list
        self.num_evictions = 0

    def allocate(self, request_id: str, num_tokens: int, hit: PrefixHit | None = None) -> bool:
        table = self._tables.get(request_id)
        cached: list[int] = []
        if table is None:
            table = []
            if hit is not None:
                cached = hit.payloads
        need = -(-num_tokens // self.block_size) - len(table) - len(cached)
        if need > len(self._free_blocks) + len(self._evictable) - sum(self._refs[b] == 0 for b in cached):
            return False
        for b in cached:
            self._ref(b, +1)
        new = [self._take_block() for _ in range(max(0, need))]
        for b in new:
            self._ref(b, +1)
        if cached or new:
            row = self._row(request_id)  # before reading self._array: it may grow the array
            self._array[row, len(table):len(table) + len(cached) + len(new)] = cached + new
            table = table + cached + new
        if request_id not in self._tables:
            self._published[request_id] = len(cached)
        self._tables[request_id] = table
        self._tokens.set(request_id, num_tokens)
        return True

    def _take_block(self) -> int:
        if self._free_blocks:
            return self._free_blocks.pop()
        block, _ = self._evictable.popitem(last=False)  # the least recently used cached block
        self._index.remove(self._index.get(self._key_of.pop(block)))
        self.num_evictions += 1
        return block

    def _ref(self, block: int, delta: int) -> None:
        refs = self._refs[block]
        if refs == 0 and delta > 0:
            self._evictable.pop(block, None)
        self._refs[block] = refs + delta
        self._num_shared_refs += max(0, refs + delta - 1) - max(0, refs - 1)
        self._num_shared_blocks += (refs + delta >= 2) - (refs >= 2)
        if refs + delta == 0:
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free_blocks.append(block)

    def free(self, request_id: str) -> None:
        for b in reversed(self._tables.pop(request_id, [])):  # tail blocks are evicted first
            self._ref(b, -1)
        self._published.pop(request_id, None)
        self._tokens.drop(request_id)
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)

    # ---- prefix caching -----------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], keys: list[bytes], salt: str | None = None) -> PrefixHit | None:
        """The cached full blocks `token_ids` starts with, at most all tokens but the last."""
        if not self.cache_unit:
            return None
        blocks = []
        for key in keys[:(len(token_ids) - 1) // self.block_size]:
            e = self._index.get(key)
            if e is None:
                break
            blocks.append(e.payload)
        for b in blocks:
            if b in self._evictable:
                self._evictable.move_to_end(b)
        if not blocks:
            return None
        return PrefixHit(len(blocks) * self.block_size, len(blocks), blocks)

    def cache_prefix(self, request_id: str, token_ids: list[int], keys: list[bytes], num_tokens: int,
                     final: bool = False, salt: str | None = None) -> None:
        table = self._tables.get(request_id)
        if table is None or not self.cache_unit:
            return
        full = min(num_tokens // self.block_size, len(keys), len(table))
        for i in range(self._published[request_id], full):
            if self._index.get(keys[i]) is None and table[i] not in self._key_of:
                parent = keys[i - 1] if i else root_key(salt)
                self._index.add(keys[i], parent, token_ids[i * self.block_size:(i + 1) * self.block_size],
                                table[i])
                self._key_of[table[i]] = keys[i]
        self._published[request_id] = max(self._published[request_id], full)

    def reset_prefix_cache(self) -> None:
        self._index.clear()
        self._key_of.clear()
        self._free_blocks.extend(reversed(self._evictable))
        self._evictable.clear()

    def _row(self, request_id: str) -> int:
        row = self._rows.get(request_id)
        if row is None:
            if not self._free_rows:  # more requests hold blocks than max_seqs (capacity probes)
                grown = len(self._array)
                self._array = np.concatenate([self._array, np.zeros_like(self._array)])
                self._free_rows = list(range(2 * grown - 1, grown - 1, -1))
            row = self._rows[request_id] = self._free_rows.pop()
        return row

    def build_metadata(self, request_ids, query_lens, seq_lens, device, staging=None) -> AttentionMetadata:
        tables = [self._tables[r] for r in request_ids]
        width = max(len(t) for t in tables)
        rows = [self._row(r) for r in request_ids]  # a request holding no block yet has none
        padded = self._array[rows, :width]  # a copy: later growth leaves it be
        return build_paged_metadata(tables, self.block_size, query_lens, seq_lens, device, staging, padded)

    def layer_caches(self) -> list[LayerKV]:
        return self._caches

    def padding_row(self) -> int:
        if self._padding_block is None:
            if not self._free_blocks and not self._evictable:
                raise RuntimeError("no KV block left for the CUDA-graph padding block; reserve it "
                                   "before admitting requests, or run with enforce_eager")
            self._padding_block = self._take_block()
            self.max_tokens_per_request = min(self.max_tokens_per_request,
                                              (self.num_blocks - 1) * self.block_size)
        return self._padding_block * self.block_size

    def usage(self) -> KVUsage:
        blocks = self.num_blocks - len(self._free_blocks)  # the requests', the cached and the padding block
        return KVUsage(self._tokens.total * self.spec.bytes_per_token, blocks * self.block_bytes,
                       self.num_blocks * self.block_bytes, len(self._tables), self.block_bytes,
                       self.num_blocks, blocks, len(self._free_blocks),
                       counters={"prefix_evictions": self.num_evictions},
                       bytes_saved=self._num_shared_refs * self.block_bytes,
                       pages_shared=self._num_shared_blocks, num_cached_units=len(self._index))

    def close(self) -> None:
        self._caches = []
