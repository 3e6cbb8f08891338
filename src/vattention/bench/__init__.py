"""vattention.bench: benchmarks anyone can rerun, one module per suite.

    memory.py   the memory library: driver calls, set_access batching, growth, decode overlap
    report.py   what every suite shares: timing, tables on stdout, the device's name, JSON output

Each benchmark prints one table per measurement and a summary, and writes every number it took to
one JSON file (by default under benchmarks/results/ in the current directory). Run one with
`vattention bench <suite> [args]`; `--help` lists a suite's arguments. The benchmarks import the
library; nothing in the library imports from here.
"""
