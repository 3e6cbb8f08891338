"""Well-known model shapes, for `--load-format dummy` benchmarks at real sizes without weights."""

from __future__ import annotations

_LLAMA3 = {"rope_theta": 500000.0, "rms_norm_eps": 1e-5, "vocab_size": 128256,
           "max_position_embeddings": 8192, "bos_token_id": 128000, "eos_token_id": 128001,
           "architectures": ["LlamaForCausalLM"]}

PRESETS: dict[str, dict] = {
    "llama-3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "yi-6b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 4,
              "vocab_size": 64000, "rope_theta": 5000000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 200000, "bos_token_id": 1, "eos_token_id": 2},
    "yi-34b": {"architectures": ["LlamaForCausalLM"], "hidden_size": 7168, "intermediate_size": 20480,
               "num_hidden_layers": 60, "num_attention_heads": 56, "num_key_value_heads": 8,
               "vocab_size": 64000, "rope_theta": 5000000.0, "rms_norm_eps": 1e-5,
               "max_position_embeddings": 200000, "bos_token_id": 1, "eos_token_id": 2},
    "qwen3-8b": {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096, "intermediate_size": 12288,
                 "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "max_position_embeddings": 40960, "tie_word_embeddings": False,
                 "bos_token_id": 151643, "eos_token_id": 151645},
}
