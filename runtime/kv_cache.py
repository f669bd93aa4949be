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
    reference_key`."""

    what = "reference K/V cache size"
