"""PagePool: physical pages up to a byte budget, created ahead so growth only maps.

Not thread-safe on its own: VirtualKVCache calls it under its lock.
"""

from __future__ import annotations

from typing import Any

from .drivers.base import Driver


class PagePool:
    """`num_pages` pages at most; `prealloc` creates them all now, off the critical path."""

    def __init__(self, driver: Driver, num_pages: int, prealloc: bool = True):
        self.driver = driver
        self.num_pages = num_pages  # the budget in pages: created + not yet created
        self._free: list[Any] = []  # created handles not mapped anywhere
        self._num_uncreated = num_pages  # budget not yet backed by a handle
        self.num_taken = 0  # handles handed out (mapped, or about to be)
        if prealloc:
            self._create(num_pages)

    @property
    def num_available(self) -> int:
        """Pages that `take` can hand out without reclaiming anything."""
        return len(self._free) + self._num_uncreated

    @property
    def num_created(self) -> int:
        """Pages that hold physical memory now (taken or free)."""
        return self.num_pages - self._num_uncreated

    def take(self, n: int) -> list[Any] | None:
        """`n` handles, or None (and nothing taken) when the budget cannot cover them."""
        if n > self.num_available:
            return None
        if n > len(self._free):
            self._create(n - len(self._free))
        taken = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]  # in place: a copy of the rest cost O(pool) a take
        self.num_taken += n
        return taken

    def give(self, handles: list[Any]) -> None:
        """Return unmapped handles for reuse."""
        self._free.extend(handles)
        self.num_taken -= len(handles)

    def trim(self) -> int:
        """Release every free handle so its memory returns to the system; returns pages released."""
        released = 0
        while self._free:
            self.driver.release(self._free[-1])
            self._free.pop()
            self._num_uncreated += 1
            released += 1
        return released

    def close(self) -> None:
        self.trim()

    def _create(self, n: int) -> None:
        for _ in range(n):  # a failed create leaves earlier pages in the pool: nothing leaks
            self._free.append(self.driver.create())
            self._num_uncreated -= 1
