"""CacheStats: what `VirtualKVCache.stats()` reports, and the counters behind it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MapCounters:
    """Running totals the cache updates as it maps and unmaps (under its lock)."""

    pages_mapped_background: int = 0  # pages mapped by the background mapper (hidden behind compute)
    pages_mapped_critical: int = 0  # pages mapped inside ensure(): the caller waited for them
    pages_unmapped: int = 0  # pages unmapped (reclamation, trim, close)
    pages_reclaimed: int = 0  # of those, pages taken from other slots because the pool was short
    map_seconds_background: float = 0.0  # driver time spent mapping in the background thread
    map_seconds_critical: float = 0.0  # driver time spent mapping inside ensure()
    unmap_seconds: float = 0.0  # driver time spent unmapping (including waits on fences)
    wait_seconds: float = 0.0  # time ensure() blocked on pages the background mapper was mapping
    pages_aliased: int = 0  # of pages_mapped_critical, second mappings of shared units (read-only)


@dataclass
class CacheStats:
    """A snapshot of the cache's memory. Waste = bytes mapped that hold no token."""

    page_size: int  # bytes per physical page
    pages_total: int  # the budget in pages
    pages_mapped: int  # distinct pages mapped into some slot (busy or idle)
    pages_free: int  # pages in the pool: pages_total - pages_mapped - pages_held
    pages_created: int  # pages holding physical memory now (mapped + pooled handles)
    bytes_mapped: int  # pages_mapped * page_size
    bytes_used: int  # bytes of tokens the busy slots hold
    num_slots_busy: int  # slots allocated to a request
    num_slots_idle_mapped: int  # free slots still holding pages (deferred reclamation)
    counters: MapCounters  # cumulative mapping activity
    pages_held: int = 0  # pages of shared units mapped in no slot, kept for a prefix cache
    pages_shared: int = 0  # pages two or more busy slots map (counted once in pages_mapped)
    bytes_saved: int = 0  # bytes busy slots would need more without sharing
    num_mappings: int = 0  # page mappings: pages_mapped plus every second mapping of a shared page
    num_units: int = 0  # live shared units

    @property
    def bytes_wasted(self) -> int:
        return self.bytes_mapped - self.bytes_used

    @property
    def utilization(self) -> float:
        """Fraction of mapped bytes that hold tokens (1.0 when nothing is mapped)."""
        return self.bytes_used / self.bytes_mapped if self.bytes_mapped else 1.0

    def summary(self) -> str:
        mib = 1 << 20
        c = self.counters
        return (f"KV: {self.bytes_used / mib:.1f} MiB used / {self.bytes_mapped / mib:.1f} MiB mapped "
                f"({self.pages_mapped}/{self.pages_total} pages of {self.page_size // 1024} KiB, "
                f"{self.utilization:.0%} utilized); maps {c.pages_mapped_background} background / "
                f"{c.pages_mapped_critical} critical")
