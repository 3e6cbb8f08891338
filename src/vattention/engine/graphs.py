"""DecodeGraphs: decode-only steps replayed as CUDA graphs instead of launched kernel by kernel.

Eagerly, a decode step launches every layer's dozen-odd kernels from Python, and at small batches
the GPU waits on those launches. A CUDA graph launches the whole model body at once. vAttention
makes this natural: a slot's KV sits at one virtual address for the cache's whole life, so a
graph captured once keeps reading the right tokens while pages are mapped underneath it later.

  capture (once, at start), for each batch size b in graph_batch_sizes(max):
      static inputs ids [b], positions [b], write rows [b], seq lens [b],
      KV starts [b] (contiguous) or block tables [b, max_blocks] (paged) ─> model body ─> hidden [b, H]
  replay (a decode-only step of n <= max sequences), b = the smallest size >= n:
      rows [0, n) <- the step's inputs; rows [n, b) <- padding that writes and reads the KV
      manager's padding row (one token no request owns) ─> replay ─> hidden[:n]

Attention in a graph may read only device tensors: the metadata's max_seq_len is fixed to the
context length, from which FA2 and our split-KV kernel size their grids (each still stops at its
sequence's own length), and sdpa runs padded_decode. With capture=False (CPU, which has no
graphs) the same static-buffer path runs eagerly; the tests use it to check the padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..attention import AttentionMetadata
from ..kv import KVManager

GRAPH_BACKENDS = ("flash", "triton")  # CUDA backends whose decode path reads only device tensors


def use_graphs(enforce_eager: bool, device: torch.device, backend_name: str, tensor_parallel_size: int) -> bool:
    """Graphs serve decode steps on one CUDA GPU with flash or triton attention. Not under tensor
    parallelism yet: graphs holding NCCL all-reduces capture and replay correctly, but a process
    group they captured hangs when torn down (torch 2.11 on two H200s, pytorch#115388;
    benchmarks/results/README.md), so tensor-parallel ranks run eagerly."""
    return (not enforce_eager and device.type == "cuda" and backend_name in GRAPH_BACKENDS
            and tensor_parallel_size == 1)


def graph_batch_sizes(max_size: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to and including max_size."""
    sizes = [s for s in (1, 2, 4) if s < max_size] + list(range(8, max_size, 8))
    return [*sizes, max_size]


class DecodeGraphs:
    def __init__(self, model, kv: KVManager, backend, device: torch.device, max_batch_size: int,
                 max_seq_len: int, capture: bool = True):
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_seq_len = max_seq_len  # every captured step's attention bound: the context length
        self.pad_row = kv.padding_row()
        self.block_size = kv.block_size if kv.kind == "paged" else 0
        size = self.sizes[-1]
        opts = dict(device=device)
        with torch.inference_mode():
            self.ids = torch.zeros(size, dtype=torch.long, **opts)
            self.positions = torch.zeros(size, dtype=torch.long, **opts)
            self.write_rows = torch.full((size,), self.pad_row, dtype=torch.int64, **opts)
            self.seq_lens = torch.ones(size, dtype=torch.int32, **opts)
            self.query_start = torch.arange(size + 1, dtype=torch.int32, **opts)
            self.kv_starts = self.block_tables = None
            if self.block_size:
                width = -(-max_seq_len // self.block_size)  # [size, blocks of the longest sequence]
                self.block_tables = torch.full((size, width), self.pad_row // self.block_size,
                                               dtype=torch.int32, **opts)
            else:
                self.kv_starts = torch.full((size,), self.pad_row, dtype=torch.int32, **opts)
            self._replay: dict[int, Callable[[], torch.Tensor]] = {}
            caches = kv.layer_caches()
            pool = None
            for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
                meta = self._metadata(b)

                def body(b=b, meta=meta):
                    return model(self.ids[:b], self.positions[:b], caches, meta, backend)

                if capture:
                    graph, hidden = capture_graph(body, pool)
                    pool = graph.pool()
                    self._replay[b] = lambda graph=graph, hidden=hidden: (graph.replay(), hidden)[1]
                else:
                    self._replay[b] = body
        self.num_replays = 0  # steps served by a graph (or its eager stand-in), for tests and stats

    def fits(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode and meta.num_seqs <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The model body over a decode-only step of n sequences: hidden [n, H] (a view of the
        graph's output, valid until the next replay)."""
        n = meta.num_seqs
        b = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(ids)
        self.positions[:n].copy_(positions)
        self.write_rows[:n].copy_(meta.kv_write_index)
        self.seq_lens[:n].copy_(meta.seq_lens_t)
        if self.block_tables is None:
            self.kv_starts[:n].copy_(meta.kv_starts)
        else:
            self.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if n < b:  # rows a larger step left behind would write into live requests' KV
            self.write_rows[n:b].fill_(self.pad_row)
            self.seq_lens[n:b].fill_(1)
            if self.block_tables is None:
                self.kv_starts[n:b].fill_(self.pad_row)
            else:
                self.block_tables[n:b, 0].fill_(self.pad_row // self.block_size)
        self.num_replays += 1
        return self._replay[b]()[:n]

    def _metadata(self, b: int) -> AttentionMetadata:
        """Batch size b's metadata over the static buffers (the host lists only size things)."""
        return AttentionMetadata(
            query_lens=[1] * b, seq_lens=[self.max_seq_len] * b, max_query_len=1,
            max_seq_len=self.max_seq_len, query_start_loc=self.query_start[:b + 1],
            seq_lens_t=self.seq_lens[:b], kv_write_index=self.write_rows[:b],
            kv_starts=None if self.kv_starts is None else self.kv_starts[:b],
            block_tables=None if self.block_tables is None else self.block_tables[:b],
            block_size=self.block_size)


def capture_graph(body: Callable[[], torch.Tensor], pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm body up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture
    it. thread_local: the KV mapper thread may call the driver meanwhile."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        hidden = body()
    return graph, hidden
