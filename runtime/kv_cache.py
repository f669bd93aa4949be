"""Persistent reference K/V cache: the same references + selection + model reuse their K/V across calls.

Exact for the Klein KV model: references attend only to references, with a fixed timestep, so their K/V do not
depend on the prompt, the noise or the step (NOTES §2). Bounded by a byte cap with least-recently-used eviction.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sparse_context.runtime.errors import InputError, bad_value


def array_digest(array: Any) -> str:
    """sha256 of an array's dtype, shape and bytes (numpy, PIL images via np.asarray, or CPU torch tensors)."""
    values = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def reference_key(model_fingerprint: str, reference_digests: Sequence[str], selections: Sequence[np.ndarray]) -> str:
    """Cache key of one set of references: the model, each prepared reference, and the kept token indices."""
    digest = hashlib.sha256(model_fingerprint.encode())
    for index, (reference, kept) in enumerate(zip(reference_digests, selections, strict=True)):
        digest.update(f"|{index}:{reference}:".encode())
        digest.update(np.ascontiguousarray(np.asarray(kept, dtype=np.int64)).tobytes())
    return digest.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class ReferenceKVCache:
    """LRU map from :func:`reference_key` to a backend's K/V state, holding at most ``max_bytes``."""

    def __init__(self, max_bytes: int):
        if not isinstance(max_bytes, (int, np.integer)) or max_bytes < 0:
            raise InputError(bad_value("reference cache size", max_bytes, "a byte count >= 0", "--kv-cache-mb"))
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

    def put(self, key: str, state: Any, nbytes: int) -> bool:
        """Store ``state``; evict least-recently-used entries to fit. A state larger than the cap is not kept."""
        if key in self._entries:
            self.stats.bytes -= self._entries.pop(key)[1]
        if nbytes > self.max_bytes:
            self._sync()
            return False
        while self._entries and self.stats.bytes + nbytes > self.max_bytes:
            _, (_, freed) = self._entries.popitem(last=False)
            self.stats.bytes -= freed
            self.stats.evictions += 1
        self._entries[key] = (state, int(nbytes))
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
