"""Reference K/V buffers for engine backends: allocated once at a bucket's maximum, reused without copies.

The KV graph's extract step writes the references' K/V straight into a buffer of the bucket's largest N, in the
stacked layout ``(layers, 1, N, heads, head_dim)``: the graph has one output per layer (``ref_keys_0`` ...), and the
backend binds layer l at offset ``l * N * heads * head_dim`` of the buffer. Every cached step reads the same
buffer the same way, as its per-layer ``cached_keys_l`` / ``cached_values_l`` inputs at the real N. A state of N
tokens is the contiguous start of its buffer, so no step copies, slices or concatenates K/V. When a state is dropped (not kept by the persistent cache), its buffers go back to a
small pool and the next generation reuses them: steady-state generation allocates nothing.

Allocation is the backend's (numpy for onnxruntime CPU, onnxruntime CUDA memory, TensorRT device memory), so
this module stays numpy-only.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from sparse_context.runtime.errors import InputError, bad_value


@dataclass(eq=False)  # identity: the pool finds buffers by object, never by comparing their contents
class KVBuffers:
    """One keys and one values allocation, each holding up to ``capacity_tokens`` reference tokens."""

    keys: Any
    values: Any
    capacity_tokens: int
    nbytes: int  # both allocations together


@dataclass
class PoolStats:
    allocations: int = 0  # buffers allocated
    reuses: int = 0  # acquisitions served from the pool
    idle: int = 0  # buffers waiting in the pool


class KVBufferPool:
    """Hands out :class:`KVBuffers` of at least the requested capacity; buffers return when their state dies.

    ``allocate(nbytes)`` returns a backend allocation; ``free(buffer)`` (optional) releases one the pool drops.
    ``token_bytes``: bytes of one token of one tensor (layers x heads x head_dim x itemsize).
    """

    def __init__(self, allocate: Callable[[int], Any], token_bytes: int, free: Callable[[Any], None] | None = None,
                 max_idle: int = 2):
        if token_bytes < 1:
            raise InputError(bad_value("bytes per K/V token", token_bytes, "an integer >= 1"))
        self._allocate, self._free = allocate, free
        self.token_bytes = int(token_bytes)
        self.max_idle = int(max_idle)
        self._idle: list[KVBuffers] = []
        self._lock = threading.Lock()  # finalizers can run on any thread
        self.stats = PoolStats()

    def acquire(self, capacity_tokens: int) -> KVBuffers:
        """The smallest idle buffers that hold ``capacity_tokens``, else new ones of exactly that capacity."""
        capacity_tokens = max(int(capacity_tokens), 1)  # a 0-byte allocation may have no address
        with self._lock:
            fitting = [b for b in self._idle if b.capacity_tokens >= capacity_tokens]
            if fitting:
                chosen = min(fitting, key=lambda b: b.capacity_tokens)
                self._idle.remove(chosen)
                self.stats.reuses += 1
                self.stats.idle = len(self._idle)
                return chosen
        nbytes = capacity_tokens * self.token_bytes
        buffers = KVBuffers(self._allocate(nbytes), self._allocate(nbytes), capacity_tokens, 2 * nbytes)
        self.stats.allocations += 1
        return buffers

    def release(self, buffers: KVBuffers) -> None:
        """Return buffers for reuse; beyond ``max_idle`` the smallest idle ones are freed."""
        with self._lock:
            self._idle.append(buffers)
            self._idle.sort(key=lambda b: b.capacity_tokens, reverse=True)
            dropped = self._idle[self.max_idle:]
            del self._idle[self.max_idle:]
            self.stats.idle = len(self._idle)
        for old in dropped:
            if self._free is not None:
                self._free(old.keys)
                self._free(old.values)

    def track(self, state: Any, buffers: KVBuffers) -> None:
        """Release ``buffers`` to this pool once ``state`` (which reads them) is garbage."""
        weakref.finalize(state, self.release, buffers)

    def clear(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self.stats.idle = 0
        for old in idle:
            if self._free is not None:
                self._free(old.keys)
                self._free(old.values)


class EngineKVState:
    """Reference K/V of one set of references, held in pooled buffers of an engine backend.

    ``shape`` is the real ``(layers, 1, N, heads, head_dim)``; the buffers may hold more tokens (the bucket's
    maximum). ``read(buffer, shape)`` turns a buffer into a host numpy array (a view on CPU, a copy from a GPU).
    """

    def __init__(self, buffers: KVBuffers, shape: tuple[int, ...], dtype: Any, read: Callable[[Any, tuple], Any]):
        if shape[2] > buffers.capacity_tokens:
            raise InputError(bad_value("reference tokens for the K/V buffers", shape[2],
                                       f"at most {buffers.capacity_tokens} (the bucket maximum)"))
        self.buffers = buffers
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self._read = read

    @property
    def num_ref_tokens(self) -> int:
        return self.shape[2]

    @property
    def nbytes(self) -> int:
        """Memory the state holds (its buffers at capacity): what the persistent cache must count."""
        return self.buffers.nbytes

    @property
    def keys(self) -> Any:
        return self._read(self.buffers.keys, self.shape)

    @property
    def values(self) -> Any:
        return self._read(self.buffers.values, self.shape)
