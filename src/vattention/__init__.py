"""vattention: LLM serving with the KV cache in contiguous virtual memory.

`vattention.memory` is the heart and stands alone (torch + cuda-bindings only): virtual KV tensors
whose physical pages are mapped on demand. The engine, server and benchmarks build on it.
"""

__version__ = "0.1.0"

from .outputs import CompletionOutput, RequestOutput  # noqa: E402
from .sampling_params import SamplingParams, StructuredOutputs  # noqa: E402


def __getattr__(name: str):
    # LLM pulls in the model stack; import it on first use so `vattention.memory` stays light.
    if name in ("LLM", "LLMEngine", "GenerationError"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module 'vattention' has no attribute {name!r}")


__all__ = ["LLM", "LLMEngine", "GenerationError", "SamplingParams", "StructuredOutputs", "RequestOutput",
           "CompletionOutput"]
