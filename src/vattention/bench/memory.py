"""Benchmark of the vattention memory library, on the host driver or on CUDA with the same code.

    vattention bench memory --device cpu                    # HostDriver (memfd + mmap)
    vattention bench memory --device cpu --page-size 65536  # the paper's small pages
    vattention bench memory --device cuda                   # CudaDriver (cuMem*), cuda-bindings

(python benchmarks/bench_memory.py takes the same arguments.) Four measurements, one table each,
then a summary; everything also goes to one JSON file (--out, default
benchmarks/results/memory_<device>_<page size in KiB>k.json under the current directory):

  1. driver calls     latency per page of create / map / set_access / unmap / release, and per call
                      of reserve / free_reservation, calling the driver directly
  2. access batching  one set_access over a contiguous run of N mapped pages vs one per page
  3. growth           one slot grown token by token (ensure(slot, n), n = 1..L) per model shape and
                      layout: pages mapped, mapping time, worst stall, bytes mapped but unused;
                      plus the same L tokens mapped by one ensure() (a prefill)
  4. decode           B sequences for S steps with simulated compute: ensure() on the critical
                      path (sync) vs prepare() of the next step before compute (overlap), with
                      and without an eager cushion; how much mapping the background thread hides

Simulated compute is a chain of bf16 matmuls sized to --compute-ms followed by
torch.cuda.synchronize() on CUDA, and time.sleep() on CPU; both release the GIL, as a real step
does, so the background mapper can run. --quick (the default on CPU) shrinks the runs so the whole
script finishes well under a minute on two cores.

    vattention bench memory designs [...]                   # = vattention bench capacity [...]

compares the KV designs instead (vattention layouts, paged block sizes, static): committed vs used
KV bytes and the most concurrent requests at one budget, on ShareGPT and long-context lengths;
`vattention bench memory designs --help` lists its arguments.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from vattention.memory import LAYOUTS, KVCacheSpec, KVLayout, MapCounters, VirtualKVCache, make_driver
from vattention.memory.drivers import Driver

from .report import device_name, print_table, share, timed, us_stats, write_json

MIB = 1 << 20
DRIVER_OPS = ("create", "map", "set_access", "unmap", "release", "reserve", "free_reservation")


@dataclass(frozen=True)
class ModelShape:
    """The part of a model config that sizes its KV cache."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int


MODELS = {m.name: m for m in (
    ModelShape("llama-3-8b", 32, 8, 128),
    ModelShape("yi-34b", 60, 8, 128),
    ModelShape("llama-3-70b", 80, 8, 128),
)}

# decode mode -> (prepare() next step's lengths before compute, eager_cushion_groups)
DECODE_MODES = {"sync": (False, 0), "eager": (False, 1), "overlap": (True, 0), "overlap+eager": (True, 1)}


# ---- helpers ------------------------------------------------------------------------------------

def _counter_delta(before: MapCounters, after: MapCounters) -> MapCounters:
    return MapCounters(**{k: v - getattr(before, k) for k, v in asdict(after).items()})


def _open_cache(device: str, page_size: int, spec: KVCacheSpec, budget_slots: int,
                cushion: int) -> VirtualKVCache:
    """A cache whose budget holds `budget_slots` slots at max_seq_len, every page created up front
    so that growth only maps. The cache owns (and closes) its driver."""
    driver = make_driver(device, page_size)
    layout = KVLayout(spec, driver.page_size)
    budget_bytes = budget_slots * layout.slot_stride_bytes * layout.num_tensors
    return VirtualKVCache(spec, device=device, memory_budget_bytes=budget_bytes, prealloc=True,
                          eager_cushion_groups=cushion, driver=driver)


def _spec(model: ModelShape, layout: str, max_seqs: int, max_seq_len: int) -> KVCacheSpec:
    return KVCacheSpec(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads,
                       head_dim=model.head_dim, dtype=torch.bfloat16, max_seqs=max_seqs,
                       max_seq_len=max_seq_len, layout=layout)


def _max_mapped_pages(device: str) -> int | None:
    """Each host page is its own mmap (one VMA); Linux caps a process at vm.max_map_count of them.
    Keep a quarter free for everything else. CUDA has no such cap (None)."""
    if device != "cpu":
        return None
    with open("/proc/sys/vm/max_map_count") as f:
        return int(f.read()) * 3 // 4


