"""Prefix caching, the part both designs share: unit hashes and the index of cached units.

A request's tokens are cut into units of the design's size (vattention: the memory library's
unit, whole pages and whole tokens; paged: one block). Unit i's key hashes unit i-1's key with
unit i's tokens, so equal keys mean equal tokens from the start (and the same `cache_salt`: the
chain starts from the salt, so tenants with different salts never share).

  root(salt) -> key0 = H(root, tokens[0:u]) -> key1 = H(key0, tokens[u:2u]) -> ...

PrefixIndex maps keys to what a design cached (its payload: a shared unit of pages, a block),
in least-recently-used order for eviction. It also files each entry under (parent key, first
token), so vattention can find the cached unit whose tokens share the longest start with a
request's next ones (a tail it copies, token-exact, instead of recomputing).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def root_key(salt: str | None) -> bytes:
    return hashlib.blake2b(b"vattention-prefix\0" + (salt or "").encode(), digest_size=16).digest()


def unit_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


def extend_keys(keys: list[bytes], token_ids: Sequence[int], unit: int, salt: str | None) -> list[bytes]:
    """Append the keys of every full unit of `token_ids` not in `keys` yet (keys[i] is unit i's)."""
    parent = keys[-1] if keys else root_key(salt)
    for i in range(len(keys), len(token_ids) // unit):
        parent = unit_key(parent, token_ids[i * unit:(i + 1) * unit])
        keys.append(parent)
    return keys


@dataclass(eq=False)
class Entry:
    key: bytes
    parent: bytes  # the previous unit's key (root_key(salt) for unit 0)
    tokens: tuple[int, ...]  # the unit's tokens: all of them, or a tail's first ones
    payload: Any  # the design's: a SharedUnit, a block id


class PrefixIndex:
    """Cached units by key, least recently used first."""

    def __init__(self):
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._by_start: dict[tuple[bytes, int], list[Entry]] = {}  # (parent, first token) -> entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> Entry | None:
        return self._entries.get(key)

    def add(self, key: bytes, parent: bytes, tokens: Sequence[int], payload: Any) -> Entry:
        entry = Entry(key, parent, tuple(tokens), payload)
        self._entries[key] = entry
        self._by_start.setdefault((parent, entry.tokens[0]), []).append(entry)
        return entry

    def touch(self, entries: Sequence[Entry]) -> None:
        """Mark used, deepest first, so a prefix's first units are evicted after its last."""
        for e in reversed(entries):
            if self._entries.get(e.key) is e:
                self._entries.move_to_end(e.key)

    def longest_start(self, parent: bytes, tokens: Sequence[int], usable: Callable[[Entry], bool],
                      max_candidates: int = 16) -> tuple[Entry | None, int]:
        """The entry after `parent` whose tokens share the longest start with `tokens`, and how
        many they share (most recently added entries first, `max_candidates` at most)."""
        if not tokens:
            return None, 0
        best, best_len = None, 0
        candidates = self._by_start.get((parent, tokens[0]), ())
        for e in candidates[::-1][:max_candidates]:
            if not usable(e):
                continue
            n = 0
            for a, b in zip(e.tokens, tokens):
                if a != b:
                    break
                n += 1
            if n > best_len:
                best, best_len = e, n
        return best, best_len

    def remove(self, entry: Entry) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        start = (entry.parent, entry.tokens[0])
        bucket = self._by_start.get(start)
        if bucket is not None:
            bucket.remove(entry)
            if not bucket:
                del self._by_start[start]

    def evict(self, count: int, evictable: Callable[[Entry], bool]) -> list[Entry]:
        """Remove up to `count` evictable entries, least recently used first; returns them."""
        out: list[Entry] = []
        for e in self._entries.values():
            if len(out) == count:
                break
            if evictable(e):
                out.append(e)
        for e in out:
            self.remove(e)
        return out

    def clear(self) -> list[Entry]:
        entries = list(self._entries.values())
        self._entries.clear()
        self._by_start.clear()
        return entries


@dataclass
class PrefixHit:
    """What a design found cached for a request's start; match_prefix's answer, handed back to
    allocate. `num_tokens` tokens need no computing (at most all but the last)."""

    num_tokens: int
    num_units: int  # full units (vattention) or blocks (paged) reused as they are
    payloads: list[Any]  # their payloads, in order
    tail: Any = None  # vattention: the unit the next `tail_tokens` tokens are copied from
    tail_tokens: int = 0
    tail_whole: bool = False  # the request's tokens extend all of the tail's cached ones
