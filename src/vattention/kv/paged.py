"""The PagedAttention baseline (vLLM style): one pool of fixed-size blocks per layer, allocated
up front; a request's tokens live in the blocks its block table lists, in order.

  block table [7, 2, 9]   token t -> block table[t // block_size], offset t % block_size

Each request's table also lives in a row of one int32 array, written where blocks are added,
so a step's padded tables are one gather of rows, not a rebuild of every list.
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention import AttentionMetadata, LayerKV, build_paged_metadata
from ..memory import KVCacheSpec
from .base import KVUsage, TokenCounts


class PagedKVManager:
    kind = "paged"

    def __init__(self, spec: KVCacheSpec, device: torch.device, budget_bytes: int, block_size: int = 16):
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

    def allocate(self, request_id: str, num_tokens: int) -> bool:
        table = self._tables.get(request_id, [])
        need = -(-num_tokens // self.block_size) - len(table)
        if need > len(self._free_blocks):
            return False
        if need > 0:
            new = [self._free_blocks.pop() for _ in range(need)]
            row = self._row(request_id)  # before reading self._array: it may grow the array
            self._array[row, len(table):len(table) + need] = new
            table = table + new
        self._tables[request_id] = table
        self._tokens.set(request_id, num_tokens)
        return True

    def free(self, request_id: str) -> None:
        self._free_blocks.extend(reversed(self._tables.pop(request_id, [])))
        self._tokens.drop(request_id)
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)

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
            if not self._free_blocks:
                raise RuntimeError("no KV block left for the CUDA-graph padding block; reserve it "
                                   "before admitting requests, or run with enforce_eager")
            self._padding_block = self._free_blocks.pop()
            self.max_tokens_per_request = min(self.max_tokens_per_request, len(self._free_blocks) * self.block_size)
        return self._padding_block * self.block_size

    def usage(self) -> KVUsage:
        blocks = self.num_blocks - len(self._free_blocks)  # the requests' and the padding block
        return KVUsage(self._tokens.total * self.spec.bytes_per_token, blocks * self.block_bytes,
                       self.num_blocks * self.block_bytes, len(self._tables), self.block_bytes,
                       self.num_blocks, blocks, len(self._free_blocks))

    def close(self) -> None:
        self._caches = []
