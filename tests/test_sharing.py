"""Sharing pages between slots (the memory side of prefix caching): a held unit mapped into a
second slot is the same physical memory, counted once, read-only there; a tail is copied; every
page comes back once nothing holds or maps it; a failed driver call leaks nothing."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from conftest import FaultyDriver, check, check_range, fill, make_cache, new_driver, on_cuda, small_spec
from test_cache import assert_balanced


def share_cache(layout: str = "cross_layer", **kwargs):
    """Room for 3 units a slot in both layouts (per_layer units are 1024 tokens on 64 KiB pages).
    No background cushion, as the engine runs it: the counts below are exact at every point
    (the hypothesis machine shares with the mapper thread running)."""
    kwargs.setdefault("eager_cushion_groups", 0)
    return make_cache(layout, budget_pages=None, spec=small_spec(layout, max_seq_len=4000), **kwargs)


def test_a_held_unit_is_aliased_into_a_new_slot_and_counted_once(layout):
    with share_cache(layout) as cache:
        lay = cache.layout
        ut, n = lay.unit_tokens, lay.num_tensors
        a = cache.alloc_slot()
        assert cache.ensure(a, 2 * ut + 5)
        fill(cache, a, 1, 0, 2 * ut + 5)
        units = [cache.hold(a, 0), cache.hold(a, 1)]
        before = cache.stats()
        b = cache.alloc_slot(2 * ut + 9, prefix=units)
        assert b != a
        st = cache.stats()
        assert st.pages_mapped == before.pages_mapped, "aliasing took new pages"
        assert st.num_mappings == before.num_mappings + 2 * lay.unit_groups * n
        assert st.pages_shared == 2 * lay.unit_groups * n
        assert st.bytes_saved == 2 * ut * cache.spec.bytes_per_token
        check_range(cache, b, 1, 0, 2 * ut)  # b reads a's tokens through its own addresses
        assert cache.ensure(b, 2 * ut + 9)
        fill(cache, b, 2, 2 * ut, 2 * ut + 9)  # its own pages past the prefix
        check(cache, a, 1, 2 * ut + 5)
        assert_balanced(cache)
        with cache._lock:
            assert cache._slots[b].readonly == {0, 1}
            assert cache._slots[b].groups[0] is cache._slots[a].groups[0]


def test_everything_returns_once_nothing_holds_or_maps_it(layout):
    with share_cache(layout) as cache:
        ut = cache.layout.unit_tokens
        a = cache.alloc_slot()
        cache.ensure(a, ut + 3)
        u = cache.hold(a, 0)
        b = cache.alloc_slot(ut + 1, prefix=[u])
        cache.free(a)
        cache.free(b)
        st = cache.stats()
        assert st.num_units == 1 and st.bytes_saved == 0
        cache.trim()  # idle slots let go; the held unit stays, mapped nowhere
        st = cache.stats()
        assert st.pages_held == cache.layout.unit_groups * cache.layout.num_tensors
        assert st.num_mappings == 0 and cache.driver.num_live_mappings == 0
        c = cache.alloc_slot(ut, prefix=[u])  # mapped again from nowhere
        assert cache.stats().pages_held == 0 and cache.slot_capacity(c) >= ut
        cache.release(u)
        assert cache.stats().num_units == 0  # now private to c
        with cache._lock:
            assert cache._slots[c].readonly == set()
        fill(cache, c, 3, 0, ut)  # c owns it now: writable again
        cache.free(c)
        cache.trim()
        st = cache.stats()
        assert (st.pages_mapped, st.pages_held, st.pages_free) == (0, 0, st.pages_total)
        assert_balanced(cache)


def test_a_free_slot_that_maps_the_prefix_is_reused_without_mapping(layout):
    with share_cache(layout) as cache:
        ut = cache.layout.unit_tokens
        a = cache.alloc_slot()
        cache.ensure(a, 2 * ut)
        units = [cache.hold(a, 0), cache.hold(a, 1)]
        other = cache.alloc_slot()
        cache.ensure(other, 10)
        cache.free(a)
        mapped = cache.stats().counters.pages_mapped_critical
        b = cache.alloc_slot(2 * ut + 1, prefix=units)
        assert b == a and cache.stats().counters.pages_mapped_critical == mapped
        cache.free(other)
        c = cache.alloc_slot(10)  # a slot on no prefix never maps a shared unit
        with cache._lock:
            assert not cache._slots[c].shared
        assert_balanced(cache)


def test_reclaim_takes_over_the_units_past_the_prefix_in_place(layout):
    """A prefix cache's slot choice: the free slot mapping the prefix is taken even though it
    holds a unit of its own past it, which dies in place (no driver call, take_dead()
    says so once); without reclaim a plain slot is taken and the prefix aliased into it."""
    with share_cache(layout) as cache:
        ut = cache.layout.unit_tokens
        a = cache.alloc_slot()
        cache.ensure(a, 3 * ut)
        fill(cache, a, 1, 0, 3 * ut)
        u0, u1, u2 = (cache.hold(a, i) for i in range(3))
        cache.free(a)
        mapped = cache.stats().counters.pages_mapped_critical
        b = cache.alloc_slot(2 * ut + 1, prefix=[u0, u1])
        assert b != a and not u2.dead, "without reclaim a's own unit stays mapped where it is"
        assert cache.stats().counters.pages_mapped_critical > mapped  # the prefix aliased in
        mapped = cache.stats().counters.pages_mapped_critical
        c = cache.alloc_slot(3 * ut, prefix=[u0, u1], reclaim=True)
        assert c == a and u2.dead and not (u0.dead or u1.dead)
        assert cache.take_dead() == [u2] and cache.take_dead() == []
        assert cache.ensure(c, 3 * ut)
        assert cache.stats().counters.pages_mapped_critical == mapped, "reclaiming mapped pages"
        check_range(cache, c, 1, 0, 3 * ut)  # the prefix, and u2's old tokens in its own page
        fill(cache, c, 2, 2 * ut, 3 * ut)  # writable: its own now
        check_range(cache, b, 1, 0, 2 * ut)  # b still reads the prefix
        cache.free(b)
        cache.free(c)
        cache.release(u2)  # the holder lets go of a dead unit: nothing to give back
        for u in (u0, u1):
            cache.release(u)
        assert_balanced(cache)


def test_reclaim_leaves_a_unit_another_slot_maps(layout):
    with share_cache(layout) as cache:
        ut = cache.layout.unit_tokens
        a = cache.alloc_slot()
        cache.ensure(a, 3 * ut)
        fill(cache, a, 1, 0, 3 * ut)
        units = [cache.hold(a, i) for i in range(3)]
        b = cache.alloc_slot(3 * ut, prefix=units)  # maps all three, busy
        cache.free(a)
        c = cache.alloc_slot(2 * ut + 1, prefix=units[:2], reclaim=True)
        assert c == a and not units[2].dead and cache.take_dead() == []
        with cache._lock:
            assert units[2].slots == {b}  # dropped from a, still b's
        assert cache.ensure(c, 3 * ut)
        fill(cache, c, 2, 2 * ut, 3 * ut)  # fresh pages of its own
        check_range(cache, b, 1, 0, 3 * ut)
        for s in (b, c):
            cache.free(s)
        for u in units:
            cache.release(u)
        assert_balanced(cache)


def test_with_no_prefix_reclaim_reuses_the_coldest_slot_whose_pages_fit(layout):
    """Every slot holds cached units: a request on no prefix takes the one freed longest ago
    as it is (its units die), mapping nothing, where without reclaim fresh pages are mapped."""
    for reclaim in (True, False):
        with share_cache(layout) as cache:
            ut = cache.layout.unit_tokens
            n = cache.spec.max_seqs
            slots = [cache.alloc_slot() for _ in range(n)]
            held = {}
            for s in slots:
                cache.ensure(s, 2 * ut)
                held[s] = [cache.hold(s, 0), cache.hold(s, 1)]
            order = [slots[2], slots[0]] + [s for s in slots if s not in (slots[0], slots[2])]
            for s in order:
                cache.free(s)
            mapped = cache.stats().counters.pages_mapped_critical
            c = cache.alloc_slot(2 * ut, reclaim=reclaim)
            assert cache.ensure(c, 2 * ut)
            if reclaim:
                assert c == order[0] and all(u.dead for u in held[c])
                assert cache.take_dead() == held[c]
                assert cache.stats().counters.pages_mapped_critical == mapped
                d = cache.alloc_slot(2 * ut, reclaim=True)
                assert d == order[1], "the next coldest"
                cache.free(d)
            else:
                assert not any(u.dead for us in held.values() for u in us)
                assert cache.stats().counters.pages_mapped_critical > mapped
            assert not any(u.dead for s, us in held.items() if s not in order[:2] for u in us)
            fill(cache, c, 3, 0, 2 * ut)
            cache.free(c)
            for us in held.values():
                for u in us:
                    cache.release(u)
            cache.take_dead()
            assert_balanced(cache)


def test_a_tail_is_copied_or_taken_in_place(layout):
    with share_cache(layout) as cache:
        ut = cache.layout.unit_tokens
        a = cache.alloc_slot()
        cache.ensure(a, ut + 7)
        fill(cache, a, 1, 0, ut + 7)
        full, tail = cache.hold(a, 0), cache.hold(a, 1, tail=True)
        # a is busy: the tail is copied into b
        b = cache.alloc_slot(ut + 5, prefix=[full], partial=tail)
        assert cache.ensure(b, ut + 5)
        cache.copy_tokens(tail, b, 5)
        check_range(cache, b, 1, 0, ut + 5)
        cache.free(b)
        cache.free(a)
        # a is free and the tail's only home: a request that extends all of it takes it as it
        # is, no copy (one that does not gets another slot and copies)
        d = cache.alloc_slot(ut + 6, prefix=[full], partial=tail)
        assert d != a and not tail.dead
        cache.free(d)
        c = cache.alloc_slot(ut + 6, prefix=[full], partial=tail, take_partial=True)
        assert c == a and tail.dead and cache.take_dead() == [tail]
        cache.ensure(c, ut + 6)
        cache.copy_tokens(tail, c, 6)  # a no-op
        fill(cache, c, 2, ut + 6, ut + 8)  # writes into the former tail
        check_range(cache, c, 1, 0, ut + 6)
        cache.release(tail)
        assert_balanced(cache)


def test_a_complete_unit_mapped_only_in_the_chosen_slot_is_copied_aside():
    with share_cache() as cache:
        ut = cache.layout.unit_tokens
        slots = [cache.alloc_slot() for _ in range(cache.spec.max_seqs)]
        a = slots[0]
        cache.ensure(a, ut)
        fill(cache, a, 1, 0, ut)
        u = cache.hold(a, 0)
        for s in slots:
            cache.free(s)
        for s in slots[1:]:
            cache.alloc_slot()  # every slot but a is busy
        b = cache.alloc_slot(9, partial=u)  # an LCP of 9 tokens into the complete unit
        assert b == a and not u.dead
        cache.ensure(b, 9)
        cache.copy_tokens(u, b, 9)
        check_range(cache, b, 1, 0, 9)
        fill(cache, b, 2, 9, 20)
        cache.release(u)
        assert_balanced(cache)


class FenceLog:
    """A host driver whose fences are numbered, so a test can see that a page is unmapped only
    after the device work issued before it was waited for (on the GPU, work is asynchronous)."""

    def __init__(self, inner):
        self.inner, self.issued, self.waited, self.unmaps_unsafe = inner, 0, set(), 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fence(self):
        self.issued += 1
        return self.issued

    def wait(self, fence):
        if fence is not None:
            self.waited.add(fence)

    def unmap(self, addr):
        self.unmaps_unsafe += self.issued not in self.waited
        self.inner.unmap(addr)


def test_a_unit_copied_aside_is_read_before_its_pages_are_unmapped():
    """Staging a complete tail reads the slot's pages on the device; the slot then lets go of
    them: the unmap must wait for that read (a fence after it), not the slot's last free."""
    log = FenceLog(new_driver())
    with share_cache(driver=log) as cache:
        ut = cache.layout.unit_tokens
        slots = [cache.alloc_slot() for _ in range(cache.spec.max_seqs)]
        a = slots[0]
        cache.ensure(a, ut)
        u = cache.hold(a, 0)
        for s in slots:
            cache.free(s)
        for s in slots[1:]:
            cache.alloc_slot()
        log.fence()  # device work since a's free (other slots'), as the engine would issue
        log.unmaps_unsafe = 0
        b = cache.alloc_slot(9, partial=u)
        assert b == a and cache.stats().counters.pages_unmapped > 0  # it let go of u's pages
        assert log.unmaps_unsafe == 0, "pages unmapped before the copy that reads them was waited for"
        cache.release(u)


