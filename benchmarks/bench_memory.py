"""Benchmark of the vattention memory library: the same as `vattention bench memory`, same arguments
(see `python benchmarks/bench_memory.py --help`). The code lives in vattention.bench.memory."""

import sys

from vattention.bench.memory import main

sys.exit(main())
