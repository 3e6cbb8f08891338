"""Can the MoE layer use torch._grouped_mm on this GPU: which dtypes, inside a CUDA graph, with
the routing (softmax, topk, argsort) on the device? And what does it cost against a loop over
experts? Prints one line per check.  python benchmarks/diag_grouped_mm.py"""

from __future__ import annotations

import torch


def moe(x, router, w_gate_up, w_down, k):
    """The MoE block as models/moe.py computes it on CUDA (see there)."""
    t, e = x.shape[0], router.shape[0]
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(0, flat.int(), torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    a = x[order // k]
    h = torch._grouped_mm(a, w_gate_up.transpose(-2, -1), offs=offs)
    gate, up = h.chunk(2, dim=-1)
    h = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w_down.transpose(-2, -1), offs=offs)
    out = torch.empty_like(h).index_copy_(0, order, h)
    return (out.view(t, k, -1) * weights[..., None]).sum(1)


def reference(x, router, w_gate_up, w_down, k):
    probs = torch.softmax((x @ router.T).float(), dim=-1)
    weights, experts = probs.topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        tok, slot = (experts == e).nonzero(as_tuple=True)
        if tok.numel():
            gate, up = (x[tok] @ w_gate_up[e].T).chunk(2, dim=-1)
            out.index_add_(0, tok, (torch.nn.functional.silu(gate) * up) @ w_down[e].T * weights[tok, slot, None])
    return out


def main():
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    H, I, E, K = 2048, 768, 128, 8  # Qwen3-30B-A3B's MoE shape
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(64, H, device=dev, generator=g).to(dtype)
        router = (torch.randn(E, H, device=dev, generator=g) * 0.02).to(dtype)
        wgu = (torch.randn(E, 2 * I, H, device=dev, generator=g) * 0.02).to(dtype)
        wd = (torch.randn(E, H, I, device=dev, generator=g) * 0.02).to(dtype)
        try:
            got = moe(x, router, wgu, wd, K)
        except Exception as e:  # noqa: BLE001
            print(f"{dtype}: _grouped_mm eager fails: {type(e).__name__}: {str(e)[:200]}")
            continue
        want = reference(x, router, wgu, wd, K)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        print(f"{dtype}: eager ok, relative error vs the expert loop {err:.2e}")
        try:
            static = x.clone()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                moe(static, router, wgu, wd, K)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = moe(static, router, wgu, wd, K)
            static.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            print(f"{dtype}: CUDA graph ok, replay equals eager: {torch.equal(out, got)}")
        except Exception as e:  # noqa: BLE001
            print(f"{dtype}: CUDA graph capture fails: {type(e).__name__}: {str(e)[:200]}")
    for t in (1, 64, 512):
        x = torch.randn(t, H, device=dev).bfloat16()
        router, wgu, wd = ((torch.randn(*s, device=dev) * 0.02).bfloat16() for s in ((E, H), (E, 2 * I, H), (E, H, I)))
        times = {}
        for name, fn in (("grouped_mm", moe), ("expert loop", reference)):
            for _ in range(3):
                fn(x, router, wgu, wd, K)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn(x, router, wgu, wd, K)
            end.record()
            torch.cuda.synchronize()
            times[name] = start.elapsed_time(end) / 20
        print(f"T={t}: one MoE layer (E={E}, k={K}, H={H}, I={I}) bf16: grouped_mm {times['grouped_mm']:.3f} ms, "
              f"expert loop {times['expert loop']:.3f} ms")


if __name__ == "__main__":
    main()
