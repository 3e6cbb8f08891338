"""The static baseline (pre-vLLM serving): every admitted request reserves max_model_len tokens
of KV up front, in one ordinary tensor [num_slots, max_model_len, layers, 2, H_kv, D]. Simple
and contiguous, but a request's unused tail is committed the whole time it runs."""

from __future__ import annotations

import torch

from ..attention import AttentionMetadata, LayerKV, build_contiguous_metadata
from ..memory import KVCacheSpec
from .base import KVUsage, TokenCounts


class StaticKVManager:
    """No prefix caching: a request's reservation is its own (the pre-vLLM design had none)."""

    kind = "contiguous"
    cache_unit = 0

    def __init__(self, spec: KVCacheSpec, device: torch.device, budget_bytes: int):
        self.spec = spec
        self.slot_bytes = spec.max_seq_len * spec.bytes_per_token
        self.num_slots = min(spec.max_seqs, budget_bytes // self.slot_bytes)
        if self.num_slots == 0:
            raise ValueError(f"a KV budget of {budget_bytes} bytes cannot reserve one request of "
                             f"max_model_len={spec.max_seq_len} ({self.slot_bytes} bytes); raise the "
                             f"budget or lower max_model_len")
        self.max_tokens_per_request = spec.max_seq_len
        L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        self._buffer = torch.empty(self.num_slots, spec.max_seq_len, L, 2, H, D, dtype=spec.dtype,
                                   device=device)
        self._caches = []
        for layer in range(L):
            k, v = self._buffer[:, :, layer, 0], self._buffer[:, :, layer, 1]  # [slots, T, H, D]
            row = L * 2 * H * D
            k_flat = k.as_strided((self.num_slots * spec.max_seq_len, H, D), (row, D, 1))
            v_flat = v.as_strided((self.num_slots * spec.max_seq_len, H, D), (row, D, 1))
            self._caches.append(LayerKV(k_flat, v_flat, k=k, v=v))
        self._free_slots = list(range(self.num_slots - 1, -1, -1))
        self._slots: dict[str, int] = {}  # request id -> slot
        self._tokens = TokenCounts()
        self._padding_slot: int | None = None  # padded graph batches write and read its first row

    def allocate(self, request_id: str, num_tokens: int, hit=None) -> bool:
        if request_id not in self._slots:
            if not self._free_slots:
                return False
            self._slots[request_id] = self._free_slots.pop()
        self._tokens.set(request_id, num_tokens)
        return True

    def match_prefix(self, token_ids, keys, salt=None) -> None:
        return None

    def cache_prefix(self, request_id, token_ids, keys, num_tokens, final=False, salt=None) -> None:
        pass

    def reset_prefix_cache(self) -> None:
        pass

    def free(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._free_slots.append(slot)
        self._tokens.drop(request_id)

    def build_metadata(self, request_ids, query_lens, seq_lens, device, staging=None) -> AttentionMetadata:
        return build_contiguous_metadata([self._slots[r] * self.spec.max_seq_len for r in request_ids],
                                         query_lens, seq_lens, device, staging)

    def layer_caches(self) -> list[LayerKV]:
        return self._caches

    def padding_row(self) -> int:
        """A slot taken out of service (the scheduler may then run one request fewer at once
        when the budget, not max_num_seqs, limits the slots)."""
        if self._padding_slot is None:
            if not self._free_slots:
                raise RuntimeError("no KV slot left for the CUDA-graph padding slot; reserve it "
                                   "before admitting requests, or run with enforce_eager")
            self._padding_slot = self._free_slots.pop()
        return self._padding_slot * self.spec.max_seq_len

    def usage(self) -> KVUsage:
        reserved = self.num_slots - len(self._free_slots)  # the requests' and the padding slot
        return KVUsage(self._tokens.total * self.spec.bytes_per_token, reserved * self.slot_bytes,
                       self.num_slots * self.slot_bytes, len(self._slots), self.slot_bytes,
                       self.num_slots, reserved, len(self._free_slots))

    def close(self) -> None:
        self._caches = []
        self._buffer = None
