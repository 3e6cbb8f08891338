"""The physical-memory driver protocol: what every backend (host, CUDA) provides.

A driver knows nothing about KV caches. It reserves virtual ranges, creates physical pages
(`granularity` bytes each), maps one page at one page-aligned address, grants access over a
contiguous mapped range, and wraps an address range as a zero-copy torch tensor.
"""

from __future__ import annotations

import operator
from typing import Any, Protocol

import torch


class DriverError(RuntimeError):
    """A driver call failed. Names the call, the address involved and what to try next."""

    def __init__(self, call: str, detail: str, addr: int | None = None, hint: str = ""):
        self.call = call
        self.addr = addr
        self.detail = detail
        where = f" at 0x{addr:x}" if addr is not None else ""
        message = f"{call}{where} failed: {detail}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


class Driver(Protocol):
    """One page = `granularity` bytes of physical memory behind an opaque handle."""

    name: str
    granularity: int  # bytes of the smallest mappable page
    page_size: int  # bytes per page this driver instance creates and maps (a multiple of granularity)
    num_live_handles: int  # pages created and not yet released: leak checks read these three
    num_live_mappings: int  # pages mapped and not yet unmapped
    num_live_reservations: int  # reservations not yet freed

    def reserve(self, nbytes: int) -> int:
        """Reserve `nbytes` of virtual address space (page aligned); nothing is mapped."""

    def free_reservation(self, addr: int, nbytes: int) -> None:
        """Give back a reservation; every page in it must be unmapped first. While a tensor
        from `tensor()` over it is alive, the range stays reserved (inaccessible) and is freed
        when the last such tensor is collected: see reservations.py."""

    def create(self) -> Any:
        """Create one physical page and return its handle."""

    def release(self, handle: Any) -> None:
        """Destroy a page; its memory returns to the system."""

    def map(self, addr: int, handle: Any) -> None:
        """Map page `handle` at `addr`; not yet accessible until `set_access`."""

    def set_access(self, addr: int, nbytes: int, read_only: bool = False) -> None:
        """Grant read/write (read only, with `read_only`) over `nbytes` of mapped pages starting
        at `addr` (batch contiguous runs). A write through a read-only range faults."""

    def unmap(self, addr: int) -> None:
        """Unmap the page at `addr`; a later access faults."""

    def tensor(self, addr: int, shape: tuple[int, ...], dtype: torch.dtype,
               strides: tuple[int, ...]) -> torch.Tensor:
        """A zero-copy tensor over memory at `addr` (strides in elements), inside one live
        reservation; the tensor keeps that reservation's address range reserved."""

    def fence(self) -> Any:
        """A marker of all work issued so far on the current stream (None where work is synchronous)."""

    def wait(self, fence: Any) -> None:
        """Block until the work behind `fence` is done, so its pages may be unmapped."""

    def bind_thread(self) -> None:
        """Make this driver usable from the calling (background) thread."""

    def close(self) -> None:
        """Release driver-level resources (after every page and reservation is gone)."""


def check_page_size(page_size: object, driver: str, granularity: int | None = None,
                    unit: str = "driver granularity") -> int:
    """`page_size` as an int, or a TypeError/ValueError saying what a valid one is. With
    `granularity` None (not known yet) only the type and sign are checked."""
    try:
        if isinstance(page_size, bool):
            raise TypeError
        page_size = operator.index(page_size)
    except TypeError:
        raise TypeError(f"{driver} page_size must be an int number of bytes, got {page_size!r}") from None
    if granularity is None:
        if page_size <= 0:
            raise ValueError(f"{driver} page_size must be a positive number of bytes, got {page_size}")
    elif page_size <= 0 or page_size % granularity:
        raise ValueError(f"{driver} page_size must be a positive multiple of the {unit} "
                         f"({granularity} bytes), got {page_size}")
    return page_size
