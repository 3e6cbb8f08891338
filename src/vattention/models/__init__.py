"""Models and what they need: architecture configs (config.py), the Llama-family decoder
(llama.py), weight loading (loader.py), preset shapes for dummy weights (presets.py), the
tokenizer (tokenizer.py) and the built-in default model imported from GGUF (gguf_import.py)."""
