"""`vattention bench offline`: end-to-end offline throughput of the engine on a fixed batch.

    vattention bench offline --model llama-3-8b --load-format dummy --num-prompts 256 \
        --input-len 512 --output-len 256

All prompts are submitted at once (random token ids, seeded), the engine runs until every
request finishes (no synchronize between steps: one would undo the overlapped loop), and the
report gives requests/s, output and total tokens/s, mean step time of steps that scheduled
prefill and of decode-only steps ("-" where the engine reports no step timing), and the KV
memory mapped vs used at the peak.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..cli_args import add_dataclass_args, dataclass_values
from ..config import ENGINE_CONFIGS
from ..sampling_params import SamplingParams
from .report import device_name, print_table, write_json
from .throughput import step_kind

MIB = 1 << 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vattention bench offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=64, help="requests in the batch")
    parser.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/offline_<model>_<kv>.json)")
    for cls in ENGINE_CONFIGS:
        add_dataclass_args(parser, cls)
    return parser.parse_args(argv)


def run(ns: argparse.Namespace) -> dict:
    from ..engine import LLM
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(dataclass_values(ns, cls))
    llm = LLM(**kwargs)
    engine = llm.engine
    rng = random.Random(ns.seed)
    vocab = engine.limits.vocab_size
    params = SamplingParams(temperature=0, max_tokens=ns.output_len, ignore_eos=True)
    warm = engine.add_request([rng.randrange(vocab) for _ in range(16)], SamplingParams(max_tokens=4))
    while engine.has_unfinished():  # warm-up: kernels loaded, allocator primed
        engine.step()
    engine.peak_bytes_used = engine.peak_bytes_committed = 0
    del warm
    for _ in range(ns.num_prompts):
        engine.add_request([rng.randrange(vocab) for _ in range(ns.input_len)], params)
    step_times: dict[str, list[float]] = {"prefill": [], "decode": [], "other": []}  # step_kind -> seconds
    bar = tqdm(total=ns.num_prompts, desc=f"{model_label(ns)}: requests done", unit="req", dynamic_ncols=True)
    start = time.perf_counter()
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        step_times[step_kind(engine.last_step)].append(time.perf_counter() - t0)
        bar.update(sum(out.finished for out in outs))
    elapsed = time.perf_counter() - start
    bar.close()
    total_out = ns.num_prompts * ns.output_len
    result = {
        "model": model_label(ns), "kv_cache": ns.kv_cache, "layout": ns.layout,
        "device": device_name(str(engine.device.type)), "torch": torch.__version__,
        "num_prompts": ns.num_prompts, "input_len": ns.input_len, "output_len": ns.output_len,
        "max_num_seqs": ns.max_num_seqs, "max_num_batched_tokens": ns.max_num_batched_tokens,
        "elapsed_s": elapsed, "requests_per_s": ns.num_prompts / elapsed,
        "output_tokens_per_s": total_out / elapsed,
        "total_tokens_per_s": ns.num_prompts * (ns.input_len + ns.output_len) / elapsed,
        "num_steps": sum(len(v) for v in step_times.values()),
        "mean_prefill_step_ms": _mean_ms(step_times["prefill"]),
        "mean_decode_step_ms": _mean_ms(step_times["decode"]),
        "peak_kv_used_mib": engine.peak_bytes_used / MIB,
        "peak_kv_committed_mib": engine.peak_bytes_committed / MIB,
        "kv_counters": engine.stats().kv.counters,
    }
    llm.close()
    return result


def model_label(ns: argparse.Namespace) -> str:
    """The model as the user named it (a preset or a directory); the built-in one by its name."""
    return str(ns.model) if ns.model else "SmolLM2-135M-Instruct"


def _mean_ms(times: list[float]) -> float | None:
    return 1000 * sum(times) / len(times) if times else None


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    result = run(ns)
    keys = ("device", "model", "kv_cache", "layout", "num_prompts", "input_len", "output_len", "elapsed_s",
            "requests_per_s", "output_tokens_per_s", "total_tokens_per_s", "num_steps", "mean_prefill_step_ms",
            "mean_decode_step_ms", "peak_kv_used_mib", "peak_kv_committed_mib")
    rows = [[k, "-" if result[k] is None else result[k]] for k in keys]
    print_table(f"offline throughput: {result['model']} ({ns.load_format} weights), {result['kv_cache']}, "
                f"{result['device']}", ["metric", "value"], rows)
    name = Path(result["model"]).name
    write_json(Path(ns.out or f"benchmarks/results/offline_{name}_{ns.kv_cache}.json"), result)
    return 0
