"""CUDA graphs for the KV graph's calls without new references: the cached steps and the persistent-cache call.

A cached step launches the same few thousand kernels with the same shapes at every step of every image that reuses
a reference set; only the numbers in its inputs change. onnxruntime's CUDA EP can capture such a run once and replay
it as one CUDA graph (the ``enable_cuda_graph`` provider option; a run names its graph with the ``gpu_graph_id``
run option), which removes the host's launch work and the GPU's idle gaps between kernels. A replay reads and writes
the addresses it was captured with, so a graph's inputs and outputs must stay where they were:

- every input of a graph lives in a buffer this module owns, bound once; before each replay the call's values are
  copied in on the backend's stream (device latents device-to-device, host values host-to-device). A static input
  (prompt, RoPE tables) is copied only when it is another array than the one its buffer holds, or when the held one
  may have changed: the same object counts as unchanged within one image, or for good if it is lasting (read-only
  prompt, RoPE tables). Each static input has :data:`STATIC_SLOTS` buffers, so a prompt and its negative prompt
  (guidance) stay in place side by side, each with its own graph;
- the reference K/V are read where the pool keeps them, never copied: their addresses are part of the graph's key,
  so new buffers make a new graph;
- the velocity is written to a buffer of the graph and copied to the backend's two-buffer ring on the stream, so the
  Euler step and guidance read it as they read any other velocity.

The copies cost a few microseconds of device time (1 MB of latents and velocity per step at 1024^2), queued without
waiting. onnxruntime keeps every captured graph until the session closes (there is no way to drop one), so at most
:data:`MAX_GRAPHS` are made per backend: a bucket plan has a few cached shapes, and a new reference set in the same
pooled buffers reuses its graph. Further calls run as ordinary runs. A graph's intermediate tensors sit in
onnxruntime's memory arena, which ordinary runs reuse in between; that is safe because every run of the backend is
ordered on its one stream.

If a graph call fails (a kernel onnxruntime cannot capture), the backend warns once, turns graphs off and runs the
call, and every later one, ordinarily.

Every run of a session with CUDA graphs enabled names a graph id: onnxruntime treats a run without one as graph 0
and would capture it, so ordinary runs of that session name :data:`NO_GRAPH`. onnxruntime runs a new id twice to
size its memory arena, captures it and replays it, all inside the first call; it keeps graphs per host thread, so a
backend used from several threads (one at a time) captures on each. It captures in CUDA's global mode: while a
graph's first call runs, no other thread of the process may use the GPU's legacy default stream (a synchronous copy,
an allocation), or the capture fails (and graphs turn off, as above).

``capture=False`` keeps the fixed buffers, the copies and the bound-once bindings without asking onnxruntime for
graphs: that is how the CPU provider runs this exact code in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_context.engines.errors import BackendOptionError
from sparse_context.engines.feeds import CallFeed, Empty
from sparse_context.engines.ort.loader import NO_SYNC_AFTER_RUN, provider_name
from sparse_context.engines.streams import HostStream
from sparse_context.runtime.errors import bad_value

GRAPH_ID = "gpu_graph_id"  # onnxruntime's run option naming the CUDA graph of a run
NO_GRAPH = -1  # a run of a graph-enabled session that is neither captured nor replayed
FIRST_GRAPH = 1  # 0 is what onnxruntime assumes for a run that names none
MAX_GRAPHS = 8
STATIC_SLOTS = 2  # buffers per static input: a prompt and its negative prompt (guidance) each keep one
CONTROL_FLOW = ("If", "Loop", "Scan")  # onnxruntime refuses CUDA graphs for sessions with any of these


def check_cuda_graphs(providers: Any, exports: dict[str, tuple[Any, dict[str, Any]]]) -> None:
    """CUDA graphs need onnxruntime's CUDA provider first and a kv graph without control flow."""
    first = provider_name(providers[0]) if providers else None
    if first != "CUDAExecutionProvider":
        raise BackendOptionError(bad_value("execution provider for CUDA graphs", first, "CUDAExecutionProvider "
                                           "(engines built with --backend ort-cuda), or leave CUDA graphs off",
                                           "--cuda-graphs"))
    if "kv" not in exports:
        raise BackendOptionError(bad_value("graphs for CUDA graphs", sorted(exports), "a kv graph among them (CUDA "
                                           "graphs replay its cached calls), or leave CUDA graphs off",
                                           "--cuda-graphs"))
    path, manifest = exports["kv"]
    ops = manifest.get("ops")
    if ops is None:
        raise BackendOptionError(bad_value("kv graph for CUDA graphs", f"{path}, whose manifest lists no operators",
                                           "an export that lists them (export it again)", "--cuda-graphs"))
    flow = sorted(set(ops) & set(CONTROL_FLOW))
    if flow:
        raise BackendOptionError(bad_value("kv graph for CUDA graphs", f"{path} with {'/'.join(flow)} nodes",
                                           "a kv graph without control flow: export it with --ref-stream plain "
                                           "(build_engines.py --backend ort-cuda --ref-stream plain), or leave "
                                           "CUDA graphs off", "--cuda-graphs"))


