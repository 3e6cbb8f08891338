"""`vattention bench kernels`: attention kernel time over a contiguous (vAttention) or a paged KV cache.

    vattention bench kernels [--quick] [--out PATH] [--plot-dir DIR] [--no-flex]

CUDA only. One layer's attention for Llama-3-8B (32 q / 8 kv heads) and Yi-6B (32 q / 4 kv heads),
head dim 128, bf16, over B sequences of L tokens each (B in 1, 8, 32, 128; L in 1K .. 32K;
combinations whose caches do not fit are skipped, with the reason in the JSON):

  decode (one query token per sequence)            prefill (B prompts of L tokens, causal, B*L capped)
    fa2           FA2 varlen over the kv_flat views       fa2         FA2 varlen over the kv_flat views
    triton        our split-KV kernel, same views         gather_fa2  gather the blocks, then FA2
    triton_paged  its paged twin (block 16, 128)          flex_paged  FlexAttention + PagedAttention
    flex_paged    FlexAttention + torch's PagedAttention (page 128), where it compiles

Contiguous variants run on both cache layouts, allocated through VirtualKVCache so they read
VMM-mapped 2 MiB pages: per_layer (one layer's K and V tensors) and cross_layer (every layer of the
model interleaved in each token row; one layer's strided view is read). Paged pools are plain torch
tensors, as in vLLM, holding the same K/V behind shuffled block tables, so every output is checked
against FA2's on the same data (max |out - fa2| / max |fa2| in the JSON).

Times are triton.testing.do_bench medians (L2 flushed before each call) of CUDA-graph replays of
each call, so they are GPU time, not Python launch overhead. Decode bandwidth = K/V bytes
read / time, also as a share of the device-to-device copy bandwidth measured here (bytes read +
written by one 2 GiB copy / its time; a read-only stream can pass 100% of it). Prefill: TFLOP/s
of the causal attention.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .report import device_name, print_table, write_json

KIB = 1024
GIB = 1 << 30


@dataclass(frozen=True)
class Heads:
    """What sizes one layer's attention, plus the layer count a cross-layer token row holds."""

    name: str
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int


MODELS = {m.name: m for m in (Heads("llama-3-8b", 32, 32, 8, 128), Heads("yi-6b", 32, 32, 4, 128))}
FLEX_PAGE = 128  # FlexAttention's KV block: PagedAttention's page must equal it


@dataclass
class Row:
    """One measurement, or why there is none."""

    kind: str  # "decode" or "prefill"
    model: str
    batch: int  # sequences
    context: int  # tokens per sequence
    variant: str  # fa2, triton, triton_paged, flex_paged, gather_fa2
    layout: str  # per_layer / cross_layer (VMM-backed, contiguous) or paged (torch tensors)
    block_size: int | None = None  # tokens per block, paged variants only
    time_us: float | None = None  # do_bench median; None when skipped or failed
    kv_bytes: int = 0  # K and V bytes one call reads
    flops: float = 0.0  # prefill: causal attention FLOPs of one call
    max_rel_diff: float | None = None  # max |out - fa2| / max |fa2| on the same data
    first_call_ms: float | None = None  # the untimed first call: includes JIT / torch.compile
    graph_error: str | None = None  # why the call could not be timed from a CUDA graph (then eager)
    error: str | None = None  # why there is no time

    @property
    def label(self) -> str:
        return f"{self.variant}/{self.block_size if self.block_size else self.layout}"


# ---- the kernels, each as a call over prepared tensors ------------------------------------------

def fa2(q, k_flat, v_flat, cu_q, cu_k, seq_lens, max_q: int, max_k: int, scale: float):
    """FA2 varlen as the FlashBackend calls it: sequence i's keys start at row cu_k[i] and number
    seq_lens[i] (None: up to cu_k[i + 1])."""
    return torch.ops.aten._flash_attention_forward(q, k_flat, v_flat, cu_q, cu_k, max_q, max_k, 0.0,
                                                   True, False, scale=scale, seqused_k=seq_lens)[0]


