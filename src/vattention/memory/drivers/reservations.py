"""Reserved address ranges that outlive their free while tensors still view them.

A view of a closed cache must never alias memory a later cache maps at the same addresses. So a
driver frees a range only once no tensor over it is alive; until then the range stays reserved
with nothing mapped, and an access through a stale view faults.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

from .base import DriverError


class ViewKeepAlive:
    """Referenced by every tensor a driver builds over one reservation (through the buffer
    object the tensor's storage holds), so the driver can tell when the last one is gone."""

    __slots__ = ("__weakref__",)


class Reservations:
    """A driver's reserved address ranges, and the rule that keeps a dead view harmless.

    free() of a range that tensors still view does not free it: its pages are already
    unmapped, so the range stays reserved and inaccessible (an access faults) until the last
    view is collected, and only then is it really freed. No later reserve() can therefore
    hand the same addresses to another cache while a stale view still points at them.

        reserve()          -> add()    live: tensors may be built over it (keep_alive())
        free_reservation() -> free()   no view alive: freed now; else dying until the last goes

    `free_now(addr, token)` is the driver's real free; for a dying range it runs on whichever
    thread drops the last view, so it must be callable from any thread. It is skipped at
    interpreter exit, when the process's address space goes anyway.
    """

    def __init__(self, free_now: Callable[[int, Any], None]):
        self._free_now = free_now
        self._lock = threading.Lock()  # free() and a collected view may race from two threads
        # addr -> (nbytes, the driver's token for free_now, weak ref to the views' keep-alive)
        self._live: dict[int, tuple[int, Any, weakref.ref | None]] = {}
        self._num_dying = 0  # freed by the caller, still reserved for views that are alive

    def __len__(self) -> int:
        """Ranges not yet really freed: live ones and dying ones (leak checks read this)."""
        with self._lock:
            return len(self._live) + self._num_dying

    def add(self, addr: int, nbytes: int, token: Any) -> None:
        with self._lock:
            self._live[addr] = (nbytes, token, None)

    def keep_alive(self, addr: int, nbytes: int) -> ViewKeepAlive:
        """The object a tensor over [addr, addr + nbytes) must reference."""
        with self._lock:
            for base, (size, token, ref) in self._live.items():
                if base <= addr and addr + nbytes <= base + size:
                    owner = ref() if ref is not None else None
                    if owner is None:
                        owner = ViewKeepAlive()
                        self._live[base] = (size, token, weakref.ref(owner))
                    return owner
        raise DriverError("tensor", f"[0x{addr:x}, 0x{addr + nbytes:x}) is not inside a live "
                          f"reservation", addr, hint="views can only be built over reserve()d "
                                                     "ranges not yet freed")

    def free(self, addr: int) -> None:
        with self._lock:
            if addr not in self._live:
                raise DriverError("free_reservation", "not a live reservation", addr,
                                  hint="each reservation is freed once, at its base address")
            _, token, ref = self._live.pop(addr)
            owner = ref() if ref is not None else None  # a strong ref: no view can die mid-way
            if owner is not None:
                self._num_dying += 1
        if owner is None:
            self._free_now(addr, token)
            return
        weakref.finalize(owner, self._free_dying, addr, token).atexit = False

    def _free_dying(self, addr: int, token: Any) -> None:
        try:
            self._free_now(addr, token)
        finally:
            with self._lock:
                self._num_dying -= 1