def with_cuda_graphs(providers: list[Any]) -> list[Any]:
    """``providers`` (after :func:`~sparse_context.engines.ort.loader.with_default_options`) with CUDA graphs
    enabled on the CUDA provider."""
    result = []
    for provider in providers:
        if provider_name(provider) == "CUDAExecutionProvider":
            options = dict(provider[1]) if isinstance(provider, (tuple, list)) else {}
            provider = ("CUDAExecutionProvider", {**options, "enable_cuda_graph": "1"})
        result.append(provider)
    return result


def _buffer_key(name: str, value: Any, slot: int) -> tuple[Any, ...]:
    return name, tuple(np.shape(value)), np.dtype(value.dtype).str, slot


@dataclass
class GraphStats:
    graphs: int = 0  # graphs made (onnxruntime captures each inside its first call, after two runs that size its arena)
    calls: int = 0  # calls through a graph's buffers (the first of each graph captured, the rest replayed)
    over_limit: int = 0  # calls that ran ordinarily because MAX_GRAPHS graphs exist
    copies: int = 0  # inputs copied into graph buffers
    kept: int = 0  # static inputs the buffer already held


@dataclass
class _Graph:
    id: int
    binding: Any
    velocity: Any  # the graph's own output buffer (OrtValue)
    shape: tuple[int, ...]


@dataclass
class _Held:
    source: Any  # the array the buffer was last filled from (kept alive, so its identity cannot be reused)
    generation: int | None  # None: a lasting array, valid in any generation


