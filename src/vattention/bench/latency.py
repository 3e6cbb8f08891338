"""`vattention bench latency`: time of one decode step against batch size, beside the memory roofline.

    vattention bench latency --model llama-3-8b --load-format dummy --device cuda \
        --kv-caches vattention:triton,vattention:flash,paged:triton --batch-sizes 1,8,32,64,128,256

For each KV design in turn (one LLM, closed and freed before the next) and each batch size B:
submit B requests of --input-len random tokens (greedy, ignore_eos, max_tokens enough for what
follows), step until every request has finished its prompt, run --warmup-steps decode steps,
then --decode-steps steps of exactly B sequences x B tokens three times: back to back, each
between two synchronizes, and under the profiler; then abort the batch. Back to back is what
serving does: the engine launches step N before collecting step N-1's tokens, so host work
overlaps the device's; a synchronize around every step would undo that.

  wall ms       wall time of the back-to-back steps / the steps (synchronized before and after)
  synced ms     median engine.step() wall time with a synchronize before and after each step:
                no overlap, host and device time add up
  host ms       mean host time per back-to-back step (engine.last_step.host_s: scheduling,
                inputs, launches, outputs; not waiting for the device); "-" where not reported
  GPU busy ms   device time of every kernel and copy in the profiled steps (torch.profiler, CUDA
                activity) / the steps; "-" on CPU
  wall/busy     wall / GPU busy: 1 when the device never waits for the host
  roofline ms   (weight bytes + KV bytes read) / copy bandwidth: the least time a step can take
                  weight bytes   every parameter once (tied embeddings once; the rank's shard under TP)
                  KV bytes read  B x mean context length x bytes per token (all layers' K and V)
                  copy bandwidth bytes read + written per second by one large copy within the
                                 device, measured here (median of several; a host memcpy on CPU)
  of busy, of wall   roofline / GPU busy and roofline / wall: the share of the bound reached

Every measured step is checked to have scheduled B sequences of one token each (engine.stats()
before and after; engine.last_step of each step). JSON from before the overlapped loop has no
synced or host time, and its wall_ms is the synchronized median.

Designs: --kv-caches takes KIND[:BACKEND] entries (vattention:flash, paged:triton); an entry
without a backend uses --attention-backend. Also reported: each design's start time (LLM(...)
to ready: weights, KV cache, CUDA-graph capture) and each (design, B)'s top kernels by GPU time.
Batch sizes above --max-num-seqs (here 256 unless given) are skipped with a note. Under tensor
parallelism the profile and the bytes are rank 0's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..cli_args import add_dataclass_args, dataclass_values
from ..config import ENGINE_CONFIGS
from ..sampling_params import SamplingParams
from .kernels import gpu_tag
from .report import copy_bandwidth, device_name, free_device_memory, print_table, share, write_json

if TYPE_CHECKING:
    from ..engine.stats import EngineStats, StepTiming

MIB = 1 << 20
TOP_KERNELS = 8
NAME_CHARS = 60  # kernel names are C++ signatures; the table keeps their start
SPARE_TOKENS = 8  # max_tokens beyond the steps planned, so no request ends inside the window


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vattention bench latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,32,64,128,256", help="decode batch sizes, in order")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--decode-steps", type=int, default=32, help="decode-only steps timed per batch")
    p.add_argument("--warmup-steps", type=int, default=4, help="decode steps run before timing")
    p.add_argument("--profile-steps", type=int, default=4, help="decode steps under the profiler (CUDA)")
    p.add_argument("--kv-caches", default="vattention,paged",
                   help="designs, in order: KIND[:BACKEND], e.g. vattention:triton,vattention:flash,paged:triton")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="bytes of the bandwidth copy, MiB (default: 2048 on CUDA, 256 on CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/"
                   "latency_<model>_<device>.json); the PNG goes beside it")
    p.add_argument("--plot-from", default=None, help="redraw the tables and PNG of this JSON, run nothing")
    for cls in ENGINE_CONFIGS:
        add_dataclass_args(p, cls, skip=("kv_cache",))
    p.set_defaults(max_num_seqs=256)  # the largest default batch
    seqs = next(a for a in p._actions if a.dest == "max_num_seqs")
    seqs.help = seqs.help.rsplit(" (default:", 1)[0] + " (default here: 256)"
    return p.parse_args(argv)


def designs(ns: argparse.Namespace) -> list[dict]:
    """Per-design engine options from --kv-caches, in order."""
    out = []
    for entry in _csv(ns.kv_caches):
        kind, _, backend = entry.partition(":")
        out.append({"kv_cache": kind, **({"attention_backend": backend} if backend else {})})
    return out


def label(design: dict) -> str:
    return design["kv_cache"] + (f" {design['attention_backend']}" if "attention_backend" in design else "")


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter, each storage once (a tied lm_head is the embedding)."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return sum(seen.values())


def kv_bytes_per_token(engine) -> int:
    """K and V of one token in every layer, for this rank's KV heads."""
    arch = engine.model.config
    heads = engine.model.shard.num_kv_heads(arch)
    return arch.num_layers * 2 * heads * arch.head_dim * engine.dtype.itemsize


