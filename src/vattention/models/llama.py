"""The Llama-family decoder (Llama 2/3, Mistral, Yi, Qwen2, SmolLM) over a flat batch of tokens.

    input_ids [T] ─ embed ─> [T, hidden] ─ N x (RMSNorm ─ attention ─ + ─ RMSNorm ─ MLP ─ +)
                  ─ RMSNorm ─> hidden [T, hidden];  compute_logits(rows) ─> [rows, vocab]

Module names match Hugging Face checkpoints, so a safetensors state dict loads as it is.
Attention is delegated to a backend with the layer's KV cache and the step's metadata.

Under tensor parallelism (a Shard of more than one rank, plus `comm` for the collectives) each
rank builds only its slices (sharding.py) and sums partial results where Megatron does:

  x ─ embed (vocab slice; all-reduce) ─ [q,k,v local heads ─ attn ─ o_proj rows; all-reduce]
    ─ [gate,up local columns ─ down_proj rows; all-reduce] ─ ... ─ lm_head (vocab slice; all-gather)
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata, LayerKV
from .config import ModelArchConfig
from .sharding import Shard


class Collectives(Protocol):
    """What a sharded model needs from its tensor-parallel group (vattention.distributed)."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor: ...  # sum over ranks, in place

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor: ...  # concatenate ranks' last dims


class RowParallelLinear(nn.Linear):
    """A linear layer holding some input columns: partial products are summed over ranks, then
    the (whole) bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, comm: Collectives | None):
        super().__init__(in_features, out_features, bias=bias)
        self.comm = comm

    def forward(self, x):
        if self.comm is None:
            return super().forward(x)
        y = self.comm.all_reduce(F.linear(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding vocabulary rows [start, start + rows): tokens of other ranks embed to
    zero here and the ranks' results are summed."""

    def __init__(self, rows: int, dim: int, start: int, comm: Collectives | None):
        super().__init__(rows, dim)
        self.start, self.comm = start, comm

    def forward(self, ids):
        if self.comm is None:
            return super().forward(ids)
        local = ids - self.start
        mine = (local >= 0) & (local < self.num_embeddings)
        x = F.embedding(torch.where(mine, local, 0), self.weight) * mine[:, None].to(self.weight.dtype)
        return self.comm.all_reduce(x)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelArchConfig) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with Llama 3 style scaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear")
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, 1, D] (the half-split "rotate_half" convention of HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None):
        super().__init__()
        self.num_heads, self.num_kv_heads = shard.num_heads(cfg), shard.num_kv_heads(cfg)  # this rank's
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = RowParallelLinear(self.num_heads * cfg.head_dim, cfg.hidden_size, False, comm)

    def forward(self, x, cos, sin, cache: LayerKV, meta: AttentionMetadata, backend):
        t = x.shape[0]
        q = apply_rope(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, cache, meta)  # [T, H_q, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None):
        super().__init__()
        width = cfg.intermediate_size // shard.world_size  # this rank's columns
        self.gate_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, width, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, cfg.mlp_bias, comm)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None):
        super().__init__()
        self.self_attn = Attention(cfg, shard, comm)
        self.mlp = MLP(cfg, shard, comm)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, meta, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None):
        super().__init__()
        rows = shard.vocab_per_rank(cfg)
        self.embed_tokens = VocabParallelEmbedding(rows, cfg.hidden_size, shard.rank * rows, comm)
        self.layers = nn.ModuleList(DecoderLayer(cfg, shard, comm) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard = Shard(), comm: Collectives | None = None):
        super().__init__()
        shard.check(cfg)
        self.config, self.shard, self.comm = cfg, shard, comm
        self.model = LlamaBody(cfg, shard, comm)
        self.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_per_rank(cfg), bias=False)  # this rank's vocab rows
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # [D/2] float32

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[LayerKV],
                meta: AttentionMetadata, backend) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cos, sin, cache, meta, backend)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 (every rank gets all of them)."""
        logits = self.lm_head(hidden)
        if self.comm is not None:
            logits = self.comm.all_gather_last(logits)[:, :self.config.vocab_size]  # drop the padding
        return logits.float()