def _warm_up(driver: Driver) -> None:
    """One full page lifecycle, so lazy initialisation does not land in the first timed call."""
    base = driver.reserve(2 * driver.page_size)
    handles = [driver.create() for _ in range(2)]
    for i, handle in enumerate(handles):
        driver.map(base + i * driver.page_size, handle)
    driver.set_access(base, 2 * driver.page_size)
    for i, handle in enumerate(handles):
        driver.unmap(base + i * driver.page_size)
        driver.release(handle)
    driver.free_reservation(base, 2 * driver.page_size)


# ---- 1. driver calls ----------------------------------------------------------------------------

def bench_driver_calls(device: str, page_size: int, num_pages: int, repeats: int) -> dict:
    """Latency of each driver call, page by page over `num_pages` contiguous pages."""
    driver = make_driver(device, page_size)
    try:
        _warm_up(driver)
        nbytes = num_pages * driver.page_size
        base = driver.reserve(nbytes)
        addrs = [base + i * driver.page_size for i in range(num_pages)]
        times: dict[str, list[float]] = {op: [] for op in DRIVER_OPS[:5]}
        handles = []
        for _ in addrs:
            seconds, handle = timed(driver.create)
            times["create"].append(seconds)
            handles.append(handle)
        for addr, handle in zip(addrs, handles):
            times["map"].append(timed(driver.map, addr, handle)[0])
        for addr in addrs:
            times["set_access"].append(timed(driver.set_access, addr, driver.page_size)[0])
        for addr in addrs:
            times["unmap"].append(timed(driver.unmap, addr)[0])
        for handle in handles:
            times["release"].append(timed(driver.release, handle)[0])
        driver.free_reservation(base, nbytes)
        result = {op: us_stats(t, "page") for op, t in times.items()}
        result.update(_bench_reservations(driver, nbytes, max(repeats, 20)))
        return result
    finally:
        driver.close()


def _bench_reservations(driver: Driver, nbytes: int, num_calls: int) -> dict:
    """reserve + free_reservation of an `nbytes` range, `num_calls` times."""
    reserve, free = [], []
    for _ in range(num_calls):
        seconds, addr = timed(driver.reserve, nbytes)
        reserve.append(seconds)
        free.append(timed(driver.free_reservation, addr, nbytes)[0])
    unit = f"call ({nbytes // driver.page_size} pages)"
    return {"reserve": us_stats(reserve, unit), "free_reservation": us_stats(free, unit)}


# ---- 2. set_access batching ---------------------------------------------------------------------

def bench_access_batching(device: str, page_size: int, num_pages: int, repeats: int) -> dict:
    """set_access once per page vs once over the whole contiguous run; median of `repeats`."""
    driver = make_driver(device, page_size)
    try:
        _warm_up(driver)
        nbytes = num_pages * driver.page_size
        base = driver.reserve(nbytes)
        addrs = [base + i * driver.page_size for i in range(num_pages)]
        handles = [driver.create() for _ in addrs]
        per_page, batched = [], []
        for _ in range(repeats):
            per_page.append(_map_and_grant(driver, addrs, handles, batched=False))
            batched.append(_map_and_grant(driver, addrs, handles, batched=True))
        for handle in handles:
            driver.release(handle)
        driver.free_reservation(base, nbytes)
    finally:
        driver.close()
    per_page_s, batched_s = statistics.median(per_page), statistics.median(batched)
    return {"num_pages": num_pages, "repeats": repeats,
            "per_page_total_us": per_page_s * 1e6, "batched_total_us": batched_s * 1e6,
            "per_page_us_per_page": per_page_s * 1e6 / num_pages,
            "batched_us_per_page": batched_s * 1e6 / num_pages,
            "speedup": per_page_s / batched_s if batched_s else float("inf")}


def _map_and_grant(driver: Driver, addrs: list[int], handles: list[Any], batched: bool) -> float:
    """Map the run, time granting access to it (one call, or one per page), unmap it."""
    for addr, handle in zip(addrs, handles):
        driver.map(addr, handle)
    start = time.perf_counter()
    if batched:
        driver.set_access(addrs[0], len(addrs) * driver.page_size)
    else:
        for addr in addrs:
            driver.set_access(addr, driver.page_size)
    seconds = time.perf_counter() - start
    for addr in addrs:
        driver.unmap(addr)
    return seconds


