"""ModelArchConfig: the decoder shape read from a Hugging Face config.json, for every architecture
we run: the Llama family (Llama 2/3, Mistral, Yi, Qwen2, Qwen3, Phi-3, SmolLM), Gemma 2 / 3, and
the mixtures of experts Mixtral and Qwen3-MoE (models/moe.py).

Attention windows are per layer (`layer_windows`): None attends to the whole context, w to the
last w tokens (key k is visible from query q when q - w < k <= q, as Hugging Face masks it).
Mistral v0.1 windows every layer; Gemma 2 alternates windowed and global layers, Gemma 3 has five
windowed layers per global one; config.json's `layer_types` says which when it is written."""

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
    "Gemma2ForCausalLM": False,
    "Gemma3ForCausalLM": False,  # the text-only Gemma 3 (1B); the multimodal ones are refused
    "MixtralForCausalLM": False,  # every layer's MLP a mixture of experts
    "Qwen3MoeForCausalLM": False,  # Qwen3 attention; MoE layers (some may stay dense: mlp_only_layers)
}
QK_NORM_ARCHITECTURES = {"Qwen3ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM"}  # an RMSNorm over each head's q and k, before rope
GEMMA_ARCHITECTURES = {"Gemma2ForCausalLM", "Gemma3ForCausalLM"}  # models/gemma.py
# Hugging Face's defaults for what a Gemma config.json may leave out
FAMILY_DEFAULTS = {
    "Gemma2ForCausalLM": {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "tie_word_embeddings": True, "sliding_window": 4096},
    "Gemma3ForCausalLM": {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                          "tie_word_embeddings": True, "sliding_window": 4096},
}
WINDOW_PATTERN = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}  # every n-th layer is global, when
# config.json predates `layer_types`


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
    sliding_window: int | None  # the window of the windowed layers (Mistral v0.1: all; Gemma: some)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    qk_norm: bool = False  # q and k RMS-normed per head before rope (Qwen3, Gemma 3)
    layer_windows: tuple[int | None, ...] = ()  # per layer: its attention window, None = global
    hidden_act: str = "silu"  # the MLP's gate activation: silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)
    query_pre_attn_scalar: float | None = None  # Gemma: attention scale is this ** -0.5, not head_dim's
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the output logits
    local_rope_theta: float | None = None  # Gemma 3: windowed layers' rope base (unscaled)
    num_experts: int = 0  # experts per MoE layer; 0 = a dense model
    num_experts_per_tok: int = 0  # experts each token is routed to (top k)
    moe_intermediate_size: int = 0  # one expert's MLP width
    norm_topk_prob: bool = False  # the top k routing weights renormalized to sum to 1 (Mixtral: always)
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model that keep a dense MLP (Qwen3-MoE)

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s attention window in tokens, None where it attends to all of them."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def is_gemma(self) -> bool:
        return self.architecture in GEMMA_ARCHITECTURES

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
        cfg = {**FAMILY_DEFAULTS.get(arch, {}), **{k: v for k, v in cfg.items() if v is not None or
                                                   k.endswith("softcapping")}}
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        params = cfg.get("rope_parameters") or {}  # transformers 5 writes rope settings here,
        local_theta = cfg.get("rope_local_base_freq")
        if "full_attention" in params:  # Gemma 3: one set per layer type
            local = params.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"rope scaling {local.get('rope_type')!r} on windowed layers is not supported")
            local_theta = local.get("rope_theta", local_theta)
            params = params["full_attention"]
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and params:
            rope_scaling = params if params.get("rope_type", "default") != "default" else None
        rope_theta = cfg.get("rope_theta") or params.get("rope_theta", 10000.0)
        partial = cfg.get("partial_rotary_factor") or params.get("partial_rotary_factor", 1.0)
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor={partial} (rotary over part of each head) is not supported")
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) == "longrope":
            original = rope_scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
            if not original:
                raise ValueError("longrope rope scaling needs original_max_position_embeddings")
            rope_scaling = {**rope_scaling, "original_max_position_embeddings": original}
        gemma = arch in GEMMA_ARCHITECTURES
        if gemma and cfg.get("use_bidirectional_attention"):
            raise ValueError("bidirectional Gemma attention (an encoder) is not supported")
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"MLP activation {act!r} is not supported; supported: silu, gelu_pytorch_tanh")
        num_layers = cfg["num_hidden_layers"]
        moe = _moe_fields(cfg, arch, num_layers)
        return cls(
            architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"], num_layers=num_layers,
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads, rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta), rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
            mlp_bias=bool(cfg.get("mlp_bias", False)), sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
            qk_norm=arch in QK_NORM_ARCHITECTURES,
            layer_windows=_layer_windows(cfg, arch, num_layers, window), hidden_act=act,
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar") if gemma else None,
            attn_logit_softcapping=cfg.get("attn_logit_softcapping") if gemma else None,
            final_logit_softcapping=cfg.get("final_logit_softcapping") if gemma else None,
            local_rope_theta=float(local_theta or 10000.0) if arch == "Gemma3ForCausalLM" else None,
            **moe)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArchConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}: a model directory needs config.json, "
                                    f"*.safetensors and tokenizer.json")
        return cls.from_dict(json.loads(file.read_text()))


def _layer_windows(cfg: dict, arch: str, num_layers: int, window: int | None) -> tuple[int | None, ...]:
    """Each layer's window: config.json's `layer_types` where written, else the family's rule
    (Gemma's pattern; Qwen2's windows from layer max_window_layers on; the rest all windowed)."""
    if window is None:
        return (None,) * num_layers
    types = cfg.get("layer_types")
    if types is None:
        if arch in WINDOW_PATTERN:
            n = cfg.get("sliding_window_pattern", WINDOW_PATTERN[arch])
            types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(num_layers)]
        elif arch == "Qwen2ForCausalLM":
            first = cfg.get("max_window_layers", num_layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
        else:
            types = ["sliding_attention"] * num_layers
    if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ValueError(f"layer_types must name sliding_attention or full_attention for each of the "
                         f"{num_layers} layers, got {types}")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _moe_fields(cfg: dict, arch: str, num_layers: int) -> dict:
    """The mixture-of-experts fields: Mixtral names its experts num_local_experts, each as wide
    as intermediate_size, and always renormalizes its top 2; Qwen3-MoE has moe_intermediate_size,
    norm_topk_prob, and dense layers (mlp_only_layers, and all but every decoder_sparse_step-th)."""
    if arch == "MixtralForCausalLM":
        fields = dict(num_experts=cfg.get("num_local_experts", 8), num_experts_per_tok=cfg.get("num_experts_per_tok", 2),
                      moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    elif arch == "Qwen3MoeForCausalLM":
        step = cfg.get("decoder_sparse_step", 1)
        dense = tuple(i for i in range(num_layers) if i in (cfg.get("mlp_only_layers") or []) or (i + 1) % step)
        experts = cfg.get("num_experts") or cfg.get("num_local_experts", 128)  # transformers 5 writes the latter
        fields = dict(num_experts=experts, num_experts_per_tok=cfg.get("num_experts_per_tok", 8),
                      moe_intermediate_size=cfg.get("moe_intermediate_size", 768),
                      norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), dense_layers=dense)
    else:
        return {}
    if not 0 < fields["num_experts_per_tok"] <= fields["num_experts"]:
        raise ValueError(f"num_experts_per_tok must be in [1, num_experts={fields['num_experts']}], "
                         f"got {fields['num_experts_per_tok']}")
    return fields