def paged_pool(k_flat, v_flat, kv_starts, context: int, block_size: int):
    """The same K/V as [num_blocks, block_size, H_kv, D] pools behind a shuffled block table."""
    batch, (rows, heads, dim) = kv_starts.shape[0], k_flat.shape
    per_seq = -(-context // block_size)
    tables = torch.randperm(batch * per_seq, device="cuda").view(batch, per_seq).int()
    pools = [torch.empty(batch * per_seq, block_size, heads, dim, dtype=k_flat.dtype, device="cuda")
             for _ in range(2)]
    offsets = torch.arange(block_size, device="cuda")
    for b in range(batch):  # one sequence at a time: no B*L-sized temporaries
        dst = (tables[b].long()[:, None] * block_size + offsets).flatten()[:context]
        src = kv_starts[b].long() + torch.arange(context, device="cuda")
        for pool, flat in zip(pools, (k_flat, v_flat)):
            pool.view(-1, heads, dim)[dst] = flat[src]
    return pools[0], pools[1], tables


def gather_fa2(q, k_blocks, v_blocks, tables, context: int, cu_q, cu_k, max_q: int, scale: float):
    """Paged prefill without a paged kernel: copy each sequence's blocks out, then FA2."""
    block_size, heads, dim = k_blocks.shape[1:]
    rows = (tables.long()[:, :, None] * block_size + torch.arange(block_size, device="cuda"))
    rows = rows.flatten(1)[:, :context].flatten()
    keys = k_blocks.view(-1, heads, dim).index_select(0, rows)  # [B * L, H_kv, D]
    values = v_blocks.view(-1, heads, dim).index_select(0, rows)
    return fa2(q, keys, values, cu_q, cu_k, None, max_q, context, scale)


class FlexPaged:
    """FlexAttention over a page-128 pool through torch.nn.attention.experimental's PagedAttention.
    One compiled flex_attention serves every shape (torch.compile turns dynamic on a recompile)."""

    def __init__(self):
        from torch.nn.attention.experimental._paged_attention import PagedAttention
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
        self.paged_attention, self.block_mask = PagedAttention, BlockMask
        for name in ("recompile_limit", "cache_size_limit"):  # B, L and H_kv all vary
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        self.attend = torch.compile(flex_attention)

    def prepare(self, k_blocks, v_blocks, tables, seq_lens, q_len: int):
        """K/V caches [1, H_kv, num_blocks * page, D] (views of the pools) and the physical block
        mask PagedAttention converts from a logical causal one (queries = the last q_len tokens)."""
        num_blocks, page, heads, dim = k_blocks.shape
        batch, per_seq = tables.shape
        paged = self.paged_attention(num_blocks, page, batch, device="cuda")
        logical_blocks = torch.arange(per_seq, device="cuda")
        paged.page_table[:, :per_seq] = tables
        paged.physical_to_logical.scatter_(1, tables.long(), logical_blocks.expand(batch, per_seq))
        paged.capacity.fill_(per_seq * page)
        mask = paged.convert_logical_block_mask(self._causal(batch, q_len, per_seq, page), kv_len=seq_lens)
        caches = [t.view(1, num_blocks * page, heads, dim).transpose(1, 2) for t in (k_blocks, v_blocks)]
        return caches[0], caches[1], mask

    def _causal(self, batch: int, q_len: int, num_blocks: int, page: int):
        """Logical block mask: query i sits at position offset + i; key blocks wholly at or before
        a query block's first query are full, those reaching past it are partial."""
        offset = num_blocks * page - q_len
        rows = -(-q_len // page)
        first = offset + torch.arange(rows, device="cuda") * page
        last = torch.clamp(first + page, max=offset + q_len) - 1
        full = (first + 1) // page  # [rows]
        partial = last // page + 1 - full
        cols = torch.arange(num_blocks, device="cuda")
        full_idx = cols.expand(rows, num_blocks)
        partial_idx = torch.clamp(full[:, None] + cols, max=num_blocks - 1)

        def expand(t):
            return t.to(torch.int32).expand(batch, 1, *t.shape).contiguous()

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return self.block_mask.from_kv_blocks(expand(partial), expand(partial_idx), expand(full),
                                              expand(full_idx), BLOCK_SIZE=page, mask_mod=causal,
                                              seq_lengths=(q_len, num_blocks * page))

    def __call__(self, q4, k_cache, v_cache, mask, scale: float):
        return self.attend(q4, k_cache, v_cache, block_mask=mask, scale=scale, enable_gqa=True)


# ---- measuring ----------------------------------------------------------------------------------

def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


def measure(row: Row, fn: Callable[[], torch.Tensor], ref: torch.Tensor | None,
            args: argparse.Namespace, shape: Callable | None = None) -> Row:
    """Run once (checked against ref, reshaped by `shape`), then time; a failure (a kernel that
    does not compile, out of memory) is recorded in the row, not raised."""
    from triton.testing import do_bench
    try:
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        row.first_call_ms = (time.perf_counter() - start) * 1e3
        if ref is not None:
            row.max_rel_diff = rel_diff(shape(out) if shape else out, ref)
        del out
        try:
            replay = graphed(fn)
        except Exception as e:  # noqa: BLE001 - not capturable: time the eager calls instead
            row.graph_error = f"{type(e).__name__}: {e}"[:200]
            torch.cuda.synchronize()
            replay = fn
        row.time_us = do_bench(replay, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median") * 1e3
    except Exception as e:  # noqa: BLE001 - every failure becomes a recorded result
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:400]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return row


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """fn captured in a CUDA graph, so timings are the kernels' and not Python's launch overhead
    (the engine replays its decode steps from graphs too)."""
    from ..engine.graphs import capture_graph
    graph, _ = capture_graph(fn)
    return graph.replay


def copy_bandwidth(args: argparse.Namespace) -> float:
    """Bytes read + written per second by one large device-to-device copy."""
    from triton.testing import do_bench
    src = torch.empty(GIB, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def fits(nbytes: int, reserve: int = 3 * GIB) -> bool:
    return nbytes + reserve <= torch.cuda.mem_get_info()[0]


# ---- one pass: a model's cache in one layout, every (context, batch) point ---------------------

def run_pass(model: Heads, layout: str, args, flex: FlexPaged | None, rows: list[Row]) -> None:
    """per_layer passes also time the paged variants (on copies of the same K/V)."""
    from tqdm import tqdm

    from vattention.memory import KVCacheSpec, KVLayout, VirtualKVCache
    spec = KVCacheSpec(num_layers=1 if layout == "per_layer" else model.num_layers,
                       num_kv_heads=model.num_kv_heads, head_dim=model.head_dim, dtype=torch.bfloat16,
                       max_seqs=max(args.batches), max_seq_len=max(args.contexts), layout=layout)
    share = 0.4 if layout == "per_layer" else 0.85  # per_layer leaves room for the paged pools
    budget = min(KVLayout(spec, 2 << 20).reservation_bytes, int(torch.cuda.mem_get_info()[0] * share))
    layer = spec.num_layers // 2
    points = [(b, c) for c in args.contexts for b in args.batches]
    with VirtualKVCache(spec, device="cuda", memory_budget_bytes=budget, eager_cushion_groups=0) as cache:
        slots: list[int] = []
        for batch, context in tqdm(points, desc=f"{model.name} {layout}", leave=False):
            for s in slots:
                cache.free(s)
            need = batch * cache.layout.groups_for(context) * cache.layout.num_tensors * cache.page_size
            slots = [cache.alloc_slot(context) for _ in range(batch)] if need <= budget else []
            if not slots or not all(cache.ensure(s, context) for s in slots):
                reason = f"{batch} x {context} tokens do not fit the {budget / GIB:.0f} GiB cache budget"
                rows.append(Row("decode", model.name, batch, context, "all", layout, error=reason))
                continue
            k_view, v_view = cache.kv(layer)
            for s in slots:
                k_view[s, :context].normal_()
                v_view[s, :context].normal_()
            k_flat, v_flat = cache.kv_flat(layer)
            starts = torch.tensor([s * cache.slot_stride_tokens for s in slots], dtype=torch.int32, device="cuda")
            paged = layout == "per_layer"
            rows += decode_point(model, layout, batch, context, k_flat, v_flat, starts, paged, flex, args)
            if batch * context <= args.max_prefill_tokens:
                rows += prefill_point(model, layout, batch, context, k_flat, v_flat, starts, paged, flex, args)


def decode_point(model: Heads, layout, batch, context, k_flat, v_flat, starts, paged, flex, args) -> list[Row]:
    from vattention.attention import triton_decode
    h, d = model.num_kv_heads, model.head_dim
    scale = d ** -0.5
    q = torch.randn(batch, model.num_q_heads, d, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    cu_k = torch.cat([starts, starts[-1:]])
    kv_bytes = 2 * batch * context * h * d * 2

    def row(variant, where=layout, block=None):
        return Row("decode", model.name, batch, context, variant, where, block, kv_bytes=kv_bytes)

    ref = fa2(q, k_flat, v_flat, cu_q, cu_k, lens, 1, context, scale)
    out = [measure(row("fa2"), lambda: fa2(q, k_flat, v_flat, cu_q, cu_k, lens, 1, context, scale), ref, args),
           measure(row("triton"), lambda: triton_decode.contiguous_decode(
               q, k_flat, v_flat, starts, lens, scale, max_seq_len=context), ref, args)]
    for block in args.block_sizes if paged else ():
        if not fits(kv_bytes):
            out.append(row("triton_paged", "paged", block))
            out[-1].error = "the paged pool does not fit next to the contiguous cache"
            continue
        k_blocks, v_blocks, tables = paged_pool(k_flat, v_flat, starts, context, block)
        out.append(measure(row("triton_paged", "paged", block), lambda: triton_decode.paged_decode(
            q, k_blocks, v_blocks, tables, lens, scale, max_seq_len=context), ref, args))
        if flex is not None and block == FLEX_PAGE:
            out.append(time_flex(row("flex_paged", "paged", block), flex, q[:, :, None], k_blocks,
                                 v_blocks, tables, lens, scale, ref, lambda o: o[:, :, 0], args))
        del k_blocks, v_blocks, tables
    return out


def prefill_point(model: Heads, layout, batch, context, k_flat, v_flat, starts, paged, flex, args) -> list[Row]:
    h, d = model.num_kv_heads, model.head_dim
    scale = d ** -0.5
    q = torch.randn(batch * context, model.num_q_heads, d, dtype=torch.bfloat16, device="cuda")
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    cu_q = torch.arange(0, batch * context + 1, context, dtype=torch.int32, device="cuda")
    cu_k = torch.cat([starts, starts[-1:]])
    flops = 4 * batch * model.num_q_heads * d * context * (context + 1) / 2  # QK^T and PV, causal

    def row(variant, where=layout, block=None):
        return Row("prefill", model.name, batch, context, variant, where, block,
                   kv_bytes=2 * batch * context * h * d * 2, flops=flops)

    ref = fa2(q, k_flat, v_flat, cu_q, cu_k, lens, context, context, scale)
    out = [measure(row("fa2"), lambda: fa2(q, k_flat, v_flat, cu_q, cu_k, lens, context, context, scale),
                   ref, args)]
    for block in args.block_sizes if paged else ():
        k_blocks, v_blocks, tables = paged_pool(k_flat, v_flat, starts, context, block)
        out.append(measure(row("gather_fa2", "paged", block), lambda: gather_fa2(
            q, k_blocks, v_blocks, tables, context, cu_q, cu_q, context, scale), ref, args))
        if flex is not None and block == FLEX_PAGE:
            q4 = q.view(batch, context, -1, d).transpose(1, 2).contiguous()  # [B, H_q, L, D]
            out.append(time_flex(row("flex_paged", "paged", block), flex, q4, k_blocks, v_blocks,
                                 tables, lens, scale, ref, lambda o: o.transpose(1, 2).flatten(0, 1), args))
    return out


def time_flex(row: Row, flex: FlexPaged, q4, k_blocks, v_blocks, tables, lens, scale, ref, shape, args) -> Row:
    if k_blocks.numel() >= 1 << 31:  # a fault would end the process (the CUDA context is lost)
        row.error = (f"not run: the pool holds {k_blocks.numel():.2e} >= 2^31 elements per tensor; "
                     f"FlexAttention on torch 2.11 indexes it with 32-bit offsets and hit an illegal "
                     f"memory access at B=128, L=32K (Llama-3-8B heads)")
        return row
    try:
        k_cache, v_cache, mask = flex.prepare(k_blocks, v_blocks, tables, lens, q4.shape[2])
    except Exception as e:  # noqa: BLE001 - recorded like a kernel failure
        row.error = f"PagedAttention setup: {type(e).__name__}: {e}"[:400]
        return row
    return measure(row, lambda: flex(q4, k_cache, v_cache, mask, scale), ref, args, shape)


# ---- reporting ----------------------------------------------------------------------------------

def row_json(row: Row, copy_bytes_per_s: float) -> dict:
    """The row plus what follows from its time: bandwidth, its share of copy bandwidth, TFLOP/s."""
    out = asdict(row)
    out["label"] = row.label
    seconds = row.time_us * 1e-6 if row.time_us else None
    out["kv_GBps"] = row.kv_bytes / seconds / 1e9 if seconds else None
    out["copy_share"] = row.kv_bytes / seconds / copy_bytes_per_s if seconds else None
    out["tflops"] = row.flops / seconds / 1e12 if seconds and row.flops else None
    return out


def labels_of(rows: list[Row]) -> list[str]:
    return list(dict.fromkeys(r.label for r in rows if r.variant != "all"))


def print_tables(rows: list[Row], copy_bytes_per_s: float) -> None:
    """Per kind and model: time per variant at each (B, L), then bandwidth share or TFLOP/s."""
    for kind in ("decode", "prefill"):
        for model in dict.fromkeys(r.model for r in rows):
            sel = [r for r in rows if r.kind == kind and r.model == model and r.variant != "all"]
            if not sel:
                continue
            labels = labels_of(sel)
            points = sorted({(r.batch, r.context) for r in sel})
            by = {(r.batch, r.context, r.label): r for r in sel}
            unit, scale = ("us", 1.0) if kind == "decode" else ("ms", 1e-3)

            def cells(fn):
                table = []
                for b, c in points:
                    row = [b, f"{c // KIB}K" if c % KIB == 0 else c]
                    for label in labels:
                        r = by.get((b, c, label))
                        row.append("-" if r is None else "err" if r.error else fn(r))
                    table.append(row)
                return table

            print_table(f"{kind} time ({unit}), {model} (err: see JSON 'errors'; -: not run)",
                        ["B", "L", *labels], cells(lambda r: r.time_us * scale))
            if kind == "decode":
                print_table(f"decode K/V bandwidth as a share of copy bandwidth "
                            f"({copy_bytes_per_s / 1e9:.0f} GB/s), {model}", ["B", "L", *labels],
                            cells(lambda r: f"{r.kv_bytes / (r.time_us * 1e-6) / copy_bytes_per_s:.0%}"))
            else:
                print_table(f"prefill TFLOP/s, {model}", ["B", "L", *labels],
                            cells(lambda r: r.flops / (r.time_us * 1e-6) / 1e12))


RATIOS = [("decode", "triton_paged/16", "triton/per_layer"), ("decode", "triton_paged/128", "triton/per_layer"),
          ("decode", "triton/cross_layer", "triton/per_layer"), ("decode", "fa2/cross_layer", "fa2/per_layer"),
          ("decode", "triton/per_layer", "fa2/per_layer"), ("decode", "flex_paged/128", "triton_paged/128"),
          ("prefill", "gather_fa2/16", "fa2/per_layer"), ("prefill", "flex_paged/128", "fa2/per_layer"),
          ("prefill", "fa2/cross_layer", "fa2/per_layer")]


def summarize(rows: list[Row]) -> list[dict]:
    """Time ratios of variant pairs over the points where both ran: geometric mean, min, max."""
    times = {(r.kind, r.model, r.batch, r.context, r.label): r.time_us for r in rows if r.time_us}
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        for kind, a, b in RATIOS:
            ratios = [t / times[key[:4] + (b,)] for key, t in times.items()
                      if key[0] == kind and key[1] == model and key[4] == a and key[:4] + (b,) in times]
            if ratios:
                out.append({"kind": kind, "model": model, "ratio": f"{a} / {b}", "points": len(ratios),
                            "geomean": math.exp(statistics.fmean(math.log(x) for x in ratios)),
                            "min": min(ratios), "max": max(ratios)})
    return out


def errors_of(rows: list[Row]) -> dict[str, dict]:
    """Each distinct failure or skip reason per variant, with how often and where first."""
    out: dict[str, dict] = {}
    for r in rows:
        if r.error:
            key = f"{r.kind} {r.label}: {r.error}"
            entry = out.setdefault(key, {"count": 0, "first": f"{r.model} B={r.batch} L={r.context}"})
            entry["count"] += 1
    return out


def plot(rows: list[Row], plot_dir: Path, tag: str, gpu: str) -> list[Path]:
    """One PNG per kind and model: time vs context, one panel per batch size, a line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    plot_dir.mkdir(parents=True, exist_ok=True)
    colors = {label: f"C{i}" for i, label in enumerate(labels_of(rows))}
    paths = []
    for kind in ("decode", "prefill"):
        for model in dict.fromkeys(r.model for r in rows):
            sel = [r for r in rows if r.kind == kind and r.model == model and r.time_us]
            batches = sorted({r.batch for r in sel})
            if not batches:
                continue
            fig, axes = plt.subplots(1, len(batches), figsize=(max(3.4 * len(batches), 7), 3.6), squeeze=False)
            for ax, batch in zip(axes[0], batches):
                for label in labels_of(sel):
                    pts = sorted((r.context, r.time_us / 1e3) for r in sel if r.batch == batch and r.label == label)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=colors[label], label=label)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                contexts = sorted({r.context for r in sel})
                ax.set_xticks(contexts, [f"{c // KIB}K" if c % KIB == 0 else str(c) for c in contexts])
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.set_title(f"B = {batch}", fontsize=9)
                ax.set_xlabel("context (tokens)", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3, which="both", lw=0.5)
            axes[0][0].set_ylabel("time (ms)", fontsize=8)
            handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
            fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=7, frameon=False)
            fig.suptitle(f"{kind} attention, {model} heads, bf16, {gpu}", fontsize=10)
            fig.tight_layout(rect=(0, 0.16, 1, 1))
            path = plot_dir / f"kernels_{tag}_{kind}_{model}.png"
            fig.savefig(path, dpi=72)
            plt.close(fig)
            paths.append(path)
    return paths


def gpu_tag(name: str) -> str:
    """"NVIDIA H200" -> "h200"; an unknown name -> its letters and digits."""
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", name)
    return (found.group(1) if found else re.sub(r"[^0-9A-Za-z]+", "_", name)).lower()


# ---- entry point --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vattention bench kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="llama-3-8b only, B in 1 and 32, L in 2K and 16K, shorter timing")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 8 32 128")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="tokens per sequence, default 1K 2K 4K 8K 16K 32K (multiples of every block size)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 128],
                        help="paged block sizes (powers of 2 >= 16; FlexAttention runs at 128)")
    parser.add_argument("--max-prefill-tokens", type=int, default=65536,
                        help="prefill runs where B * L is at most this (a step's token budget)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it compiles per shape)")
    parser.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (default 10, quick 5)")
    parser.add_argument("--rep-ms", type=float, default=None, help="do_bench timing window (default 40, quick 20)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels_<gpu>[_quick].json)")
    parser.add_argument("--plot-dir", type=Path, default=None, help="PNG directory (default: the JSON's)")
    args = parser.parse_args(argv)
    args.models = args.models or (["llama-3-8b"] if args.quick else list(MODELS))
    args.batches = sorted(args.batches or ([1, 32] if args.quick else [1, 8, 32, 128]))
    args.contexts = sorted(args.contexts or ([2 * KIB, 16 * KIB] if args.quick else
                                             [KIB << i for i in range(6)]))
    args.warmup_ms = args.warmup_ms or (5 if args.quick else 10)
    args.rep_ms = args.rep_ms or (20 if args.quick else 40)
    bad = [c for c in args.contexts if c % max(args.block_sizes)]
    if bad:
        parser.error(f"contexts {bad} are not multiples of the largest block size {max(args.block_sizes)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("vattention bench kernels: needs a CUDA GPU (FA2, our Triton kernels and FlexAttention "
              "run there); on CPU, tests/test_triton_kernels.py checks the Triton kernels under "
              "Triton's interpreter", file=sys.stderr)
        return 2
    import triton
    start = time.perf_counter()
    gpu = device_name("cuda")
    tag = gpu_tag(gpu)
    out = args.out or Path("benchmarks/results") / f"kernels_{tag}{'_quick' if args.quick else ''}.json"
    meta = {"device_name": gpu, "torch_version": torch.__version__, "triton_version": triton.__version__,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"bench kernels: {gpu}, torch {torch.__version__}, triton {triton.__version__}, "
          f"models {args.models}, B {args.batches}, L {args.contexts}")
    copy_bytes_per_s = copy_bandwidth(args)
    print(f"device-to-device copy: {copy_bytes_per_s / 1e9:.0f} GB/s (read + write)")
    flex = None
    if not args.no_flex:
        try:
            flex = FlexPaged()
        except Exception as e:  # noqa: BLE001 - FlexAttention is optional
            meta["flex_error"] = f"{type(e).__name__}: {e}"
    rows: list[Row] = []
    for name in args.models:
        for layout in ("per_layer", "cross_layer"):
            run_pass(MODELS[name], layout, args, flex, rows)
            write_json(out, {"meta": meta, "partial": True, "rows": [asdict(r) for r in rows]})
    meta["total_seconds"] = time.perf_counter() - start
    print_tables(rows, copy_bytes_per_s)
    summary = summarize(rows)
    print_table("time ratios over the points where both ran (< 1: the first is faster)",
                ["kind", "model", "ratio", "points", "geomean", "min", "max"],
                [list(s.values()) for s in summary])
    errors = errors_of(rows)
    for key, entry in errors.items():
        print(f"  {entry['count']:3d} x {key} (first: {entry['first']})")
    write_json(out, {"meta": meta, "copy_bandwidth_GBps": copy_bytes_per_s / 1e9, "summary": summary,
                     "errors": errors, "rows": [row_json(r, copy_bytes_per_s) for r in rows]})
    paths = plot(rows, args.plot_dir or out.parent, tag + ("_quick" if args.quick else ""), gpu)
    print(f"\nwrote {out} and {len(paths)} plots ({meta['total_seconds']:.0f} s)")
    return 0
