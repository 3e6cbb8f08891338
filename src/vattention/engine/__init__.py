"""The serving engine. Data flows one way:

    LLM.generate ─> LLMEngine.step ─> Scheduler.schedule ─> SchedulerOutput
        (asks the KV manager: can this request hold n more tokens?)
    SchedulerOutput ─> ModelRunner.execute ─> model + attention backend ─> Sampler
        (decode-only steps on one GPU: a CUDA graph of the model body, graphs.py)
    sampled tokens ─> OutputProcessor (detokenize, stop rules) ─> RequestOutput ─> caller
"""

from .engine import LLMEngine
from .llm import LLM, GenerationError

__all__ = ["LLM", "LLMEngine", "GenerationError"]
