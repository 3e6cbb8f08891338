"""VirtualKVCache behaviour: slots, budget, reclamation, overlap, and failures that leak nothing."""

from __future__ import annotations

import gc
import threading

import pytest

from vattention.memory import DriverError, VirtualKVCache

from conftest import (FaultyDriver, assert_stats_match_recount, check, fill, make_cache, new_driver,
                      on_cuda, small_spec)


def assert_balanced(cache: VirtualKVCache) -> None:
    """Pages mapped per the cache == live mappings per the driver; pool + mapped == budget;
    the running totals == a recount over the slots."""
    assert_stats_match_recount(cache)
    st = cache.stats()
    assert st.num_mappings == cache.driver.num_live_mappings, (st, cache.driver.num_live_mappings)
    assert st.pages_mapped + st.pages_held + st.pages_free == st.pages_total, st
    assert cache._pool.num_taken == st.pages_mapped + st.pages_held


def test_alloc_slot_returns_none_when_all_busy():
    with make_cache() as cache:
        slots = [cache.alloc_slot() for _ in range(cache.spec.max_seqs)]
        assert sorted(slots) == list(range(cache.spec.max_seqs))
        assert cache.alloc_slot() is None
        cache.free(slots[2])
        assert cache.alloc_slot() == slots[2]


def test_ensure_within_mapped_pages_only_counts_tokens(layout):
    """The common decode-step call (the pages are there): nothing is mapped, the token count
    (bytes_used) follows every call, up or down, and what the slow path refuses is still refused."""
    with make_cache(spec=small_spec(layout), eager_cushion_groups=0) as cache:
        a = cache.alloc_slot()
        assert cache.ensure(a, 1)
        backed = cache.layout.tokens_in(cache.layout.groups_for(1))
        mappings = cache.driver.num_live_mappings
        for n in (2, backed, 3, backed):
            assert cache.ensure(a, n)
            assert cache.stats().bytes_used == n * cache.spec.bytes_per_token
            assert cache.driver.num_live_mappings == mappings
        assert_balanced(cache)
        assert cache.ensure(a, backed + 1) and cache.driver.num_live_mappings > mappings  # the slow path maps
        with pytest.raises(TypeError, match="num_tokens must be an int"):
            cache.ensure(a, True)
        with pytest.raises(ValueError, match="outside"):
            cache.ensure(a, cache.spec.max_seq_len + 1)
        cache.free(a)
        with pytest.raises(ValueError, match="not allocated"):
            cache.ensure(a, 1)
        assert_balanced(cache)


def test_out_of_budget_returns_false_and_cache_stays_usable(layout):
    """A growth the budget cannot cover returns False, maps nothing, and smaller ones still work."""
    spec = small_spec(layout, max_seq_len=12000)
    with make_cache(spec=spec, budget_pages=None) as probe:
        half = probe.layout.pages_per_slot // 2 * probe.layout.num_tensors
    with make_cache(spec=spec, budget_pages=half, eager_cushion_groups=0) as cache:
        a = cache.alloc_slot()
        assert cache.ensure(a, 100)
        fill(cache, a, 1, 0, 100)
        before = cache.stats()
        assert cache.ensure(a, cache.spec.max_seq_len) is False
        after = cache.stats()
        assert after.pages_mapped == before.pages_mapped and after.bytes_used == before.bytes_used
        check(cache, a, 1, 100)
        b = cache.alloc_slot()
        assert cache.ensure(b, 50)
        assert_balanced(cache)


