"""What a KV cache holds (`KVCacheSpec`) and where each byte of it lives (`KVLayout`).

Both layouts put slot `s` at a fixed, page-aligned virtual base, so a request's KV is one strided
tensor and growth never moves it:

  per_layer    2 * num_layers tensors, each [max_seqs, slot_stride_tokens, H_kv, D]
               tensor (layer l, K=0/V=1) = index 2*l + kv
  cross_layer  1 tensor [max_seqs, slot_stride_tokens, num_layers, 2, H_kv, D]
               layer l's K is the strided view [:, :, l, 0]

           slot 0                     slot 1
  tensor t |page|page|page|...pad|    |page|page|...          slot_stride_bytes apart
            ^ base + t*tensor_bytes + s*slot_stride_bytes + p*page_size

A "page group" is page p of one slot in every tensor (2L pages per_layer, 1 cross_layer): the
unit of growth. `slot_stride_tokens >= max_seq_len` is chosen so a slot spans whole pages *and*
whole tokens, which lets varlen kernels index all slots as one [max_seqs*slot_stride_tokens, H, D].

A "unit" is the smallest run of page groups that holds whole tokens: lcm(page_size, token_bytes)
bytes of each tensor. It sits at the same offset in every slot, so a unit's pages can be mapped
into a second slot and mean the same tokens there (prefix sharing). With 2 MiB pages:
  cross_layer  token_bytes = 2 * L * H_kv * D * itemsize; Llama-3-8B bf16: 128 KiB, so one page
               is one unit of 16 tokens; SmolLM2-135M fp32 (46080 B/token): 45 pages, 2048 tokens
  per_layer    token_bytes = H_kv * D * itemsize per tensor; Llama-3-8B bf16: 2 KiB, so one group
               (64 pages, one per layer and K/V) is one unit of 1024 tokens
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

LAYOUTS = ("per_layer", "cross_layer")


@dataclass(frozen=True)
class KVCacheSpec:
    """The shape of one model's KV cache; independent of where pages come from."""

    num_layers: int  # decoder layers, each with its own K and V
    num_kv_heads: int  # KV heads held by this cache (a tensor-parallel rank holds its shard)
    head_dim: int  # elements per head
    dtype: torch.dtype = torch.bfloat16  # element type of K and V
    max_seqs: int = 256  # slots: requests that can hold KV at the same time
    max_seq_len: int = 4096  # tokens one slot can hold (prompt + output)
    layout: str = "cross_layer"  # "cross_layer" (one page serves every layer) or "per_layer" (the paper's)

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "max_seqs", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVCacheSpec.{name} must be a positive int, got {value!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"KVCacheSpec.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise ValueError(f"KVCacheSpec.dtype must be a torch.dtype, got {self.dtype!r}")

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes across all layers, K and V."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize


@dataclass(frozen=True)
class KVLayout:
    """Byte geometry of a spec on pages of `page_size` bytes."""

    spec: KVCacheSpec
    page_size: int  # bytes per physical page
    num_tensors: int = field(init=False)  # virtual tensors: 2L per_layer, 1 cross_layer
    token_bytes: int = field(init=False)  # bytes one token takes in one tensor
    slot_stride_tokens: int = field(init=False)  # token rows from one slot's base to the next
    slot_stride_bytes: int = field(init=False)  # = slot_stride_tokens * token_bytes, page aligned
    tensor_bytes: int = field(init=False)  # one tensor's span: max_seqs * slot_stride_bytes
    unit_groups: int = field(init=False)  # page groups per sharing unit (whole pages, whole tokens)
    unit_tokens: int = field(init=False)  # tokens per sharing unit

    def __post_init__(self):
        s = self.spec
        head_bytes = s.num_kv_heads * s.head_dim * s.itemsize
        num_tensors = 2 * s.num_layers if s.layout == "per_layer" else 1
        token_bytes = head_bytes if s.layout == "per_layer" else 2 * s.num_layers * head_bytes
        unit = math.lcm(self.page_size, token_bytes)  # a stride of whole pages and whole tokens
        slot_stride_bytes = -(-s.max_seq_len * token_bytes // unit) * unit
        object.__setattr__(self, "num_tensors", num_tensors)
        object.__setattr__(self, "token_bytes", token_bytes)
        object.__setattr__(self, "slot_stride_bytes", slot_stride_bytes)
        object.__setattr__(self, "slot_stride_tokens", slot_stride_bytes // token_bytes)
        object.__setattr__(self, "tensor_bytes", s.max_seqs * slot_stride_bytes)
        object.__setattr__(self, "unit_groups", unit // self.page_size)
        object.__setattr__(self, "unit_tokens", unit // token_bytes)

    @property
    def reservation_bytes(self) -> int:
        return self.num_tensors * self.tensor_bytes

    @property
    def pages_per_slot(self) -> int:
        """Page groups that cover max_seq_len tokens of one slot."""
        return self.groups_for(self.spec.max_seq_len)

    def groups_for(self, num_tokens: int) -> int:
        """Page groups slot-relative bytes [0, num_tokens * token_bytes) need."""
        return -(-num_tokens * self.token_bytes // self.page_size)

    def tokens_in(self, num_groups: int) -> int:
        """Tokens fully backed by the first `num_groups` page groups of a slot."""
        return min(num_groups * self.page_size // self.token_bytes, self.spec.max_seq_len)

    def page_addr(self, base: int, tensor: int, slot: int, group: int) -> int:
        return base + tensor * self.tensor_bytes + slot * self.slot_stride_bytes + group * self.page_size

    def tensor_index(self, layer: int, kv: int) -> int:
        """Which virtual tensor holds (layer, K=0/V=1); cross_layer has one for all."""
        return 2 * layer + kv if self.spec.layout == "per_layer" else 0
