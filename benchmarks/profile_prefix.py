"""Where the host time of `bench prefix`'s shared workload goes, caching on (diagnostic).

Runs the workload once per design under cProfile (the profiler slows Python, not the device, so
the split between functions is what to read, not the total) and prints the functions with the
most time of their own and the engine's main entry points by cumulative time.

    python benchmarks/profile_prefix.py --model llama-3-8b --load-format dummy --device cuda \\
        --max-num-seqs 256 --max-num-batched-tokens 8192 [--kv-caches vattention,paged] [--top 25]
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys

from vattention.bench import prefix

WATCH = ("step", "schedule", "_match_prefix", "_publish", "allocate", "_new_slot", "_grow", "alloc_slot",
         "_map_units", "ensure", "cache_prefix", "match_prefix", "extend_keys", "build_metadata", "execute",
         "set_access", "map", "free")


def main(argv: list[str]) -> None:
    top = 25
    if "--top" in argv:
        i = argv.index("--top")
        top = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    ns = prefix.parse_args(argv + ["--workloads", "shared"])
    for design in prefix.designs(ns):
        prof = cProfile.Profile()
        prof.enable()
        row, = prefix.run_one(ns, design, True, ["shared"])
        prof.disable()
        print(f"\n=== {design['kv_cache']}, caching on: {row['elapsed_s']:.1f} s under the profiler, "
              f"host {row['host_s']:.2f} s over {row['num_steps']} steps, TTFT p50 {row['ttft_p50_s']:.2f} s")
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(top)
        print("\n".join(out.getvalue().splitlines()[-top - 3:]))
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("cumulative").print_stats("|".join(rf"\({w}\)" for w in WATCH))
        print("\n".join(line for line in out.getvalue().splitlines() if "(" in line and ":" in line))


if __name__ == "__main__":
    main(sys.argv[1:])