# ---- 3. growth per layout -----------------------------------------------------------------------

def bench_growth(device: str, page_size: int, model: ModelShape, layout: str,
                 max_seqs: int, max_seq_len: int) -> dict:
    """Grow one slot token by token to max_seq_len, then map the same length in one ensure()."""
    spec = _spec(model, layout, max_seqs, max_seq_len)
    with _open_cache(device, page_size, spec, budget_slots=1, cushion=0) as cache:
        result = _grow_token_by_token(cache, max_seq_len)
        result["page_size"] = cache.page_size
        result["pages_per_group"] = cache.layout.num_tensors
        result["tokens_per_page"] = cache.page_size / cache.layout.token_bytes
    with _open_cache(device, page_size, spec, budget_slots=1, cushion=0) as cache:
        slot = cache.alloc_slot()
        before = cache.stats().counters
        seconds, ok = timed(cache.ensure, slot, max_seq_len)
        if not ok:
            raise RuntimeError(f"one-shot ensure({max_seq_len}) did not fit the budget")
        delta = _counter_delta(before, cache.stats().counters)
    result.update(oneshot_ensure_ms=seconds * 1e3, oneshot_map_ms=delta.map_seconds_critical * 1e3,
                  oneshot_pages=delta.pages_mapped_critical)
    return {"model": model.name, "layout": layout, "bytes_per_token": spec.bytes_per_token, **result}


def _grow_token_by_token(cache: VirtualKVCache, num_tokens: int) -> dict:
    """ensure(slot, n) for n = 1..num_tokens; waste sampled after every token."""
    slot = cache.alloc_slot()
    before = cache.stats().counters
    ensure_s, waste_sum, waste_max, pages_before = 0.0, 0, 0, 0
    stalls_s: list[float] = []  # ensure() time of each call that mapped pages
    for n in range(1, num_tokens + 1):
        seconds, ok = timed(cache.ensure, slot, n)
        if not ok:
            raise RuntimeError(f"ensure({n}) did not fit the budget")
        ensure_s += seconds
        stats = cache.stats()
        if stats.pages_mapped > pages_before:
            stalls_s.append(seconds)
            pages_before = stats.pages_mapped
        waste_sum += stats.bytes_wasted
        waste_max = max(waste_max, stats.bytes_wasted)
    delta = _counter_delta(before, stats.counters)
    return {"tokens": num_tokens, "pages_mapped": delta.pages_mapped_critical, "growth_events": len(stalls_s),
            "map_ms": delta.map_seconds_critical * 1e3, "ensure_ms": ensure_s * 1e3,
            "map_ms_per_1k_tokens": delta.map_seconds_critical * 1e6 / num_tokens,
            "map_us_per_page": delta.map_seconds_critical * 1e6 / max(delta.pages_mapped_critical, 1),
            "stall_ms_median": statistics.median(stalls_s) * 1e3, "stall_ms_max": max(stalls_s) * 1e3,
            "bytes_mapped_end": stats.bytes_mapped, "bytes_used_end": stats.bytes_used,
            "mapped_bytes_per_token_end": stats.bytes_mapped / num_tokens,
            "waste_end_bytes": stats.bytes_wasted, "waste_mean_bytes": waste_sum / num_tokens,
            "waste_max_bytes": waste_max}


def _fit_growth_length(device: str, page_size: int, model: ModelShape, layout: str,
                       max_seq_len: int) -> int:
    """max_seq_len, shortened on the host when one slot would need more mappings than allowed."""
    limit = _max_mapped_pages(device)
    if limit is None:
        return max_seq_len
    lay = KVLayout(_spec(model, layout, 1, max_seq_len), page_size)
    max_groups = limit // lay.num_tensors
    return max_seq_len if lay.groups_for(max_seq_len) <= max_groups else lay.tokens_in(max_groups)


# ---- 4. decode: what the background mapper hides ------------------------------------------------

