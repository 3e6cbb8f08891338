"""AttentionMetadata: what one step's attention needs to know about the batch, built once per
step by the KV manager (which knows where tokens live) and passed down explicitly.

  tokens of the step, flattened:   | seq 0 chunk | seq 1 (decode) | seq 2 chunk ... |
  query_start_loc                  0             n0               n0+1  ...
  seq i attends to its tokens [0, seq_lens[i]) (the chunk is its last query_lens[i] tokens)

Where token t of sequence i lives:
  contiguous (vattention, static)  row kv_starts[i] + t of the layer's flat view
  paged                            row block_tables[i][t // block_size] * block_size + t % block_size
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .staging import StepStaging, to_device


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens of each sequence this step
    seq_lens: list[int]  # tokens each sequence holds after this step (context + new)
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32 on device: cu_seqlens_q
    seq_lens_t: torch.Tensor  # [num_seqs] int32 on device: seqused_k
    kv_write_index: torch.Tensor  # [num_tokens] int64 on device: flat row of each new token's K/V
    kv_starts: torch.Tensor | None = None  # contiguous: [num_seqs] int32, flat row of token 0
    starts: list[int] | None = None  # contiguous: the same on the host
    block_tables: torch.Tensor | None = None  # paged: [num_seqs, max_blocks] int32 on device
    block_tables_host: list[list[int]] | None = None  # paged: the same on the host, unpadded
    block_size: int = 0  # paged: tokens per block

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token (the decode-only fast path)."""
        return self.max_query_len == 1


def _common(query_lens: list[int], seq_lens: list[int], write: list[int], put) -> dict:
    return dict(query_lens=query_lens, seq_lens=seq_lens, max_query_len=max(query_lens),
                max_seq_len=max(seq_lens),
                query_start_loc=put([0, *itertools.accumulate(query_lens)], torch.int32),
                seq_lens_t=put(seq_lens, torch.int32), kv_write_index=put(write, torch.int64))


def _putter(device: torch.device, staging: StepStaging | None):
    """How a host array becomes a device tensor: through the step's staging buffers, or alone."""
    if staging is not None:
        return staging.add
    return lambda values, dtype: to_device(values, dtype, device)


def build_contiguous_metadata(starts: list[int], query_lens: list[int], seq_lens: list[int],
                              device: torch.device, staging: StepStaging | None = None) -> AttentionMetadata:
    """Sequences whose token 0 is at flat row starts[i], adding query_lens[i] tokens each."""
    put = _putter(device, staging)
    write = [s + pos for s, q, n in zip(starts, query_lens, seq_lens) for pos in range(n - q, n)]
    return AttentionMetadata(**_common(query_lens, seq_lens, write, put),
                             kv_starts=put(starts, torch.int32), starts=starts)


def build_paged_metadata(block_tables: list[list[int]], block_size: int, query_lens: list[int],
                         seq_lens: list[int], device: torch.device, staging: StepStaging | None = None,
                         padded: np.ndarray | None = None) -> AttentionMetadata:
    """Sequences whose tokens live in the blocks listed by block_tables[i]; `padded` is the
    same tables as one zero-padded int32 array, when the caller keeps them that way."""
    put = _putter(device, staging)
    write = [table[pos // block_size] * block_size + pos % block_size
             for table, q, n in zip(block_tables, query_lens, seq_lens) for pos in range(n - q, n)]
    if padded is None:
        padded = np.zeros((len(block_tables), max(len(t) for t in block_tables)), dtype=np.int32)
        for row, table in zip(padded, block_tables):
            row[:len(table)] = table
    return AttentionMetadata(**_common(query_lens, seq_lens, write, put), block_tables=put(padded, torch.int32),
                             block_tables_host=block_tables, block_size=block_size)
