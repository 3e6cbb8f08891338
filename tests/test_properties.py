"""Property-based tests: random sequences of alloc/ensure/free/prepare/wait/trim keep every
invariant (no page mapped twice, accounting balances, running totals equal a recount, budget
never exceeded, data intact, everything returned after close)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vattention.memory import KVCacheSpec, VirtualKVCache

from conftest import assert_stats_match_recount, check, fill, new_driver, on_cuda

PAGE = 4096  # the smallest host page: many page groups per slot with a tiny spec
HEADS, DIM = (8, 128) if on_cuda else (1, 4)  # on 2 MiB CUDA pages, real heads give many groups


class CacheMachine(RuleBasedStateMachine):
    @initialize(layout=st.sampled_from(["cross_layer", "per_layer"]),
                budget_groups=st.integers(2, 40), cushion=st.integers(0, 2))
    def setup(self, layout, budget_groups, cushion):
        self.spec = KVCacheSpec(num_layers=2, num_kv_heads=HEADS, head_dim=DIM, dtype=torch.float32,
                                max_seqs=5, max_seq_len=1500, layout=layout)
        self.driver = new_driver(PAGE)
        n = 4 if layout == "per_layer" else 1
        self.cache = VirtualKVCache(self.spec, driver=self.driver, eager_cushion_groups=cushion,
                                    memory_budget_bytes=budget_groups * n * self.driver.page_size)
        self.lengths: dict[int, int] = {}  # busy slot -> tokens written (the model)
        self.tags: dict[int, int] = {}  # busy slot -> the tag its data was written with
        self.next_tag = 1

    @rule(hint=st.one_of(st.none(), st.integers(0, 1500)))
    def alloc(self, hint):
        slot = self.cache.alloc_slot(hint)
        if slot is None:
            assert len(self.lengths) == self.spec.max_seqs
            return
        assert slot not in self.lengths
        self.lengths[slot], self.tags[slot] = 0, self.next_tag
        self.next_tag += 1

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def ensure(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        old = self.lengths[slot]
        new = data.draw(st.integers(old, min(old + 400, self.spec.max_seq_len)))
        if self.cache.ensure(slot, new):
            fill(self.cache, slot, self.tags[slot], old, new)
            self.lengths[slot] = new
            assert self.cache.slot_capacity(slot) >= new
        else:
            self.cache.wait()
            lay, c = self.cache.layout, self.cache
            with c._lock:
                reclaimable = sum(s.excess_groups for s in c._slots if s.index != slot)
                missing = lay.groups_for(new) - len(c._slots[slot].groups)
                assert missing * lay.num_tensors > c._pool.num_available + reclaimable * lay.num_tensors

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        slot = data.draw(st.sampled_from(sorted(self.lengths)))
        self.cache.free(slot)
        del self.lengths[slot], self.tags[slot]

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
        assert st_.pages_mapped == self.driver.num_live_mappings
        assert st_.pages_mapped + st_.pages_free == st_.pages_total
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
            handles = [h for s in c._slots for g in s.groups for h in g]
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
        for slot, n in self.lengths.items():
            check(self.cache, slot, self.tags[slot], n)
        used = sum(self.lengths.values()) * self.spec.bytes_per_token
        assert self.cache.stats().bytes_used == used

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        self.cache.close()
        assert_stats_match_recount(self.cache)
        assert self.driver.num_live_handles == 0, "pages not released at close"
        assert self.driver.num_live_mappings == 0, "pages still mapped after close"
        assert self.driver.num_live_reservations == 0, "reservation not freed at close"


CacheMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
test_cache_state_machine = CacheMachine.TestCase
