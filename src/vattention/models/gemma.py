"""Gemma 2 and Gemma 3 (text): the Llama decoder (llama.py) with Gemma's differences, each a
config field (config.py) so checkpoints load under Hugging Face's module names unchanged:

    input_ids ─ embed ─ x * sqrt(hidden)  (the scale rounded to the activation dtype, as HF does)
      N x ( input_layernorm ─ attention ─ post_attention_layernorm ─ + residual
            ─ pre_feedforward_layernorm ─ gelu_tanh(gate) * up ─ post_feedforward_layernorm ─ + residual )
      ─ norm ─ lm_head (tied) ─ [Gemma 2: cap * tanh(logits / cap)]

  norms        x / rms(x) * (1 + w), in float32 (GemmaRMSNorm); four per layer ("sandwich");
               on CUDA the Llama norm's Triton kernel with its GEMMA flag, GeGLU the SiLU one's GELU
  attention    scale query_pre_attn_scalar ** -0.5; Gemma 3 q/k norms per head; Gemma 2 scores
               soft-capped; windowed layers (Gemma 2: every other, Gemma 3: five of six) attend
               to their last sliding_window tokens, the others to all of them
  rope         Gemma 3's windowed layers rotate with their own base (rope_local_base_freq) and
               no scaling; its global layers with rope_theta and rope_scaling

The residual stream is carried beside each layer's output as in llama.py: a layer returns its
post-normed MLP output, and the next layer's input norm adds it to the stream.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attention import AttentionMetadata, LayerKV
from .config import ModelArchConfig
from .fused import rotary_cos_sin
from .llama import MLP, Attention, Collectives, GemmaRMSNorm, LlamaForCausalLM, Rope, rope_inv_freq
from .sharding import Shard


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelArchConfig, shard: Shard, comm: Collectives | None, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, shard, comm, layer)
        self.mlp = MLP(cfg, shard, comm)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, rope, cache, meta, backend):
        """-> (this layer's post-normed MLP output, the residual stream before it is added)."""
        x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, positions, rope, cache, meta, backend))[0]
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x))[0], residual


class GemmaForCausalLM(LlamaForCausalLM):
    layer_class = GemmaDecoderLayer
    unit_norm_weight = 0.0  # the norms scale by 1 + w

    def __init__(self, cfg: ModelArchConfig, shard: Shard = Shard(), comm: Collectives | None = None):
        super().__init__(cfg, shard, comm)
        self.local_rope = cfg.local_rope_theta is not None  # Gemma 3: windowed layers' own rope
        if self.local_rope:
            self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True), persistent=False)

    def reset_rope(self, device: torch.device) -> None:
        super().reset_rope(device)
        if self.local_rope:
            self.inv_freq_local = rope_inv_freq(self.config, local=True).to(device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[LayerKV],
                meta: AttentionMetadata, backend) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x = self.model.embed_tokens(input_ids)
        x, residual = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype).item(), None
        ropes = {"global": Rope(self.inv_freq, rotary_cos_sin(positions, self.inv_freq, x.dtype))}
        if self.local_rope:
            ropes["local"] = Rope(self.inv_freq_local, rotary_cos_sin(positions, self.inv_freq_local, x.dtype))
        for layer, cache in zip(self.model.layers, caches):
            rope = ropes["local" if self.local_rope and layer.self_attn.window else "global"]
            x, residual = layer(x, residual, positions, rope, cache, meta, backend)
        return self.model.norm(x, residual)[0]


def model_class(cfg: ModelArchConfig) -> type[LlamaForCausalLM]:
    """The decoder class that runs an architecture."""
    return GemmaForCausalLM if cfg.is_gemma else LlamaForCausalLM