def run_design(design: dict, ns: argparse.Namespace, bandwidth: float) -> tuple[dict, list[dict]]:
    """One LLM: its start time, then every batch size that fits; (design record, batch records)."""
    from ..engine import LLM
    kwargs = {}
    for cls in ENGINE_CONFIGS:
        kwargs.update(dataclass_values(ns, cls, skip=("kv_cache",)))
    start = time.perf_counter()
    llm = LLM(**{**kwargs, **design})
    engine = llm.engine
    _sync(engine)
    record = {"design": label(design), **design, "start_s": time.perf_counter() - start,
              "attention_backend_used": engine.attention_backend, "cuda_graphs": engine.cuda_graphs,
              "weight_bytes": weight_bytes(engine.model), "kv_bytes_per_token": kv_bytes_per_token(engine)}
    rows, rng = [], random.Random(ns.seed)
    try:
        for batch in [int(b) for b in _csv(ns.batch_sizes)]:
            row = {"design": record["design"], "batch_size": batch}
            if batch > ns.max_num_seqs:
                row["skipped"] = f"batch {batch} is above --max-num-seqs {ns.max_num_seqs}"
            else:
                try:
                    row.update(measure_batch(engine, batch, ns, rng))
                    row.update(roofline(row, record, bandwidth))
                except Exception as e:  # noqa: BLE001 - recorded; the other batch sizes still run
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {e}"
            if "skipped" in row or "error" in row:
                print(f"  {record['design']} batch {batch}: {row.get('skipped') or row['error']}")
            rows.append(row)
    finally:
        llm.close()
        del llm, engine
        free_device_memory()
    return record, rows


