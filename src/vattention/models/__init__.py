"""Models and what they need: architecture configs (config.py), the Llama-family decoder
(llama.py) and its fused elementwise ops (fused.py: eager PyTorch, or on CUDA the Triton kernels
of fused_kernels.py), Gemma 2 / 3 on top of it (gemma.py), the mixture-of-experts MLP of Mixtral
and Qwen3-MoE (moe.py), weight loading (loader.py; gemma.model_class picks the decoder class),
preset shapes for dummy weights (presets.py), the tokenizer (tokenizer.py) and the built-in
default model imported from GGUF (gguf_import.py).

    config.json ─ ModelArchConfig ─ model_class ─ LlamaForCausalLM | GemmaForCausalLM
        each layer: Attention (window, soft-cap per layer) + MLP | SparseMoE (per layer)
"""