def _make_compute(device: str, compute_ms: float) -> tuple[Callable[[], None], str]:
    """A step's worth of work that releases the GIL: GPU matmuls + synchronize, or a sleep on CPU."""
    if device == "cpu":
        return (lambda: time.sleep(compute_ms / 1e3)), f"time.sleep({compute_ms} ms)"
    dev = torch.device(device)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for num_mm in (50, 100):  # the first pass warms up clocks and cuBLAS; the second calibrates
        start = time.perf_counter()
        for _ in range(num_mm):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(dev)
    per_mm = (time.perf_counter() - start) / num_mm
    reps = max(1, round(compute_ms / 1e3 / per_mm))

    def compute() -> None:
        for _ in range(reps):
            torch.mm(a, b, out=out)
        torch.cuda.synchronize(dev)

    return compute, f"{reps} x bf16 mm 4096^3 + synchronize ({per_mm * 1e3:.3f} ms each)"


def bench_decode(device: str, page_size: int, model: ModelShape, layout: str, mode: str,
                 lengths: list[int], num_steps: int, compute: Callable[[], None]) -> dict:
    """len(lengths) sequences decode `num_steps` tokens each; one compute() per step."""
    prepare, cushion = DECODE_MODES[mode]
    batch = len(lengths)
    spec = _spec(model, layout, batch, max(lengths) + num_steps + 2)
    with _open_cache(device, page_size, spec, budget_slots=batch, cushion=cushion) as cache:
        slots = [cache.alloc_slot() for _ in lengths]
        for slot, n in zip(slots, lengths):  # the prefill: not measured
            cache.ensure(slot, n)
        if prepare:
            cache.prepare({slot: n + 1 for slot, n in zip(slots, lengths)})
        cache.wait()
        before = cache.stats().counters
        step_s, memory_s, compute_s = _decode_loop(cache, slots, list(lengths), num_steps, prepare, compute)
        cache.wait()  # cushion jobs the last steps queued belong to this run
        end = cache.stats()
        delta = _counter_delta(before, end.counters)
    total_pages = delta.pages_mapped_background + delta.pages_mapped_critical
    return {"model": model.name, "layout": layout, "mode": mode, "prepare": prepare,
            "eager_cushion_groups": cushion, "batch": batch, "steps": num_steps,
            "step_ms_mean": statistics.fmean(step_s) * 1e3, "step_ms_p50": statistics.median(step_s) * 1e3,
            "step_ms_max": max(step_s) * 1e3, "compute_ms_mean": statistics.fmean(compute_s) * 1e3,
            "memory_ms_mean": statistics.fmean(memory_s) * 1e3, "memory_ms_max": max(memory_s) * 1e3,
            "pages_mapped_critical": delta.pages_mapped_critical,
            "pages_mapped_background": delta.pages_mapped_background,
            "map_ms_critical": delta.map_seconds_critical * 1e3,
            "map_ms_background": delta.map_seconds_background * 1e3,
            "wait_ms": delta.wait_seconds * 1e3,
            "bytes_mapped_end": end.bytes_mapped, "bytes_used_end": end.bytes_used,
            "hidden_share": delta.pages_mapped_background / total_pages if total_pages else None}


def _decode_loop(cache: VirtualKVCache, slots: list[int], lengths: list[int], num_steps: int,
                 prepare: bool, compute: Callable[[], None]) -> tuple[list[float], list[float], list[float]]:
    """Per step: every sequence grows by one token (ensure), the next step's lengths are handed
    to the mapper (prepare, overlap modes only), then compute. Returns (step, memory, compute) seconds."""
    step_s, memory_s, compute_s = [], [], []
    for step in range(num_steps):
        start = time.perf_counter()
        for i, slot in enumerate(slots):
            lengths[i] += 1
            if not cache.ensure(slot, lengths[i]):
                raise RuntimeError(f"decode ensure(slot {slot}, {lengths[i]}) did not fit the budget")
        if prepare and step + 1 < num_steps:
            cache.prepare({slot: n + 1 for slot, n in zip(slots, lengths)})
        mid = time.perf_counter()
        compute()
        end = time.perf_counter()
        step_s.append(end - start)
        memory_s.append(mid - start)
        compute_s.append(end - mid)
    return step_s, memory_s, compute_s


