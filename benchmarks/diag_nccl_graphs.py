"""Where does a CUDA graph holding NCCL all-reduces hang on this machine? Two processes do what
the engine's tensor-parallel ranks would with graphs (vattention.distributed.init_group's groups:
NCCL default group plus a gloo control group; engine/graphs.py's warm-up then thread_local
capture, several batch sizes sharing one pool), printing each stage, then tear the group down.
A stage that does not finish in 60 s dumps every thread's stack and exits.

    python3 benchmarks/diag_nccl_graphs.py                     # on a machine with 2 GPUs
    python3 benchmarks/diag_nccl_graphs.py --free-graphs-first  # drop the graphs, then tear down

The second form tests the hypothesis that NCCL keeps resources of a communicator alive for the
graphs that captured its collectives, so the graphs must go before the group does.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STAGE_TIMEOUT_S = 60


def stage(rank: int, name: str, start: float) -> None:
    print(f"[rank {rank} {time.perf_counter() - start:6.2f}s] {name}", flush=True)
    faulthandler.dump_traceback_later(STAGE_TIMEOUT_S, exit=True)


def body(layers: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for w in layers:
        x = x @ w
        dist.all_reduce(x)
        x = x / 2
    return x


def worker(rank: int, port: int, free_graphs_first: bool) -> None:
    start = time.perf_counter()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    stage(rank, "init_process_group nccl + gloo control group", start)
    dist.init_process_group("nccl", rank=rank, world_size=2)
    control = dist.new_group(backend="gloo")
    torch.manual_seed(0)
    layers = [torch.randn(256, 256, device="cuda") / 16 for _ in range(4)]
    inputs = torch.randn(8, 256, device="cuda")
    with torch.inference_mode():
        stage(rank, "eager all-reduce", start)
        want = body(layers, inputs.clone())
        torch.cuda.synchronize()
        graphs, pool = {}, None
        for size in (8, 4, 2, 1):
            stage(rank, f"warm-up on a side stream, batch {size}", start)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                body(layers, inputs[:size])
            torch.cuda.current_stream().wait_stream(side)
            stage(rank, f"capture batch {size}", start)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = body(layers, inputs[:size])
            pool = graph.pool()
            graphs[size] = (graph, out)
        stage(rank, "replay", start)
        for size, (graph, out) in graphs.items():
            graph.replay()
            torch.cuda.synchronize()
            err = (out - want[:size]).abs().max().item()
            print(f"[rank {rank}] batch {size}: max |graph - eager| = {err:.2e}", flush=True)
        stage(rank, "gloo barrier", start)
        dist.barrier(group=control)
        if free_graphs_first:
            stage(rank, "drop the graphs", start)
            graphs.clear()
            del graph, out
            torch.cuda.synchronize()
    stage(rank, "destroy_process_group", start)
    dist.destroy_process_group()
    stage(rank, "done", start)
    faulthandler.cancel_dump_traceback_later()


def main() -> int:
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs")
        return 1
    print(f"torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)
    mp.spawn(worker, args=(29517, "--free-graphs-first" in sys.argv), nprocs=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
