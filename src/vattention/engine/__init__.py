"""The serving engine. One owner per kind of state; data flows one way:

    LLM.generate / AsyncEngine ─> LLMEngine.add_request (validation.py: RequestLimits, one place)
    LLMEngine.step = schedule ─> execute ─> update, overlapped one step deep:

      host   | schedule N | launch N | collect N-1, update | sample N | schedule N+1 | launch N+1 | ...
      device |   ... step N-1 ...   |        step N (forward, then sampling)       |  step N+1 ...

      Scheduler.schedule ─> SchedulerOutput (step_io.py)      request state: scheduler.py, request.py
          (asks the KV manager, kv/: can this request hold n more tokens? mapping happens here,
           while the device runs the step before)
      ModelRunner.launch ─> StepStaging (pinned) ─> model + AttentionBackend ─> logits
          (decode-only steps on one GPU: a CUDA graph of the model body, graphs.py; a decoding
           request's input id is the previous step's sample, read on the device)
      ModelRunner.sample ─> Sampler on the device ─> one non-blocking copy to pinned memory
      Scheduler.update_from_output ─> OutputProcessor (incremental detokenizer, stop rules)
          ─> RequestOutput by output kind (cumulative, delta, final only) ─> caller
      LLMEngine.stats() ─> EngineStats: what the server and benchmarks read (stats.py)
"""

from .engine import LLMEngine
from .llm import LLM, GenerationError

__all__ = ["LLM", "LLMEngine", "GenerationError"]