def _fit_decode_batch(device: str, page_size: int, model: ModelShape, batch: int, max_tokens: int) -> int:
    """The batch, shrunk on the host so every layout's mappings stay under the mapping cap."""
    limit = _max_mapped_pages(device)
    if limit is None:
        return batch
    layouts = [KVLayout(_spec(model, name, 1, max_tokens), page_size) for name in LAYOUTS]
    pages_per_seq = max(lay.pages_per_slot * lay.num_tensors for lay in layouts)
    return max(1, min(batch, limit // pages_per_seq))


# ---- output -------------------------------------------------------------------------------------

def print_driver_calls(calls: dict, batching: dict) -> None:
    rows = [[op, c["unit"], c["count"], c["median_us"], c["mean_us"], c["min_us"], c["max_us"]]
            for op, c in calls.items()]
    print_table("1. driver calls (microseconds)", ["op", "per", "n", "median", "mean", "min", "max"], rows)
    b = batching
    print_table(f"2. set_access over {b['num_pages']} contiguous mapped pages (median of {b['repeats']})",
                 ["per page total us", "one call total us", "us/page per-page", "us/page batched", "speedup"],
                 [[b["per_page_total_us"], b["batched_total_us"], b["per_page_us_per_page"],
                   b["batched_us_per_page"], f"{b['speedup']:.1f}x"]])


def print_growth(rows: list[dict]) -> None:
    print_table("3. growth token by token, one slot (map time from stats counters; stall = ensure() "
                 "calls that mapped, median and max; waste in MiB)",
                 ["model", "layout", "tokens", "pages", "growths", "map ms", "ensure ms", "map ms/1K tok",
                  "us/page", "stall ms", "max stall", "waste mean", "waste max", "waste end", "one-shot ms"],
                 [[r["model"], r["layout"], r["tokens"], r["pages_mapped"], r["growth_events"], r["map_ms"],
                   r["ensure_ms"], r["map_ms_per_1k_tokens"], r["map_us_per_page"], r["stall_ms_median"],
                   r["stall_ms_max"],
                   r["waste_mean_bytes"] / MIB, r["waste_max_bytes"] / MIB, r["waste_end_bytes"] / MIB,
                   r["oneshot_ensure_ms"]] for r in rows])


def print_decode(decode: dict) -> None:
    rows = decode["runs"]
    print_table(f"4. decode {decode['model']}, batch {decode['batch']}, {decode['steps']} steps, "
                 f"compute = {decode['compute']}\n"
                 "   (memory ms = time in ensure() + prepare() per step; map ms from stats counters)",
                 ["layout", "mode", "step ms", "p50", "max", "compute ms", "memory ms", "memory max",
                  "pages crit", "pages bg", "map ms crit", "map ms bg", "wait ms", "hidden", "MiB mapped"],
                 [[r["layout"], r["mode"], r["step_ms_mean"], r["step_ms_p50"], r["step_ms_max"],
                   r["compute_ms_mean"], r["memory_ms_mean"], r["memory_ms_max"], r["pages_mapped_critical"],
                   r["pages_mapped_background"], r["map_ms_critical"], r["map_ms_background"], r["wait_ms"],
                   share(r["hidden_share"]), r["bytes_mapped_end"] / MIB] for r in rows])


def print_summary(results: dict) -> None:
    meta, calls = results["meta"], results["driver_calls"]
    print(f"\n=== summary: {meta['device']} ({meta['device_name']}), torch {meta['torch_version']}, "
          f"page {meta['page_size'] // 1024} KiB ===")
    print("driver us/page (median): " + ", ".join(
        f"{op} {calls[op]['median_us']:.3g}" for op in DRIVER_OPS[:5])
        + f"; set_access batched over {results['set_access_batching']['num_pages']} pages: "
        f"{results['set_access_batching']['speedup']:.1f}x faster")
    print_table("growth", ["model", "layout", "map ms/1K tok", "stall ms", "waste mean MiB",
                            "one-shot ms"],
                 [[r["model"], r["layout"], r["map_ms_per_1k_tokens"], r["stall_ms_median"],
                   r["waste_mean_bytes"] / MIB, r["oneshot_ensure_ms"]] for r in results["growth"]])
    print_table("decode", ["layout", "mode", "step ms", "memory ms/step", "map ms crit", "map ms bg",
                            "hidden", "MiB mapped"],
                 [[r["layout"], r["mode"], r["step_ms_mean"], r["memory_ms_mean"], r["map_ms_critical"],
                   r["map_ms_background"], share(r["hidden_share"]), r["bytes_mapped_end"] / MIB]
                  for r in results["decode"]["runs"]])


# ---- main ---------------------------------------------------------------------------------------

def _driver_page_size(device: str, page_size: int | None) -> int:
    driver = make_driver(device, page_size)
    try:
        return driver.page_size
    finally:
        driver.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="vattention bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="host driver or CudaDriver")
    p.add_argument("--page-size", type=int, default=None,
                   help="bytes per page (default: the driver's, 2 MiB); host accepts multiples of 4 KiB")
    p.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                   help="smaller runs (default: on for cpu, off for cuda)")
    p.add_argument("--pages", type=int, default=None, help="pages for driver timings (256; quick 128)")
    p.add_argument("--repeats", type=int, default=5, help="repeats of the set_access batching test")
    p.add_argument("--models", default=",".join(MODELS), help=f"growth models, from {list(MODELS)}")
    p.add_argument("--max-seqs", type=int, default=8, help="slots in the growth caches")
    p.add_argument("--max-seq-len", type=int, default=None, help="tokens to grow to (8192; quick 4096)")
    p.add_argument("--decode-model", default="llama-3-8b", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=32, help="sequences in the decode loop")
    p.add_argument("--steps", type=int, default=None, help="decode steps (256; quick 128)")
    p.add_argument("--compute-ms", type=float, default=None, help="simulated compute per step (10; quick 5)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial decode lengths, in [1, 1024)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/memory_<device>_<page KiB>k.json)")
    args = p.parse_args(argv)
    if args.quick is None:
        args.quick = args.device == "cpu"
    for name, full, quick in (("pages", 256, 128), ("max_seq_len", 8192, 4096), ("steps", 256, 128),
                              ("compute_ms", 10.0, 5.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    return args


def run_growth(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        for layout in LAYOUTS:
            length = _fit_growth_length(args.device, args.page_size, MODELS[name], layout, args.max_seq_len)
            if length < args.max_seq_len:
                print(f"note: {name} {layout} grown to {length} tokens, not {args.max_seq_len}: "
                      f"more would pass the host's vm.max_map_count")
            rows.append(bench_growth(args.device, args.page_size, MODELS[name], layout,
                                     args.max_seqs, length))
    return rows


def run_decode(args: argparse.Namespace) -> dict:
    model = MODELS[args.decode_model]
    compute, compute_desc = _make_compute(args.device, args.compute_ms)
    batch = _fit_decode_batch(args.device, args.page_size, model, args.batch, 1024 + args.steps + 2)
    if batch < args.batch:
        print(f"note: decode batch {batch}, not {args.batch}: more would pass the host's vm.max_map_count")
    rng = random.Random(args.seed)
    lengths = [rng.randrange(1, 1024) for _ in range(batch)]
    runs = [bench_decode(args.device, args.page_size, model, layout, mode, lengths, args.steps, compute)
            for layout in LAYOUTS for mode in DECODE_MODES]
    return {"model": model.name, "batch": batch, "steps": args.steps, "compute_ms": args.compute_ms,
            "compute": compute_desc, "initial_lengths": lengths, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["designs"]:  # the KV designs at one budget: the capacity benchmark
        from .capacity import main as designs_main
        return designs_main(argv[1:], prog="vattention bench memory designs")
    args = parse_args(argv)
    start = time.perf_counter()
    args.page_size = page_size = _driver_page_size(args.device, args.page_size)  # resolved once
    if args.out is None:  # per page size, so a 64 KiB run does not overwrite the 2 MiB one
        args.out = Path("benchmarks/results") / f"memory_{args.device}_{page_size // 1024}k.json"
    meta = {"device": args.device, "device_name": device_name(args.device),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "page_size": page_size, "quick": args.quick,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"bench_memory: {meta['device']} ({meta['device_name']}), torch {meta['torch_version']}, "
          f"page {page_size} bytes, quick={args.quick}")
    calls = bench_driver_calls(args.device, args.page_size, args.pages, args.repeats)
    batching = bench_access_batching(args.device, args.page_size, args.pages, args.repeats)
    print_driver_calls(calls, batching)
    growth = run_growth(args)
    print_growth(growth)
    decode = run_decode(args)
    print_decode(decode)
    meta["total_seconds"] = time.perf_counter() - start
    results = {"meta": meta, "driver_calls": calls, "set_access_batching": batching,
               "growth": growth, "decode": decode}
    write_json(args.out, results)
    print_summary(results)
    print(f"\nwrote {args.out} ({meta['total_seconds']:.1f} s)")
    return 0
