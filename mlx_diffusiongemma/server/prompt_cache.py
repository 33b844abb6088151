"""KV caches kept across requests, found again by the longest cached token prefix.

A cache can only be reused when its tokens are a prefix of the new prompt: sliding-window layers
keep only their last window of rows, so a cache cannot be rewound to an earlier point. Two
snapshots are therefore kept per generation:

- the cache right after the prompt (the conversation so far plus the generation prompt), and
- the cache after the reply (the prompt plus every encoded canvas).

The second serves a client that sends the reply back verbatim; the first serves the common case
where it does not: Gemma's chat template drops the thought channel from earlier assistant turns
(and the last canvas is never encoded), so the next request shares the previous *prompt* exactly
but diverges inside the previous reply. Snapshots are cheap forks: MLX arrays are values, so a
snapshot and the cache that goes on growing share their buffers until one side writes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from ..model.cache import PromptCache


class PromptCacheStore:
    """At most `max_entries` caches and `max_bytes` bytes (None: no bound of its own), least
    recently used dropped first. The server also trims it to what its memory budget leaves
    (`trim`, see memory_budget.py). Used by one thread."""

    def __init__(self, max_entries: int = 8, max_bytes: int | None = None):
        self.max_entries = max(0, max_entries)
        self.max_bytes = max_bytes
        self.evicted = 0  # snapshots dropped for bytes (not for the entry count)
        self._entries: OrderedDict[tuple[int, ...], PromptCache] = OrderedDict()
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[PromptCache | None, int]:
        """(a fork of the longest cache whose tokens start `ids`, how many tokens it holds)."""
        ids = tuple(ids)
        best: tuple[int, ...] | None = None
        for key in self._entries:
            if len(key) <= len(ids) and (best is None or len(key) > len(best)) and ids[: len(key)] == key:
                best = key
        if best is None:
            return None, 0
        self._entries.move_to_end(best)
        self.hits += 1
        self.reused_tokens += len(best)
        return self._entries[best].copy(), len(best)

    def insert(self, ids: Sequence[int], cache: PromptCache) -> None:
        """Keep a fork of `cache`, which holds exactly the tokens `ids`."""
        if self.max_entries == 0 or not ids:
            return
        if cache.length != len(ids):
            raise ValueError(f"cache holds {cache.length} tokens, not {len(ids)}")
        key = tuple(ids)
        self._entries[key] = cache.copy()
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if self.max_bytes is not None:
            self.trim(self.max_bytes)

    def trim(self, max_bytes: int) -> int:
        """Drop least recently used snapshots until the store holds at most `max_bytes`; returns
        the bytes it holds then. A dropped snapshot frees only the buffers no other snapshot (or
        running request) shares."""
        held = self.nbytes
        while self._entries and held > max_bytes:
            self._entries.popitem(last=False)
            self.evicted += 1
            held = self.nbytes
        return held

    @property
    def nbytes(self) -> int:
        # Snapshots share buffers; count each buffer once. The arrays are the cache's own
        # (`PromptCache.state`), whatever its layout.
        seen: dict[int, int] = {}
        for cache in self._entries.values():
            for a in cache.state():
                seen[id(a)] = a.nbytes
        return sum(seen.values())
