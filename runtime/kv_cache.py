"""Persistent reference K/V cache: the same references + selection + model reuse their K/V across calls.

Exact for the Klein KV model: references attend only to references, with a fixed timestep, so their K/V do not
depend on the prompt, the noise or the step (NOTES §2). Bounded by a byte cap with least-recently-used eviction.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_context.runtime.errors import InputError, bad_value


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class ByteCappedLRU:
    """LRU map from a string key to a value of a stated size, holding at most ``max_bytes``."""

    what = "cache size"  # for the error on a bad cap

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, (int, np.integer)) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise InputError(bad_value(self.what, max_bytes, "a byte count >= 0"))
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.stats = CacheStats()

    def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self.stats.hits += 1
        return entry[0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Store ``value``; evict least-recently-used entries to fit. A value larger than the cap is not kept."""
        if key in self._entries:
            self.stats.bytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:
            self._sync()
            return False
        while self._entries and self.stats.bytes + nbytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.stats.bytes -= freed
            self.stats.evictions += 1
        self._entries[key] = (value, int(nbytes))
        self.stats.bytes += int(nbytes)
        self._sync()
        return True

    def clear(self) -> None:
        self._entries.clear()
        self.stats.bytes = 0
        self._sync()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _sync(self) -> None:
        self.stats.entries = len(self._entries)


class ReferenceKVCache(ByteCappedLRU):
    """Reference K/V states (a backend's ``kv_state``) keyed by :func:`~sparse_context.runtime.fingerprints.
    reference_key`, and the token selections made for the references they belong to (keyed by
    :func:`~sparse_context.runtime.fingerprints.selection_key`, in an LRU of their own capped at
    ``SELECTION_BYTES``, outside the K/V byte cap), so a repeated request finds its kept tokens without scoring the
    references again."""

    what = "reference K/V cache size"
    SELECTION_BYTES = 32 << 20  # int64 indices: ~160 selections of six dense 1024^2 references, thousands sparse

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self._selections = ByteCappedLRU(self.SELECTION_BYTES)

    @property
    def selection_stats(self) -> CacheStats:
        return self._selections.stats

    def recall_selections(self, key: str) -> tuple[np.ndarray, ...] | None:
        """The kept indices remembered for ``key`` (read-only arrays), or None."""
        return self._selections.get(key)

    def remember_selections(self, key: str, selections: Any) -> tuple[np.ndarray, ...]:
        """Keep read-only int64 copies of ``selections`` under ``key`` (the least recently used go past
        ``SELECTION_BYTES``); returns them."""
        kept = []
        for indices in selections:
            copy = np.array(indices, dtype=np.int64)
            copy.flags.writeable = False
            kept.append(copy)
        self._selections.put(key, tuple(kept), sum(copy.nbytes for copy in kept))
        return tuple(kept)

    def clear(self) -> None:
        super().clear()
        self._selections.clear()
