"""The Llama-family decoder (Llama 2/3, Mistral, Yi, Qwen2, Qwen3, Phi-3, SmolLM) over a flat batch of tokens,
laid out as vLLM's: the residual stream is carried beside each layer's output and added inside
the next norm.

    input_ids [T] ─ embed ─> x [T, hidden]          residual = x, x = norm(x)       (layer 0)
      N x ( qkv_proj ─ [Qwen3: rmsnorm(q), rmsnorm(k) per head] ─ rope(q, k), K/V into the cache ─ attention ─ o_proj
            ─ x, residual = add_norm(x, residual)
            ─ gate_up_proj ─ silu(gate) * up ─ down_proj ─ x, residual = add_norm(x, residual) )
      ─> hidden [T, hidden] (the last add_norm is the final norm);  compute_logits(rows) ─> [rows, vocab]

The attention of a windowed layer (config.window(layer)) sees only its last `window` tokens; the
MLP of an MoE layer (Mixtral, Qwen3-MoE: config.is_moe_layer) is moe.SparseMoE. Gemma 2 / 3
reuse these modules with their own layer and norms (gemma.py).

The norms, rope (with the step's K/V cache write) and silu * up are fused.py's functions: Triton
kernels on CUDA, eager PyTorch elsewhere; so is every projection (fused.linear: on CUDA, up to 16
rows of a 16-bit model go through our skinny GEMM, more through cuBLAS). q/k/v and gate/up are
each one GEMM (MergedLinear): the loader stacks the checkpoint's q_proj/k_proj/v_proj and gate_proj/up_proj tensors into qkv_proj
and gate_up_proj (loader.py); every other module name matches Hugging Face checkpoints. Attention
is delegated to a backend with the layer's KV cache and the step's metadata.

Under tensor parallelism (a Shard of more than one rank, plus `comm` for the collectives) each
rank builds only its slices (sharding.py) and sums partial results where Megatron does:

  x ─ embed (vocab slice; all-reduce) ─ [qkv: local q heads | local kv heads ─ attn ─ o_proj rows;
    all-reduce] ─ [gate_up: local gate | local up columns ─ down_proj rows; all-reduce] ─ ...
    ─ lm_head (vocab slice; all-gather)
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import AttentionMetadata, LayerKV
from .config import ModelArchConfig
from .moe import SparseMoE
from .fused import (add_rms_norm, gelu_tanh_and_mul, gemma_rms_norm, linear, rms_norm, rotary_cos_sin,
                    rotary_qk_store, silu_and_mul)
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
            return linear(x, self.weight, self.bias)
        y = self.comm.all_reduce(linear(x, self.weight))
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


class MergedLinear(nn.Linear):
    """Column-parallel projections of one input as one GEMM: the output rows are the checkpoint
    tensors named in `parts` (this rank's slice of each), stacked in that order."""

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool):
        super().__init__(in_features, sum(parts.values()), bias=bias)
        self.parts = parts  # checkpoint module name -> this rank's rows, e.g. {"q_proj": 512, ...}
        self.sizes = list(parts.values())

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm of the residual stream, the residual stream): the stream is x where no residual
        is carried yet, else residual + x (written into residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps), x
        return add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's norm (fused.gemma_rms_norm): the stored weight is the scale minus one."""

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return gemma_rms_norm(x, self.weight, self.eps), x
        return gemma_rms_norm(x, self.weight, self.eps, residual), residual


def norm_class(cfg: ModelArchConfig) -> type[RMSNorm]:
    return GemmaRMSNorm if cfg.is_gemma else RMSNorm


