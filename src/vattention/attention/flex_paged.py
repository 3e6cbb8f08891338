"""FlexAttention over the paged block pool, through torch's `PagedAttention`
(torch.nn.attention.experimental): the stock PyTorch way to read a vLLM-style cache.

  one step ─> decode rows (one query each)   ─> flex_attention, B = #decodes, Q = 1
          └─> chunk rows (prefill, chunked)  ─> flex_attention, B = #chunks,  Q = longest chunk
  each call: a logical causal BlockMask (query block x KV block, KV block = the cache's block)
             ─ PagedAttention.convert_logical_block_mask(block tables) ─> physical BlockMask
             the K/V pool, [1, H_kv, num_blocks * block_size, D], is read in place

B and Q are rounded up to powers of two so the compiled kernel sees few shapes; the padding rows
have no KV blocks, so the kernel skips them. On CUDA flex_attention is compiled (its eager form
materialises scores against the whole pool); on CPU the eager form runs, which is what the CPU
tests check against the reference backend.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from .base import LayerKV
from .metadata import AttentionMetadata, to_device

FLEX_KV_TILE = 128  # compiled flex_attention reads KV in tiles of 128 rows: blocks must hold whole tiles
MAX_POOL_ELEMENTS = 1 << 31  # torch 2.11's compiled kernel indexes K/V with 32-bit offsets


def _quiet(fn):
    """The eager flex_attention, without its warning that it is not compiled (on CPU that is
    the point: it is the exact, unfused form)."""
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return fn(*args, **kwargs)
    return call


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def causal_block_counts(q_lens: torch.Tensor, offsets: torch.Tensor, q_block: int, page: int,
                        num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical causal block mask of a batch: query block r of sequence b (queries at positions
    offsets[b] + r * q_block ...) sees KV blocks [0, full) whole and [full, full + partial) through
    the mask_mod; rows past q_lens[b] see nothing. Returns (full, partial), each [B, num_rows].

      KV blocks   | 0 | 1 | 2 | 3 |        query row r: first position 2.5 blocks in, last 3.2
      row r       |ful|ful|par|par|        -> full = 2, partial = 2
    """
    r = torch.arange(num_rows, device=q_lens.device)
    q_first = r * q_block  # [R]
    q_last = torch.minimum((r[None, :] + 1) * q_block, q_lens[:, None]) - 1  # [B, R]
    live = q_first[None, :] < q_lens[:, None]  # [B, R]
    full = torch.where(live, (offsets[:, None] + q_first + 1) // page, 0)
    partial = torch.where(live, (offsets[:, None] + q_last) // page + 1 - full, 0)
    return full, partial


def _softcap_mod(cap: float):
    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap
    return softcap


class FlexPagedBackend:
    """Paged cache only: every sequence attends through FlexAttention + PagedAttention."""

    name = "flex"

    def __init__(self, scale: float, block_size: int, device: torch.device):
        if device.type == "cuda" and block_size % FLEX_KV_TILE:
            raise ValueError(f"the flex backend on CUDA needs a block size that is a multiple of "
                             f"{FLEX_KV_TILE} (PagedAttention's page is flex_attention's KV block); "
                             f"got {block_size}: use --block-size 128 or 256")
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        self.scale = scale
        self.block_size = block_size
        self.paged_attention_cls, self.block_mask_cls = PagedAttention, BlockMask
        if device.type == "cuda":
            for name in ("recompile_limit", "cache_size_limit"):  # B, Q and the pool size vary
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 64)
            self.attend = torch.compile(flex_attention)
        else:
            self.attend = _quiet(flex_attention)
        self._masks: tuple[AttentionMetadata, list] | None = None  # this step's groups and block masks

    def forward(self, q, k, v, cache: LayerKV, meta: AttentionMetadata, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        if q.is_cuda and cache.k_blocks.numel() >= MAX_POOL_ELEMENTS:
            raise ValueError(f"the flex backend cannot read a pool of {cache.k_blocks.numel():.3g} "
                             f"elements per layer (>= 2^31): FlexAttention indexes it with 32-bit "
                             f"offsets; lower --kv-cache-memory-gib or use --attention-backend triton")
        if self._masks is None or self._masks[0] is not meta:  # built once per step, used by every layer
            self._masks = (meta, {})
        groups = self._masks[1]
        if window not in groups:  # one set per window size the model's layers use
            groups[window] = self._step_groups(meta, cache.k_blocks.shape[0], q.device, window)
        out = torch.empty_like(q)
        for mask, batch, q_len, packed, dest in groups[window]:
            out[dest] = self._attend_group(q[dest], cache, mask, batch, q_len, packed, softcap)
        return out

    def _step_groups(self, meta: AttentionMetadata, num_blocks: int, device,
                     window: int | None = None) -> list[tuple]:
        """Per group (decodes, chunks) of this step: its block mask, padded shape, packed rows, and
        the step rows its queries occupy."""
        lens = meta.query_lens
        first = [0, *itertools.accumulate(lens)]  # first row of each sequence's queries
        groups = []
        for group in (tuple(i for i, n in enumerate(lens) if n == 1),
                      tuple(i for i, n in enumerate(lens) if n > 1)):
            if group:
                rows = [r for i in group for r in range(first[i], first[i + 1])]
                groups.append((*self._block_mask(meta, group, num_blocks, device, window),
                               to_device(rows, torch.long, device)))
        return groups

    def _attend_group(self, q, cache: LayerKV, mask, batch: int, q_len: int, packed: torch.Tensor,
                      softcap: float | None):
        """q [rows, H_q, D]: one group's query rows, in order."""
        num_blocks, block, heads, dim = cache.k_blocks.shape
        q4 = q.new_zeros(batch * q_len, *q.shape[1:])
        q4[packed] = q
        q4 = q4.view(batch, q_len, *q.shape[1:]).transpose(1, 2)  # [B, H_q, Q, D]
        k_pool, v_pool = (t.view(1, num_blocks * block, heads, dim).transpose(1, 2)  # [1, H_kv, N, D]
                          for t in (cache.k_blocks, cache.v_blocks))
        out = self.attend(q4, k_pool, v_pool, block_mask=mask, scale=self.scale, enable_gqa=True,
                          score_mod=None if softcap is None else _softcap_mod(softcap))
        return out.transpose(1, 2).reshape(batch * q_len, *q.shape[1:])[packed]

    def _block_mask(self, meta: AttentionMetadata, group: tuple[int, ...], num_blocks: int, device,
                    window: int | None = None):
        """The physical BlockMask for `group`, padded to (batch, q_len) powers of two, and the
        packed row of each real query. With a window no KV block counts as full (every block
        the causal mask admits goes through the mask_mod, which also cuts off the window's far
        side): exact, though it computes a little more than a banded block mask would."""
        page = self.block_size
        q_lens = [meta.query_lens[i] for i in group]
        seq_lens = [meta.seq_lens[i] for i in group]
        batch, q_len = _pow2(len(group)), _pow2(max(q_lens))
        q_block = FLEX_KV_TILE  # query rows per mask row (the kernels' tile; decode uses one row)
        num_rows = -(-q_len // q_block)
        tables = [meta.block_tables_host[i] for i in group]
        width = max(len(t) for t in tables)
        pad = batch - len(group)
        q_lens_t = to_device(q_lens + [0] * pad, torch.long, device)  # [B]
        kv_len = to_device(seq_lens + [0] * pad, torch.long, device)  # [B]
        offsets = kv_len - q_lens_t  # position of each sequence's first query

        full, partial = causal_block_counts(q_lens_t, offsets, q_block, page, num_rows)
        if window is not None:
            full, partial = torch.zeros_like(full), full + partial
        cols = torch.arange(width, device=device)
        full_idx = cols.expand(batch, num_rows, width)
        partial_idx = torch.clamp(full[..., None] + cols, max=width - 1)

        def causal(b, h, q_idx, kv_idx):
            return (q_idx < q_lens_t[b]) & (kv_idx <= q_idx + offsets[b])

        def windowed(b, h, q_idx, kv_idx):
            return causal(b, h, q_idx, kv_idx) & (kv_idx > q_idx + offsets[b] - window)

        def heads(t):  # [B, R, ...] -> [B, 1, R, ...] int32, as BlockMask stores them
            return t[:, None].to(torch.int32).contiguous()

        logical = self.block_mask_cls.from_kv_blocks(
            heads(partial), heads(partial_idx), heads(full), heads(full_idx),
            BLOCK_SIZE=(q_block, page), mask_mod=causal if window is None else windowed,
            seq_lengths=(q_len, width * page))
        paged = self.paged_attention_cls(num_blocks, page, batch, device=device)
        table_t = to_device([t + [0] * (width - len(t)) for t in tables] + [[0] * width] * pad,
                            torch.long, device)  # [B, W]
        paged.page_table = table_t
        logical_idx = torch.where(cols[None, :] < to_device([len(t) for t in tables] + [0] * pad,
                                                            torch.long, device)[:, None], cols, -1)
        paged.physical_to_logical.scatter_reduce_(1, table_t, logical_idx, reduce="amax")
        mask = paged.convert_logical_block_mask(logical, kv_len=kv_len)
        packed = to_device([b * q_len + j for b, n in enumerate(q_lens) for j in range(n)],
                           torch.long, device)
        return mask, batch, q_len, packed
