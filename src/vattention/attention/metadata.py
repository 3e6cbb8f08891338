"""AttentionMetadata: what one step's attention needs to know about the batch, built once per
step by the model runner and passed down explicitly.

  tokens of the step, flattened:   | seq 0 chunk | seq 1 (decode) | seq 2 chunk ... |
  query_start_loc                  0             n0               n0+1  ...
  seq i attends to its tokens [0, seq_lens[i]) (the chunk is its last query_lens[i] tokens)
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slots: list[int]  # cache slot of each sequence
    query_lens: list[int]  # new tokens of each sequence this step
    seq_lens: list[int]  # tokens each sequence holds after this step (context + new)
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32 on device: cu_seqlens_q
    seq_lens_t: torch.Tensor  # [num_seqs] int32 on device: seqused_k
    kv_starts: torch.Tensor  # [num_seqs] int32 on device: row of token 0 of each sequence in kv_flat
    kv_write_index: torch.Tensor  # [num_tokens] int64 on device: row in kv_flat for each new token's K/V

    @property
    def num_seqs(self) -> int:
        return len(self.slots)


def build_metadata(slots: list[int], query_lens: list[int], seq_lens: list[int],
                   slot_stride_tokens: int, device: torch.device) -> AttentionMetadata:
    """Metadata for sequences at `slots`, each adding query_lens[i] tokens and ending at seq_lens[i]."""
    starts = [s * slot_stride_tokens for s in slots]
    write = [start + pos for start, q, n in zip(starts, query_lens, seq_lens) for pos in range(n - q, n)]
    cu_q = [0, *itertools.accumulate(query_lens)]

    def on_device(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    return AttentionMetadata(
        slots=slots, query_lens=query_lens, seq_lens=seq_lens, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc=on_device(cu_q, torch.int32),
        seq_lens_t=on_device(seq_lens, torch.int32), kv_starts=on_device(starts, torch.int32),
        kv_write_index=on_device(write, torch.int64))
