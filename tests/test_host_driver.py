"""The host driver is real virtual memory: unmapped pages fault, released pages return memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from vattention.memory import HostDriver

from conftest import SMALL_PAGE, fill, make_cache


def memfd_bytes(driver: HostDriver) -> int:
    """Physical memory the memfd holds now (allocated blocks, not its apparent size)."""
    return os.fstat(driver.fd).st_blocks * 512


def rss_in(lo: int, hi: int) -> int:
    """Resident bytes of this process's mappings inside [lo, hi), from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start < hi and end > lo
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def test_memory_returns_to_the_os_after_trim_and_close(layout):
    """Writing KV commits memory (memfd blocks and RSS); trim() after free gives it back."""
    cache = make_cache(layout, budget_pages=None)
    driver = cache.driver
    lo, hi = cache._base, cache._base + cache.layout.reservation_bytes
    before = memfd_bytes(driver)
    slots = [cache.alloc_slot() for _ in range(3)]
    for tag, slot in enumerate(slots):
        assert cache.ensure(slot, 1500)
        fill(cache, slot, tag, 0, 1500)
    written = memfd_bytes(driver) - before
    cache.wait()
    used, mapped = cache.stats().bytes_used, cache.stats().bytes_mapped
    assert 0 < used <= written <= mapped, (used, written, mapped)
    assert used <= rss_in(lo, hi) <= mapped
    for slot in slots:
        cache.free(slot)
    # Deferred reclamation: freed slots keep their pages (and memory) until trimmed.
    assert memfd_bytes(driver) - before == written
    released = cache.trim()
    assert released >= mapped
    assert memfd_bytes(driver) <= before + SMALL_PAGE, "punched pages still hold memory"
    assert rss_in(lo, hi) == 0
    assert cache.stats().pages_mapped == 0 and cache.stats().pages_created == 0
    cache.close()
    assert driver.num_live_handles == 0 and driver.num_live_mappings == 0


FAULT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from vattention.memory import HostDriver, KVCacheSpec, VirtualKVCache
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                       max_seqs=2, max_seq_len=4096, layout=sys.argv[1])
    cache = VirtualKVCache(spec, driver=HostDriver(65536), memory_budget_bytes=64 * 65536,
                           eager_cushion_groups=0)
    slot = cache.alloc_slot()
    assert cache.ensure(slot, 10)
    capacity = cache.slot_capacity(slot)
    k, v = cache.kv(1)
    k[slot, capacity - 1] = 1.0            # the last mapped token is fine
    what = sys.argv[2]
    if what == "past_end":
        token = capacity
    elif what == "after_trim":
        cache.free(slot); cache.trim(); token = 0
    else:
        token = capacity - 1
    print("touching", token, flush=True)
    print(float(v[slot, token].sum()), flush=True)
    print("survived", flush=True)
""")


@pytest.mark.parametrize("what", ["past_end", "after_trim"])
def test_touching_an_unmapped_page_faults(layout, what):
    """A read one token past the mapped pages, or of a trimmed slot, dies with SIGSEGV."""
    proc = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, layout, what],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "touching" in proc.stdout and "survived" not in proc.stdout


def test_touching_mapped_pages_does_not_fault(layout):
    """The control for the fault test: the same script reading a mapped token exits cleanly."""
    proc = subprocess.run([sys.executable, "-c", FAULT_SCRIPT, layout, "inside"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "survived" in proc.stdout


STALE_VIEW_SCRIPT = textwrap.dedent("""
    import sys, torch
    from vattention.memory import HostDriver, KVCacheSpec, VirtualKVCache
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                       max_seqs=2, max_seq_len=4096, layout=sys.argv[1])
    def open_cache():
        cache = VirtualKVCache(spec, driver=HostDriver(65536), memory_budget_bytes=64 * 65536,
                               eager_cushion_groups=0)
        slot = cache.alloc_slot()
        assert cache.ensure(slot, 10)
        return cache, slot
    a, slot = open_cache()
    stale = a.kv(0)[0]
    a.close()
    b, slot_b = open_cache()  # the same shape: the allocator's first choice is a's old range
    fresh = b.kv(0)[0]
    fresh[slot_b, 0] = 42.0
    view = stale if sys.argv[2] == "stale" else fresh
    print("reading", flush=True)
    print(float(view[slot_b, 0, 0, 0]), flush=True)
    print("survived", flush=True)