def measure_batch(engine, batch: int, ns: argparse.Namespace, rng: random.Random) -> dict:
    """Wall and host times of decode-only steps of exactly `batch` sequences, then their kernels' time."""
    limits = engine.limits
    prefill_steps = -(-batch * ns.input_len // engine.config.scheduler.max_num_batched_tokens)
    # The first requests decode while the others prefill, and their decode tokens take some of the
    # step's budget: twice the bare prefill steps leaves room for both.
    max_prefill_steps = 2 * prefill_steps + SPARE_TOKENS
    max_tokens = (max_prefill_steps + ns.warmup_steps + 2 * ns.decode_steps + ns.profile_steps
                  + SPARE_TOKENS)
    if ns.input_len + max_tokens > limits.max_request_tokens:
        raise ValueError(f"{ns.input_len} prompt + {max_tokens} output tokens exceed what a request may "
                         f"hold ({limits.max_request_tokens}); raise --max-model-len or lower --input-len")
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ids = [engine.add_request([rng.randrange(limits.vocab_size) for _ in range(ns.input_len)], params)
           for _ in range(batch)]
    try:
        num_steps = _prefill(engine, batch, max_prefill_steps)
        _run_steps(engine, ns.warmup_steps)
        before = engine.stats()
        wall_s, timings = _back_to_back(engine, ns.decode_steps)
        after = engine.stats()
        synced_s, synced = _synced(engine, ns.decode_steps)
        busy_ms, kernels, profiled = profile_steps(engine, ns.profile_steps)
        _check_steps(timings + synced + profiled, batch)
    finally:
        for request_id in ids:
            engine.abort(request_id)
    decode_tokens = _decoded_tokens(before, after, batch, ns.decode_steps)
    # the timed steps read contexts c+1 .. c+n tokens (c held before them): the mean is c + (n+1)/2
    context_len = (before.num_context_tokens + after.num_context_tokens) / (2 * batch) + 0.5
    host = [t.host_s for t in timings if t is not None]
    wall_ms = 1e3 * wall_s
    return {"decode_batch": after.num_decoding, "decode_tokens": decode_tokens, "prefill_steps": num_steps,
            "num_timed_steps": len(timings), "context_len": context_len, "wall_ms": wall_ms,
            "wall_ms_synced": 1e3 * statistics.median(synced_s),
            "host_ms": 1e3 * statistics.fmean(host) if len(host) == len(timings) else None,
            "gpu_busy_ms": busy_ms, "wall_vs_gpu_busy": wall_ms / busy_ms if busy_ms else None,
            "top_kernels": kernels}


def _prefill(engine, batch: int, max_steps: int) -> int:
    """Step until all `batch` requests are past their prompts; the steps it took."""
    num_steps = 0
    while not _all_decoding(engine.stats(), batch):
        if num_steps == max_steps:
            raise RuntimeError(f"the {batch} requests were not all decoding after {num_steps} steps; "
                               f"the KV cache may hold fewer (raise --kv-cache-memory-gib)")
        engine.step()
        num_steps += 1
    return num_steps


def _run_steps(engine, num_steps: int) -> list[StepTiming | None]:
    """engine.step() `num_steps` times, back to back; what each reported about itself."""
    timings = []
    for _ in range(num_steps):
        engine.step()
        timings.append(engine.last_step)
    return timings


def _back_to_back(engine, num_steps: int) -> tuple[float, list[StepTiming | None]]:
    """(wall seconds per step, the steps' timings) of `num_steps` steps, synchronized only around
    the run, so that each step's host work overlaps the device's work on the one before."""
    _sync(engine)
    t0 = time.perf_counter()
    timings = _run_steps(engine, num_steps)
    _sync(engine)
    return (time.perf_counter() - t0) / num_steps, timings


def _synced(engine, num_steps: int) -> tuple[list[float], list[StepTiming | None]]:
    """(wall seconds of each, their timings) of `num_steps` steps each between two synchronizes."""
    seconds, timings = [], []
    for _ in range(num_steps):
        _sync(engine)
        t0 = time.perf_counter()
        timings += _run_steps(engine, 1)
        _sync(engine)
        seconds.append(time.perf_counter() - t0)
    return seconds, timings


def profile_steps(engine, num_steps: int) -> tuple[float | None, list[dict], list[StepTiming | None]]:
    """(device ms per step, top kernels by device time, the steps' timings) over `num_steps`
    decode steps; (None, [], []) on CPU, and no time or kernels where the profiler records no
    device activity."""
    if engine.device.type != "cuda" or num_steps < 1:
        return None, [], []
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    _sync(engine)  # no earlier step's kernels in the window
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        timings = _run_steps(engine, num_steps)
        _sync(engine)
    totals: dict[str, list[float]] = {}  # kernel name -> [device us, calls]
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            entry = totals.setdefault(event.name, [0.0, 0])
            entry[0] += event.time_range.elapsed_us()
            entry[1] += 1
    if not totals:
        return None, [], timings
    top = sorted(totals.items(), key=lambda kv: -kv[1][0])[:TOP_KERNELS]
    kernels = [{"name": name[:NAME_CHARS], "ms_per_step": us / 1e3 / num_steps, "calls_per_step": calls / num_steps}
               for name, (us, calls) in top]
    return sum(us for us, _ in totals.values()) / 1e3 / num_steps, kernels, timings


def roofline(row: dict, record: dict, bandwidth: float) -> dict:
    kv_bytes = int(row["batch_size"] * row["context_len"] * record["kv_bytes_per_token"])
    ms = 1e3 * (record["weight_bytes"] + kv_bytes) / bandwidth
    busy = row["gpu_busy_ms"]
    return {"kv_bytes_read": kv_bytes, "roofline_ms": ms, "roofline_vs_wall": ms / row["wall_ms"],
            "roofline_vs_gpu_busy": ms / busy if busy else None}


def _all_decoding(stats: EngineStats, batch: int) -> bool:
    return stats.num_waiting == 0 and stats.num_running == stats.num_decoding == batch


def _decoded_tokens(before: EngineStats, after: EngineStats, batch: int, num_steps: int) -> int:
    """Tokens per timed step, from the context the batch gained; raises unless the batch stayed
    whole and each step computed one token per sequence (a decode step gives each at most one)."""
    gained = after.num_context_tokens - before.num_context_tokens
    if not _all_decoding(after, batch) or gained != batch * num_steps:
        raise RuntimeError(f"over {num_steps} timed steps the {batch} sequences gained {gained} tokens, "
                           f"not {batch * num_steps}, and {after.num_decoding} of {after.num_running} "
                           f"running decode ({after.num_waiting} waiting): a request was preempted or finished")
    return gained // num_steps


def _check_steps(timings: list[StepTiming | None], batch: int) -> None:
    """Every measured step scheduled `batch` sequences of one token each (where it reported itself)."""
    shapes = {(t.num_seqs, t.num_tokens) for t in timings if t is not None}
    if shapes - {(batch, batch)}:
        raise RuntimeError(f"measured steps scheduled (sequences, tokens) = {sorted(shapes)}, "
                           f"not ({batch}, {batch}): a request was preempted or finished")


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def run(ns: argparse.Namespace) -> dict:
    """The copy bandwidth once, then every design; one that fails to start is recorded."""
    from ..config import ModelConfig
    device = ModelConfig(**dataclass_values(ns, ModelConfig)).torch_device()
    num_bytes = (ns.copy_mib or (2048 if device.type == "cuda" else 256)) * MIB
    bandwidth = copy_bandwidth(device, num_bytes)
    free_device_memory()
    print(f"copy bandwidth within {device}: {bandwidth / 1e9:.0f} GB/s (read + write)")
    records, rows = [], []
    for design in designs(ns):
        try:
            record, design_rows = run_design(design, ns, bandwidth)
        except Exception as e:  # noqa: BLE001 - reported in the results, not swallowed
            traceback.print_exc()
            free_device_memory()
            record, design_rows = {"design": label(design), **design, "error": f"{type(e).__name__}: {e}"}, []
        records.append(record)
        rows += design_rows
    return {"device": device_name(device.type), "device_type": device.type, "torch": torch.__version__,
            "model": str(ns.model), "load_format": ns.load_format, "dtype": ns.dtype, "input_len": ns.input_len,
            "decode_steps": ns.decode_steps, "warmup_steps": ns.warmup_steps, "profile_steps": ns.profile_steps,
            "copy_bytes": num_bytes, "copy_bandwidth_GBps": bandwidth / 1e9,
            "engine": {k: getattr(ns, k) for k in ("layout", "max_model_len", "kv_cache_memory_gib", "max_num_seqs",
                                                   "max_num_batched_tokens", "enforce_eager", "attention_backend",
                                                   "tensor_parallel_size")},
            "designs": records, "runs": rows}


def print_results(res: dict) -> None:
    print_table(f"{res['device']}: {res['model']} ({res['load_format']}), {res['input_len']}-token prompts, "
                f"copy bandwidth {res['copy_bandwidth_GBps']:.0f} GB/s",
                ["design", "backend", "graphs", "start s", "weights GB"],
                [[d["design"], d.get("attention_backend_used", "-"), d.get("cuda_graphs", "-"),
                  d.get("start_s", "-"), d["weight_bytes"] / 1e9 if "weight_bytes" in d else "-"]
                 for d in res["designs"]])
    ok = [r for r in res["runs"] if "wall_ms" in r]
    print_table("decode step (ms per step; wall: back to back, synced: median of synchronized steps)",
                ["design", "batch", "context", "wall", "synced", "host", "GPU busy", "wall/busy", "roofline",
                 "of busy", "of wall"],
                [[r["design"], r["decode_batch"], r["context_len"], r["wall_ms"], _or_dash(r.get("wall_ms_synced")),
                  _or_dash(r.get("host_ms")), _or_dash(r["gpu_busy_ms"]), _or_dash(r.get("wall_vs_gpu_busy")),
                  r["roofline_ms"], share(r["roofline_vs_gpu_busy"]), share(r["roofline_vs_wall"])] for r in ok])
    for r in ok:
        if r["top_kernels"]:
            print_table(f"top kernels: {r['design']}, batch {r['batch_size']} (GPU busy {r['gpu_busy_ms']:.3g} ms)",
                        ["kernel", "ms/step", "calls/step"],
                        [[k["name"], k["ms_per_step"], k["calls_per_step"]] for k in r["top_kernels"]])
    for entry in [*res["designs"], *res["runs"]]:
        if "error" in entry or "skipped" in entry:
            where = entry["design"] + (f", batch {entry['batch_size']}" if "batch_size" in entry else "")
            print(f"  {where}: {entry.get('skipped') or entry['error']}")


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path}; redraw later with --plot-from {path.with_suffix('.json')}")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in res["runs"] if "wall_ms" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, name in enumerate(dict.fromkeys(r["design"] for r in ok)):
        rows = [r for r in ok if r["design"] == name]
        ax.plot([r["batch_size"] for r in rows], [r["wall_ms"] for r in rows], "o-", color=f"C{i}",
                label=f"{name}: wall")
        busy = [r for r in rows if r["gpu_busy_ms"]]
        if busy:
            ax.plot([r["batch_size"] for r in busy], [r["gpu_busy_ms"] for r in busy], "s--", color=f"C{i}",
                    label=f"{name}: GPU busy")
    first = [r for r in ok if r["design"] == ok[0]["design"]] if ok else []
    ax.plot([r["batch_size"] for r in first], [r["roofline_ms"] for r in first], "k:", label="roofline")
    ax.set_xscale("log", base=2)
    batches = sorted({r["batch_size"] for r in ok})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("decode batch (sequences)")
    ax.set_ylabel("ms per decode step")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(f"{res['model']}, {res['input_len']}-token prompts, on {res['device']}", fontsize=9)
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
        model = Path(ns.model).name if ns.model else "smollm2"
        device = gpu_tag(res["device"]) if res["device_type"] == "cuda" else "cpu"
        out = Path(ns.out or f"benchmarks/results/latency_{model}_{device}.json")
        write_json(out, res)
    print_results(res)
    plot(res, out.with_suffix(".png"))
    print(f"\n{out} and {out.with_suffix('.png')}")
    return 0


def _or_dash(value: float | None) -> float | str:
    """A value for the table; one not measured (CPU, an older file) as "-"."""
    return "-" if value is None else value


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
