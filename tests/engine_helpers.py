"""Tiny random Hugging Face checkpoints of each supported family, and a slow HF greedy oracle."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = {
    # Llama 3 style: tied embeddings, llama3 RoPE scaling, GQA
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),  # q/k/v bias
    # per-head q/k RMSNorm, a head_dim that is not hidden / heads
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=24)),
    # fused qkv_proj / gate_up_proj in the checkpoint, LongRoPE (short factors, attention factor)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        tie_word_embeddings=False, sliding_window=None, original_max_position_embeddings=512, pad_token_id=0,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.25 * i for i in range(8)],
                      "long_factor": [2.0 + i for i in range(8)]})),
    # sandwich norms (1 + w), GeGLU, embedding scale, query_pre_attn_scalar, tied embeddings;
    # windowed layers alternating with global ones (window 8: the test prompts outgrow it), soft-caps
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, pad_token_id=0)),
    # q/k norms, five windowed layers per global one (here two of three), their own rope base
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, num_hidden_layers=3, query_pre_attn_scalar=24, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}})),
    # mixtures of experts: top-2 of 4 experts, each as wide as intermediate_size (Mixtral, which
    # checkpoints name block_sparse_moe.experts.N.w1/w2/w3); Qwen3-MoE with q/k norms, top-2 of 4
    # renormalized, and a dense layer among the sparse ones (mlp_only_layers)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True,
        mlp_only_layers=[1], num_hidden_layers=3, head_dim=16)),
}
MOE_FAMILIES = ("mixtral", "qwen3moe")

LLAMA_FAMILIES = sorted(f for f in FAMILIES if not f.startswith("gemma") and f not in MOE_FAMILIES)  # what tests/unfused_llama.py models


def make_checkpoint(family: str, path: Path, seed: int = 0, **overrides):
    """Save a random tiny model of `family` to `path`; returns the HF model (fp32, eval)."""
    import transformers
    config_cls, model_cls, extra = FAMILIES[family]
    fields = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    fields.update(extra)
    fields.update(overrides)
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**fields)
    model = getattr(transformers, model_cls)(config).eval()
    if family == "qwen2":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if family in MOE_FAMILIES:  # decisive routing: no near-tied experts for rounding to flip
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    p.normal_(0, 1.0)
    if family in ("qwen3", "gemma2", "gemma3"):  # HF initialises norms to unit scale; make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(-0.5, 0.5) if family != "qwen3" else p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == [model_cls]
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens by full recomputation each step (no KV cache), and their logprobs."""
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    for _ in range(num_tokens):
        logits = model(ids).logits[0, -1].float()
        token = int(logits.argmax())
        tokens.append(token)
        logprobs.append(float(logits.log_softmax(-1)[token]))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, logprobs
