"""The periodic one-line engine log that vLLM prints (`--stats-log-interval-s`, 0 = off):

  INFO vattention.stats: prompt throughput 812.4 tok/s, generation throughput 233.0 tok/s,
       running 8 reqs, waiting 0 reqs, KV used 3.1% (committed 4.0%), prefix cache hit rate 41.2%

Throughputs are over the interval; the hit rate is since the start, as vLLM's. A quiet
interval (no tokens and nothing queued) logs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..engine.stats import EngineStats

log = logging.getLogger("vattention.stats")


def stats_line(before: EngineStats, now: EngineStats, seconds: float) -> str | None:
    """The line for the interval from `before` to `now`; None when nothing happened in it."""
    prompt = now.num_prompt_tokens_computed - before.num_prompt_tokens_computed
    generated = now.num_generated_tokens - before.num_generated_tokens
    if not (prompt or generated or now.num_running or now.num_waiting):
        return None
    kv = now.kv
    capacity = kv.bytes_capacity or 1
    hits = 100 * now.prefix_cache_hits / now.prefix_cache_queries if now.prefix_cache_queries else 0.0
    return (f"prompt throughput {prompt / seconds:.1f} tok/s, generation throughput "
            f"{generated / seconds:.1f} tok/s, running {now.num_running} reqs, waiting "
            f"{now.num_waiting} reqs, KV used {100 * kv.bytes_used / capacity:.1f}% (committed "
            f"{100 * kv.bytes_committed / capacity:.1f}%), prefix cache hit rate {hits:.1f}%")


async def log_stats(stats: Callable[[], EngineStats | None], interval_s: float) -> None:
    """Log a line every `interval_s` seconds until cancelled."""
    before, t0 = stats(), time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now, t1 = stats(), time.monotonic()
        if now is not None and before is not None:
            line = stats_line(before, now, t1 - t0)
            if line is not None:
                log.info(line)
        before, t0 = now if now is not None else before, t1
