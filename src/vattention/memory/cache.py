"""VirtualKVCache: the public face of the memory library.

    alloc_slot / free     which slot a request owns (best fit over still-mapped pages; with a
                          prefix, a slot that maps it already, else it is aliased in read-only)
    hold / retain /       sharing: keep a unit of a slot's pages (whole pages, whole tokens)
      release / copy_tokens  alive for later requests; copy a cached tail into a new slot
    ensure / prepare      how many tokens a slot must hold: now (blocking) or next step (background)
    kv / kv_flat          the virtual tensors, plain strided torch views, built once
    stats / trim / close  what is mapped (running totals, no walk over the slots), give memory
                          back, tear down

One lock guards every slot and the pool. Planning (which handles go where, which slot gives up
pages) happens under it; driver calls happen outside it, on a job whose slot is marked inflight.
Sharing calls (alloc_slot with a prefix, hold, release, copy_tokens) are rare next to growth and
make their few driver calls under the lock.

A shared unit's pages are counted once however many slots map them; an aliased unit is mapped
without write access, so a kernel that writes into another request's prefix faults.
"""

from __future__ import annotations

import operator
import threading
import time
from dataclasses import replace
from typing import Any

import torch

from .drivers import make_driver
from .drivers.base import Driver, DriverError
from .mapper import BackgroundMapper
from .pool import PagePool
from .slots import MapJob, SharedUnit, Slot, SlotTotals, Unmap, pick_slot, pick_victims
from .spec import KVCacheSpec, KVLayout
from .stats import CacheStats, MapCounters