def test_free_keeps_pages_and_best_fit_reuses_them():
    """Deferred reclamation: a freed slot keeps its pages; alloc_slot(n) picks the free slot
    whose pages fit n best, so no new mapping is needed."""
    with make_cache(budget_pages=None, eager_cushion_groups=0) as cache:
        per_group = cache.layout.tokens_in(1)
        sizes = {cache.alloc_slot(): g * per_group for g in (1, 4, 2)}
        for slot, n in sizes.items():
            assert cache.ensure(slot, n)
        for slot in sizes:
            cache.free(slot)
        assert cache.stats().num_slots_idle_mapped == 3
        mapped = cache.stats().counters.pages_mapped_critical
        slot = cache.alloc_slot(num_tokens=2 * per_group - 5)
        assert sizes[slot] == 2 * per_group  # not the 4-group slot, not the too-small 1-group one
        assert cache.ensure(slot, 2 * per_group - 5)
        assert cache.stats().counters.pages_mapped_critical == mapped


def test_reclaims_idle_slots_when_pool_is_short(layout):
    """Growth takes pages from idle slots (largest first) once the pool is empty, and only then."""
    spec = small_spec(layout, max_seq_len=12000)
    with make_cache(spec=spec, budget_pages=None, eager_cushion_groups=0) as probe:
        groups = probe.layout.pages_per_slot
        n = probe.layout.num_tensors
    with make_cache(spec=spec, budget_pages=groups * n, eager_cushion_groups=0) as cache:
        full = spec.max_seq_len
        idle = [cache.alloc_slot() for _ in range(2)]
        assert cache.ensure(idle[0], full // 2) and cache.ensure(idle[1], full // 4)
        for slot in idle:
            cache.free(slot)
        a = cache.alloc_slot(num_tokens=1)  # best fit: the smaller idle slot
        assert a == idle[1]
        assert cache.ensure(a, full)  # needs every page: reclaims the other idle slot's pages
        st = cache.stats()
        assert st.counters.pages_reclaimed > 0 and st.pages_free == 0
        assert cache.slot_capacity(idle[0]) == 0
        assert_balanced(cache)


def test_busy_slots_are_never_reclaimed(layout):
    with make_cache(layout, budget_pages=None, eager_cushion_groups=0) as probe:
        n, need = probe.layout.num_tensors, probe.layout.groups_for(1000)
    with make_cache(layout, budget_pages=2 * need * n, eager_cushion_groups=0) as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        assert cache.ensure(a, 1000)
        fill(cache, a, 7, 0, 1000)
        assert cache.ensure(b, 1000)
        assert cache.ensure(b, 2000) is False  # only a's pages could cover it, and a is busy
        check(cache, a, 7, 1000)


def test_prepare_maps_in_background_and_ensure_then_maps_nothing(layout):
    """The overlap path: prepare() returns at once, the mapper maps, ensure() finds pages ready."""
    with make_cache(layout, budget_pages=None, eager_cushion_groups=0) as cache:
        slots = [cache.alloc_slot() for _ in range(3)]
        for length in (100, 700, 1500, 2000):
            cache.prepare({s: length for s in slots})
            cache.wait()
            for s in slots:
                assert cache.ensure(s, length)
                fill(cache, s, s, 0, length)
        c = cache.stats().counters
        assert c.pages_mapped_background > 0
        assert c.pages_mapped_critical == 0, c
        for s in slots:
            check(cache, s, s, 2000)
        assert_balanced(cache)


def test_ensure_waits_for_inflight_background_work(layout):
    """ensure() right after prepare() (no wait) is correct whether or not the mapper got there
    first, and never maps a page twice."""
    with make_cache(layout, budget_pages=None, eager_cushion_groups=1) as cache:
        slots = [cache.alloc_slot() for _ in range(4)]
        previous = 0
        for length in range(50, 2001, 150):
            cache.prepare({s: length for s in slots})
            for s in slots:
                assert cache.ensure(s, length)
                fill(cache, s, s, previous, length)
            previous = length
        cache.wait()
        for s in slots:
            check(cache, s, s, previous)
        assert_balanced(cache)


def test_eager_cushion_keeps_a_group_ahead():
    with make_cache(budget_pages=None, eager_cushion_groups=2) as cache:
        s = cache.alloc_slot()
        assert cache.ensure(s, 10)
        cache.wait()
        assert cache.slot_capacity(s) >= cache.layout.tokens_in(3)


def test_failed_map_mid_growth_leaks_nothing_and_keeps_earlier_pages(layout):
    """A driver error in the middle of a growth raises, unmaps what that growth mapped, returns
    every handle, and leaves the slot's earlier pages and data intact."""
    driver = FaultyDriver()
    with make_cache(layout, budget_pages=None, driver=driver, eager_cushion_groups=0) as cache:
        s = cache.alloc_slot()
        assert cache.ensure(s, 300)
        fill(cache, s, 5, 0, 300)
        before = cache.stats()
        driver.fail_after["map"] = driver.calls["map"] + 3  # fail on the 4th map of the next growth
        with pytest.raises(DriverError, match="map.*injected failure"):
            cache.ensure(s, 1900)
        after = cache.stats()
        assert after.pages_mapped == before.pages_mapped and after.pages_free == before.pages_free
        assert driver.num_live_mappings == before.pages_mapped
        check(cache, s, 5, 300)
        del driver.fail_after["map"]
        assert cache.ensure(s, 1900)  # the cache is still usable
        fill(cache, s, 5, 300, 1900)
        check(cache, s, 5, 1900)
        assert_balanced(cache)
    assert driver.num_live_handles == 0 and driver.num_live_mappings == 0


def test_failed_set_access_rolls_back_the_whole_growth():
    driver = FaultyDriver()
    with make_cache("per_layer", budget_pages=None, driver=driver, eager_cushion_groups=0) as cache:
        s = cache.alloc_slot()
        assert cache.ensure(s, 10)
        before = cache.stats().pages_mapped
        driver.fail_after["set_access"] = driver.calls["set_access"] + 2
        with pytest.raises(DriverError, match="set_access"):
            cache.ensure(s, 1500)
        assert cache.stats().pages_mapped == before == driver.num_live_mappings
        assert_balanced(cache)


def test_failed_reclamation_unmap_leaks_no_page():
    """An unmap that fails while reclaiming an idle slot: the error surfaces, the page stays
    accounted (and is released at close), and nothing else is lost."""
    driver = FaultyDriver()
    spec = small_spec("cross_layer", max_seq_len=12000)
    with make_cache(spec=spec, budget_pages=None, eager_cushion_groups=0) as probe:
        groups = probe.layout.pages_per_slot
    cache = make_cache(spec=spec, budget_pages=groups, driver=driver, eager_cushion_groups=0)
    idle, a = cache.alloc_slot(), cache.alloc_slot()
    assert cache.ensure(idle, 6000)
    cache.free(idle)
    driver.fail_after["unmap"] = driver.calls.get("unmap", 0) + 2
    with pytest.raises(DriverError, match="unmap"):
        cache.ensure(a, 12000)
    assert_balanced(cache)
    del driver.fail_after["unmap"]
    cache.close()
    assert driver.num_live_handles == 0 and driver.num_live_mappings == 0


def test_failed_reclamation_gives_unreached_victims_their_groups_back():
    """Reclaiming two idle slots, the first unmap fails: the second victim, never unmapped, keeps
    every group it had, and the running totals still equal a recount."""
    driver = FaultyDriver()
    spec = small_spec("cross_layer", max_seq_len=12000)
    with make_cache(spec=spec, budget_pages=None, eager_cushion_groups=0) as probe:
        groups = probe.layout.pages_per_slot
    cache = make_cache(spec=spec, budget_pages=groups, driver=driver, eager_cushion_groups=0)
    big, small, a = cache.alloc_slot(), cache.alloc_slot(), cache.alloc_slot()
    assert cache.ensure(big, 6000) and cache.ensure(small, 3000)
    kept = cache.slot_capacity(small)
    cache.free(big)
    cache.free(small)
    driver.fail_after["unmap"] = driver.calls.get("unmap", 0)  # the first victim's first unmap
    with pytest.raises(DriverError, match="unmap"):
        cache.ensure(a, 12000)
    assert cache.slot_capacity(small) == kept and cache.slot_capacity(big) == 0
    assert cache.stats().num_slots_idle_mapped == 1
    assert_balanced(cache)
    del driver.fail_after["unmap"]
    cache.close()
    assert driver.num_live_handles == 0 and driver.num_live_mappings == 0


def test_background_error_surfaces_to_the_caller():
    """A driver error inside the mapper thread is raised by the next wait(), not swallowed."""
    driver = FaultyDriver()
    with make_cache(budget_pages=None, driver=driver, eager_cushion_groups=0) as cache:
        s = cache.alloc_slot()
        driver.fail_after["map"] = 0
        cache.prepare({s: 1000})
        with pytest.raises(DriverError, match="injected failure"):
            cache.wait()
        del driver.fail_after["map"]
        assert cache.ensure(s, 1000)
        assert_balanced(cache)


def test_mapper_thread_that_cannot_start_surfaces_and_does_not_hang():
    driver = FaultyDriver()
    driver.fail_after["bind_thread"] = 0
    with make_cache(budget_pages=None, driver=driver) as cache:
        s = cache.alloc_slot()
        cache.prepare({s: 500})
        with pytest.raises(DriverError, match="bind_thread"):
            cache.wait()
        cache.prepare({s: 900})  # no thread any more: prepare is a no-op, ensure maps itself
        cache.wait()
        assert cache.ensure(s, 900)


def test_bad_arguments_raise_clear_errors():
    with make_cache() as cache:
        with pytest.raises(ValueError, match="not allocated"):
            cache.ensure(0, 10)
        s = cache.alloc_slot()
        with pytest.raises(ValueError, match="max_seq_len"):
            cache.ensure(s, cache.spec.max_seq_len + 1)
        with pytest.raises(IndexError, match="out of range"):
            cache.free(99)
        cache.free(s)
        with pytest.raises(ValueError, match="not allocated"):
            cache.free(s)
    with pytest.raises(RuntimeError, match="closed"):
        cache.alloc_slot()
    cache.close()  # idempotent


def test_stats_account_used_and_mapped_bytes(layout):
    with make_cache(layout, budget_pages=None, eager_cushion_groups=0) as cache:
        a, b = cache.alloc_slot(), cache.alloc_slot()
        assert cache.ensure(a, 123) and cache.ensure(b, 456)
        st = cache.stats()
        assert st.bytes_used == (123 + 456) * cache.spec.bytes_per_token
        lay = cache.layout
        assert st.pages_mapped == (lay.groups_for(123) + lay.groups_for(456)) * lay.num_tensors
        assert st.bytes_mapped == st.pages_mapped * cache.page_size
        assert st.bytes_wasted == st.bytes_mapped - st.bytes_used >= 0
        assert "MiB used" in st.summary()
        cache.free(a)
        assert cache.stats().bytes_used == 456 * cache.spec.bytes_per_token
        assert cache.stats().num_slots_idle_mapped == 1


@pytest.mark.skipif(on_cuda, reason="2 MiB CUDA pages hold many tokens; only host pages can be "
                                     "smaller than one token")
def test_eager_cushion_covers_the_next_token_even_when_a_page_holds_less_than_one():
    """With pages smaller than a token (several groups per token), the background still maps
    the whole next token, so a decode loop of ensure() calls maps nothing on the critical path
    after the first."""
    spec = small_spec("cross_layer", num_kv_heads=8, head_dim=64)
    with make_cache(spec=spec, budget_pages=None, driver=new_driver(4096),
                    eager_cushion_groups=1) as cache:
        assert cache.layout.token_bytes > cache.page_size
        s = cache.alloc_slot()
        assert cache.ensure(s, 10)
        critical = cache.stats().counters.pages_mapped_critical
        for n in range(11, 60):
            cache.wait()
            assert cache.slot_capacity(s) >= n
            assert cache.ensure(s, n)
        assert cache.stats().counters.pages_mapped_critical == critical


def test_no_wait_time_is_counted_without_background_work():
    with make_cache(budget_pages=None, eager_cushion_groups=0) as cache:
        s = cache.alloc_slot()
        for n in range(1, 2000, 37):
            assert cache.ensure(s, n)
        c = cache.stats().counters
        assert c.wait_seconds == 0 and c.pages_mapped_background == 0


def test_closed_cache_hands_out_no_views():
    cache = make_cache()
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.kv(0)
    with pytest.raises(RuntimeError, match="closed"):
        cache.kv_flat(0)


def test_a_dead_view_keeps_its_range_reserved_so_no_later_cache_shares_it(layout):
    """Close unmaps and releases every page, but a view still held (here a slice of one) keeps
    the address range reserved: the next cache gets other addresses, so a write through the
    stale view cannot reach its data. The range is freed once the view is collected."""
    a = make_cache(layout)
    s = a.alloc_slot()
    assert a.ensure(s, 100)
    stale = a.kv(1)[0][s, :10]
    a_lo, a_hi = a._base, a._base + a.layout.reservation_bytes
    a.close()
    assert a.driver.num_live_handles == 0 and a.driver.num_live_mappings == 0  # memory returned
    assert a.driver.num_live_reservations == 1, "the range was freed under a live view"
    with make_cache(layout) as b:
        b_lo, b_hi = b._base, b._base + b.layout.reservation_bytes
        assert b_hi <= a_lo or b_lo >= a_hi, (hex(a_lo), hex(a_hi), hex(b_lo), hex(b_hi))
    del stale
    gc.collect()
    assert a.driver.num_live_reservations == 0, "the range outlived its last view"


def test_close_without_outside_views_frees_the_reservation_at_once():
    cache = make_cache()
    k, v = cache.kv(0)
    del k, v
    cache.close()
    assert cache.driver.num_live_reservations == 0


def test_the_last_view_may_die_on_another_thread():
    """The deferred free runs on whichever thread drops the last view."""
    cache = make_cache()
    views = list(cache.kv(0))
    cache.close()
    assert cache.driver.num_live_reservations == 1
    thread = threading.Thread(target=views.clear)
    thread.start()
    thread.join()
    assert cache.driver.num_live_reservations == 0


def test_growth_groups_map_ahead_from_free_pages_only_and_stay_reclaimable():
    """growth_groups: a growth that must map takes up to that many more groups in the same job
    (so the next ensures map nothing); with the pool short it maps only what it needs, and the
    extra groups are the first another slot reclaims."""
    spec = small_spec("cross_layer", max_seq_len=12000)
    with make_cache(spec=spec, budget_pages=8, eager_cushion_groups=0, growth_groups=2) as cache:
        tokens = cache.layout.tokens_in  # tokens that k groups hold
        assert cache.layout.num_tensors == 1
        a = cache.alloc_slot()
        assert cache.ensure(a, 1)
        assert cache.slot_capacity(a) == tokens(3)  # the needed group and two ahead
        mapped = cache.stats().counters.pages_mapped_critical
        assert cache.ensure(a, tokens(3))  # within what is mapped: no new mapping
        assert cache.stats().counters.pages_mapped_critical == mapped
        fill(cache, a, 1, 0, tokens(3))
        b = cache.alloc_slot()
        assert cache.ensure(b, tokens(5))  # the 5 free groups: none left to map ahead
        assert cache.slot_capacity(b) == tokens(5)
        c = cache.alloc_slot()
        assert not cache.ensure(c, 1)  # a's and b's groups are all in use: nothing to reclaim
        cache.free(b)
        assert cache.ensure(a, tokens(3) + 1)  # reclaimed from b's idle pages: only what it needs
        assert cache.slot_capacity(a) == tokens(4)
        check(cache, a, 1, tokens(3))
        assert cache.ensure(c, tokens(2))  # from b's remaining idle groups
        assert cache.slot_capacity(c) == tokens(2)
        assert_balanced(cache)