def rope_inv_freq(cfg: ModelArchConfig, local: bool = False) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with Llama 3 style scaling when configured.
    local: Gemma 3's windowed layers' (their own base, no scaling)."""
    dim = cfg.head_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scaling = {} if local else (cfg.rope_scaling or {})
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
    elif kind == "longrope":  # the short factors: the context is capped at the original (config.py)
        inv_freq = inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3, linear, longrope")
    return inv_freq


def rope_attention_factor(cfg: ModelArchConfig) -> float:
    """LongRoPE's scale of cos and sin (so of every q.k, squared), as Hugging Face computes it."""
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class Rope(NamedTuple):
    """What every layer's rotary embedding takes in a step."""

    inv_freq: torch.Tensor  # [D/2] float32
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None  # eager path's tables [T, 1, D]; None on CUDA


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None, layer: int = 0):
        super().__init__()
        self.window, self.softcap = cfg.window(layer), cfg.attn_logit_softcapping  # this layer's shape
        self.num_heads, self.num_kv_heads = shard.num_heads(cfg), shard.num_kv_heads(cfg)  # this rank's
        self.head_dim = cfg.head_dim
        q_rows, kv_rows = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedLinear(
            cfg.hidden_size, {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}, cfg.attention_bias)
        self.o_proj = RowParallelLinear(q_rows, cfg.hidden_size, False, comm)
        if cfg.qk_norm:  # one weight over head_dim, shared by every head: whole on every rank
            self.q_norm = norm_class(cfg)(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = norm_class(cfg)(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        # LongRoPE scales cos/sin of q and k by a: q.k by a^2, the same as scaling rope(q) alone
        self.q_scale = rope_attention_factor(cfg) ** 2

    def forward(self, x, positions, rope, cache: LayerKV, meta: AttentionMetadata, backend):
        """rope: the step's Rope (inv_freq, and the eager path's cos/sin tables or None)."""
        t, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.sizes, dim=-1)  # views of [T, (H_q + 2 H_kv) * D]
        v = v.view(t, self.num_kv_heads, d)
        if self.qk_norm:  # per head: rows of [T * H, D]
            q = self.q_norm(q.reshape(t * self.num_heads, d))[0]
            k = self.k_norm(k.reshape(t * self.num_kv_heads, d))[0]
        # rope(q), rope(k); rope(k) and v stored at the step's cache rows in the same pass
        q, k = rotary_qk_store(q.view(t, self.num_heads, d), k.view(t, self.num_kv_heads, d), v,
                               positions, rope.inv_freq, cache.k_flat, cache.v_flat, meta.kv_write_index,
                               rope.cos_sin)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        out = backend.forward(q, k, v, cache, meta, self.window, self.softcap)  # [T, H_q, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None):
        super().__init__()
        width = cfg.intermediate_size // shard.world_size  # this rank's columns
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate_proj": width, "up_proj": width},
                                         cfg.mlp_bias)
        self.down_proj = RowParallelLinear(width, cfg.hidden_size, cfg.mlp_bias, comm)
        self.act_and_mul = silu_and_mul if cfg.hidden_act == "silu" else gelu_tanh_and_mul

    def forward(self, x):
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))  # [T, 2 I] -> [T, I] -> [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, shard, comm, layer)
        self.mlp = SparseMoE(cfg, shard, comm) if cfg.is_moe_layer(layer) else MLP(cfg, shard, comm)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rope, cache, meta, backend):
        """-> (this layer's MLP output, the residual stream before it is added)."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, rope, cache, meta, backend)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaBody(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None,
                 layer_class: type[nn.Module] = DecoderLayer):
        super().__init__()
        rows = shard.vocab_per_rank(cfg)
        self.embed_tokens = VocabParallelEmbedding(rows, cfg.hidden_size, shard.rank * rows, comm)
        self.layers = nn.ModuleList(layer_class(cfg, shard, comm, i) for i in range(cfg.num_layers))
        self.norm = norm_class(cfg)(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    layer_class: type[nn.Module] = DecoderLayer
    unit_norm_weight = 1.0  # the stored norm weight that scales by one (dummy weights use it)

    def __init__(self, cfg: ModelArchConfig, shard: Shard = Shard(), comm: Collectives | None = None):
        super().__init__()
        shard.check(cfg)
        self.config, self.shard, self.comm = cfg, shard, comm
        self.model = LlamaBody(cfg, shard, comm, self.layer_class)
        self.lm_head = nn.Linear(cfg.hidden_size, shard.vocab_per_rank(cfg), bias=False)  # this rank's vocab rows
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)  # [D/2] float32

    def reset_rope(self, device: torch.device) -> None:
        """The rope buffers, recomputed on `device` (a model built on meta has none)."""
        self.inv_freq = rope_inv_freq(self.config).to(device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[LayerKV],
                meta: AttentionMetadata, backend) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x, residual = self.model.embed_tokens(input_ids), None
        rope = Rope(self.inv_freq, rotary_cos_sin(positions, self.inv_freq, x.dtype))  # once for all layers
        for layer, cache in zip(self.model.layers, caches):
            x, residual = layer(x, residual, positions, rope, cache, meta, backend)
        return self.model.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 (every rank gets all of them); with
        final_logit_softcapping (Gemma 2) capped in the activation dtype first."""
        logits = linear(hidden, self.lm_head.weight)
        if self.comm is not None:
            logits = self.comm.all_gather_last(logits)[:, :self.config.vocab_size]  # drop the padding
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()
