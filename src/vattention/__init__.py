"""vattention: LLM serving with the KV cache in contiguous virtual memory.

`vattention.memory` is the heart and stands alone (torch + cuda-bindings only): virtual KV tensors
whose physical pages are mapped on demand. The engine, server and benchmarks build on it.
"""

__version__ = "0.1.0"
