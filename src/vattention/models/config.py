"""ModelArchConfig: the decoder shape read from a Hugging Face config.json, for every Llama-family
architecture we run (Llama 2/3, Mistral, Yi, Qwen2, Qwen3, Phi-3, SmolLM)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# architecture name in config.json -> whether q/k/v projections carry a bias by default
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "YiForCausalLM": False,
    "Qwen2ForCausalLM": True,
    "Qwen3ForCausalLM": False,
    "Phi3ForCausalLM": False,  # checkpoints hold qkv_proj and gate_up_proj fused (the loader splits them)
}
QK_NORM_ARCHITECTURES = {"Qwen3ForCausalLM"}  # an RMSNorm over each head's q and k, before rope


@dataclass(frozen=True)
class ModelArchConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # MLP width
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # Llama 3 style {"rope_type": "llama3", "factor", ...} or None
    max_position_embeddings: int
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    attention_bias: bool  # q/k/v projections have a bias (Qwen2)
    mlp_bias: bool
    sliding_window: int | None  # Mistral v0.1: attention window; we cap the context at it
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    qk_norm: bool = False  # q and k RMS-normed per head before rope (Qwen3)

    @property
    def rope_context_limit(self) -> int | None:
        """LongRoPE (Phi-3): we rotate with the short factors, exact up to the original
        context; past it Hugging Face switches every position to the long factors, which a KV
        cache cannot follow, so the context is capped there."""
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type", scaling.get("type")) == "longrope":
            return scaling["original_max_position_embeddings"]
        return None

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelArchConfig:
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported architecture {arch!r}; vattention runs "
                             f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and isinstance(cfg.get("rope_parameters"), dict):
            params = cfg["rope_parameters"]  # transformers 5 writes rope settings here
            rope_scaling = params if params.get("rope_type", "default") != "default" else None
        rope_theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        partial = cfg.get("partial_rotary_factor") or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} (rotary over part of each head) is not supported")
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "longrope":
            original = rope_scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
            if not original:
                raise ValueError("longrope rope scaling needs original_max_position_embeddings")
            rope_scaling = {**rope_scaling, "original_max_position_embeddings": original}
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
            mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            qk_norm=arch in QK_NORM_ARCHITECTURES)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArchConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: a model directory needs config.json, "
                                    f"*.safetensors and tokenizer.json")
        return cls.from_dict(json.loads(file.read_text()))
