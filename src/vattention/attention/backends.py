"""Attention backends: each attends over a cache that already holds the step's K/V.

All take q [num_tokens, H_q, D], k/v [num_tokens, H_kv, D] for the step's new tokens and return
[num_tokens, H_q, D]. The caller has stored k/v at meta.kv_write_index first: the model's layer
does it inside its rotary kernel (models/fused.py rotary_qk_store), anyone else with write_kv.
The layer's cache is a LayerKV (base.py): flat rows for writing, plus either the contiguous views
(vattention, static) or the block pool (paged).

  contiguous: flash (FA2 varlen reading the virtual tensors), triton (our split-KV decode + FA2
              for prefill), sdpa, reference
  paged:      triton (our paged split-KV decode; FA2 over gathered blocks for prefill), flex
              (FlexAttention + torch's PagedAttention, flex_paged.py), sdpa, reference
Which one serves a cache is chosen in select.py.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .base import LayerKV
from .metadata import AttentionMetadata, to_device


def write_kv(cache: LayerKV, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
    """Store the step's new K/V in place at their rows (before a backend's forward)."""
    cache.k_flat.index_copy_(0, meta.kv_write_index, k.to(cache.k_flat.dtype))
    cache.v_flat.index_copy_(0, meta.kv_write_index, v.to(cache.v_flat.dtype))


def sequence_kv(cache: LayerKV, meta: AttentionMetadata, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence i's K and V, [seq_len, H_kv, D]: a view (contiguous) or a gather of its blocks."""
    n = meta.seq_lens[i]
    if meta.starts is not None:
        start = meta.starts[i]
        return cache.k_flat[start:start + n], cache.v_flat[start:start + n]
    num_blocks = -(-n // meta.block_size)
    table = meta.block_tables[i, :num_blocks]
    h, d = cache.k_blocks.shape[2:]
    return (cache.k_blocks[table].reshape(-1, h, d)[:n], cache.v_blocks[table].reshape(-1, h, d)[:n])


def causal_mask(query_len: int, seq_len: int, device: torch.device,
                window: int | None = None) -> torch.Tensor | None:
    """[query_len, seq_len] bool: query j (at position seq_len - query_len + j) sees keys <= it,
    and with a window only the last `window` of them. None when every query sees every key (a
    single decode token within its window)."""
    if query_len == 1 and (window is None or window >= seq_len):
        return None
    pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    keys = torch.arange(seq_len, device=device)[None, :]
    mask = keys <= pos
    return mask if window is None else mask & (keys > pos - window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           is_causal: bool, scale: float, softcap: float | None) -> torch.Tensor:
    """scaled_dot_product_attention over [B, H, Q, D] / [B, H_kv, S, D] (mask broadcasts to
    [B, H, Q, S], True = visible), or with softcap the explicit softmax Hugging Face's eager
    attention computes: scores in the input dtype, capped, softmax in float32."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, Q, S]
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(v.dtype), v)


def padded_decode_index(meta: AttentionMetadata, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """What padded_decode reads for a step, the same for every layer: the cache row of key slot
    s of sequence b ([B, S] long; slots past a sequence's length repeat its last token, always
    mapped) and which slots are real keys ([B, 1, 1, S] bool)."""
    t = torch.arange(meta.max_seq_len, device=device)  # [S]
    lens = meta.seq_lens_t.long()[:, None]  # [B, 1]
    pos = torch.minimum(t[None, :], lens - 1)  # [B, S]
    if meta.block_tables is None:
        rows = meta.kv_starts.long()[:, None] + pos
    else:
        blocks = meta.block_tables.long().gather(1, pos // meta.block_size)
        rows = blocks * meta.block_size + pos % meta.block_size
    return rows, (t[None, :] < lens)[:, None, None, :]


def padded_decode(q: torch.Tensor, cache: LayerKV, meta: AttentionMetadata, scale: float,
                  index: tuple[torch.Tensor, torch.Tensor] | None = None, window: int | None = None,
                  softcap: float | None = None) -> torch.Tensor:
    """One query per sequence, every sequence padded to meta.max_seq_len keys, in one batched
    attention call (float32 inside); reads only device tensors (and the host int max_seq_len),
    so it can be captured in a CUDA graph. index: padded_decode_index(meta), when the caller
    keeps it for the step's layers.  q [B, H_q, D] -> [B, H_q, D]"""
    num_seqs, num_q_heads, head_dim = q.shape
    num_kv_heads = cache.k_flat.shape[1]
    rows, real = index if index is not None else padded_decode_index(meta, q.device)
    if window is not None:  # and only the last `window` keys of each sequence
        t = torch.arange(meta.max_seq_len, device=q.device)
        real = real & (t[None, :] >= meta.seq_lens_t.long()[:, None] - window)[:, None, None, :]
    rows = rows.flatten()
    # [B, H_kv, S, D] views of the gathered keys / values (index_select: on CPU ~3x faster than
    # advanced indexing for these gathers of strided cache rows)
    keys = cache.k_flat.index_select(0, rows).view(num_seqs, -1, num_kv_heads, head_dim).float().transpose(1, 2)
    values = cache.v_flat.index_select(0, rows).view(num_seqs, -1, num_kv_heads, head_dim).float().transpose(1, 2)
    out = attend(q.float()[:, :, None], keys, values, real, False, scale, softcap)  # [B, H_q, 1, D]
    return out[:, :, 0].to(q.dtype)


class SDPABackend:
    """Any device, either cache kind: scaled_dot_product_attention per sequence; decode-only
    steps run as one batched softmax (padded_decode) instead when their padded keys are few, and
    always inside a CUDA graph (whose metadata has no host lists to loop over)."""

    name = "sdpa"
    max_padded_elements = 1 << 24  # decode-only steps gather B x max_seq_len x H_kv x D keys up to this many

    def __init__(self, scale: float):
        self.scale = scale
        # padded_decode's index for the step, built at its first layer: (meta, that layer, index)
        self._index: tuple[AttentionMetadata, LayerKV, tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, q, k, v, cache: LayerKV, meta: AttentionMetadata, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        graph = meta.starts is None and meta.block_tables_host is None  # a CUDA graph's metadata: no host lists
        if meta.is_decode and (graph or meta.num_seqs * meta.max_seq_len * k[0].numel() <= self.max_padded_elements):
            # Built once per step, used by every layer. A new step is a new meta, or (decode
            # graphs reuse one meta over static buffers) the step's first layer coming round again.
            if self._index is None or self._index[0] is not meta or self._index[1] is cache:
                self._index = (meta, cache, padded_decode_index(meta, q.device))
            return padded_decode(q, cache, meta, self.scale, self._index[2], window, softcap)
        return self.per_sequence(q, cache, meta, window, softcap)

    def per_sequence(self, q, cache: LayerKV, meta: AttentionMetadata, window: int | None,
                     softcap: float | None) -> torch.Tensor:
        """One attention call per sequence, over its keys read from the cache."""
        out = torch.empty_like(q)
        start = 0
        for i, n_q in enumerate(meta.query_lens):
            keys, values = sequence_kv(cache, meta, i)
            # 4-D [1, H, tokens, D]: on CPU only 4-D inputs reach the flash kernel; 3-D ones take
            # the math path (bmm, softmax, masking passes), measured 4-6x slower for a 1006-token
            # prefill of the built-in model. A chunk that is the whole sequence needs no mask.
            qi = q[start:start + n_q].transpose(0, 1)[None]  # [1, H_q, n_q, D]
            ki = keys.transpose(0, 1).to(q.dtype)[None]  # [1, H_kv, seq_len, D], strided views
            vi = values.transpose(0, 1).to(q.dtype)[None]
            n_kv = keys.shape[0]
            whole = n_q == n_kv and (window is None or window >= n_kv)  # plain causal
            mask = None if whole else causal_mask(n_q, n_kv, q.device, window)
            oi = attend(qi, ki, vi, mask, whole and n_q > 1, self.scale, softcap)
            out[start:start + n_q] = oi[0].transpose(0, 1)
            start += n_q
        return out


class ReferenceBackend:
    """The oracle: explicit float64 softmax attention, one query at a time."""

    name = "reference"

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q, k, v, cache: LayerKV, meta: AttentionMetadata, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        out = torch.empty_like(q)
        group = q.shape[1] // k.shape[1]
        start = 0
        for i, n_q in enumerate(meta.query_lens):
            keys, values = sequence_kv(cache, meta, i)
            keys = keys.double().repeat_interleave(group, dim=1)  # [n_kv, H_q, D]
            values = values.double().repeat_interleave(group, dim=1)
            n_kv = keys.shape[0]
            for j in range(n_q):
                visible = n_kv - n_q + j + 1
                first = 0 if window is None else max(0, visible - window)
                scores = torch.einsum("hd,khd->hk", q[start + j].double(), keys[first:visible]) * self.scale
                if softcap is not None:
                    scores = torch.tanh(scores / softcap) * softcap
                out[start + j] = torch.einsum("hk,khd->hd", scores.softmax(-1), values[first:visible]).to(q.dtype)
            start += n_q
        return out


def flash_varlen(q, k_rows, v_rows, meta: AttentionMetadata, kv_starts: torch.Tensor, scale: float,
                 window: int | None = None):
    """FA2 varlen: sequence i's keys are rows kv_starts[i] .. + seq_lens[i] of k_rows. FA2's
    window counts the keys left of the query's own, hence window - 1."""
    cu_k = torch.cat([kv_starts, kv_starts[-1:]])
    left, right = (None, None) if window is None else (window - 1, 0)
    return torch.ops.aten._flash_attention_forward(
        q, k_rows, v_rows, meta.query_start_loc, cu_k, meta.max_query_len, meta.max_seq_len,
        0.0, True, False, scale=scale, window_size_left=left, window_size_right=right,
        seqused_k=meta.seq_lens_t)[0]


class FlashBackend:
    """CUDA, contiguous: one FA2 varlen call reading K/V straight from the virtual tensors
    (cu_seqlens_k = each slot's first row, seqused_k = its length)."""

    name = "flash"

    def __init__(self, scale: float):
        self.scale = scale

    def forward(self, q, k, v, cache: LayerKV, meta: AttentionMetadata, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        if softcap is not None:
            raise ValueError("the flash backend cannot soft-cap attention scores; use triton or sdpa")
        return flash_varlen(q, cache.k_flat, cache.v_flat, meta, meta.kv_starts, self.scale, window)


class TritonBackend:
    """CUDA, either cache kind: sequences adding one token run our split-KV Triton decode
    kernel (contiguous, or its paged twin); sequences adding a chunk run FA2 varlen, reading the
    contiguous cache in place, or (paged) their fresh K/V when the chunk is the whole sequence
    and a gather of their blocks only when it continues earlier context."""

    name = "triton"

    def __init__(self, scale: float):
        self.scale = scale
        self._eager = SDPABackend(scale)  # soft-capped prefill chunks: FA2 here cannot cap

    def forward(self, q, k, v, cache: LayerKV, meta: AttentionMetadata, window: int | None = None,
                softcap: float | None = None) -> torch.Tensor:
        lens = meta.query_lens
        decode = [i for i, n in enumerate(lens) if n == 1]
        if len(decode) == len(lens):
            return self._decode(q, cache, meta, None, window, softcap)
        if softcap is not None:  # Gemma 2's prefill: exact, not fast
            return self._eager.per_sequence(q, cache, meta, window, softcap)
        out = torch.empty_like(q)
        first = [0, *itertools.accumulate(lens)]  # first row of each sequence's queries
        if decode:
            rows = to_device([first[i] for i in decode], torch.long, q.device)
            out[rows] = self._decode(q[rows], cache, meta, decode, window, None)
        chunks = [i for i, n in enumerate(lens) if n > 1]
        rows = to_device([r for i in chunks for r in range(first[i], first[i + 1])], torch.long, q.device)
        out[rows] = self._prefill(q[rows], k, v, first, cache, meta, chunks, window)
        return out

    def _decode(self, q, cache: LayerKV, meta: AttentionMetadata, subset: list[int] | None,
                window: int | None, softcap: float | None):
        from . import triton_decode
        pick = (lambda t: t) if subset is None else (
            lambda t, idx=to_device(subset, torch.long, q.device): t[idx])
        max_len = meta.max_seq_len if subset is None else max(meta.seq_lens[i] for i in subset)
        if meta.block_tables is None:
            return triton_decode.contiguous_decode(q, cache.k_flat, cache.v_flat, pick(meta.kv_starts),
                                                   pick(meta.seq_lens_t), self.scale, max_seq_len=max_len,
                                                   window=window, softcap=softcap)
        return triton_decode.paged_decode(q, cache.k_blocks, cache.v_blocks, pick(meta.block_tables),
                                          pick(meta.seq_lens_t), self.scale, max_seq_len=max_len,
                                          window=window, softcap=softcap)

    def _prefill(self, q, k, v, first, cache: LayerKV, meta: AttentionMetadata, chunks: list[int],
                 window: int | None):
        """FA2 varlen for the sequences in `chunks` (q holds just their query rows)."""
        sub = AttentionMetadata(
            query_lens=[meta.query_lens[i] for i in chunks], seq_lens=[meta.seq_lens[i] for i in chunks],
            max_query_len=max(meta.query_lens[i] for i in chunks),
            max_seq_len=max(meta.seq_lens[i] for i in chunks),
            query_start_loc=to_device([0, *itertools.accumulate(meta.query_lens[i] for i in chunks)],
                                       torch.int32, q.device),
            seq_lens_t=to_device([meta.seq_lens[i] for i in chunks], torch.int32, q.device),
            kv_write_index=meta.kv_write_index)
        if meta.block_tables is None:
            starts = to_device([meta.starts[i] for i in chunks], torch.int32, q.device)
            return flash_varlen(q, cache.k_flat, cache.v_flat, sub, starts, self.scale, window)
        keys, values = [], []
        for i in chunks:
            if meta.seq_lens[i] == meta.query_lens[i]:  # a whole prompt: this step's K/V is all of it
                keys.append(k[first[i]:first[i + 1]])
                values.append(v[first[i]:first[i + 1]])
            else:
                ki, vi = sequence_kv(cache, meta, i)
                keys.append(ki)
                values.append(vi)
        starts = to_device([0, *itertools.accumulate(sub.seq_lens[:-1])], torch.int32, q.device)
        return flash_varlen(q, torch.cat(keys).to(cache.k_flat.dtype), torch.cat(values).to(cache.v_flat.dtype),
                            sub, starts, self.scale, window)