ALIAS_WRITE_SCRIPT = r"""
import sys, torch
sys.path.insert(0, "tests")
from conftest import make_cache, fill, small_spec
cache = make_cache(sys.argv[1], budget_pages=None, spec=small_spec(sys.argv[1], max_seq_len=4000))
ut = cache.layout.unit_tokens
a = cache.alloc_slot(); cache.ensure(a, ut + 1); fill(cache, a, 1, 0, ut + 1)
b = cache.alloc_slot(ut + 1, prefix=[cache.hold(a, 0)])
cache.ensure(b, ut + 1)
k, v = cache.kv(0)
float(k[b, 0, 0, 0])  # reading the alias is fine
print("read", flush=True)
if sys.argv[2] == "write":
    k[b, ut - 1, 0, 0] = 5.0  # the prefix: read-only here
else:
    k[b, ut, 0, 0] = 5.0  # b's own page
print("wrote", flush=True)
"""


@pytest.mark.skipif(on_cuda, reason="the host driver's mprotect; the GPU check is tests/gpu")
@pytest.mark.parametrize("what", ["write", "own"])
def test_writing_through_an_aliased_unit_faults(layout, what):
    proc = subprocess.run([sys.executable, "-c", ALIAS_WRITE_SCRIPT, layout, what],
                          capture_output=True, text=True, timeout=60)
    assert "read" in proc.stdout, proc.stderr[-2000:]
    if what == "write":
        assert proc.returncode == -signal.SIGSEGV, (proc.returncode, proc.stderr[-2000:])
        assert "wrote" not in proc.stdout
    else:
        assert proc.returncode == 0 and "wrote" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("call", ["map", "set_access"])
