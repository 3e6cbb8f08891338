"""What a family's config.json means to us (which layers are windowed, which rope each uses, what
is refused), and the families' behaviour beyond greedy equality with HF (test_engine.py has
that for every family): a windowed Mistral, Gemma under prefix caching, dummy Gemma presets."""

from __future__ import annotations

import json

import pytest
import torch

from vattention import LLM, SamplingParams
from vattention.attention import make_backend
from vattention.models.config import ModelArchConfig
from vattention.models.presets import PRESETS

from engine_helpers import hf_greedy, make_checkpoint

BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=2)


def arch(architecture: str, **fields) -> ModelArchConfig:
    return ModelArchConfig.from_dict({"architectures": [architecture], **BASE, **fields})


def test_gemma_configs_without_layer_types_follow_each_familys_pattern():
    """Hub configs written before transformers 5: Gemma 2 windows every other layer from layer 0,
    Gemma 3 five of six (sliding_window_pattern), with rope_local_base_freq on the windowed ones."""
    g2 = arch("Gemma2ForCausalLM", sliding_window=4096, query_pre_attn_scalar=224,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    assert [g2.window(i) for i in range(6)] == [4096, None] * 3
    assert g2.attention_scale == 224 ** -0.5 and g2.hidden_act == "gelu_pytorch_tanh"
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (50.0, 30.0)
    g3 = arch("Gemma3ForCausalLM", sliding_window=512, sliding_window_pattern=6, rope_theta=1e6,
              rope_local_base_freq=10000.0, query_pre_attn_scalar=256)
    assert [g3.window(i) for i in range(6)] == [512] * 5 + [None]
    assert (g3.rope_theta, g3.local_rope_theta, g3.qk_norm) == (1e6, 10000.0, True)
    assert g3.attn_logit_softcapping is None


def test_layer_types_decide_where_written():
    """config.json's layer_types wins over the family rule; Qwen2 windows from max_window_layers
    on, only with use_sliding_window; a Llama-family window applies to every layer."""
    types = ["full_attention", "sliding_attention"] * 3
    assert [arch("Gemma2ForCausalLM", sliding_window=8, layer_types=types).window(i)
            for i in range(6)] == [None, 8] * 3
    assert [arch("Qwen2ForCausalLM", sliding_window=8, use_sliding_window=True, max_window_layers=4).window(i)
            for i in range(6)] == [None] * 4 + [8, 8]
    assert arch("Qwen2ForCausalLM", sliding_window=8, use_sliding_window=False).window(5) is None
    assert [arch("MistralForCausalLM", sliding_window=8).window(i) for i in range(6)] == [8] * 6
    assert arch("LlamaForCausalLM").window(0) is None


def test_moe_configs_name_their_experts_either_way():
    """Hub Qwen3-MoE configs say num_experts, transformers 5 writes num_local_experts; dense layers
    are mlp_only_layers plus all but every decoder_sparse_step-th; Mixtral's experts are as wide
    as intermediate_size and always renormalized."""
    hub = arch("Qwen3MoeForCausalLM", num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32,
               mlp_only_layers=[0], decoder_sparse_step=2)
    assert (hub.num_experts, hub.num_experts_per_tok, hub.moe_intermediate_size) == (16, 4, 32)
    assert [hub.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]
    assert not hub.norm_topk_prob and hub.qk_norm
    assert arch("Qwen3MoeForCausalLM", num_local_experts=8, num_experts_per_tok=2).num_experts == 8
    mixtral = arch("MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2)
    assert (mixtral.moe_intermediate_size, mixtral.norm_topk_prob, mixtral.is_moe_layer(5)) == (128, True, True)
    assert not arch("LlamaForCausalLM").is_moe_layer(0)
    with pytest.raises(ValueError, match="num_experts_per_tok must be in"):
        arch("MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=3)


def test_moe_layer_equals_a_loop_over_experts():
    """The grouped-GEMM MoE layer (routing and experts on the device, no host sync) against
    Hugging Face's loop over experts, in float32: same outputs to rounding, with experts that
    get no token, and with one token."""
    from vattention.models.moe import SparseMoE
    from vattention.models.sharding import Shard
    cfg = arch("Qwen3MoeForCausalLM", num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
               norm_topk_prob=True)
    moe = SparseMoE(cfg, Shard(), None)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        for t in (1, 5, 40):
            x = torch.randn(t, cfg.hidden_size)
            probs = torch.softmax(x @ moe.gate.weight.T, dim=-1)
            weights, experts = probs.topk(3, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            want = torch.zeros_like(x)
            for e in range(8):
                tok, slot = (experts == e).nonzero(as_tuple=True)
                gate, up = (x[tok] @ moe.experts.gate_up[e].T).chunk(2, dim=-1)
                y = (torch.nn.functional.silu(gate) * up) @ moe.experts.down[e].T
                want.index_add_(0, tok, y * weights[tok, slot, None])
            got = moe(x)
            assert (got - want).abs().max() < 1e-5, (t, (got - want).abs().max())


@pytest.mark.parametrize("fields,match", [
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "unsupported architecture"),
    ({"sliding_window": 8, "layer_types": ["full_attention"] * 5}, "each of the 6 layers"),
    ({"sliding_window": 8, "layer_types": ["chunked_attention"] * 6}, "each of the 6 layers"),
    ({"hidden_activation": "relu"}, "activation 'relu'"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
])
def test_what_cannot_run_is_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelArchConfig.from_dict({"architectures": ["Gemma3ForCausalLM"], **BASE, **fields})


def test_flash_refuses_soft_capped_scores_and_the_rest_serve_them():
    """aten's FA2 takes no soft-cap: the flash backend is refused for Gemma 2 at start."""
    with pytest.raises(ValueError, match="cannot soft-cap"):
        make_backend("flash", "contiguous", 64, torch.device("cuda"), softcapped=True)
    for name, kind in (("sdpa", "contiguous"), ("flex", "paged"), ("reference", "paged")):
        assert make_backend(name, kind, 64, torch.device("cpu"), 16, softcapped=True).name == name


@pytest.mark.parametrize("kv_cache", ["vattention", "paged"])
def test_a_windowed_mistral_attends_within_its_window(tmp_path, kv_cache):
    """Mistral v0.1's window on every layer is real attention (it once only capped the context):
    prompts and outputs past the window give HF's tokens."""
    hf = make_checkpoint("mistral", tmp_path, sliding_window=8)
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", kv_cache=kv_cache,
              kv_cache_memory_gib=0.05, page_size=64 << 10)
    prompts = [list(range(20, 61)), [5, 9, 13]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12)[0]
    assert llm.engine.max_model_len == 1024  # the window caps no context
    llm.close()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_prefix_hits_give_the_uncached_tokens(tmp_path, family):
    """Windowed layers read the same cached pages: a prompt that shares a long prefix (past the
    window) with an earlier one gives the tokens it gives with caching off."""
    make_checkpoint(family, tmp_path)
    shared = list(range(30, 90))
    prompts = [shared + [7, 8], shared + [100, 101, 102]]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = []
    for caching in (False, True):
        llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", kv_cache_memory_gib=0.05,
                  page_size=4096, enable_prefix_caching=caching)
        got = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]  # one after the other
        if caching:
            assert llm.engine.stats().prefix_cache_hits > 0
        llm.close()
        want.append(got)
    assert want[0] == want[1]


@pytest.mark.parametrize("preset", ["gemma-2-9b", "gemma-3-1b", "phi-3-mini", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_family_presets_are_real_shapes(preset, tmp_path):
    """The dummy-weight presets parse, and a copy shrunk to two layers and a small width runs."""
    cfg = ModelArchConfig.from_dict(PRESETS[preset])
    assert cfg.num_layers > 2 and cfg.architecture in ("Gemma2ForCausalLM", "Gemma3ForCausalLM",
                                                       "Phi3ForCausalLM", "Qwen3MoeForCausalLM",
                                                       "MixtralForCausalLM")
    small = {**PRESETS[preset], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "moe_intermediate_size": 32, "num_experts": 8, "num_local_experts": 8,
             "vocab_size": 300, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
    (tmp_path / "config.json").write_text(json.dumps(small))
    llm = LLM(model=str(tmp_path), device="cpu", dtype="float32", load_format="dummy",
              kv_cache_memory_gib=0.05)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    llm.close()
