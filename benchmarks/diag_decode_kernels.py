"""Where a decode step's GPU time can still go down (issue #12's missed targets), kernel by kernel,
on dummy Llama-3-8B shapes in bf16. CUDA only.

    python benchmarks/diag_decode_kernels.py [--part gemm|model|attention|all] [--quick]

gemm: each projection of a decode step (qkv, o, gate_up, down, lm_head) at M = 1, 8, 16 rows,
  F.linear (cuBLAS) against fused_kernels.skinny_linear over a grid of tilings. model: the
  same products through the model's own calls (fused.linear; down through silu_and_mul_linear)
  at the tilings it uses and a few others. attention: our
  split-KV decode kernel over a cross_layer-strided cache (every layer's K/V interleaved in one
  128 KiB token row, as the engine's default layout) at 540-token contexts, over a grid of
  block_n / warps / stages / splits, against today's defaults.

Timing: every call is captured in a CUDA graph over enough distinct weight copies (or all 32
layers of the cache) that no operand stays in the 50 MB L2, as in a real step, and the graph's
replay time (CUDA events, median of 10) is divided by the number of calls: GPU time per call
including the gaps between back-to-back kernels, not Python launch overhead.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from vattention.attention import triton_decode
from vattention.engine.graphs import capture_graph
from vattention.models import fused_kernels

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4096, 32, 8, 128, 32
GEMMS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
         "lm_head": (128256, 4096)}


def graph_time(calls: list, replays: int = 10) -> float:
    """Median ms per call of one CUDA graph that runs `calls` (argless callables) in order."""
    def body():
        for c in calls[:-1]:
            c()
        return calls[-1]()

    graph, _ = capture_graph(body)
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    del graph
    return statistics.median(times)


def gemm_part(quick: bool) -> None:
    print("\n== projections (bf16): us per call (weight bytes read / time) ==")
    grid = list(itertools.product((32, 64, 128), (128, 256), (1, 2), (4, 5, 6), (4, 8)))  # block_n, block_k, split, stages, warps
    if quick:
        grid = [(32, 256, 1, 4, 4), (64, 128, 2, 5, 4)]
    rows = []
    for name, (n, k) in GEMMS.items():
        copies = max(1, -(-400_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        gb = n * k * 2 / 1e9
        for m in (1, 8, 16):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = F.linear(x.float(), ws[0].float())
            cublas = graph_time([lambda w=w: F.linear(x, w) for w in ws])
            best = None
            for bn, bk, split, stages, warps in grid:
                kw = dict(block_n=bn, block_k=bk, split_k=split, num_stages=stages, num_warps=warps)
                try:
                    err = ((fused_kernels.skinny_linear(x, ws[0], **kw).float() - ref).abs().max()
                           / ref.abs().max()).item()
                    t = graph_time([lambda w=w: fused_kernels.skinny_linear(x, w, **kw) for w in ws])
                except Exception as e:  # noqa: BLE001 - a tiling that does not compile is a result
                    print(f"  {name} M={m} {kw}: {type(e).__name__}: {str(e)[:80]}")
                    continue
                if best is None or t < best[0]:
                    best = (t, kw, err)
            rows.append((name, m, gb, cublas, *best))
            print(f"{name:>8} M={m:<2}  cuBLAS {1e3 * cublas:6.1f} ({gb / cublas:4.2f} TB/s)  skinny "
                  f"{1e3 * best[0]:6.1f} ({gb / best[0]:4.2f} TB/s) {best[1]}  rel err {best[2]:.1e}", flush=True)
        del ws
        torch.cuda.empty_cache()
    for m in (1, 8, 16):
        per_layer = [r for r in rows if r[1] == m and r[0] != "lm_head"]
        c = sum(r[3] for r in per_layer) * LAYERS
        s = sum(min(r[3], r[4]) for r in per_layer) * LAYERS
        print(f"M={m}: 32 layers' projections cuBLAS {c:.3f} ms, best of both per projection {s:.3f} ms "
              f"(saves {c - s:.3f} ms a step)")


def model_part() -> None:
    """The products as the model calls them (fused.linear, fused.silu_and_mul_linear for down:
    its input is gate_up [M, 2I]) at a few tilings, against cuBLAS (after silu_and_mul for down)."""
    from vattention.models import fused
    print("\n== the model's calls: us per call; down includes silu(gate) * up ==")
    tilings = [(64, 256, 4), (64, 128, 4), (32, 128, 4), (32, 256, 3), (128, 128, 4)]
    for name, (n, k) in GEMMS.items():
        copies = max(1, -(-400_000_000 // (n * k * 2)))
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        gated = name == "down"
        for m in (1, 8):
            x = torch.randn(m, 2 * k if gated else k, dtype=torch.bfloat16, device="cuda")
            if gated:
                eager = [lambda w=w: F.linear(fused.silu_and_mul(x), w) for w in ws]
                model = [lambda w=w: fused.silu_and_mul_linear(x, w) for w in ws]
            else:
                eager = [lambda w=w: F.linear(x, w) for w in ws]
                model = [lambda w=w: fused.linear(x, w) for w in ws]
            line = f"{name:>8} M={m}: cuBLAS {1e3 * graph_time(eager):6.1f}  model's {1e3 * graph_time(model):6.1f}"
            for bn, bk, st in tilings:
                calls = [lambda w=w: fused_kernels.skinny_linear(x, w, gated=gated, block_n=bn, block_k=bk,
                                                                 num_stages=st) for w in ws]
                try:
                    line += f"  {bn}/{bk}/{st} {1e3 * graph_time(calls):6.1f}"
                except Exception as e:  # noqa: BLE001
                    line += f"  {bn}/{bk}/{st} {type(e).__name__}"
            print(line, flush=True)
        del ws
        torch.cuda.empty_cache()


def attention_part(quick: bool) -> None:
    context = 540
    row = LAYERS * 2 * KV_HEADS * HEAD_DIM  # elements in one cross_layer token row
    print(f"\n== decode attention, cross_layer rows of {row * 2 >> 10} KiB, {context}-token contexts: "
          f"ms for 32 layers (one call each) ==")
    for batch in ((64, 256) if quick else (1, 8, 32, 64, 128, 256)):
        stride = 1024  # tokens per slot
        cache = torch.randn(batch * stride, row, dtype=torch.bfloat16, device="cuda") * 0.5
        kv = cache.view(batch * stride, LAYERS, 2, KV_HEADS, HEAD_DIM)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=torch.bfloat16, device="cuda")
        starts = torch.arange(batch, dtype=torch.int32, device="cuda") * stride
        lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
        auto = triton_decode.choose_num_splits(batch, KV_HEADS, context, triton_decode._num_sms(q.device))
        kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * 2 * LAYERS

        def run(layer, num_splits=None, **kw):
            k_strides = (kv.stride(0), 0, kv.stride(3))
            return triton_decode._decode(q, kv[:, layer, 0], kv[:, layer, 1], k_strides, k_strides, starts,
                                         lens, lens, 0, paged=False, page_size=1, scale=HEAD_DIM ** -0.5,
                                         max_seq_len=context, num_splits=num_splits, **kw)

        ref = run(0).float()
        base = graph_time([lambda i=i: run(i) for i in range(LAYERS)]) * LAYERS
        results = []
        grid = itertools.product((16, 32, 64), (2, 4, 8), (2, 3, 4), sorted({max(1, auto // 2), auto, auto * 2, auto * 4}))
        if quick:
            grid = [(32, 2, 2, auto), (64, 4, 3, auto), (32, 4, 3, auto * 2)]
        for bn, warps, stages, splits in grid:
            kw = dict(block_n=bn, num_warps=warps, num_stages=stages, num_splits=splits)
            try:
                err = ((run(0, **kw).float() - ref).abs().max()).item()
                t = graph_time([lambda i=i: run(i, **kw) for i in range(LAYERS)]) * LAYERS
            except Exception as e:  # noqa: BLE001
                print(f"  B={batch} {kw}: {type(e).__name__}: {str(e)[:80]}")
                continue
            results.append((t, kw, err))
        results.sort(key=lambda r: r[0])
        print(f"B={batch:<3} KV {kv_bytes / 1e9:.2f} GB  default (splits {auto}) {base:.3f} ms "
              f"({kv_bytes / base / 1e9:.0f} GB/s)", flush=True)
        for t, kw, err in results[:4]:
            print(f"        {t:.3f} ms ({kv_bytes / t / 1e9:.0f} GB/s) {kw}  max |diff| {err:.1e}", flush=True)
        cache = kv = None  # free before the next batch size
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("gemm", "model", "attention", "all"), default="all")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("CUDA only")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if args.part in ("gemm", "all"):
        gemm_part(args.quick)
    if args.part in ("model", "all"):
        model_part()
    if args.part in ("attention", "all"):
        attention_part(args.quick)


if __name__ == "__main__":
    main()
