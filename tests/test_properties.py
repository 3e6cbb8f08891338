"""Property-based tests: random sequences of alloc/ensure/free/prepare/wait/trim, and of sharing
(hold a slot's prefix, allocate a slot on a held prefix with its tail copied, with or without
reclaiming the units past it, release), keep every invariant (no page mapped twice except a
shared unit's, at its own offset; accounting balances; running totals equal a recount; budget
never exceeded; every slot reads the data it was given, its own or its prefix's; everything
returned after the cache lets go and closes)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vattention.memory import KVCacheSpec, VirtualKVCache

from conftest import assert_stats_match_recount, check_range, fill, new_driver, on_cuda

PAGE = 4096  # the smallest host page: many page groups per slot with a tiny spec
HEADS, DIM = (8, 128) if on_cuda else (1, 4)  # on 2 MiB CUDA pages, real heads give many groups


class CacheMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from(["cross_layer", "per_layer"]),
                budget_groups=st.integers(2, 40), cushion=st.integers(0, 2),
                dim=st.sampled_from([DIM, DIM - 1]))
    def setup(self, layout, budget_groups, cushion, dim):
        # dim 3 on the host: units of 3 pages (cross_layer 256 tokens); dim 4: 1 page
        self.spec = KVCacheSpec(num_layers=2, num_kv_heads=HEADS, head_dim=dim, dtype=torch.float32,
                                max_seqs=5, max_seq_len=1500, layout=layout)
        self.driver = new_driver(PAGE)
        n = 4 if layout == "per_layer" else 1
        self.cache = VirtualKVCache(self.spec, driver=self.driver, eager_cushion_groups=cushion,
                                    memory_budget_bytes=budget_groups * n * self.driver.page_size)
        self.lengths: dict[int, int] = {}  # busy slot -> tokens written (the model)
        self.tags: dict[int, int] = {}  # busy slot -> the tag its data was written with
        self.content: dict[int, list[tuple[int, int, int]]] = {}  # busy slot -> (start, end, tag)
        self.prefixes: list[dict] = []  # held prefixes: units, partial tail, their content
        self.next_tag = 1
        self.unit = self.cache.layout.unit_tokens

    @rule(hint=st.one_of(st.none(), st.integers(0, 1500)), reclaim=st.booleans())
    def alloc(self, hint, reclaim):
        slot = self.cache.alloc_slot(hint, reclaim=reclaim)
        self._forget_dead()
        if slot is None:
            assert len(self.lengths) == self.spec.max_seqs
            return
        assert slot not in self.lengths
        self._start(slot, 0, [])

    def _forget_dead(self):
        """As a prefix cache does: held units a new owner took over are let go of, and the
        prefixes through them end before them."""
        dead = self.cache.take_dead()
        assert all(u.dead and not u.slots for u in dead)
        for p in self.prefixes:
            cut = next((i for i, u in enumerate(p["units"]) if u.dead), None)
            if cut is None:
                continue
            for u in p["units"][cut:] + ([p["partial"]] if p["partial"] is not None else []):
                self.cache.release(u)
            p["units"], p["partial"], p["k"] = p["units"][:cut], None, 0
            end = cut * self.unit
            p["content"] = [(a, min(b, end), t) for a, b, t in p["content"] if a < end]

    def _start(self, slot, length, content):
        self.lengths[slot], self.tags[slot], self.content[slot] = length, self.next_tag, content
        self.next_tag += 1

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def ensure(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        old = self.lengths[slot]
        new = data.draw(st.integers(old, min(old + 400, self.spec.max_seq_len)))
        if self.cache.ensure(slot, new):
            fill(self.cache, slot, self.tags[slot], old, new)  # faults if it reached a shared page
            self.lengths[slot] = new
            if new > old:
                self.content[slot].append((old, new, self.tags[slot]))
            assert self.cache.slot_capacity(slot) >= new
        else:
            self.cache.wait()
            lay, c = self.cache.layout, self.cache
            with c._lock:
                reclaimable = sum(s.excess_groups for s in c._slots if s.index != slot)
                missing = lay.groups_for(new) - len(c._slots[slot].groups)
                assert missing * lay.num_tensors > c._pool.num_available + reclaimable * lay.num_tensors

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), tail=st.booleans())
    def hold_prefix(self, data, tail):
        """Keep a busy slot's full units (and maybe its tail) for later slots, as a prefix cache does."""
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        n = self.lengths[slot]
        h = data.draw(st.integers(0, n // self.unit))
        k = n - h * self.unit if tail and h == n // self.unit else 0
        if h == 0 and k == 0:
            return
        units = [self.cache.hold(slot, i) for i in range(h)]
        partial = self.cache.hold(slot, h, tail=True) if k else None
        end = h * self.unit + k
        content = [(a, min(b, end), t) for a, b, t in self.content[slot] if a < end]
        self.prefixes.append(dict(units=units, partial=partial, k=k, content=content))

    @precondition(lambda self: self.prefixes)
    @rule(data=st.data())
    def alloc_on_prefix(self, data):
        p = data.draw(st.sampled_from(self.prefixes))
        units, partial, k = p["units"], p["partial"], p["k"]
        if partial is not None and (partial.dead or not partial.slots):
            partial, k = None, 0  # its only slot went to another owner
        c = self.cache
        if partial is not None:
            c.retain(partial)  # as the engine does: nothing reclaims it before the copy
        try:
            take, reclaim = data.draw(st.booleans()), data.draw(st.booleans())
            slot = c.alloc_slot(len(units) * self.unit + k, prefix=units, partial=partial,
                                take_partial=take, reclaim=reclaim)
            self._forget_dead()  # units past this prefix only: its own stay live
            if slot is None:
                assert len(self.lengths) == self.spec.max_seqs
                return
            h = len(units) * self.unit
            assert c.slot_capacity(slot) >= h
            if partial is not None:
                if not c.ensure(slot, h + k):
                    c.free(slot)
                    return
                c.copy_tokens(partial, slot, k)
        finally:
            if partial is not None:
                c.release(partial)
        end = h + k
        self._start(slot, end, [(a, min(b, end), t) for a, b, t in p["content"] if a < end])
        c.ensure(slot, end)  # bytes_used counts them
        with c._lock:
            assert all(c._slots[slot].shared.get(i) is u or c._slots[slot].shared.get(i) is None
                       for i, u in enumerate(units))

    @precondition(lambda self: self.prefixes)
    @rule(data=st.data())
    def release_prefix(self, data):
        p = self.prefixes.pop(data.draw(st.integers(0, len(self.prefixes) - 1)))
        for u in p["units"] + ([p["partial"]] if p["partial"] is not None else []):
            self.cache.release(u)

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self.cache.free(slot)
        del self.lengths[slot], self.tags[slot], self.content[slot]

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def prepare(self, data):
        slots = data.draw(st.lists(st.sampled_from(sorted(self.lengths)), min_size=1, unique=True))
        self.cache.prepare({s: min(self.lengths[s] + data.draw(st.integers(0, 300)),
                                   self.spec.max_seq_len) for s in slots})

    @rule()
    def wait(self):
        self.cache.wait()
        st_ = self.cache.stats()
        assert st_.num_mappings == self.driver.num_live_mappings
        assert st_.pages_mapped + st_.pages_held + st_.pages_free == st_.pages_total
        assert st_.pages_created == self.driver.num_live_handles

    @rule()
    def trim(self):
        self.cache.trim()
        assert self.cache.stats().num_slots_idle_mapped == 0

    @invariant()
    def no_page_mapped_twice_and_budget_kept(self):
        if not hasattr(self, "cache"):
            return
        c = self.cache
        with c._lock:
            shared = {id(g) for u in c._units for g in u.groups}
            handles = [h for s in c._slots for g in s.groups if id(g) not in shared for h in g]
            handles += [h for u in c._units for g in u.groups for h in g]  # once each
            assert len(handles) == len(set(handles)), "a physical page is mapped at two addresses"
            assert len(handles) * c.page_size <= c._pool.num_pages * c.page_size
            assert c._pool.num_taken <= c._pool.num_pages
            for slot, n in self.lengths.items():
                assert c.layout.tokens_in(len(c._slots[slot].groups)) >= n or c._slots[slot].inflight

    @invariant()
    def totals_equal_a_recount(self):
        if hasattr(self, "cache"):
            assert_stats_match_recount(self.cache)

    @invariant()
    def data_intact(self):
        if not hasattr(self, "cache"):
            return
        for slot in self.lengths:
            for start, end, tag in self.content[slot]:
                check_range(self.cache, slot, tag, start, end)
        used = sum(self.lengths.values()) * self.spec.bytes_per_token
        assert self.cache.stats().bytes_used == used

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        while self.prefixes:  # the prefix cache lets go, every request ends: all pages come back
            for u in (p := self.prefixes.pop())["units"] + [p["partial"]] * (p["partial"] is not None):
                self.cache.release(u)
        for slot in list(self.lengths):
            self.cache.free(slot)
        self.cache.trim()
        st_ = self.cache.stats()
        assert (st_.pages_mapped, st_.pages_held, st_.num_units) == (0, 0, 0), st_
        assert st_.pages_free == st_.pages_total and self.driver.num_live_mappings == 0
        self.cache.close()
        assert_stats_match_recount(self.cache)
        assert self.driver.num_live_handles == 0, "pages not released at close"
        assert self.driver.num_live_mappings == 0, "pages still mapped after close"
        assert self.driver.num_live_reservations == 0, "reservation not freed at close"


CacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_cache_state_machine = CacheMachine.TestCase
