"""vattention.bench: benchmarks anyone can rerun, one module per suite.

    memory.py      the memory library: driver calls, set_access batching, growth, decode overlap
    kernels.py     decode/prefill attention kernels, contiguous vs paged, on VMM-backed memory
    capacity.py    committed vs used KV bytes and max concurrent requests per KV design (no model)
    offline.py     one engine, one fixed batch: tokens/s, step times, KV mapped vs used
    latency.py     decode step time vs batch size per KV design: wall, GPU busy, the weights+KV roofline
    throughput.py  every KV design on the same model in one run: ShareGPT or long-context traces,
                   optionally beside HF transformers' continuous batching (--peer transformers)
    serve.py       Poisson load against a running `vattention serve` (vllm bench serve's report)
    datasets.py    ShareGPT and synthetic long-context request traces
    report.py      what every suite shares: timing, tables on stdout, the device's name, JSON output

Each benchmark prints one table per measurement and a summary, and writes every number it took to
one JSON file (by default under benchmarks/results/ in the current directory). Run one with
`vattention bench <suite> [args]`; `--help` lists a suite's arguments. The benchmarks import the
library; nothing in the library imports from here.
"""
