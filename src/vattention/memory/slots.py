"""Slots and map jobs: the bookkeeping the cache plans under its lock.

A slot's mapped pages are always a prefix of page groups [0, len(groups)). Growth appends groups;
reclamation takes groups off the tail. Whoever sets `inflight` owns the tail until it clears it,
so the caller's thread and the background mapper never plan on the same slot at once.
SlotTotals is the only code that changes a slot's busy, num_tokens or groups, so the sums it
keeps (what stats() reports) never need a walk over every slot.

Sharing: a SharedUnit is a unit of page groups (whole pages, whole tokens) that several slots may
map at the same offset, and that holders (a prefix cache) keep alive. A slot's groups inside a
shared unit are the unit's own handle lists; every other group is private to the slot. Reclaiming
never cuts into a shared unit: a slot's excess stops at its highest one (`shared_end`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Slot:
    index: int  # position in the virtual tensors: base = index * slot_stride_bytes
    busy: bool = False  # allocated to a request
    num_tokens: int = 0  # tokens the owner says exist (what bytes_used counts)
    reserved_groups: int = 0  # groups the owner asked for (ensure/prepare); never reclaimed while busy
    groups: list[list[Any]] = field(default_factory=list)  # mapped groups: groups[g][tensor] = handle
    inflight: bool = False  # a job owns the tail: plan nothing on this slot until it clears
    fence: Any = None  # device work that last used the pages (recorded at free); wait before unmapping
    shared: dict[int, SharedUnit] = field(default_factory=dict)  # unit index -> the shared unit mapped there
    readonly: set[int] = field(default_factory=set)  # units of `shared` this slot maps without write access
    shared_end: int = 0  # groups [0, shared_end) hold every shared unit of this slot
    freed_at: int = 0  # when it was last freed (SlotTotals.num_frees then): older is colder

    @property
    def excess_groups(self) -> int:
        """Groups that may be reclaimed: all of an idle slot's, the cushion of a busy one, never
        below its highest shared unit."""
        if self.inflight:
            return 0
        return max(0, len(self.groups) - max(self.reserved_groups if self.busy else 0, self.shared_end))


@dataclass(eq=False)
class SharedUnit:
    """One unit's page groups, mapped by the slots in `slots` (at the same offset in each) and
    kept alive by `holds`. When no hold remains the pages go back to being private to one slot,
    or to the pool. A complete unit may be mapped by many slots (aliasing) or by none (still
    held, ready to be mapped again); a partial one (a tail, copied from and never aliased) lives
    only where it was written, and dies when that slot drops it."""

    index: int  # unit position in every slot that maps it
    first_group: int  # = index * unit_groups
    groups: list[list[Any]]  # its groups' handles: the very lists the mapping slots hold
    complete: bool  # every token of the unit is written (aliasable); else a tail (copied from)
    slots: set[int] = field(default_factory=set)  # slots mapping it now
    holds: int = 0  # references from hold()/retain() not yet released
    num_busy_maps: int = 0  # of `slots`, those allocated to a request
    dead: bool = False  # its pages are private to a slot again (`private_in`) or back in the pool
    private_in: int | None = None  # the slot that kept its pages when it died, if one did

    @property
    def end_group(self) -> int:
        return self.first_group + len(self.groups)


@dataclass
class SlotTotals:
    """Running sums over every slot, updated by the only methods that change a slot's busy,
    num_tokens or groups (called under the cache's lock): stats() reads them in O(1)."""

    num_groups: int = 0  # groups mapped into some slot, busy or idle
    num_tokens: int = 0  # tokens the busy slots hold
    num_busy: int = 0  # slots allocated to a request
    num_idle_mapped: int = 0  # free slots still holding groups (deferred reclamation)
    num_frees: int = 0  # slots freed so far (stamps Slot.freed_at)

    def claim(self, s: Slot) -> None:
        """Allocate free slot `s`, holding no tokens yet."""
        self.num_busy += 1
        self.num_idle_mapped -= bool(s.groups)
        s.busy, s.num_tokens, s.reserved_groups = True, 0, 0

    def release(self, s: Slot, fence: Any) -> None:
        """Free busy slot `s`; its groups stay mapped."""
        self.num_busy -= 1
        self.num_tokens -= s.num_tokens
        self.num_idle_mapped += bool(s.groups)
        self.num_frees += 1
        s.busy, s.num_tokens, s.reserved_groups, s.fence = False, 0, 0, fence
        s.freed_at = self.num_frees

    def set_tokens(self, s: Slot, num_tokens: int) -> None:
        if s.busy:
            self.num_tokens += num_tokens - s.num_tokens
        s.num_tokens = num_tokens

    def append_groups(self, s: Slot, groups: list[list[Any]]) -> None:
        """Growth (or a rollback putting groups back): `groups` go on the tail."""
        if groups and not s.busy and not s.groups:
            self.num_idle_mapped += 1
        self.num_groups += len(groups)
        s.groups.extend(groups)

    def cut_groups(self, s: Slot, first: int) -> list[list[Any]]:
        """Reclamation, trim or close: take groups [first, len) off the tail and return them."""
        cut = s.groups[first:]
        del s.groups[first:]
        self.num_groups -= len(cut)
        if cut and not s.busy and not s.groups:
            self.num_idle_mapped -= 1
        return cut


@dataclass
class Unmap:
    """Groups taken off a victim slot's tail; unmapped before their handles are mapped elsewhere."""

    slot: Slot
    first_group: int  # the victim's group index of groups[0]
    groups: list[list[Any]]  # [group][tensor] handles, still mapped at the victim's addresses
    fence: Any  # wait on this before the first unmap


@dataclass
class MapJob:
    """Everything one growth of one slot does with the driver, planned up front."""

    slot: Slot
    first_group: int  # group index the new groups start at (== len(slot.groups) when planned)
    groups: list[list[Any]]  # [group][tensor] handles to map, in order
    unmaps: list[Unmap]  # reclamation to do first
    spare: list[Any]  # reclaimed handles beyond what the growth needs: back to the pool after unmap
    background: bool  # executed by the mapper thread (counts as hidden), else on the critical path


def pick_slot(slots: list[Slot], want_groups: int | None) -> Slot | None:
    """Best fit among free slots: the fewest mapped groups that still cover `want_groups`;
    failing that, the most mapped groups (the fewest new mappings). None when all are busy."""
    free = [s for s in slots if not s.busy]
    if not free:
        return None
    if want_groups is not None:
        fits = [s for s in free if len(s.groups) >= want_groups]
        if fits:
            return min(fits, key=lambda s: (len(s.groups), s.index))
    return max(free, key=lambda s: (len(s.groups), -s.index))


def pick_victims(slots: list[Slot], exclude: Slot, num_groups: int) -> list[tuple[Slot, int]] | None:
    """(slot, groups to take) covering `num_groups`: idle slots first, then busy slots' cushions,
    largest first. None, choosing nothing, when all reclaimable groups together fall short."""
    candidates = [s for s in slots if s is not exclude and s.excess_groups > 0]
    candidates.sort(key=lambda s: (s.busy, -s.excess_groups, s.index))
    chosen: list[tuple[Slot, int]] = []
    remaining = num_groups
    for s in candidates:
        if remaining == 0:
            break
        take = min(s.excess_groups, remaining)
        chosen.append((s, take))
        remaining -= take
    return chosen if remaining == 0 else None
