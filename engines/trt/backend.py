"""TensorRT engines behind the sampler's :class:`~sparse_context.runtime.sampler.TransformerBackend` protocol.

Each call maps to exactly one optimization profile (:class:`~sparse_context.engines.profiles.ProfileSelector`:
bucket of its reference tokens, KV step, and the built target/text ranges) or fails before touching the GPU with
the build option that would cover it. Reference K/V never leave the GPU: the extract step writes them into pooled
device buffers sized at the bucket maximum, and cached steps bind the same addresses as inputs. Prompt embeddings,
packed references and RoPE tables are uploaded once per generation. The inputs of each call come from
:class:`~sparse_context.engines.feeds.FeedBuilder` and the Euler step is
:func:`~sparse_context.runtime.schedule.euler_step`, shared with the onnxruntime backend so the two cannot drift.

Engines built with their step engines (``engines.json`` ``steps``: the Euler step and the guidance mix of
:mod:`~sparse_context.engines.step_graphs`, bit-equal to the host arithmetic) keep latents on the GPU inside the
denoising loop (:meth:`TrtTransformerBackend.device_loop`): every engine of the generation is queued on the one
stream of the backend's memory, velocities and latents stay in kept device buffers, and only the final latents
are downloaded, with the generation's one synchronisation. ``tensorrt`` is imported lazily (by the runner).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np

from sparse_context.engines.errors import RunnerError
from sparse_context.engines.feeds import KV_INPUTS, KV_OUTPUTS, CallFeed, Empty, FeedBuilder
from sparse_context.engines.index import EnginesIndex
from sparse_context.engines.profiles import ProfileSelector
from sparse_context.engines.step_graphs import STEP_OUTPUTS, rounded_scalar
from sparse_context.engines.trt.memory import ALIGNMENT, default_memory
from sparse_context.engines.trt.runner import DeviceTensor, TrtRunner, _itemsize
from sparse_context.export.manifest import read_export_manifest
from sparse_context.runtime.fingerprints import text_digest
from sparse_context.export.spec import NUMPY_DTYPES, ModelDims, layer_name
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.kv_buffers import EngineKVState, KVBufferPool
from sparse_context.runtime.schedule import euler_step

KV_TENSORS = KV_INPUTS + KV_OUTPUTS
HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16}  # velocities the step engines take (not BF16)
STATIC_INPUTS = ("text", "refs", "rope_cos", "rope_sin", "ref_rope_cos", "ref_rope_sin")
# TensorRT DataType names of the K/V outputs -> the host dtype their values are read back in (bf16 via float32).
KV_HOST_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.float32}


@dataclass(frozen=True)
class TrtTensor:
    """Latents or a velocity (1, N, C) in one of the backend's kept device buffers, inside the denoising loop.

    The loop passes these back to the backend without looking inside; ``np.asarray`` downloads one (and waits for
    the stream). The buffer is rewritten two calls later, so reading an older tensor raises instead of returning
    other values."""

    buffer: Any
    shape: tuple[int, ...]
    dtype_name: str  # TensorRT DataType name: FLOAT or HALF
    owner: Any
    version: int
    on_device = True  # FeedBuilder binds it as it is

    def numpy(self) -> np.ndarray:
        return self.owner.download(self)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)


class TrtTransformerBackend:
    """The full and/or KV engine of one ``engines.json`` (``build_engines.py --backend trt``)."""

    name = "tensorrt"

    def __init__(self, index: EnginesIndex, memory: Any = None, device: int = 0, device_steps: bool = True):
        graphs = {graph: entry for graph, entry in index.graphs.items() if entry.engine}
        if not graphs:
            raise RunnerError(bad_value("TensorRT engines", "none in engines.json", "a full and/or kv engine",
                                        "--engines"))
        self.memory = memory if memory is not None else default_memory(device)
        self._owns_memory = memory is None  # an injected memory object (and its stream) belongs to the caller
        self.runners: dict[str, TrtRunner] = {}
        self.step_runners: dict[str, TrtRunner] = {}
        self._kept: dict[tuple[str, int], tuple[Any, int]] = {}  # (name, slot) -> (buffer, bytes)
        self.manifests = {graph: read_export_manifest(index.path(entry.onnx)) for graph, entry in graphs.items()}
        manifest = next(iter(self.manifests.values()))
        self.dims = ModelDims.from_config(manifest["model_config"])
        kv_tensors = [layer_name(family, layer) for family in KV_TENSORS for layer in range(self.dims.num_layers)]
        try:
            for graph, entry in graphs.items():
                external = kv_tensors if graph == "kv" else ()
                runner = TrtRunner(index.path(entry.engine), memory=self.memory, device=device, external=external,
                                   static=STATIC_INPUTS)
                self.runners[graph] = runner.activate()
            for name, entry in index.steps.items():
                if entry.engine:
                    self.step_runners[name] = TrtRunner(index.path(entry.engine), memory=self.memory,
                                                        device=device).activate()
        except BaseException:
            self.close()
            raise
        # The engines run, not the ONNX: their checksums (checked before deserializing) identify the weights.
        self.fingerprint = text_digest({g: r.manifest.engine_sha256 for g, r in self.runners.items()})
        self.precision = manifest["precision"]
        # Host side in the engine's precision; bf16 has no numpy dtype, so it travels as float32 and the device
        # memory converts on upload.
        self.dtype = np.dtype(NUMPY_DTYPES.get(self.precision) or np.float32)
        self.feeds = FeedBuilder(self.dims, self.dtype)
        self.selector = ProfileSelector(index.plan,
                                        {g: r.manifest.profiles for g, r in self.runners.items()}, strict_shapes=True)
        d = self.dims
        self.kv_itemsize = _itemsize(self.kv_dtype) if "kv" in self.runners else 2
        self.kv_pool = KVBufferPool(self.memory.alloc, d.num_layers * d.heads * d.head_dim * self.kv_itemsize,
                                    free=self.memory.free)
        self._scratch = self.memory.alloc(64)  # the address of zero-token tensors
        # Device steps need the Euler and guidance engines of the transformer's velocity dtype.
        velocity = next(iter(self.runners.values())).dtypes["velocity"]
        usable = {"euler", "guidance"} <= set(self.step_runners) and velocity in HOST_DTYPES and all(
            r.dtypes[r.outputs[0]] == velocity for r in self.step_runners.values())
        self.velocity_dtype = velocity
        self.device_steps = bool(device_steps) and usable
        self._looping = False
        self._turns: dict[str, int] = {}
        self._versions: dict[int, int] = {}  # writes per kept buffer (by address), to refuse stale TrtTensors

    def close(self) -> None:
        for runner in (*self.runners.values(), *self.step_runners.values()):
            runner.deactivate()
        self.runners.clear()
        self.step_runners.clear()
        for buffer, _ in self._kept.values():
            self.memory.free(buffer)
        self._kept.clear()
        if getattr(self, "kv_pool", None) is not None:
            self.kv_pool.clear()  # idle K/V buffers (live states keep theirs until they are dropped)
        if getattr(self, "_scratch", None) is not None:
            self.memory.free(self._scratch)
            self._scratch = None
        if self._owns_memory:
            self.memory.close()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _runner(self, graph: str) -> TrtRunner:
        if graph not in self.runners:
            raise RunnerError(bad_value("TensorRT engines loaded", sorted(self.runners), f"the {graph} engine for "
                                        f"this call (build it with --graphs {graph})", "--graphs"))
        return self.runners[graph]

    def _empty(self, shape: tuple[int, ...]) -> DeviceTensor:
        return DeviceTensor(self.memory.pointer(self._scratch), tuple(shape), 0)

    def _bindable(self, feed: CallFeed) -> dict[str, Any]:
        """Host arrays as they are (the runner uploads each static one once), zero-token inputs at the scratch,
        the loop's device latents at their buffer."""
        return {name: self._empty(value.shape) if isinstance(value, Empty) else self._device(value)
                if isinstance(value, TrtTensor) else value for name, value in feed.inputs.items()}

    def _velocity(self, results: Mapping[str, Any]) -> np.ndarray:
        """The velocity on the host in the engine's precision (bf16 engines: float32)."""
        velocity = results["velocity"]
        if hasattr(velocity, "cpu"):  # the torch memory path returns CUDA tensors
            velocity = velocity.float().cpu().numpy()
        return np.asarray(velocity, dtype=self.dtype)

    def _infer(self, runner: TrtRunner, inputs: dict[str, Any], profile: int,
               into: dict[str, DeviceTensor] | None = None) -> Any:
        """One transformer call: a host velocity, or inside the loop with device steps a TrtTensor in a kept
        buffer, the call left queued on the stream."""
        if not self._looping:
            return self._velocity(runner.infer(inputs, profile, into=into))
        shape = tuple(int(d) for d in inputs["target"].shape)  # a host array, or the loop's DeviceTensor
        buffer = self._ring("velocity", shape)
        outputs = {**(into or {}), "velocity": DeviceTensor(self.memory.pointer(buffer), shape)}
        runner.infer(inputs, profile, into=outputs, synchronize=False)
        return self._wrap(buffer, shape)

    # -- device steps ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def device_loop(self) -> Iterator[None]:
        """The denoising loop runs inside this: with device steps its velocities and latents stay on the GPU (each
        is read before its buffer comes round again, two calls later)."""
        looping, self._looping = self._looping, self.device_steps
        try:
            yield
        finally:
            self._looping = looping

    def _ring(self, name: str, shape: tuple[int, ...]) -> Any:
        """The next of two kept buffers for ``name``, large enough for ``shape`` in the velocity dtype: an output
        is written while the previous one is still to be read (Euler reads the last latents while writing the
        next; guidance reads two velocities)."""
        turn = self._turns.get(name, 0)
        self._turns[name] = 1 - turn
        nbytes = int(np.prod(shape, dtype=np.int64)) * _itemsize(self.velocity_dtype)
        held = self._kept.get((name, turn))
        if held is None or held[1] < nbytes:
            if held is not None:
                self.memory.synchronize()  # queued work may still read the old buffer
                self.memory.free(held[0])
            held = self._kept[(name, turn)] = (self.memory.alloc(nbytes), nbytes)
        return held[0]

    def _wrap(self, buffer: Any, shape: tuple[int, ...]) -> TrtTensor:
        """``buffer`` just written: its version moves on, so older tensors on it read as stale."""
        key = self.memory.pointer(buffer)
        self._versions[key] = self._versions.get(key, 0) + 1
        return TrtTensor(buffer, tuple(shape), self.velocity_dtype, self, self._versions[key])

    def _device(self, tensor: TrtTensor) -> DeviceTensor:
        if tensor.owner is not self or self._versions.get(self.memory.pointer(tensor.buffer)) != tensor.version:
            raise RunnerError("a TensorRT tensor from another backend or an earlier call was passed in; pass host "
                              "arrays (np.asarray) or this backend's latest outputs")
        return DeviceTensor(self.memory.pointer(tensor.buffer), tensor.shape)

    def download(self, tensor: TrtTensor) -> np.ndarray:
        """A host copy of a loop tensor, after everything queued before it has run."""
        source = self._device(tensor)
        array = self.memory.download(tensor.buffer, source.shape, tensor.dtype_name)
        self.memory.synchronize()
        array = array.float().cpu().numpy() if hasattr(array, "cpu") else np.array(array, copy=True)
        return array.astype(HOST_DTYPES[tensor.dtype_name], copy=False)

    def _step(self, name: str, tensors: dict[str, Any], scalars: dict[str, np.ndarray],
              shape: tuple[int, ...]) -> TrtTensor:
        runner = self.step_runners[name]
        buffer = self._ring(STEP_OUTPUTS[name], shape)
        output = DeviceTensor(self.memory.pointer(buffer), shape)
        runner.infer({**tensors, **scalars}, 0, into={STEP_OUTPUTS[name]: output}, synchronize=False)
        return self._wrap(buffer, shape)

    def _run_kv(self, target, target_ids, refs, ref_ids, text, text_ids, timestep, step: str,
                cached: EngineKVState | None = None, into: Any = None, choice: Any = None) -> np.ndarray:
        runner = self._runner("kv")
        feed = self.feeds.kv(target, target_ids, refs, ref_ids, text, text_ids, timestep)
        if choice is None:
            counted = cached.num_ref_tokens if cached is not None else feed.ref_tokens
            choice = self.selector.choose("kv", step, counted, np.shape(target)[1], np.shape(text)[1])
        inputs = self._bindable(feed)
        inputs.update(self._kv_views(KV_INPUTS, cached.buffers if cached is not None else None,
                                     cached.num_ref_tokens if cached is not None else 0))
        outputs = self._kv_views(KV_OUTPUTS, into, feed.ref_tokens if into is not None else 0)
        return self._infer(runner, inputs, choice.index, into=outputs)

    def _kv_views(self, families: tuple[str, ...], buffers: Any, tokens: int) -> dict[str, DeviceTensor]:
        """Each layer's K/V tensor of ``families`` (keys, values) as a view of ``buffers`` (a :class:`KVBuffers`)
        at its offset in the stacked layout, bounded by what is left of the buffer; without buffers, 0 tokens at
        the scratch address."""
        views = {}
        for family, which in zip(families, ("keys", "values")):
            for name, offset, shape in self.feeds.kv_layers(family, tokens, self.kv_itemsize, ALIGNMENT):
                if buffers is None:
                    views[name] = self._empty(shape)
                else:
                    capacity = buffers.nbytes // 2 - offset
                    views[name] = DeviceTensor(self.memory.pointer(getattr(buffers, which)) + offset, shape, capacity)
        return views

    @property
    def kv_dtype(self) -> str:
        """The TensorRT data type name of the kv engine's K/V outputs."""
        return self.runners["kv"].dtypes[layer_name(KV_OUTPUTS[0], 0)]

    def _read(self, buffer: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A state's stacked ``(layers, 1, N, H, D)`` K or V on the host; layers lie every aligned stride of tokens
        in the buffer (:meth:`FeedBuilder.kv_stride_tokens`), so the padding between them is cut off."""
        stride = self.feeds.kv_stride_tokens(shape[2], self.kv_itemsize, ALIGNMENT)
        padded = (*shape[:2], stride, *shape[3:])
        array = self.memory.download(buffer, padded, self.kv_dtype)
        self.memory.synchronize()
        array = np.asarray(array.float().cpu().numpy() if hasattr(array, "cpu") else array)
        return array[:, :, : shape[2]]

    # -- TransformerBackend ----------------------------------------------------------------------------------

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        num_refs = 0 if refs is None or ref_ids is None else int(ref_ids.shape[0])
        if "full" not in self.runners and num_refs == 0:  # no references: the KV engine's extract is the dense pass
            return self._run_kv(target, target_ids, None, None, text, text_ids, timestep, "extract")
        runner = self._runner("full")
        choice = self.selector.choose("full", "full", num_refs, np.shape(target)[1], np.shape(text)[1])
        feed = self.feeds.full(target, target_ids, refs, ref_ids, text, text_ids, timestep)
        return self._infer(runner, self._bindable(feed), choice.index)

    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        num_refs = int(ref_ids.shape[0])
        choice = self.selector.choose("kv", "extract", num_refs, np.shape(target)[1], np.shape(text)[1])
        buffers = self.kv_pool.acquire(self.feeds.kv_stride_tokens(choice.bucket.max_ref_tokens, self.kv_itemsize,
                                                                   ALIGNMENT))
        velocity = self._run_kv(target, target_ids, refs, ref_ids, text, text_ids, timestep, "extract", into=buffers,
                                choice=choice)
        dtype = KV_HOST_DTYPES.get(self.kv_dtype, np.float32)
        state = EngineKVState(buffers, self.feeds.kv_shape(num_refs), dtype, self._read)
        self.kv_pool.track(state, buffers)
        return velocity, state

    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        if not isinstance(kv_state, EngineKVState):
            raise RunnerError(bad_value("kv_state", type(kv_state).__name__, "a state from this backend's kv_extract"))
        return self._run_kv(target, target_ids, None, None, text, text_ids, timestep, "cached", cached=kv_state)

    def euler_step(self, latents, velocity, delta):
        if not isinstance(velocity, TrtTensor):
            return euler_step(latents, velocity, delta)
        dtype = HOST_DTYPES[velocity.dtype_name]
        if isinstance(latents, TrtTensor):
            name, value = "euler", self._device(latents)
        else:  # the initial noise, as the host step reads it: float32 unless already in the velocity's dtype
            host = np.asarray(latents)
            name = "euler" if host.dtype == dtype or "euler_noise" not in self.step_runners else "euler_noise"
            value = host.astype(dtype if name == "euler" else np.float32, copy=False)
        return self._step(name, {"latents": value, "velocity": self._device(velocity)},
                          {"delta": rounded_scalar(delta, dtype)}, velocity.shape)

    def guide(self, positive, negative, scale):
        """Classifier-free guidance ``negative + scale * (positive - negative)``, on the GPU with device steps."""
        if not isinstance(positive, TrtTensor):
            return negative + scale * (positive - negative)
        dtype = HOST_DTYPES[positive.dtype_name]
        return self._step("guidance", {"positive": self._device(positive), "negative": self._device(negative)},
                          {"scale": rounded_scalar(scale, dtype)}, positive.shape)

    def finish_latents(self, latents):
        """The final latents as a host array (the loop's last call, and its one wait for the GPU)."""
        return latents.numpy() if isinstance(latents, TrtTensor) else latents

    def release_static(self) -> None:
        self.feeds.clear()
