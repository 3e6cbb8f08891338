"""The fused decoder (merged qkv / gate_up projections, fused norm + residual add, RoPE and
SiLU * up) against the unfused reference (tests/unfused_llama.py) on the same checkpoints:
greedy tokens equal and logprobs within 1e-4 in float32, in bfloat16 as close to float32 as the
unfused model; the merged weights are the checkpoint tensors stacked, per tensor-parallel rank
too; loading still refuses a checkpoint with missing, unexpected or misshapen tensors.

On CPU the fused ops run their eager path (the Triton kernels are checked under the interpreter
in test_fused_kernels.py); with VATTENTION_TEST_DEVICE=cuda both models run on the GPU and the
fused one through the Triton kernels.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vattention.models.loader import build_model, init_dummy, load_model, load_safetensors, resolve_arch_config
from vattention.models.sharding import Shard

from engine_helpers import LLAMA_FAMILIES, make_checkpoint
from unfused_llama import checkpoint_state, greedy, load_unfused, prefill_logits

DEVICE = os.environ.get("VATTENTION_TEST_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("VATTENTION_TEST_DEVICE=cuda but no CUDA device", allow_module_level=True)
PROMPTS = [[5, 9, 13], list(range(20, 61)), [7], list(range(100, 117))]  # mixed lengths
NUM_TOKENS = 12
CASES = {**{family: (family, {}) for family in LLAMA_FAMILIES},  # llama: tied embeddings; qwen2: q/k/v biases
         "mha-one-kv-head": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": False}),
         "mlp-bias": ("llama", {"mlp_bias": True})}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_checkpoint(family, path, **overrides)
    if overrides.get("mlp_bias"):  # HF initialises biases to zero; make them matter
        state = load_file(str(path / "model.safetensors"))
        gen = torch.Generator().manual_seed(1)
        for name, t in state.items():
            if name.endswith("bias"):
                state[name] = torch.randn(t.shape, generator=gen) * 0.5
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_fused_float32_gives_the_unfused_greedy_tokens(checkpoint):
    """float32: the same greedy tokens through prefill and 11 decode steps, logprobs within 1e-4."""
    fused = load_model(checkpoint, "safetensors", torch.device(DEVICE), torch.float32)
    reference = load_unfused(checkpoint, DEVICE, torch.float32)
    got_tokens, got_logprobs = greedy(fused, PROMPTS, NUM_TOKENS)
    want_tokens, want_logprobs = greedy(reference, PROMPTS, NUM_TOKENS)
    assert got_tokens == want_tokens
    diff = max(abs(a - b) for x, y in zip(got_logprobs, want_logprobs) for a, b in zip(x, y))
    assert diff < 1e-4, f"logprobs differ by up to {diff:.2e}"


def test_fused_bfloat16_logits_are_as_close_to_float32_as_the_unfused(checkpoint):
    """bfloat16: each prompt's prefill logits are as close to the float32 reference's as the
    unfused model's in bfloat16 are (within 1.5x, plus 0.5 % of the largest logit): fusing
    changes where bfloat16 rounds, not how much. Both stay within 5 % of the largest logit."""
    fused = load_model(checkpoint, "safetensors", torch.device(DEVICE), torch.bfloat16)
    unfused = load_unfused(checkpoint, DEVICE, torch.bfloat16)
    truth = prefill_logits(load_unfused(checkpoint, DEVICE, torch.float32), PROMPTS)
    scale = truth.abs().max().item()
    err = {name: ((prefill_logits(model, PROMPTS) - truth).abs().max() / scale).item()
           for name, model in (("fused", fused), ("unfused", unfused))}
    assert err["fused"] <= 1.5 * err["unfused"] + 5e-3, f"bfloat16 errors vs float32 (of the largest logit): {err}"
    assert max(err.values()) < 5e-2, f"bfloat16 errors vs float32 (of the largest logit): {err}"


def _stacked(full: dict, prefix: str, parts: list[str], leaf: str, rows: list[slice]) -> torch.Tensor:
    return torch.cat([full[f"{prefix}{part}.{leaf}"][r] for part, r in zip(parts, rows)])


@pytest.mark.parametrize("world_size", [1, 2])
def test_merged_weights_are_the_stacked_checkpoint_tensors(checkpoint, world_size):
    """Every layer, every rank: qkv_proj = [its q rows; its k rows; its v rows] of q_proj/k_proj/
    v_proj (kv heads replicated when fewer than ranks), gate_up_proj = [its gate rows; its up
    rows], biases alike; every other parameter as in the checkpoint."""
    cfg = resolve_arch_config(checkpoint)
    full = checkpoint_state(checkpoint, cfg)  # Phi-3's fused tensors split into their parts
    d = cfg.head_dim
    for rank in range(world_size):
        shard = Shard(rank, world_size)
        model = build_model(cfg, torch.device("cpu"), torch.float32, shard)
        load_safetensors(model, checkpoint)
        got = dict(model.named_parameters())
        q, kv = shard.num_heads(cfg) * d, shard.num_kv_heads(cfg) * d
        q_rows = slice(rank * q, (rank + 1) * q)
        kv_start = shard.kv_head_start(cfg) * d
        kv_rows = slice(kv_start, kv_start + kv)
        width = cfg.intermediate_size // world_size
        mlp_rows = slice(rank * width, (rank + 1) * width)
        for layer in range(cfg.num_layers):
            attn, mlp = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
            leaves = ["weight", "bias"] if cfg.attention_bias else ["weight"]
            for leaf in leaves:
                want = _stacked(full, attn, ["q_proj", "k_proj", "v_proj"], leaf, [q_rows, kv_rows, kv_rows])
                assert torch.equal(got[f"{attn}qkv_proj.{leaf}"], want), f"rank {rank} {attn}qkv_proj.{leaf}"
            for leaf in ["weight", "bias"] if cfg.mlp_bias else ["weight"]:
                want = _stacked(full, mlp, ["gate_proj", "up_proj"], leaf, [mlp_rows, mlp_rows])
                assert torch.equal(got[f"{mlp}gate_up_proj.{leaf}"], want), f"rank {rank} {mlp}gate_up_proj.{leaf}"
            assert torch.equal(got[f"{attn}o_proj.weight"], full[f"{attn}o_proj.weight"][:, q_rows])
            norm = f"model.layers.{layer}.input_layernorm.weight"
            assert torch.equal(got[norm], full[norm])
        if world_size == 1:
            for name, param in got.items():
                if "qkv_proj" not in name and "gate_up_proj" not in name:
                    assert torch.equal(param, full[name]), name


def test_dummy_weights_have_the_merged_shapes(tmp_path):
    """--load-format dummy: qkv_proj [(H_q + 2 H_kv) D, hidden] and gate_up_proj [2 I, hidden]
    per rank, random matrices and unit norms."""
    make_checkpoint("llama", tmp_path, num_key_value_heads=1)
    cfg = resolve_arch_config(tmp_path)
    d, hidden = cfg.head_dim, cfg.hidden_size
    for shard, kv_heads in ((Shard(), 1), (Shard(1, 2), 1)):
        model = build_model(cfg, torch.device("cpu"), torch.float32, shard)
        init_dummy(model, seed=3)
        layer = model.model.layers[0]
        q_heads = cfg.num_heads // shard.world_size
        assert layer.self_attn.qkv_proj.weight.shape == ((q_heads + 2 * kv_heads) * d, hidden)
        assert layer.mlp.gate_up_proj.weight.shape == (2 * cfg.intermediate_size // shard.world_size, hidden)
        assert layer.self_attn.qkv_proj.weight.std() > 0.01
        assert torch.equal(layer.input_layernorm.weight, torch.ones(hidden))


@pytest.mark.parametrize("change,message", [
    ("drop", r"lacks 1 weights, e\.g\. \['model\.layers\.1\.self_attn\.k_proj\.weight'\]"),
    ("merged-name", r"model\.layers\.0\.self_attn\.[qkv]_proj\.weight is given twice"),
    ("extra", r"tensor 'model\.layers\.0\.mlp\.extra_proj\.weight' matches no parameter"),
    ("shape", r"model\.layers\.0\.mlp\.up_proj\.weight has shape \(127, 64\), the config implies \(128, 64\)"),
], ids=["missing-part", "merged-name", "unknown-name", "wrong-shape"])
def test_loading_refuses_missing_unexpected_and_misshapen_tensors(tmp_path, change, message):
    """Checkpoints name q/k/v and gate/up separately (or fused, as Phi-3's): a missing part, a
    weight given both ways, an unknown name and a wrong shape are refused, naming the tensor."""
    make_checkpoint("llama", tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    if change == "drop":
        del state["model.layers.1.self_attn.k_proj.weight"]
    elif change == "merged-name":  # the fused tensor beside its parts (as Phi-3 names it)
        attn = "model.layers.0.self_attn."
        state[attn + "qkv_proj.weight"] = torch.cat([state[attn + p + ".weight"] for p in ("q_proj", "k_proj", "v_proj")])
    elif change == "extra":
        state["model.layers.0.mlp.extra_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].clone()
    else:
        state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
    save_file({n: t.contiguous() for n, t in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path, "safetensors", torch.device("cpu"), torch.float32)
