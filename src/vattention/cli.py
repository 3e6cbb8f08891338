"""The `vattention` command line: `vattention demo`, `vattention bench memory`."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vattention", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="map, write, read and free KV pages; print memory stats")
    demo.add_argument("--device", default="cpu", help="cpu (host driver) or cuda[:N]")
    demo.add_argument("--layout", default="cross_layer", choices=["cross_layer", "per_layer"])
    demo.add_argument("--page-size", type=int, default=None,
                      help="bytes per page (default: driver granularity, 2 MiB); host accepts 64 KiB")
    demo.add_argument("--budget-mib", type=int, default=256, help="physical KV memory budget")

    bench = sub.add_parser("bench", help="benchmarks (tables + JSON)")
    bench.add_argument("suite", choices=["memory"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")

    ns = parser.parse_args(argv)
    if ns.command == "demo":
        from .demo import run_demo
        run_demo(ns.device, ns.layout, ns.page_size, ns.budget_mib)
    elif ns.command == "bench":
        from .bench.memory import main as bench_main
        return bench_main(ns.args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
