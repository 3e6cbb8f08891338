"""Physical-memory drivers behind one protocol (see base.py). Only cuda.py imports cuda.bindings."""

from __future__ import annotations

import torch

from .base import Driver, DriverError
from .host import HostDriver


def make_driver(device: str | torch.device = "cpu", page_size: int | None = None) -> Driver:
    """HostDriver for "cpu", CudaDriver for "cuda[:N]"; page_size None is the driver's default."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return HostDriver(page_size)
    if dev.type == "cuda":
        from .cuda import CudaDriver  # imports cuda.bindings, which CPU-only installs may lack
        return CudaDriver(dev, page_size)
    raise ValueError(f"no KV memory driver for device {device!r}; use 'cpu' or 'cuda[:N]'")


__all__ = ["Driver", "DriverError", "HostDriver", "make_driver"]
