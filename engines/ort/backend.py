"""onnxruntime behind the sampler's :class:`~sparse_context.runtime.sampler.TransformerBackend` protocol.

Tensors are numpy arrays; the inputs of each call come from :class:`~sparse_context.engines.feeds.FeedBuilder`
(shared with the TensorRT backend) and the Euler step is :func:`~sparse_context.runtime.schedule.euler_step`, so
both backends give the same latents in every precision. One session of the KV graph serves both extract and
cached steps, so the weights are held once.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from sparse_context.engines.errors import BackendOptionError
from sparse_context.engines.feeds import KV_INPUTS, KV_OUTPUTS, STATIC_ENTRIES, CallFeed, Empty, FeedBuilder
from sparse_context.engines.ort.graphs import NO_GRAPH, CachedCallGraphs, check_cuda_graphs, with_cuda_graphs
from sparse_context.engines.ort.loader import (
    NO_SYNC_AFTER_RUN, check_providers_available, graph_exports, import_onnxruntime, providers_device, session_from_onnx,
    with_default_options,
)
from sparse_context.engines.streams import SYNC_MODES, CudaStream, HostStream
from sparse_context.engines.step_graphs import euler_graph, guidance_graph, rounded_scalar
from sparse_context.export.spec import NUMPY_DTYPES, ModelDims
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.fingerprints import engines_fingerprint
from sparse_context.runtime.kv_buffers import EngineKVState, KVBufferPool
from sparse_context.runtime.memo import IdentityMemo
from sparse_context.runtime.schedule import euler_step

KV_BINDINGS = 4  # kv-graph bindings kept with their K/V tensors bound: a state's cached calls, its extract, spares


@dataclass(frozen=True)
class OrtTensor:
    """Latents or a velocity (1, N, C) held in one of the backend's kept buffers, on its I/O device.

    The denoising loop passes these back to the backend without looking inside. ``np.asarray`` gives a host copy;
    the buffer is rewritten two calls later, so reading an older tensor raises instead of returning other values.
    """

    value: Any  # OrtValue
    shape: tuple[int, ...]
    dtype: np.dtype
    owner: Any
    version: int
    on_device = True  # FeedBuilder binds it as it is

    def numpy(self) -> np.ndarray:
        if self.owner.buffer_version(self.value) != self.version:
            raise BackendOptionError("this onnxruntime tensor's buffer was reused by a later call; copy it to the host "
                                     "(np.asarray) before the next two calls of the backend")
        self.owner.drain()  # queued runs (sync="image") may still be writing it
        return np.array(self.value.numpy(), copy=True)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


class OrtTransformerBackend:
    """Runs the exported full and/or KV graph with onnxruntime through I/O binding.

    Inputs that do not change across the denoising steps (prompt embeddings, packed references, RoPE tables) are
    copied to the session's device once per generation; only the target latents and the timestep travel per step.
    Reference K/V live in :class:`~sparse_context.runtime.kv_buffers.KVBufferPool` buffers sized at the request's
    bucket maximum: the extract step writes them in place and cached steps read them in place. The same code runs
    on the CPU EP (CI) and the CUDA / TensorRT EPs (device buffers).

    ``plan``: the bucket plan the engines were built for; each call then maps to exactly one bucket (else a
    ProfileError saying what to rebuild) and ``strict_shapes`` also checks target and text lengths (TensorRT EP).

    ``device_steps`` (default): inside the denoising loop (:meth:`device_loop`) velocities and latents stay on the I/O
    device as :class:`OrtTensor`; the Euler step and the guidance mix run as two tiny onnxruntime graphs there
    (bit-equal to the host arithmetic), and only the final latents come to the host (:meth:`finish_latents`).
    Otherwise, and for direct calls, each call returns a host velocity and the step runs in numpy: a copy out, a
    copy in and ~5 ms of numpy float16 arithmetic per step at 1024^2.

    ``cuda_graphs``: the kv graph's calls without new references (cached steps, persistent-cache calls) are
    captured once per shape and K/V buffers and replayed as CUDA graphs (:mod:`~sparse_context.engines.ort.graphs`);
    onnxruntime CUDA only, and the kv graph must have no control flow (export it with ``--ref-stream plain``).
    :meth:`set_cuda_graphs` turns the replays off and on again on the same sessions.

    ``sync``: ``"run"`` (this class's default) lets onnxruntime wait for the device at the end of every run, as it
    does by default; engines folders opened with :func:`~sparse_context.engines.index.open_backend` default to
    ``"image"`` on onnxruntime CUDA (:func:`~sparse_context.engines.index.default_sync`). ``"image"`` runs every
    session of the backend on one stream it owns (:mod:`~sparse_context.engines.streams`; the
    ``user_compute_stream`` provider option), queues the runs of a device-steps loop without waiting, writes host
    values into device buffers as copies queued on that stream, and waits once per image, before the final latents
    (or anything else) are read. The two give the same latents bit for bit; ``session_seconds`` then
    counts the time to queue the runs, not to run them.
    """

    name = "onnxruntime"

    def __init__(self, full: str | Path | None = None, kv: str | Path | None = None,
                 providers: Sequence[Any] = ("CPUExecutionProvider",), session_options: Any = None, *,
                 plan: Any = None, strict_shapes: bool = False, device_id: int = 0,
                 expected_sha256: dict[str, str] | None = None, device_steps: bool = True, sync: str = "run",
                 cuda_graphs: bool = False):
        self._ort = import_onnxruntime()
        self.device = providers_device(providers)
        check_providers_available(self._ort, providers)
        self.device_id = int(device_id)
        if sync not in SYNC_MODES:
            raise BackendOptionError(bad_value("synchronization", sync, " or ".join(SYNC_MODES), "--sync"))
        self.sync = sync
        exports = graph_exports(full, kv, expected_sha256)
        if cuda_graphs:
            check_cuda_graphs(providers, exports)
        # The stream exists from the start or never: sessions are bound to it when they are created. CUDA graph
        # replays need it too, for the copies into their fixed buffers.
        hint = {} if not cuda_graphs else {"hint": "install it (pip install sparse-context[onnxruntime-gpu]) or leave "
                                                   "out --cuda-graphs, whose copies need a stream of the backend's own"}
        self.stream = None if sync == "run" and not cuda_graphs else \
            HostStream() if self.device == "cpu" else CudaStream(self.device_id, **hint)
        self._pending = False  # work queued on the stream since it last drained
        self._queued_runs = self._ort.RunOptions()
        self._queued_runs.add_run_config_entry(NO_SYNC_AFTER_RUN, "1")
        providers = with_default_options(providers, self.device_id, self._stream_handle)
        self.manifests = {graph: manifest for graph, (_, manifest) in exports.items()}
        self.fingerprint = engines_fingerprint(self.manifests)  # the files were just checked against these
        self.sessions = {graph: session_from_onnx(path, with_cuda_graphs(providers) if cuda_graphs and graph == "kv"
                                                  else providers, session_options)
                         for graph, (path, _) in exports.items()}
        # Cached KV calls replayed as CUDA graphs (engines.ort.graphs); None without --cuda-graphs.
        self.graphs = CachedCallGraphs(self) if cuda_graphs else None
        self.generation = 0  # images finished (release_static): a static input is the same only within one
        manifest = next(iter(self.manifests.values()))
        weights = {(m["base_weights_sha256"][:12], (m.get("lora") or {}).get("sha256"))
                   for m in self.manifests.values()}
        if len(weights) > 1:
            raise BackendOptionError(bad_value("full and KV graphs", sorted(weights, key=str),
                                               "exports of the same weights and LoRA"))
        if len({m["precision"] for m in self.manifests.values()}) > 1:
            raise BackendOptionError(bad_value("full and KV graphs", "different precisions", "one precision"))
        self.precision = manifest["precision"]
        self.dtype = NUMPY_DTYPES[self.precision]
        if self.dtype is None:
            raise BackendOptionError(bad_value("precision of the ONNX export", self.precision, "fp32 or fp16 "
                                               "(numpy has no bfloat16 for the host side of the runtime)",
                                               "--precision"))
        self.dims = ModelDims.from_config(manifest["model_config"])
        self.feeds = FeedBuilder(self.dims, self.dtype)
        self.selector = None
        if plan is not None:
            from sparse_context.engines.profiles import ProfileSelector

            self.selector = ProfileSelector(plan, strict_shapes=strict_shapes)
        self.static = IdentityMemo(STATIC_ENTRIES)
        self.lasting = IdentityMemo(STATIC_ENTRIES)  # device copies of inputs that outlive the generation (feeds)
        self._pools: dict[str, KVBufferPool] = {}
        self._kv_bindings: dict[tuple[Any, ...], Any] = {}  # kv-graph bindings with their K/V bound (_kv_binding)
        self.kv_binds = 0  # K/V tensor sets bound, summed (tests: once per state, not once per call)
        self._scratches: dict[str, Any] = {}
        # Per-step inputs (target latents, timestep) and the velocity output live in buffers kept per shape and
        # rewritten in place: a fresh device OrtValue per step would cost an allocation and a free (which waits
        # for the device) on every call.
        self._step_values: dict[tuple[str, str, tuple[int, ...], str], Any] = {}
        self.io_device = self.device
        self.device_steps = bool(device_steps)
        self._looping = False
        self.session_seconds = 0.0  # wall time inside transformer runs, summed (benchmarks: the rest is overhead)
        self.step_seconds = 0.0  # wall time inside the step graphs' runs (Euler, guidance), summed
        self._step_sessions: dict[tuple[Any, ...], Any] = {}
        self._turns: dict[tuple[Any, ...], int] = {}  # next slot of each two-buffer ring
        self._versions: dict[int, int] = {}  # writes per kept buffer (by address), to refuse stale OrtTensors

    @property
    def _stream_handle(self) -> int | None:
        return None if self.stream is None else self.stream.handle

    def set_sync(self, sync: str) -> None:
        """Switch between ``"image"`` and ``"run"`` (benchmarks time both on the same sessions). ``"image"`` needs
        the backend's own stream, which only exists if it was created with ``sync="image"``."""
        if sync not in SYNC_MODES or (sync == "image" and self.stream is None):
            allowed = " or ".join(SYNC_MODES) if self.stream is not None else "run (this backend was created with "\
                "sync='run': its sessions are not on a stream of its own)"
            raise BackendOptionError(bad_value("synchronization", sync, allowed, "--sync"))
        self.drain()
        self.sync = sync

    def set_cuda_graphs(self, on: bool) -> None:
        """Replay cached KV calls as CUDA graphs (``on``) or run them ordinarily, on the same sessions (benchmarks
        time both). Only for a backend created with ``cuda_graphs=True``."""
        if self.graphs is None:
            raise BackendOptionError(bad_value("CUDA graphs", "turned on for a backend created without them",
                                               "a backend created with cuda_graphs=True", "--cuda-graphs"))
        self.drain()
        self.graphs.enabled = bool(on)

    @property
    def queues(self) -> bool:
        """Inside a device-steps loop, runs and writes are queued on the backend's stream without waiting."""
        return self.sync == "image" and self._looping and self.io_device == self.device

    def drain(self) -> None:
        """Wait for everything queued on the backend's stream (nothing to do when nothing is queued)."""
        if self._pending:
            self._pending = False
            self.stream.synchronize()

    def set_io_device(self, device: str) -> None:
        """Where inputs, outputs and K/V buffers live: the session's device (the default: I/O binding of device
        buffers), or ``"cpu"``, which makes onnxruntime copy every input in and every output out on each call, as
        a plain ``session.run`` does. The benchmark times both to show what device buffers buy."""
        if device not in ("cpu", self.device):
            raise BackendOptionError(bad_value("I/O device", device, f"cpu or {self.device}"))
        self.drain()
        self.static.clear()
        self.lasting.clear()
        self.io_device = device

    @property
    def kv_pool(self) -> KVBufferPool:
        """The K/V buffer pool of the current I/O device."""
        if self.io_device not in self._pools:
            d = self.dims
            token_bytes = d.num_layers * d.heads * d.head_dim * np.dtype(self.dtype).itemsize
            self._pools[self.io_device] = KVBufferPool(self._allocate, token_bytes)
        return self._pools[self.io_device]

    @property
    def _scratch(self) -> Any:
        """A small buffer whose address zero-token tensors are bound to."""
        if self.io_device not in self._scratches:
            self._scratches[self.io_device] = self._allocate(64)
        return self._scratches[self.io_device]

    # -- device memory -------------------------------------------------------------------------------------------

    def _allocate(self, nbytes: int) -> Any:
        if self.io_device == "cpu":
            return np.empty(int(nbytes), np.uint8)
        return self._ort.OrtValue.ortvalue_from_shape_and_type([int(nbytes)], np.uint8, self.io_device,
                                                               self.device_id)

    def _pointer(self, buffer: Any) -> int:
        return int(buffer.ctypes.data) if isinstance(buffer, np.ndarray) else int(buffer.data_ptr())

    def _read(self, buffer: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A host array of the first ``shape`` elements of a buffer: a view on CPU, a copy from a GPU."""
        self.drain()
        host = buffer if isinstance(buffer, np.ndarray) else buffer.numpy()
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(host, dtype=self.dtype, count=count).reshape(shape)

    def _step_value(self, name: str, array: np.ndarray, write: bool = True,
                    shape: tuple[int, ...] | None = None) -> Any:
        """The kept buffer of ``array``'s name, shape (or ``shape``) and dtype on the I/O device, holding ``array``
        (``write``) or left as it is (an output's buffer)."""
        array = np.ascontiguousarray(array)
        shape = tuple(array.shape) if shape is None else shape
        key = (name, self.io_device, shape, array.dtype.str)
        value = self._step_values.get(key)
        if value is None:
            value = self._step_values[key] = self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(shape), array.dtype, self.io_device, self.device_id)
        if write:
            self._write(value, array)
        return value

    def _write(self, value: Any, array: np.ndarray) -> None:
        """``array`` into ``value``'s buffer: queued on the stream in a queued loop (runs queued before it may
        still read the buffer's old contents), else copied now (every earlier run has finished)."""
        if self.queues:
            self.stream.write(value.data_ptr(), array)
            self._pending = True
        else:
            value.update_inplace(array)

    def _ring_value(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """The next of two kept buffers for ``name``: an output written while the previous one is still read (the
        Euler step reads the latents of the last step while writing the next; guidance reads two velocities)."""
        key = (name, self.io_device, tuple(shape), np.dtype(dtype).str)
        turn = self._turns.get(key, 0)
        self._turns[key] = 1 - turn
        return self._step_value(f"{name}#{turn}", np.empty(0, dtype), write=False, shape=tuple(shape))

    def buffer_version(self, value: Any) -> int:
        return self._versions.get(id(value), 0)

    def _wrap(self, value: Any, shape: tuple[int, ...]) -> OrtTensor:
        """``value`` just written: its buffer's version moves on, so older tensors on it read as stale."""
        self._versions[id(value)] = self._versions.get(id(value), 0) + 1
        return OrtTensor(value, tuple(shape), self.dtype, self, self._versions[id(value)])

    def _to_device(self, array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        if not self.queues or self.io_device == "cpu":  # a CPU OrtValue wraps the array itself
            return self._ort.OrtValue.ortvalue_from_numpy(array, self.io_device, self.device_id)
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(list(array.shape), array.dtype, self.io_device,
                                                                self.device_id)
        self._write(value, array)
        return value

    def release_static(self) -> None:
        """Drop this generation's static inputs and their device copies (the generation core calls this after
        each image)."""
        self.drain()
        self.feeds.clear()
        self.static.clear()
        self.generation += 1

    # -- binding ---------------------------------------------------------------------------------------------

    def _session(self, graph: str) -> Any:
        if graph not in self.sessions:
            raise BackendOptionError(bad_value("ONNX graphs loaded", sorted(self.sessions), f"the {graph} graph for "
                                               "this call (export it with --graph " + graph + ")"))
        return self.sessions[graph]

    def _choose(self, graph: str, step: str, ref_tokens: int, target: Any, text: Any) -> Any:
        if self.selector is None:
            return None
        return self.selector.choose(graph, step, ref_tokens, int(np.shape(target)[1]), int(np.shape(text)[1]))

    def _bind_feed(self, binding: Any, feed: CallFeed) -> tuple[Any, tuple[int, ...]]:
        """Binds every input and the velocity output; returns the velocity's buffer and shape."""
        shape = tuple(feed.inputs["target"].shape)  # the velocity has the target's shape and the engine's dtype
        velocity = self._ring_value("velocity", shape, self.dtype)
        binding.bind_ortvalue_output("velocity", velocity)
        scratch = self._pointer(self._scratch)
        for name, value in feed.inputs.items():
            if isinstance(value, OrtTensor):  # latents of the previous step, already on the device
                binding.bind_ortvalue_input(name, self._current(value))
            elif isinstance(value, Empty):
                binding.bind_input(name, self.io_device, self.device_id, value.dtype, list(value.shape), scratch)
            elif name in feed.static:  # one device copy per host array, which stays the same all generation (or
                memo = self.lasting if name in feed.lasting else self.static  # longer: RoPE tables, kept prompts)
                binding.bind_ortvalue_input(name, memo.get(name, (value,), lambda v=value: self._to_device(v)))
            else:
                binding.bind_ortvalue_input(name, self._step_value(name, value))
        return velocity, shape

    def _current(self, tensor: OrtTensor) -> Any:
        if tensor.owner is not self or self.buffer_version(tensor.value) != tensor.version:
            raise BackendOptionError("an onnxruntime tensor from another backend or an earlier call was passed in; "
                                     "pass host arrays (np.asarray) or this backend's latest outputs")
        return tensor.value

    def _bind_pointer(self, binding: Any, name: str, pointer: int, shape: tuple[int, ...],
                      output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.io_device, self.device_id, self.dtype, list(shape), pointer)

    def _run(self, session: Any, binding: Any, velocity: tuple[Any, tuple[int, ...]]) -> Any:
        start = time.perf_counter()
        self._run_binding(session, binding)
        self.session_seconds += time.perf_counter() - start
        tensor = self._wrap(*velocity)
        # K/V stay in place; so does the velocity inside a loop with device steps. Otherwise it comes to the host
        # as an array that owns its memory (its buffer is reused two calls later).
        return tensor if self._looping else tensor.numpy()

    def _run_binding(self, session: Any, binding: Any, graph_id: int | None = None) -> None:
        """``graph_id``: the CUDA graph to capture or replay; every run of a graph-enabled session names one
        (:data:`~sparse_context.engines.ort.graphs.NO_GRAPH` for an ordinary run)."""
        if graph_id is None and self.graphs is not None and session is self.sessions.get("kv"):
            graph_id = NO_GRAPH
        if graph_id is not None:
            session.run_with_iobinding(binding, self.graphs.run_options(graph_id, self.queues))
            self._pending = self._pending or self.queues
        elif self.queues:
            session.run_with_iobinding(binding, self._queued_runs)
            self._pending = True
        else:
            session.run_with_iobinding(binding)

    @contextlib.contextmanager
    def device_loop(self) -> Iterator[None]:
        """The denoising loop runs inside this: with ``device_steps`` its velocities and latents stay on the device
        (each is read before its buffer comes round again, two calls later). On the way out, also after an error,
        queued work is waited for, so no buffer it uses can be freed under it."""
        looping, self._looping = self._looping, self.device_steps
        try:
            yield
        finally:
            self._looping = looping
            self.drain()

    def run_kv(self, target, target_ids, refs, ref_ids, text, text_ids, timestep, cached: Any = None,
               into: Any = None) -> np.ndarray:
        """One call of the KV graph: new references ``refs`` (may be 0 tokens) written into the buffers ``into``
        (a :class:`KVBuffers`), plus the K/V of ``cached`` (an :class:`EngineKVState`) read in place."""
        session = self._session("kv")
        feed = self.feeds.kv(target, target_ids, refs, ref_ids, text, text_ids, timestep)
        if into is None and feed.ref_tokens:
            raise BackendOptionError(f"run_kv: {feed.ref_tokens} new reference tokens but no buffers for their K/V; "
                                     f"call kv_extract (it takes buffers from kv_pool), or pass into= buffers of "
                                     f"the backend's kv_pool")
        graph = None if self.graphs is None else self.graphs.prepare(session, feed, cached)
        if graph is not None:
            replayed = self._replay(session, graph)
            if replayed is not None:
                return replayed  # else the graph failed and graphs are off: this call runs ordinarily
        binding = self._kv_binding(session, cached, into, feed.ref_tokens)
        velocity = self._bind_feed(binding, feed)
        return self._run(session, binding, velocity)

    def _kv_binding(self, session: Any, cached: Any, into: Any, ref_tokens: int) -> Any:
        """A binding of the kv session with its per-layer K/V tensors bound for these buffers and token counts;
        every other input and the velocity are bound again by each call. The cached steps of an image (and every
        image that reuses a state) bind the same 2 x layers inputs and outputs, so they are bound once per state:
        at klein-9b that is 128 binds fewer per call (~0.35 ms of host time on the 2-core CI machine)."""
        pointers = lambda buffers: (self._pointer(buffers.keys), self._pointer(buffers.values))
        key = (id(session), self.io_device, None if cached is None else (*pointers(cached.buffers),
                                                                         cached.num_ref_tokens),
               None if into is None else (*pointers(into), ref_tokens))
        binding = self._kv_bindings.pop(key, None)
        if binding is None:
            binding = session.io_binding()
            self._bind_kv(binding, cached, into, ref_tokens)
            self.kv_binds += 1
        self._kv_bindings[key] = binding  # the most recent last
        while len(self._kv_bindings) > KV_BINDINGS:
            self._kv_bindings.pop(next(iter(self._kv_bindings)))
        return binding

    def _bind_kv(self, binding: Any, cached: Any, into: Any, ref_tokens: int) -> None:
        """The K/V tensors of a kv-graph call: ``cached`` read in place (none: 0 tokens at the scratch address),
        ``ref_tokens`` new ones written into ``into`` (none: 0 tokens at the scratch address)."""
        scratch = self._pointer(self._scratch)
        itemsize = np.dtype(self.dtype).itemsize
        for family, which in zip(KV_INPUTS, ("keys", "values")):
            base = scratch if cached is None else self._pointer(getattr(cached.buffers, which))
            tokens = 0 if cached is None else cached.num_ref_tokens
            for name, offset, shape in self.feeds.kv_layers(family, tokens, itemsize):
                self._bind_pointer(binding, name, base + offset, shape)
        for family, which in zip(KV_OUTPUTS, ("keys", "values")):
            base = scratch if into is None else self._pointer(getattr(into, which))
            for name, offset, shape in self.feeds.kv_layers(family, ref_tokens, itemsize):
                self._bind_pointer(binding, name, base + offset, shape, output=True)

    def _replay(self, session: Any, graph: Any) -> Any:
        """One call through a CUDA graph (its inputs already copied in): run it, copy its velocity to the ring.
        None if the run failed (graphs are then off)."""
        start = time.perf_counter()
        try:
            self._run_binding(session, graph.binding, graph.id)
        except Exception as error:  # onnxruntime's own error types: a kernel it cannot capture
            self.graphs.fail(error)
            warnings.warn(f"CUDA graphs are off for this backend: a graph call failed ({self.graphs.error}); this "
                          "and every later call run ordinarily (leave out --cuda-graphs to skip the attempt)",
                          RuntimeWarning, stacklevel=3)
            return None
        self.session_seconds += time.perf_counter() - start
        velocity = self._ring_value("velocity", graph.shape, self.dtype)
        self.graphs.velocity_into(graph, velocity)
        tensor = self._wrap(velocity, graph.shape)
        return tensor if self._looping else tensor.numpy()

    # -- TransformerBackend ----------------------------------------------------------------------------------

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        num_refs = 0 if refs is None or ref_ids is None else int(ref_ids.shape[0])
        if "full" not in self.sessions and num_refs == 0:
            # Without references the KV graph computes the dense forward: no need for a second engine.
            self._choose("kv", "extract", 0, target, text)
            return self.run_kv(target, target_ids, None, None, text, text_ids, timestep)
        self._choose("full", "full", num_refs, target, text)
        session = self._session("full")
        binding = session.io_binding()
        velocity = self._bind_feed(binding, self.feeds.full(target, target_ids, refs, ref_ids, text, text_ids,
                                                            timestep))
        return self._run(session, binding, velocity)

    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        self._session("kv")
        num_refs = int(ref_ids.shape[0])
        choice = self._choose("kv", "extract", num_refs, target, text)
        buffers = self.kv_pool.acquire(choice.bucket.max_ref_tokens if choice is not None else num_refs)
        velocity = self.run_kv(target, target_ids, refs, ref_ids, text, text_ids, timestep, into=buffers)
        state = EngineKVState(buffers, self.feeds.kv_shape(num_refs), self.dtype, self._read)
        self.kv_pool.track(state, buffers)
        return velocity, state

    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        self._session("kv")  # fail with the flag to change before touching the arguments
        if not isinstance(kv_state, EngineKVState):
            raise BackendOptionError(bad_value("kv_state", type(kv_state).__name__, "a state from this backend's "
                                               "kv_extract (EngineKVState)"))
        self._choose("kv", "cached", kv_state.num_ref_tokens, target, text)
        return self.run_kv(target, target_ids, None, None, text, text_ids, timestep, cached=kv_state)

    def euler_step(self, latents, velocity, delta):
        if not isinstance(velocity, OrtTensor):
            return euler_step(latents, velocity, delta)
        if isinstance(latents, OrtTensor):
            latents_value, latents_dtype = self._current(latents), latents.dtype
        else:  # the initial noise, as the host step reads it: float32 unless already in the engine's dtype
            host = np.asarray(latents)
            latents_dtype = self.dtype if host.dtype == self.dtype else np.dtype(np.float32)
            latents_value = self._step_value("noise", host.astype(latents_dtype, copy=False))
        feeds = {"latents": latents_value, "velocity": self._current(velocity)}
        return self._elementwise("euler", euler_graph(np.dtype(latents_dtype), self.dtype), feeds,
                                 {"delta": rounded_scalar(delta, self.dtype)}, "next", velocity.shape)

    def guide(self, positive, negative, scale):
        """Classifier-free guidance ``negative + scale * (positive - negative)``, on the device with device steps."""
        if not isinstance(positive, OrtTensor):
            return negative + scale * (positive - negative)
        feeds = {"positive": self._current(positive), "negative": self._current(negative)}
        return self._elementwise("guidance", guidance_graph(self.dtype), feeds,
                                 {"scale": rounded_scalar(scale, self.dtype)}, "guided", positive.shape)

    def finish_latents(self, latents):
        """The final latents as a host array (the loop's last call)."""
        return latents.numpy() if isinstance(latents, OrtTensor) else latents

    def _elementwise(self, name: str, model: bytes, tensors: dict[str, Any], host: dict[str, np.ndarray],
                     output: str, shape: tuple[int, ...]) -> OrtTensor:
        session = self._step_session(model)
        binding = session.io_binding()
        for key, value in tensors.items():
            binding.bind_ortvalue_input(key, value)
        for key, value in host.items():  # step scalars in kept device buffers too, written like every loop input
            binding.bind_ortvalue_input(key, self._step_value(f"{name}.{key}", value))
        result = self._ring_value(name, shape, self.dtype)
        binding.bind_ortvalue_output(output, result)
        start = time.perf_counter()
        self._run_binding(session, binding)
        self.step_seconds += time.perf_counter() - start
        return self._wrap(result, shape)

    def _step_session(self, model: bytes) -> Any:
        """A session of a step graph on the I/O device, without graph optimizations: a pass that folded the
        float32 -> float16 -> float32 Cast pairs would drop the rounding they exist for."""
        key = (model, self.io_device)
        if key not in self._step_sessions:
            options = self._ort.SessionOptions()
            options.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            providers = (["CPUExecutionProvider"] if self.io_device == "cpu" else
                         with_default_options(["CUDAExecutionProvider"], self.device_id, self._stream_handle))
            self._step_sessions[key] = self._ort.InferenceSession(model, sess_options=options, providers=providers)
        return self._step_sessions[key]