""")


@pytest.mark.parametrize("which", ["stale", "fresh"])
def test_a_view_of_a_closed_cache_faults_instead_of_reading_the_next_cache(layout, which):
    """A view kept past close() reads nothing: it faults (SIGSEGV) even once another cache of
    the same shape is live and written, instead of showing that cache's 42. The fresh view is
    the control."""
    proc = subprocess.run([sys.executable, "-c", STALE_VIEW_SCRIPT, layout, which],
                          capture_output=True, text=True, timeout=120)
    if which == "fresh":
        assert proc.returncode == 0 and "42.0" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
        return
    assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "reading" in proc.stdout and "survived" not in proc.stdout


def test_views_only_over_live_reservations():
    """tensor() refuses a range it did not reserve, or one already freed; a second free is an
    error too, not a silent munmap of someone else's range."""
    from vattention.memory import DriverError
    d = HostDriver(SMALL_PAGE)
    addr = d.reserve(2 * SMALL_PAGE)
    assert d.tensor(addr, (2 * SMALL_PAGE,), torch.uint8, (1,)).numel() == 2 * SMALL_PAGE
    with pytest.raises(DriverError, match="not inside a live reservation"):
        d.tensor(addr, (3 * SMALL_PAGE,), torch.uint8, (1,))  # runs past the end
    d.free_reservation(addr, 2 * SMALL_PAGE)
    assert d.num_live_reservations == 0
    with pytest.raises(DriverError, match="not inside a live reservation"):
        d.tensor(addr, (16,), torch.uint8, (1,))
    with pytest.raises(DriverError, match="free_reservation.*not a live reservation"):
        d.free_reservation(addr, 2 * SMALL_PAGE)
    d.close()


def test_mapped_page_without_access_faults():
    """map() alone grants nothing, as on CUDA: only set_access makes the page usable."""
    script = textwrap.dedent("""
        import ctypes
        from vattention.memory import HostDriver
        d = HostDriver(65536)
        addr = d.reserve(4 * 65536)
        h = d.create()
        d.map(addr, h)
        if __import__('sys').argv[1] == 'access':
            d.set_access(addr, 65536)
        ctypes.memset(addr, 1, 16)
        print("wrote", flush=True)
    """)
    denied = subprocess.run([sys.executable, "-c", script, "none"], capture_output=True, text=True)
    granted = subprocess.run([sys.executable, "-c", script, "access"], capture_output=True, text=True)
    assert denied.returncode == -signal.SIGSEGV, denied.stderr[-1000:]
    assert granted.returncode == 0 and "wrote" in granted.stdout, granted.stderr[-1000:]


def test_page_handles_are_shared_memory_between_mappings():
    """One physical page mapped at two addresses shows the same bytes (it is memory, not a copy)."""
    import ctypes
    d = HostDriver(SMALL_PAGE)
    addr = d.reserve(2 * SMALL_PAGE)
    h = d.create()
    d.map(addr, h)
    d.map(addr + SMALL_PAGE, h)
    d.set_access(addr, 2 * SMALL_PAGE)
    ctypes.memmove(addr + 100, b"vattention", 10)
    assert ctypes.string_at(addr + SMALL_PAGE + 100, 10) == b"vattention"
    d.unmap(addr)
    d.unmap(addr + SMALL_PAGE)
    d.release(h)
    d.free_reservation(addr, 2 * SMALL_PAGE)
    assert d.num_live_handles == 0 and d.num_live_mappings == 0
    d.close()


def test_budget_beyond_the_process_mapping_limit_is_refused_up_front():
    """Each host page is one kernel mapping; a budget that would exceed vm.max_map_count is a
    clear error at construction, not an ENOMEM in the middle of serving."""
    from vattention.memory import VirtualKVCache

    from conftest import small_spec
    driver = HostDriver(4096)
    with pytest.raises(ValueError, match="max_map_count"):
        VirtualKVCache(small_spec(), driver=driver, memory_budget_bytes=(driver.max_mappings + 10) * 4096)
