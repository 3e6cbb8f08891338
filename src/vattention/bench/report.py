"""What every benchmark shares: timing one call, latency statistics, tables on stdout, the name of
the machine measured, its copy bandwidth, freeing device memory between runs, and the JSON file
the results go to."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def us_stats(seconds: list[float], unit: str) -> dict[str, Any]:
    """Count, median, mean, min and max in microseconds of timings taken once per `unit`."""
    us = [s * 1e6 for s in seconds]
    return {"unit": unit, "count": len(us), "median_us": statistics.median(us),
            "mean_us": statistics.fmean(us), "min_us": min(us), "max_us": max(us)}


def print_table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    """A title line, then right-aligned columns as wide as their widest cell."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def fmt(value: Any) -> str:
    """Floats to 3 significant digits, or whole from 100 up; anything else as str()."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def share(fraction: float | None) -> str:
    """A fraction as a whole percentage; None (a share of nothing) as "-"."""
    return "-" if fraction is None else f"{fraction:.0%}"


def device_name(device: str) -> str:
    """The GPU's name on "cuda"; on the host, the platform, processor and CPU count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus"


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by one copy of `num_bytes` within `device`: the median of
    `repeats` copies after an untimed one (CUDA events on a GPU, perf_counter around a host memcpy)."""
    src = torch.ones(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # pages touched, the copy path warm
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    return 2 * num_bytes / statistics.median(seconds)


def free_device_memory() -> None:
    """Give the last run's tensors back, so the next one measures (and gets) the free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_json(path: Path, results: dict[str, Any]) -> None:
    """Write `results` indented to `path`, creating its directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
