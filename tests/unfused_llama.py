"""The reference for the fused decoder: the Llama-family model as it was before fusion (separate
q/k/v and gate/up projections loaded under their checkpoint names, RMSNorm in float32 as its own
module, RoPE through a cos/sin cat, residual adds as separate ops), one rank only; and a greedy
loop that drives either model through prefill and decode steps over a contiguous KV cache."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from vattention.attention import LayerKV
from vattention.attention.backends import SDPABackend, write_kv
from vattention.attention.metadata import build_contiguous_metadata
from vattention.models.config import ModelArchConfig
from vattention.models.llama import rope_attention_factor, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D]; cos/sin [T, 1, D] (the half-split "rotate_half" convention of HF)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, cache, meta, backend):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        write_kv(cache, k, v, meta)  # before the fused step, the backends wrote K/V themselves
        out = backend.forward(q, k, v, cache, meta)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, meta, backend):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta, backend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class UnfusedLlama(nn.Module):
    def __init__(self, cfg: ModelArchConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, input_ids, positions, caches, meta, backend):
        x = self.model.embed_tokens(input_ids)
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        scale = rope_attention_factor(self.config)  # LongRoPE scales cos and sin, as HF does
        cos, sin = (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)
        for layer, cache in zip(self.model.layers, caches):
            x = layer(x, cos, sin, cache, meta, backend)
        return self.model.norm(x)

    def compute_logits(self, hidden):
        return self.lm_head(hidden).float()


def load_unfused(path: Path, device: torch.device | str, dtype: torch.dtype) -> UnfusedLlama:
    """The checkpoint's tensors under their own names (every one of them, and nothing more)."""
    cfg = ModelArchConfig.from_dir(path)
    model = UnfusedLlama(cfg)
    state = checkpoint_state(path, cfg)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_word_embeddings else []), \
        (missing, unexpected)
    model = model.to(device=device, dtype=dtype).eval()
    model.inv_freq = rope_inv_freq(cfg).to(device)  # float32, as the engine keeps it
    return model


def checkpoint_state(path: Path, cfg: ModelArchConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint by name, Phi-3's fused qkv_proj / gate_up_proj split into
    q/k/v and gate/up as the other families name them."""
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    for name in [n for n in state if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
        fused, head = state.pop(name), name.rsplit(".", 2)[0]  # Phi-3: split into the parts
        if name.endswith("qkv_proj.weight"):
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            parts = {"q_proj": q, "k_proj": kv, "v_proj": kv}
        else:
            parts = {"gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size}
        for part, chunk in zip(parts, fused.split(list(parts.values()))):
            state[f"{head}.{part}.weight"] = chunk
    return state


def empty_caches(model, num_rows: int) -> list[LayerKV]:
    """Every layer's K and V as [num_rows, H_kv, D] zeros, on the model's device and dtype."""
    cfg = model.config
    like = dict(dtype=model.model.embed_tokens.weight.dtype, device=model.inv_freq.device)
    num_kv_heads = model.model.layers[0].self_attn.num_kv_heads
    return [LayerKV(*(torch.zeros(num_rows, num_kv_heads, cfg.head_dim, **like) for _ in range(2)))
            for _ in range(cfg.num_layers)]


@torch.inference_mode()
def prefill_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """[num_prompts, vocab] float32: each prompt's last-token logits after one prefill step."""
    device, lens = model.inv_freq.device, [len(p) for p in prompts]
    meta = build_contiguous_metadata([0, *torch.tensor(lens).cumsum(0)[:-1].tolist()], lens, lens, device)
    hidden = model(torch.tensor([t for p in prompts for t in p], device=device),
                   torch.tensor([i for n in lens for i in range(n)], device=device),
                   empty_caches(model, sum(lens)), meta, SDPABackend(1 / math.sqrt(model.config.head_dim)))
    return model.compute_logits(hidden[torch.tensor(lens, device=device).cumsum(0) - 1])


@torch.inference_mode()
def greedy(model, prompts: list[list[int]], num_tokens: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and their logprobs: one step prefills every prompt, then one decode step per
    token, the K/V of sequence i at rows [i * max_len, (i + 1) * max_len) of each layer's cache."""
    device = model.inv_freq.device
    max_len = max(map(len, prompts)) + num_tokens
    caches = empty_caches(model, len(prompts) * max_len)
    backend = SDPABackend(1 / math.sqrt(model.config.head_dim))
    starts = [i * max_len for i in range(len(prompts))]
    seqs, done = [list(p) for p in prompts], [0] * len(prompts)
    tokens, logprobs = [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(num_tokens):
        ids = [t for s, n in zip(seqs, done) for t in s[n:]]
        positions = [p for s, n in zip(seqs, done) for p in range(n, len(s))]
        query_lens = [len(s) - n for s, n in zip(seqs, done)]
        meta = build_contiguous_metadata(starts, query_lens, [len(s) for s in seqs], device)
        hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device),
                       caches, meta, backend)
        last = torch.tensor(query_lens, device=device).cumsum(0) - 1
        logp = model.compute_logits(hidden[last]).log_softmax(-1)  # [num_seqs, vocab]
        best = logp.argmax(-1)
        for i, s in enumerate(seqs):
            done[i] = len(s)
            s.append(int(best[i]))
            tokens[i].append(int(best[i]))
            logprobs[i].append(float(logp[i, best[i]]))
    return tokens, logprobs