class CachedCallGraphs:
    """The fixed-address calls of one :class:`~sparse_context.engines.ort.backend.OrtTransformerBackend`'s kv
    session. ``capture``: name a graph id on each call, so onnxruntime captures and replays (its CUDA provider);
    ``limit``: graphs made at most."""

    def __init__(self, backend: Any, capture: bool = True, limit: int = MAX_GRAPHS):
        self.backend = backend
        self.capture = bool(capture)
        self.limit = int(limit)
        self.enabled = True
        self.stats = GraphStats()
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._buffers: dict[tuple[Any, ...], Any] = {}
        self._held: dict[tuple[Any, ...], _Held] = {}
        self._used: dict[tuple[Any, ...], int] = {}  # when each static slot was last chosen
        self._clock = 0
        self._options: dict[tuple[int, bool], Any] = {}
        self.error: str | None = None  # why graphs were turned off after a failed call
        if backend.stream is None and backend.device == "cpu":  # the CPU path's copies (sync="run" has none)
            backend.stream = HostStream()

    def run_options(self, graph_id: int, queued: bool) -> Any:
        """onnxruntime run options naming ``graph_id`` (when capturing), not waiting at the end when ``queued``."""
        key = (graph_id, queued)
        if key not in self._options:
            options = self.backend._ort.RunOptions()
            if self.capture:
                options.add_run_config_entry(GRAPH_ID, str(graph_id))
            if queued:
                options.add_run_config_entry(NO_SYNC_AFTER_RUN, "1")
            self._options[key] = options
        return self._options[key]

    def prepare(self, session: Any, feed: CallFeed, cached: Any) -> _Graph | None:
        """The graph of this call with its inputs copied in, or None when it runs ordinarily (graphs off, new
        references in the call, host I/O, or :data:`MAX_GRAPHS` graphs already made)."""
        backend = self.backend
        if not self.enabled or feed.ref_tokens or backend.io_device != backend.device:
            return None
        static = {name: self._slot(name, value, feed) for name, value in feed.inputs.items()
                  if name in feed.static and not isinstance(value, Empty)}
        slots = {name: slot for name, (slot, _) in static.items()}
        key = self._key(feed, cached, slots)
        graph = self._graphs.get(key)
        if graph is None:
            if self.stats.graphs >= self.limit:
                self.stats.over_limit += 1
                return None
            # Ids are never reused: onnxruntime refuses to capture an id twice in a session.
            graph = self._graphs[key] = self._new_graph(session, feed, cached, FIRST_GRAPH + self.stats.graphs,
                                                        slots)
            self.stats.graphs += 1
        for name, value in feed.inputs.items():
            if isinstance(value, Empty):
                continue
            if name in static:
                slot, copy = static[name]
                if copy:
                    self._held[_buffer_key(name, value, slot)] = _Held(value, self._generation(name, feed))
                    self._write(self._buffer(name, np.shape(value), value.dtype, slot), value)
                else:
                    self.stats.kept += 1
            elif getattr(value, "on_device", False):  # latents of the previous step, in the backend's ring
                nbytes = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
                self._copy(self._buffer(name, value.shape, value.dtype), backend._current(value), nbytes)
            else:
                self._write(self._buffer(name, np.shape(value), value.dtype), value)
        self.stats.calls += 1
        return graph

    def velocity_into(self, graph: _Graph, destination: Any) -> None:
        """Copy the graph's velocity into ``destination`` (a ring buffer of the backend), queued on its stream."""
        nbytes = int(np.prod(graph.shape)) * np.dtype(self.backend.dtype).itemsize
        self._copy(destination, graph.velocity, nbytes)

    def fail(self, error: BaseException) -> None:
        """A graph call failed (a kernel onnxruntime cannot capture): every later call runs ordinarily."""
        self.enabled = False
        self.error = f"{type(error).__name__}: {str(error).strip()[:300]}"

    # -- inside ------------------------------------------------------------------------------------------------

    def _generation(self, name: str, feed: CallFeed) -> int | None:
        """What makes a static input's buffer still valid: None for a lasting array (read-only prompt, RoPE table),
        which never changes in place; else this image (the same object is the same values only within it)."""
        return None if name in feed.lasting else self.backend.generation

    def _slot(self, name: str, value: Any, feed: CallFeed) -> tuple[int, bool]:
        """(slot, whether to copy) for a static input: the slot already holding this array, valid now; else the
        least recently used of :data:`STATIC_SLOTS` (a prompt and its negative alternate with guidance)."""
        generation = self._generation(name, feed)
        keys = [_buffer_key(name, value, slot) for slot in range(STATIC_SLOTS)]
        self._clock += 1
        for slot, key in enumerate(keys):
            held = self._held.get(key)
            if held is not None and held.source is value and held.generation == generation:
                self._used[key] = self._clock
                return slot, False
        slot = min(range(STATIC_SLOTS), key=lambda i: self._used.get(keys[i], -1))
        self._used[keys[slot]] = self._clock
        return slot, True

    def _key(self, feed: CallFeed, cached: Any, slots: dict[str, int]) -> tuple[Any, ...]:
        backend = self.backend
        shapes = tuple(sorted((name, tuple(np.shape(value) if not isinstance(value, Empty) else value.shape),
                               np.dtype(value.dtype).str) for name, value in feed.inputs.items()))
        bound = tuple(sorted(slots.items()))
        if cached is None:
            return shapes, bound, 0, None, None
        pointer = backend._pointer
        return shapes, bound, cached.num_ref_tokens, pointer(cached.buffers.keys), pointer(cached.buffers.values)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: Any, slot: int = 0) -> Any:
        key = (name, tuple(shape), np.dtype(dtype).str, slot)
        if key not in self._buffers:
            backend = self.backend
            self._buffers[key] = backend._ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), np.dtype(dtype), backend.io_device, backend.device_id)
        return self._buffers[key]

    def _new_graph(self, session: Any, feed: CallFeed, cached: Any, graph_id: int, slots: dict[str, int]) -> _Graph:
        backend = self.backend
        binding = session.io_binding()
        scratch = backend._pointer(backend._scratch)
        for name, value in feed.inputs.items():
            if isinstance(value, Empty):
                binding.bind_input(name, backend.io_device, backend.device_id, value.dtype, list(value.shape),
                                   scratch)
            else:
                binding.bind_ortvalue_input(name, self._buffer(name, np.shape(value), value.dtype,
                                                               slots.get(name, 0)))
        backend._bind_kv(binding, cached, None, 0)
        shape = tuple(np.shape(feed.inputs["target"]))
        velocity = self._buffer("velocity", shape, backend.dtype)
        binding.bind_ortvalue_output("velocity", velocity)
        return _Graph(graph_id, binding, velocity, shape)

    def _write(self, buffer: Any, value: Any) -> None:
        self.backend._write(buffer, np.ascontiguousarray(value))
        self.stats.copies += 1

    def _copy(self, destination: Any, source: Any, nbytes: int) -> None:
        backend = self.backend
        backend.stream.copy(destination.data_ptr(), source.data_ptr(), nbytes)
        backend._pending = True
        self.stats.copies += 1
