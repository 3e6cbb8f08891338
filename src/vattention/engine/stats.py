"""EngineStats: what the engine reports about itself, for the server's /metrics and /health and
for the benchmarks (public: nothing outside the engine reads the scheduler or KV manager)."""

from __future__ import annotations

from dataclasses import dataclass

from ..kv import KVUsage


@dataclass(frozen=True)
class StepTiming:
    """One engine.step(), as the host saw it."""

    num_seqs: int  # sequences the step scheduled (0: it only collected an earlier step's results)
    num_tokens: int  # tokens it computes
    host_s: float  # seconds the host was busy in step() (scheduling, inputs, launches, outputs)
    wait_s: float  # seconds step() waited for the device (for an earlier step's sampled tokens)


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences in the running batch (each of a request's n samples counts)
    num_waiting: int  # sequences queued for admission (new or preempted)
    num_decoding: int  # running sequences past their prompt
    num_context_tokens: int  # tokens the running sequences hold in KV
    num_preemptions: int  # sequences preempted since the engine started
    kv: KVUsage  # KV memory now (kept as counters: cheap every step)
    last_step: StepTiming | None  # the latest step() call
    prefix_cache_queries: int = 0  # tokens of sequences admitted from scratch (looked up in the prefix cache)
    prefix_cache_hits: int = 0  # of those, tokens found cached (not computed)
    num_prompt_tokens_computed: int = 0  # prompt tokens scheduled for computing since the start
    num_generated_tokens: int = 0  # output tokens produced since the start