class VirtualKVCache:
    """KV tensors reserved once in virtual memory; physical pages mapped as slots grow.

    memory_budget_bytes  physical memory the cache may map (None: everything the slots could
                         ever hold, capped by what the device has free)
    page_size            bytes per page (None: the driver's default, 2 MiB); with `driver`, None
                         or that driver's page_size
    prealloc             create every page of the budget now, so growth only maps
    growth_groups        when ensure() must map (on the caller's thread), map up to this many
                         groups beyond what it needs in the same job (from free pages only): one
                         set-access call and one plan for several groups instead of one each
    eager_cushion_groups page groups the background mapper keeps mapped beyond each slot's length;
                         taken only from free pages, and reclaimed first when memory is short
    """

    def __init__(self, spec: KVCacheSpec, device: str | torch.device = "cpu",
                 memory_budget_bytes: int | None = None, page_size: int | None = None,
                 prealloc: bool = True, eager_cushion_groups: int = 1, driver: Driver | None = None,
                 growth_groups: int = 0):
        eager_cushion_groups = _as_int("eager_cushion_groups", eager_cushion_groups)
        if eager_cushion_groups < 0:
            raise ValueError(f"eager_cushion_groups must be >= 0, got {eager_cushion_groups}")
        growth_groups = _as_int("growth_groups", growth_groups)
        if growth_groups < 0:
            raise ValueError(f"growth_groups must be >= 0, got {growth_groups}")
        self.growth_groups = growth_groups
        if memory_budget_bytes is not None:
            memory_budget_bytes = _as_int("memory_budget_bytes", memory_budget_bytes)
            if memory_budget_bytes <= 0:
                raise ValueError(f"memory_budget_bytes must be a positive number of bytes (or None "
                                 f"for all the slots could hold), got {memory_budget_bytes}")
        if driver is not None and page_size is not None and page_size != driver.page_size:
            raise ValueError(f"page_size={page_size!r} differs from the given driver's page_size "
                             f"{driver.page_size}; pass one or the other")
        self.spec = spec
        self.driver = driver if driver is not None else make_driver(device, page_size)
        self.layout = KVLayout(spec, self.driver.page_size)
        self.page_size = self.driver.page_size
        self.slot_stride_tokens = self.layout.slot_stride_tokens
        self.eager_cushion_groups = eager_cushion_groups
        group_bytes = self.layout.num_tensors * self.page_size
        if memory_budget_bytes is None:
            memory_budget_bytes = _default_budget(self.driver, self.layout)
        num_pages = memory_budget_bytes // self.page_size // self.layout.num_tensors * self.layout.num_tensors
        max_pages = getattr(self.driver, "max_mappings", None)
        if max_pages is not None and num_pages > max_pages:
            raise ValueError(f"{num_pages} pages of {self.page_size} bytes exceed the {max_pages} "
                             f"mappings this process may still make (vm.max_map_count); use a "
                             f"larger page_size or a smaller memory_budget_bytes")
        if num_pages == 0:
            raise ValueError(f"memory_budget_bytes={memory_budget_bytes} cannot hold one page group "
                             f"({group_bytes} bytes = {self.layout.num_tensors} pages of "
                             f"{self.page_size}); raise the budget or use layout='cross_layer'")
        self._lock = threading.Condition()
        self._slots = [Slot(i) for i in range(spec.max_seqs)]
        self._totals = SlotTotals()  # changes every slot's busy/num_tokens/groups, sums them as it goes
        self._counters = MapCounters()
        self._pending: dict[int, int] = {}  # slot -> tokens to map in the background (FIFO)
        self._num_background_jobs = 0  # jobs the mapper thread is executing now
        self._error: BaseException | None = None  # raised by the mapper, re-raised to the caller
        self._mapper: BackgroundMapper | None = None  # started on first background work
        self._mapper_dead = False
        self._stopping = False
        self._closed = False
        self._lost: list[tuple[int, Any]] = []  # (addr, handle) a failed unmap left mapped; retried at close
        # (handle None: a shared unit's page, which the unit gives back)
        self._units: set[SharedUnit] = set()  # live shared units
        self._dead: list[SharedUnit] = []  # held units that died, for take_dead()
        self._staged: dict[int, tuple[SharedUnit, torch.Tensor]] = {}  # slot -> a unit's tokens
        # copied aside by alloc_slot (the slot was the unit's only mapping), for copy_tokens
        self._share = _ShareTotals()  # their contribution to stats(), kept as they change
        self._base = self.driver.reserve(self.layout.reservation_bytes)
        try:
            self._pool = PagePool(self.driver, num_pages, prealloc)
        except BaseException:
            self.driver.free_reservation(self._base, self.layout.reservation_bytes)
            raise
        self._views = [self._make_views(layer) for layer in range(spec.num_layers)]
        self._rows = self._make_rows()

    # ---- slots ------------------------------------------------------------------------------

    def alloc_slot(self, num_tokens: int | None = None, prefix: list[SharedUnit] | tuple = (),
                   partial: SharedUnit | None = None, take_partial: bool = False,
                   reclaim: bool = False) -> int | None:
        """A free slot, or None when every slot is busy. With `num_tokens`, the free slot whose
        still-mapped pages fit it best (deferred reclamation: its pages are reused as they are).

        `prefix`: complete units (from hold()) for unit positions 0..len-1, in order, each the
        unit of the one before's tokens: the slot comes out mapping them (read-only where they
        had to be aliased in), preferring a slot that maps them already. `partial`: a unit the
        caller will copy_tokens() from next; its only slot is avoided (it stays a source for
        others), except that with `take_partial` (the caller's tokens extend all of a tail's) a
        tail whose only slot is free is taken as it is: its pages become the new owner's and the
        copy is a no-op. Whatever else the slot maps
        from earlier owners' shared units is dropped, so the new owner may write anywhere past
        the prefix.

        `reclaim` (a prefix cache's choice): shared units past the prefix that only the chosen
        slot maps are taken over in place, as if their holders had let go: their pages become
        the new owner's with no driver call, and the units die (`dead`; take_dead() lists
        them once, for the holders to forget). Without it they are unmapped here and stay held,
        mapped nowhere, and the new owner maps fresh pages in their place. It also changes the
        choice: a free slot mapping the prefix is taken when it drops no more units past the
        prefix than a fresh slot would have to alias (the drop costs no driver call); with no
        prefix and no free slot that maps no shared unit, the one freed longest ago
        (its units the coldest) among those whose pages fit."""
        if num_tokens is not None:
            num_tokens = self._check_length(num_tokens)
        prefix = list(prefix)
        with self._lock:
            self._check_open()
            for i, u in enumerate(prefix):
                if u.dead or not u.complete or u.index != i:
                    raise ValueError(f"prefix unit {i} is not a live complete unit at position {i}")
            if partial is not None and (partial.dead or partial.index != len(prefix)):
                raise ValueError("partial must be a live unit right after the prefix")
            if partial is not None and not partial.slots:
                raise ValueError("partial is mapped in no slot: there is nothing to copy from")
            want = self.layout.groups_for(num_tokens) if num_tokens is not None else None
            slot, steal = self._pick_for_prefix(prefix, partial, want, take_partial, reclaim)
            if slot is None:
                return None
            while slot.inflight:  # the background mapper is reclaiming from it
                self._lock.wait()
            self._totals.claim(slot)
            for u in slot.shared.values():
                self._share.busy(u, +1, self.layout.num_tensors)
            try:
                self._prepare_slot(slot, prefix, partial, steal, reclaim)
            except BaseException:
                self._release_slot(slot, self.driver.fence())
                raise
            return slot.index

    def free(self, slot: int) -> None:
        """Release a slot. Its pages stay mapped for the next user until memory is short."""
        fence = self.driver.fence()  # device work issued so far may still read these pages
        with self._lock:
            s = self._busy_slot(slot)
            self._release_slot(s, fence)

    def _release_slot(self, s: Slot, fence: Any) -> None:
        self._staged.pop(s.index, None)
        self._totals.release(s, fence)
        self._pending.pop(s.index, None)
        units = list(s.shared.values())
        for u in units:
            self._share.busy(u, -1, self.layout.num_tensors)
        for u in units:
            self._settle(u)

    # ---- sharing ----------------------------------------------------------------------------

    def hold(self, slot: int, unit: int, tail: bool = False) -> SharedUnit:
        """Keep unit `unit` of `slot` alive as a SharedUnit until release(); one more hold if it
        is one already. A complete unit (all its tokens written; the slot must not write into
        it afterwards) may be aliased into other slots; with `tail`, only the unit's first
        tokens are written, and it is copied from (copy_tokens), never aliased."""
        unit = _as_int("unit", unit)
        lay = self.layout
        with self._lock:
            self._check_open()
            s = self._slot(slot)
            first = unit * lay.unit_groups
            end = min(len(s.groups), first + lay.unit_groups)
            if unit < 0 or end <= first or (not tail and end < first + lay.unit_groups):
                raise ValueError(f"slot {s.index} maps {'no page' if end <= first else 'part'} "
                                 f"of unit {unit}")
            u = s.shared.get(unit)
            if u is None:
                u = SharedUnit(unit, first, s.groups[first:end], complete=not tail)
                self._change(u, attach=s)  # counts it from here on
            elif not u.complete and (not tail or end > u.end_group):  # a tail that has grown
                self._change(u, groups=s.groups[first:end], complete=not tail)
            u.holds += 1
            return u

    def retain(self, unit: SharedUnit) -> None:
        with self._lock:
            unit.holds += 1

    def release(self, unit: SharedUnit) -> None:
        """Drop one hold. With none left the pages become private to a slot again (or go back
        to the pool, mapped nowhere), once no busy slot shares them."""
        with self._lock:
            if unit.holds <= 0:
                raise ValueError("release() of a unit with no hold left")
            unit.holds -= 1
            self._settle(unit)

    def copy_tokens(self, unit: SharedUnit, slot: int, num_tokens: int) -> None:
        """Copy the first `num_tokens` tokens of `unit` from a slot that maps it into the same
        positions of `slot` (already backed, e.g. by ensure()): one device copy over every
        tensor. A no-op when `unit`'s pages became `slot`'s own in alloc_slot()."""
        lay = self.layout
        with self._lock:
            self._check_open()
            dst = self._busy_slot(slot)
            staged = self._staged.pop(dst.index, None)
            if unit.dead and unit.private_in == dst.index:
                return
            start = unit.index * lay.unit_tokens
            if not 0 <= num_tokens <= lay.unit_tokens or \
                    num_tokens > lay.tokens_in(unit.end_group) - start:
                raise ValueError(f"{num_tokens} tokens are not all in unit {unit.index}")
            if lay.tokens_in(len(dst.groups)) < start + num_tokens:
                raise ValueError(f"slot {dst.index} does not back tokens [{start}, "
                                 f"{start + num_tokens}); ensure() them first")
            b = dst.index * lay.slot_stride_tokens + start
            if staged is not None and staged[0] is unit:
                self._rows[:, b:b + num_tokens].copy_(staged[1][:, :num_tokens])
                return
            sources = [self._slots[i] for i in sorted(unit.slots) if i != dst.index]
            if unit.dead or not sources:
                raise ValueError(f"unit {unit.index} is mapped in no other slot to copy from")
            src = sources[0]
            while src.inflight:
                self._lock.wait()
            a = src.index * lay.slot_stride_tokens + start
            self._rows[:, b:b + num_tokens].copy_(self._rows[:, a:a + num_tokens])
            if not src.busy:
                src.fence = self.driver.fence()  # reclaiming src must wait for this copy

    def take_dead(self) -> list[SharedUnit]:
        """Held units that died since the last call, each once: taken over by a slot's new
        owner (alloc_slot with `reclaim`, a tail with `take_partial`), or a tail its slot let go
        of. Their holders may release() them or just drop them."""
        with self._lock:
            units, self._dead = self._dead, []
            return units

    def _pick_for_prefix(self, prefix: list[SharedUnit], partial: SharedUnit | None,
                         want: int | None, take_partial: bool, reclaim: bool) -> tuple[Slot | None, bool]:
        """(slot, whether `partial`'s pages become its own). A free slot that maps the deepest
        unit of `prefix` maps the tokens before it too (whoever wrote it had them there), one
        mapping the first unit a shorter part of it (alloc finds how much and maps the rest); one
        that would drop other shared units for it is passed over while a slot with none is
        free (with `reclaim`, see alloc_slot). A tail whose only slot is free is taken as
        it is when allowed; else `partial`'s only slot is avoided, so it stays mapped somewhere
        to copy from."""
        home = None
        if partial is not None and len(partial.slots) == 1:
            home = self._slots[next(iter(partial.slots))]
            if take_partial and not partial.complete and not home.busy:
                return home, True
        free = [s for s in self._slots if not s.busy and s is not home]
        if not free:
            return (home, False) if home is not None and not home.busy else (None, False)
        plain = [s for s in free if not s.shared]
        h = len(prefix)

        def dropped(s: Slot) -> int:
            """Shared units past the prefix that `s` would drop: still held, mapped nowhere or
            elsewhere, no longer a source to copy a tail from; with reclaim, those only `s`
            maps die instead (cached no more)."""
            return sum(i >= h for i in s.shared)

        # a free slot mapping the deepest unit, else one mapping the first (a few looked at:
        # the check is per admission, and every slot may map a popular prefix); one that would
        # drop units for it is passed over while a plain slot is free, unless reclaiming (its
        # pages reused as they are), it drops no more than a plain slot would alias
        for u in dict.fromkeys(prefix[-1:] + prefix[:1]):
            mapping = [self._slots[i] for i in u.slots if not self._slots[i].busy and self._slots[i] is not home]
            if mapping:
                best = min(mapping[:8], key=lambda s: (dropped(s), -len(s.groups), s.index))
                if not plain or dropped(best) == 0 or (reclaim and dropped(best) <= h):
                    return best, False
                break
        if reclaim and not prefix and not plain:  # the coldest slot whose pages fit, as they are
            fits = [s for s in free if want is not None and len(s.groups) >= want]
            if fits:
                return min(fits, key=lambda s: (s.freed_at, s.index)), False
        return pick_slot(plain or free, want), False

    def _prepare_slot(self, s: Slot, prefix: list[SharedUnit], partial: SharedUnit | None,
                      steal: bool, reclaim: bool) -> None:
        """Make a just-claimed slot map `prefix` and no other shared unit past it; a stolen
        `partial` (its tail right after the prefix) becomes private to it, and with `reclaim`
        so does every unit past the prefix that only this slot maps. A complete `partial`
        mapped only here is copied aside first, for copy_tokens()."""
        lay = self.layout
        h = len(prefix)
        if steal:
            matched = h
        else:
            matched = next((j + 1 for j in reversed(range(h)) if s.shared.get(j) is prefix[j]), 0)
            if partial is not None and partial.slots == {s.index}:
                start = s.index * lay.slot_stride_tokens + partial.index * lay.unit_tokens
                self._staged[s.index] = (partial, self._rows[:, start:start + lay.unit_tokens].clone())
                s.fence = self.driver.fence()  # unmapping below must wait for this read
        if matched < h:
            self._truncate(s, matched * lay.unit_groups)
            self._map_units(s, prefix[matched:])
        if steal:
            self._change(partial, detach=s, privatize=True)
        if reclaim:
            for u in [u for i, u in s.shared.items() if i >= h and u.slots == {s.index} and u is not partial]:
                self._change(u, detach=s, privatize=True)
        later = [u.first_group for i, u in s.shared.items() if i >= h]
        if later:
            self._truncate(s, min(later))

    def _map_units(self, s: Slot, units: list[SharedUnit]) -> None:
        """Append complete `units` to slot `s`'s groups (its length is their first group),
        mapped read-only. On a driver error nothing changes (pages it could not unmap are lost
        until close, and counted mapped)."""
        lay = self.layout
        first = len(s.groups)
        assert first == units[0].first_group
        mapped: list[int] = []
        try:
            for u in units:
                for i, group in enumerate(u.groups):
                    for tensor, handle in enumerate(group):
                        addr = lay.page_addr(self._base, tensor, s.index, u.first_group + i)
                        self.driver.map(addr, handle)
                        mapped.append(addr)
            num_groups = sum(len(u.groups) for u in units)
            for tensor in range(lay.num_tensors):
                self.driver.set_access(lay.page_addr(self._base, tensor, s.index, first),
                                       num_groups * self.page_size, read_only=True)
        except BaseException:
            for addr in reversed(mapped):
                try:
                    self.driver.unmap(addr)
                except DriverError:
                    self._lost.append((addr, None))
            raise
        self._counters.pages_mapped_critical += len(mapped)
        self._counters.pages_aliased += len(mapped)
        for u in units:
            self._totals.append_groups(s, u.groups)
            self._change(u, attach=s)
            s.readonly.add(u.index)

    def _truncate(self, s: Slot, first_group: int) -> None:
        """Unmap slot `s`'s groups from `first_group` (a unit boundary) on: private pages go to
        the pool, shared units lose this slot (and settle)."""
        if len(s.groups) <= first_group:
            return
        cut_units = [u for u in s.shared.values() if u.first_group >= first_group]
        shared = {id(g) for u in cut_units for g in u.groups}
        self._unmap_groups(Unmap(s, first_group, s.groups[first_group:], s.fence))
        cut = self._totals.cut_groups(s, first_group)
        self._pool.give([h for g in cut if id(g) not in shared for h in g])
        for u in cut_units:
            self._change(u, detach=s, bulk=True)
        s.shared_end = max((v.end_group for v in s.shared.values()), default=0)
        for u in cut_units:
            self._settle(u)

    def _settle(self, u: SharedUnit) -> None:
        """A unit nothing holds: once at most one slot maps it, its pages are that slot's own
        again (or the pool's). Idle slots beyond the first let go of it now."""
        if u.dead or u.holds:
            return
        if len(u.slots) > 1:
            for i in sorted(u.slots):
                s = self._slots[i]
                if len(u.slots) <= 1 or u.dead:
                    break
                if not s.busy and not s.inflight:
                    self._truncate(s, u.first_group)  # settles u again with one slot fewer
            return
        if u.slots:
            self._change(u, detach=self._slots[next(iter(u.slots))], privatize=True)
        else:
            self._change(u, kill=True)

    def _change(self, u: SharedUnit, attach: Slot | None = None, detach: Slot | None = None,
                privatize: bool = False, kill: bool = False, groups: list | None = None,
                complete: bool = False, bulk: bool = False) -> None:
        """The one place (with _ShareTotals.busy, for a mapping slot's claim and free) a unit's
        slots, busy maps, groups or life change; keeps the totals stats() reports (pages mapped
        twice, held, shared, saved) in step. `bulk`: the caller recomputes the detached slot's
        shared_end once after detaching many units."""
        was_dead = u.dead
        if u in self._units:
            self._share.add(u, -1, self.layout.num_tensors)
        if groups is not None:
            u.groups, u.complete = groups, complete
            s = self._slots[next(iter(u.slots))]
            s.shared_end = max(s.shared_end, u.end_group)
        if attach is not None:
            u.slots.add(attach.index)
            u.num_busy_maps += attach.busy
            attach.shared[u.index] = u
            attach.shared_end = max(attach.shared_end, u.end_group)
        if detach is not None:
            u.slots.discard(detach.index)
            u.num_busy_maps -= detach.busy
            del detach.shared[u.index]
            if not bulk and u.end_group >= detach.shared_end:
                detach.shared_end = max((v.end_group for v in detach.shared.values()), default=0)
            if privatize:
                if u.index in detach.readonly:  # its new owner writes here
                    lay = self.layout
                    for tensor in range(lay.num_tensors):
                        self.driver.set_access(lay.page_addr(self._base, tensor, detach.index, u.first_group),
                                               len(u.groups) * self.page_size)
                u.dead, u.private_in = True, detach.index
            elif not u.slots and not u.complete:
                kill = True  # a tail is only useful where it was written
            detach.readonly.discard(u.index)
        if kill and not u.dead:
            self._pool.give([h for g in u.groups for h in g])
            u.dead = True
        if u.dead:
            self._units.discard(u)
            if u.holds and not was_dead:
                self._dead.append(u)
        else:
            self._units.add(u)
            self._share.add(u, +1, self.layout.num_tensors)

    # ---- growth -----------------------------------------------------------------------------

    def ensure(self, slot: int, num_tokens: int) -> bool:
        """Make tokens [0, num_tokens) of `slot` backed by memory, mapping now if the background
        mapper has not. False (nothing changed) when the budget cannot cover it."""
        if type(slot) is int and type(num_tokens) is int and not self.eager_cushion_groups:
            # A decode step's common case, once per request per step: the pages are there
            # already. Same checks and effects as below, without the calls (measured:
            # benchmarks/diag_prefix_host_cost.py, the scheduler's host time per step).
            with self._lock:
                if 0 <= slot < len(self._slots) and 0 <= num_tokens <= self.spec.max_seq_len \
                        and not (self._closed or self._stopping) and self._error is None:
                    s = self._slots[slot]
                    want = self.layout.groups_for(num_tokens)
                    if s.busy and not s.inflight and want <= len(s.groups):
                        if want > s.reserved_groups:
                            s.reserved_groups = want
                        self._totals.set_tokens(s, num_tokens)
                        return True
        num_tokens = self._check_length(num_tokens)
        with self._lock:
            self._check_open()
            self._raise_mapper_error()
            s = self._busy_slot(slot)
            want = self.layout.groups_for(num_tokens)
            if s.inflight:
                start = time.perf_counter()
                while s.inflight:
                    self._lock.wait()
                self._counters.wait_seconds += time.perf_counter() - start
                self._raise_mapper_error()
            job = None
            while len(s.groups) < want:
                job = self._plan(s, want, cushion=self.growth_groups, background=False)
                if job is not None:
                    break
                if not self._num_background_jobs:
                    return False
                self._lock.wait()  # pages held by in-flight background jobs become reclaimable
                self._raise_mapper_error()
            s.reserved_groups = max(s.reserved_groups, want)
        if job is not None:
            self._execute(job)
        with self._lock:
            self._totals.set_tokens(s, num_tokens)
            # Eager cushion: map ahead for the next token (a page may hold less than one token)
            # plus the cushion, in the background, so the next ensure() finds its pages ready.
            following = min(num_tokens + 1, self.spec.max_seq_len)
            if self.eager_cushion_groups and \
                    len(s.groups) < self.layout.groups_for(following) + self.eager_cushion_groups:
                self._queue_background(s.index, following)
        return True

    def prepare(self, lengths_by_slot: dict[int, int]) -> None:
        """Hand over the next step's lengths; returns at once while the mapper maps them.
        The next ensure() of each slot then only waits for pages that are not mapped yet."""
        with self._lock:
            self._check_open()
            self._raise_mapper_error()
            checked = [(self._busy_slot(slot), self._check_length(num_tokens))
                       for slot, num_tokens in lengths_by_slot.items()]  # all valid before any is queued
            for s, num_tokens in checked:
                s.reserved_groups = max(s.reserved_groups, self.layout.groups_for(num_tokens))
                self._queue_background(s.index, num_tokens)

    def wait(self) -> None:
        """Block until every prepared length is mapped (or found not to fit); raise mapper errors."""
        with self._lock:
            while (self._pending or self._num_background_jobs) and self._error is None \
                    and not self._mapper_dead:
                self._lock.wait()
            self._raise_mapper_error()

    # ---- views ------------------------------------------------------------------------------

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V, each [max_seqs, max_seq_len, H_kv, D], zero-copy strided views."""
        return self._layer_views(layer)[0]

    def kv_flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as [max_seqs * slot_stride_tokens, H_kv, D]: token t of slot s is row
        s * slot_stride_tokens + t, the form varlen kernels index with cu_seqlens_k."""
        return self._layer_views(layer)[1]

    def _layer_views(self, layer: int):
        layer = _as_int("layer", layer)
        if not 0 <= layer < self.spec.num_layers:  # a negative layer would silently count from the end
            raise IndexError(f"layer {layer} out of range [0, num_layers={self.spec.num_layers})")
        with self._lock:  # close() empties the views
            self._check_open()
            return self._views[layer]

    def _make_views(self, layer: int):
        spec, lay = self.spec, self.layout
        h, d = spec.num_kv_heads, spec.head_dim
        token = lay.token_bytes // spec.itemsize  # elements from one token row to the next
        slot = lay.slot_stride_tokens * token
        out = []
        for kv in (0, 1):
            if spec.layout == "per_layer":
                addr = self._base + lay.tensor_index(layer, kv) * lay.tensor_bytes
            else:  # inside a token row: [num_layers, 2, H_kv, D]
                addr = self._base + (2 * layer + kv) * h * d * spec.itemsize
            view = self.driver.tensor(addr, (spec.max_seqs, spec.max_seq_len, h, d), spec.dtype,
                                      (slot, token, d, 1))
            flat = self.driver.tensor(addr, (spec.max_seqs * lay.slot_stride_tokens, h, d),
                                      spec.dtype, (token, d, 1))
            out.append((view, flat))
        return (out[0][0], out[1][0]), (out[0][1], out[1][1])

    def _make_rows(self) -> torch.Tensor:
        """Every tensor's token rows as one view [num_tensors, max_seqs * slot_stride_tokens,
        token elements]: one copy_ moves tokens between slots in every layer at once."""
        lay, spec = self.layout, self.spec
        token = lay.token_bytes // spec.itemsize
        return self.driver.tensor(self._base, (lay.num_tensors, spec.max_seqs * lay.slot_stride_tokens, token),
                                  spec.dtype, (lay.tensor_bytes // spec.itemsize, token, 1))

    # ---- accounting -------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        with self._lock:
            t, sh = self._totals, self._share
            mappings = t.num_groups * self.layout.num_tensors + len(self._lost)
            mapped = mappings - sh.pages_dup - sum(h is None for _, h in self._lost)
            return CacheStats(
                page_size=self.page_size, pages_total=self._pool.num_pages, pages_mapped=mapped,
                pages_free=self._pool.num_available, pages_created=self._pool.num_created,
                bytes_mapped=mapped * self.page_size, bytes_used=t.num_tokens * self.spec.bytes_per_token,
                num_slots_busy=t.num_busy, num_slots_idle_mapped=t.num_idle_mapped,
                counters=replace(self._counters), pages_held=sh.pages_held,
                pages_shared=sh.pages_shared, bytes_saved=sh.pages_saved * self.page_size,
                num_mappings=mappings, num_units=len(self._units))

    def slot_capacity(self, slot: int) -> int:
        """Tokens `slot` can hold with the pages it has mapped now."""
        with self._lock:
            return self.layout.tokens_in(len(self._slot(slot).groups))

    def trim(self) -> int:
        """Unmap every idle slot's pages and release all pooled pages; returns bytes released."""
        with self._lock:
            self._check_open()
            while any(s.inflight for s in self._slots):
                self._lock.wait()
            for s in self._slots:
                if not s.busy and s.groups:
                    self._truncate(s, 0)  # held units stay held: the prefix cache lets go of them
            return self._pool.trim() * self.page_size

    def close(self) -> None:
        """Unmap and release every page (its memory really returns) and free the reservation.

        Views are dead afterwards, and kv()/kv_flat() raise. A view still held elsewhere keeps
        the reservation reserved, every page unmapped, until the last one is collected: an
        access through it faults (SIGSEGV on the host, a CUDA error on the GPU) and can never
        reach a later cache's memory, since no reserve() can return those addresses meanwhile.
        driver.num_live_reservations counts such a range until it is freed."""
        with self._lock:
            if self._closed:
                return
            self._stopping = True
            self._lock.notify_all()
        if self._mapper is not None:
            self._mapper.join()
        self.driver.wait(self.driver.fence())
        errors: list[BaseException] = []
        with self._lock:
            self._closed = True
            shared = {id(g) for u in self._units for g in u.groups}
            for s in self._slots:
                try:
                    self._unmap_groups(Unmap(s, 0, s.groups, None))
                    self._pool.give([h for g in s.groups if id(g) not in shared for h in g])
                except DriverError as e:
                    errors.append(e)
                self._totals.cut_groups(s, 0)
            for u in self._units:  # each live unit's pages once, however many slots mapped them
                self._pool.give([h for g in u.groups for h in g])
            self._units.clear()
            for addr, handle in self._lost:
                try:
                    self.driver.unmap(addr)
                except DriverError as e:
                    errors.append(e)
                if handle is not None:  # released below even if still mapped: the driver frees it on unmap
                    self._pool.give([handle])
            self._lost.clear()
            self._views = []  # ours would keep the reservation alive; only outside views may
            self._rows = None
            self._staged.clear()
            for step in (self._pool.close,
                         lambda: self.driver.free_reservation(self._base, self.layout.reservation_bytes),
                         self.driver.close):
                try:
                    step()
                except DriverError as e:
                    errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> VirtualKVCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- planning (under the lock) ----------------------------------------------------------

    def _plan(self, s: Slot, want: int, cushion: int, background: bool) -> MapJob | None:
        """Take handles for groups [len(s.groups), want) plus up to `cushion` more from free
        pages, reclaiming other slots' groups for the required part if the pool is short.
        None, with nothing changed, when the required part cannot be covered or nothing is needed."""
        n = self.layout.num_tensors
        have = len(s.groups)
        required = max(0, want - have)
        extra = max(0, min(want + cushion, self.layout.pages_per_slot) - max(have, want))
        handles: list[Any] = []
        unmaps: list[Unmap] = []
        spare: list[Any] = []
        if required:
            deficit = required * n - self._pool.num_available
            if deficit > 0:
                victims = pick_victims(self._slots, s, -(-deficit // n))
                if victims is None:
                    return None
                handles = self._pool.take(self._pool.num_available)
                reclaimed: list[Any] = []
                for victim, k in victims:
                    first = len(victim.groups) - k
                    cut = self._totals.cut_groups(victim, first)
                    unmaps.append(Unmap(victim, first, cut, victim.fence))
                    reclaimed += [h for g in cut for h in g]
                    victim.inflight = True
                handles += reclaimed[:deficit]
                spare = reclaimed[deficit:]
            else:
                handles = self._pool.take(required * n)
        if extra and self._pool.num_available >= extra * n:
            handles += self._pool.take(extra * n)
        elif not required:
            return None
        s.inflight = True
        groups = [handles[i:i + n] for i in range(0, len(handles), n)]
        return MapJob(s, have, groups, unmaps, spare, background)

    def _queue_background(self, slot: int, num_tokens: int) -> None:
        if self._mapper_dead:
            return
        self._pending[slot] = max(self._pending.get(slot, 0), num_tokens)
        if self._mapper is None:
            self._mapper = BackgroundMapper(self._next_background_job, self._execute,
                                            self._on_mapper_error, self.driver.bind_thread)
            self._mapper.start()
        self._lock.notify_all()

    def _next_background_job(self) -> MapJob | None:
        """Called by the mapper thread: block until a pending slot needs mapping; None = stop."""
        with self._lock:
            while not self._stopping:
                if not self._pending:
                    self._lock.notify_all()  # wake wait(): everything prepared is done
                    self._lock.wait()
                    continue
                # A slot stays pending until it can be planned, so wait() never sees "nothing
                # pending, nothing running" while this thread still owes that slot its pages.
                slot = next((i for i in self._pending if not self._slots[i].inflight), None)
                if slot is None:
                    self._lock.wait()  # every pending slot is owned by another job for now
                    continue
                num_tokens = self._pending.pop(slot)
                s = self._slots[slot]
                if not s.busy:
                    continue
                job = self._plan(s, self.layout.groups_for(num_tokens), self.eager_cushion_groups,
                                 background=True)
                if job is not None:
                    self._num_background_jobs += 1
                    return job
            return None

    def _on_mapper_error(self, error: BaseException, fatal: bool) -> None:
        with self._lock:
            self._error = error
            if fatal:
                self._mapper_dead = True
                self._pending.clear()
            self._lock.notify_all()

    # ---- execution (no lock held during driver calls) ---------------------------------------

    def _execute(self, job: MapJob) -> None:
        """Unmap reclaimed groups, map the new ones, grant access; on any failure undo this
        job's mappings and return every handle, leaving the slot's earlier groups intact."""
        lay, s = self.layout, job.slot
        mapped: list[tuple[int, Any]] = []  # (addr, handle) this job has mapped so far
        num_unmaps_done = 0
        try:
            for u in job.unmaps:
                self._unmap_groups(u)
                num_unmaps_done += 1
                with self._lock:
                    u.slot.inflight = False
                    self._counters.pages_reclaimed += len(u.groups) * lay.num_tensors
                    self._lock.notify_all()
            start = time.perf_counter()
            for i, group in enumerate(job.groups):
                for tensor, handle in enumerate(group):
                    addr = lay.page_addr(self._base, tensor, s.index, job.first_group + i)
                    self.driver.map(addr, handle)
                    mapped.append((addr, handle))
            for tensor in range(lay.num_tensors):  # one call per contiguous run of new pages
                addr = lay.page_addr(self._base, tensor, s.index, job.first_group)
                self.driver.set_access(addr, len(job.groups) * self.page_size)
            seconds = time.perf_counter() - start
        except BaseException:
            self._roll_back(job, mapped, num_unmaps_done)
            raise
        with self._lock:
            self._totals.append_groups(s, job.groups)
            self._pool.give(job.spare)
            s.inflight = False
            c = self._counters
            if job.background:
                c.pages_mapped_background += len(mapped)
                c.map_seconds_background += seconds
                self._num_background_jobs -= 1
            else:
                c.pages_mapped_critical += len(mapped)
                c.map_seconds_critical += seconds
            self._lock.notify_all()

    def _roll_back(self, job: MapJob, mapped: list[tuple[int, Any]], num_unmaps_done: int) -> None:
        """Undo a failed job. Victims it never reached get their groups back; pages a failed
        unmap left mapped go to _lost (retried at close); every other handle returns to the pool."""
        for addr, handle in reversed(mapped):
            try:
                self.driver.unmap(addr)
            except DriverError:
                with self._lock:
                    self._lost.append((addr, handle))
        with self._lock:
            keep = {id(h) for _, h in self._lost}
            for u in job.unmaps[num_unmaps_done + 1:]:
                self._totals.append_groups(u.slot, u.groups)  # never unmapped: still where they were
                keep |= {id(h) for g in u.groups for h in g}
            for u in job.unmaps[num_unmaps_done:]:
                u.slot.inflight = False
            handles = [h for g in job.groups for h in g] + job.spare
            self._pool.give([h for h in handles if id(h) not in keep])
            job.slot.inflight = False
            if job.background:
                self._num_background_jobs -= 1
            self._lock.notify_all()

    def _unmap_groups(self, u: Unmap) -> None:
        """Unmap a run of one slot's groups once the device is done with them. If a call fails,
        the pages still mapped go to _lost and the error propagates."""
        lay = self.layout
        start = time.perf_counter()
        self.driver.wait(u.fence)
        pages = [(lay.page_addr(self._base, t, u.slot.index, u.first_group + i), h)
                 for i, group in enumerate(u.groups) for t, h in enumerate(group)]
        for done, (addr, _) in enumerate(pages):
            try:
                self.driver.unmap(addr)
            except DriverError:
                with self._lock:
                    self._lost += pages[done:]
                    self._counters.pages_unmapped += done
                raise
        with self._lock:
            self._counters.pages_unmapped += len(pages)
            self._counters.unmap_seconds += time.perf_counter() - start

    # ---- checks -----------------------------------------------------------------------------

    def _slot(self, slot: int) -> Slot:
        slot = _as_int("slot", slot)
        if not 0 <= slot < len(self._slots):
            raise IndexError(f"slot {slot} out of range [0, max_seqs={len(self._slots)})")
        return self._slots[slot]

    def _busy_slot(self, slot: int) -> Slot:
        s = self._slot(slot)
        if not s.busy:
            raise ValueError(f"slot {slot} is not allocated; call alloc_slot() first")
        return s

    def _check_length(self, num_tokens: int) -> int:
        num_tokens = _as_int("num_tokens", num_tokens)
        if not 0 <= num_tokens <= self.spec.max_seq_len:
            raise ValueError(f"num_tokens={num_tokens} is outside [0, max_seq_len="
                             f"{self.spec.max_seq_len}]")
        return num_tokens

    def _check_open(self) -> None:
        if self._closed or self._stopping:
            raise RuntimeError("the VirtualKVCache is closed")

    def _raise_mapper_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _ShareTotals:
    """What the live shared units add to stats(), in pages: mapped a second time or more
    (`pages_dup`), held but mapped nowhere, shared by two or more busy slots, and saved (the
    pages busy slots would need without sharing)."""

    def __init__(self):
        self.pages_dup = self.pages_held = self.pages_shared = self.pages_saved = 0

    def busy(self, u: SharedUnit, delta: int, num_tensors: int) -> None:
        """A slot mapping `u` was claimed (+1) or freed (-1)."""
        b, pages = u.num_busy_maps, len(u.groups) * num_tensors
        self.pages_shared += ((b + delta >= 2) - (b >= 2)) * pages
        self.pages_saved += (max(0, b + delta - 1) - max(0, b - 1)) * pages
        u.num_busy_maps = b + delta

    def add(self, u: SharedUnit, sign: int, num_tensors: int) -> None:
        pages = len(u.groups) * num_tensors
        self.pages_dup += sign * max(0, len(u.slots) - 1) * pages
        self.pages_held += sign * (0 if u.slots else pages)
        self.pages_shared += sign * (pages if u.num_busy_maps >= 2 else 0)
        self.pages_saved += sign * max(0, u.num_busy_maps - 1) * pages


def _as_int(name: str, value: object) -> int:
    """`value` as a plain int (numpy and 0-d torch integers included), else a TypeError naming
    `name`. A bool is refused: `ensure(slot, True)` is a bug, not one token."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r}")


def _default_budget(driver: Driver, layout: KVLayout) -> int:
    """Enough for every slot at max_seq_len, capped by free memory (90% on CUDA, 50% on host)."""
    full = layout.reservation_bytes
    if driver.name == "cuda":
        free, _ = torch.cuda.mem_get_info(driver.device)
        return min(full, int(free * 0.9))
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    return min(full, available // 2)