def test_a_failed_alias_leaks_no_page(layout, call):
    driver = FaultyDriver()
    with share_cache(layout, driver=driver) as cache:
        ut = cache.layout.unit_tokens
        a = cache.alloc_slot()
        cache.ensure(a, 2 * ut)
        fill(cache, a, 1, 0, 2 * ut)
        units = [cache.hold(a, 0), cache.hold(a, 1)]
        before = cache.stats()
        driver.fail_after[call] = driver.calls.get(call, 0) + (call == "map")  # the 2nd map, the 1st set_access
        with pytest.raises(Exception):
            cache.alloc_slot(2 * ut + 1, prefix=units)
        del driver.fail_after[call]
        st = cache.stats()
        assert (st.pages_mapped, st.num_slots_busy, st.num_mappings) == \
               (before.pages_mapped, before.num_slots_busy, before.num_mappings)
        assert_balanced(cache)
        b = cache.alloc_slot(2 * ut + 1, prefix=units)  # and it works once the driver does
        check_range(cache, b, 1, 0, 2 * ut)
        assert_balanced(cache)


def test_release_without_a_hold_is_refused():
    with make_cache() as cache:
        a = cache.alloc_slot()
        cache.ensure(a, 10)
        u = cache.hold(a, 0, tail=True)
        cache.release(u)
        with pytest.raises(ValueError, match="no hold"):
            cache.release(u)
        with pytest.raises(ValueError, match="maps no page"):
            cache.hold(a, 3)
        if cache.layout.unit_tokens > 10:
            with pytest.raises(ValueError, match="maps part"):
                cache.hold(a, 0)
