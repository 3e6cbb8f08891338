"""Models and what they need: architecture configs (config.py), the Llama-family decoder
(llama.py) and its fused elementwise ops (fused.py: eager PyTorch, or on CUDA the Triton kernels
of fused_kernels.py), weight loading (loader.py), preset shapes for dummy weights (presets.py),
the tokenizer (tokenizer.py) and the built-in default model imported from GGUF (gguf_import.py)."""
