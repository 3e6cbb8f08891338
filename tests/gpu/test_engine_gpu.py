"""The engine on the GPU: bf16 with FA2 reading the virtual KV cache, against HF transformers.
bf16 greedy paths may legitimately part where two tokens are near-tied, so (as vLLM's
check_logprobs_close does) tokens must agree with HF bf16 until the first divergence, where each
side's token must be among the other's top candidates. Logprobs are checked against HF in float32
on our own tokens: ours may stray from fp32 no more than HF's bf16 does."""

from __future__ import annotations

import pytest
import torch

from vattention import LLM, SamplingParams

from engine_helpers import make_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (run on the device machine)")

PROMPTS = [[5, 9, 13], list(range(20, 300)), [7], list(range(100, 1200, 3))]
NUM_TOKENS = 24
TOP = 5
CHECKPOINT = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                  initializer_range=0.1)


@torch.no_grad()
def hf_greedy_top(model, prompt, num_tokens):
    """Greedy tokens with HF's KV cache, plus each step's top-TOP {token: logprob}."""
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, max_new_tokens=num_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    tops = []
    for logits in out.logits:
        lp = logits[0].float().log_softmax(-1)
        values, idx = lp.topk(TOP)
        tops.append(dict(zip(idx.tolist(), values.tolist())))
    return tokens, tops


def check_tokens_close(ours, our_tops, theirs, their_tops):
    """Equal until the first divergence; there each side's token is in the other's top-TOP."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert a in their_tops[i] and b in our_tops[i], (
                f"step {i}: ours {a} not in HF's top-{TOP} {their_tops[i]} or HF's {b} not in ours")
            return


@pytest.mark.parametrize("backend", ["auto", "flash"])
@pytest.mark.parametrize("layout", ["cross_layer", "per_layer"])
def test_bf16_greedy_and_logprobs_close_to_hf(tmp_path, layout, backend):
    """The default (our Triton decode, FA2 prefill) and FA2 throughout."""
    hf = make_checkpoint("llama", tmp_path, **CHECKPOINT).to("cuda", torch.bfloat16)
    llm = LLM(model=str(tmp_path), device="cuda", dtype="bfloat16", kv_cache_memory_gib=1.0,
              layout=layout, max_num_batched_tokens=512, attention_backend=backend)
    want = "TritonBackend" if backend == "auto" else "FlashBackend"
    assert type(llm.engine.runner.backend).__name__ == want
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=NUM_TOKENS,
                                                ignore_eos=True, logprobs=TOP))
    hf32 = make_checkpoint("llama", tmp_path / "fp32", **CHECKPOINT).to("cuda")  # same seed: same weights
    for prompt, out in zip(PROMPTS, outs):
        c = out.outputs[0]
        ours_top = [{lp.token_id: lp.logprob for lp in step} for step in c.top_logprobs]
        theirs, theirs_top = hf_greedy_top(hf, prompt, NUM_TOKENS)
        check_tokens_close(c.token_ids, ours_top, theirs, theirs_top)
        # Teacher-forced against HF in float32: every token we chose is (near-)greedy under the
        # fp32 model, and our bf16 logprobs stray from fp32 no more than HF's own bf16 ones do.
        with torch.no_grad():
            ids = torch.tensor([prompt + c.token_ids], device="cuda")
            ref32 = hf32(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)  # [NUM_TOKENS, V]
            ref16 = hf(ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        rows = torch.arange(len(c.token_ids), device="cuda")
        chosen = torch.tensor(c.token_ids, device="cuda")
        assert torch.all(ref32[rows, chosen] >= ref32.max(-1).values - 0.15), "a token is not near-greedy"
        ours = torch.tensor([lp.logprob for lp in c.logprobs], device="cuda")
        err_ours = (ours - ref32[rows, chosen]).abs()
        err_hf = (ref16[rows, chosen] - ref32[rows, chosen]).abs()
        assert err_ours.mean() <= 2 * err_hf.mean() + 0.02, (err_ours.mean(), err_hf.mean())
        assert err_ours.max() < 0.3, err_ours.max()
    llm.close()


def test_flash_and_sdpa_backends_agree_on_the_gpu(tmp_path):
    make_checkpoint("qwen2", tmp_path, vocab_size=2048, hidden_size=128, num_attention_heads=4)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    runs = {}
    for backend in ("flash", "sdpa"):
        llm = LLM(model=str(tmp_path), device="cuda", dtype="float16", kv_cache_memory_gib=0.5,
                  attention_backend=backend, max_num_batched_tokens=64)
        runs[backend] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        llm.close()
    same = sum(a == b for a, b in zip(runs["flash"], runs["sdpa"]))
    assert same >= len(PROMPTS) - 1, runs


def test_kv_designs_give_identical_greedy_outputs_on_the_gpu(tmp_path):
    """Same model, same prompts, bf16: designs that run the same kernels on the same numbers give
    bit-identical tokens (vattention vs static under FA2; vattention vs paged under our Triton
    twins, whose only difference is addressing); FA2, Triton and FlexAttention + PagedAttention
    agree up to near-ties."""
    make_checkpoint("llama", tmp_path, **CHECKPOINT)
    params = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=TOP)
    runs = {}
    for name, options in {
        "vattention-flash": dict(kv_cache="vattention", attention_backend="flash"),
        "static-flash": dict(kv_cache="static", attention_backend="flash", max_model_len=2048,
                             max_num_seqs=8),
        "vattention-triton": dict(kv_cache="vattention", attention_backend="triton"),
        "paged16-triton": dict(kv_cache="paged", block_size=16, attention_backend="triton"),
        "paged128-triton": dict(kv_cache="paged", block_size=128, attention_backend="triton"),
        "paged128-flex": dict(kv_cache="paged", block_size=128, attention_backend="flex"),
        "paged256-flex": dict(kv_cache="paged", block_size=256, attention_backend="flex"),
    }.items():
        llm = LLM(model=str(tmp_path), device="cuda", dtype="bfloat16", kv_cache_memory_gib=1.0,
                  max_num_batched_tokens=512, **options)
        runs[name] = llm.generate(PROMPTS, params)
        llm.close()
    tokens = {name: [o.outputs[0].token_ids for o in outs] for name, outs in runs.items()}
    assert tokens["static-flash"] == tokens["vattention-flash"]
    assert tokens["paged16-triton"] == tokens["vattention-triton"]
    assert tokens["paged128-triton"] == tokens["vattention-triton"]
    pairs = [("vattention-flash", "vattention-triton"), ("paged128-flex", "paged128-triton"),
             ("paged256-flex", "paged128-triton")]
    for a, b in (pair for x, y in pairs for pair in zip(runs[x], runs[y])):
        ca, cb = a.outputs[0], b.outputs[0]
        check_tokens_close(ca.token_ids, [{lp.token_id: lp.logprob for lp in s} for s in ca.top_logprobs],
                           cb.token_ids, [{lp.token_id: lp.logprob for lp in s} for s in cb.top_logprobs])
