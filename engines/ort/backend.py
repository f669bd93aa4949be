"""onnxruntime behind the sampler's :class:`~sparse_context.runtime.sampler.TransformerBackend` protocol.

Tensors are numpy arrays; RoPE tables are computed here from position ids (numpy, float64 math, float32 tables).
One session of the KV graph serves both extract and cached steps, so the weights are held once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sparse_context.export.errors import ExportConfigError, ExportError
from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import NUMPY_DTYPES, ModelDims
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.kv_buffers import EngineKVState, KVBufferPool
from sparse_context.runtime.memo import IdentityMemo

MANIFEST = "manifest.json"


def read_export_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export: ``path`` is its ``model.onnx`` or its folder. numpy-only, so the runtime can read
    it without the exporter (which imports torch)."""
    import json

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(bad_value("ONNX export", str(path), f"a model.onnx with its {MANIFEST} (written by "
                                    "sparse_context.export)")) from error


DEVICE_BY_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                      "CPUExecutionProvider": "cpu"}
STATIC_ENTRIES = 4  # per input: positive and negative prompt (guidance) and their RoPE tables, with room to spare


def provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def with_default_options(providers: Sequence[Any], device_id: int = 0) -> list[Any]:
    """CUDA EP defaults for this workload: the chosen device, and an arena that grows by what is asked (the K/V
    buffers are large and long-lived; the default doubling strategy would reserve up to twice that)."""
    result: list[Any] = []
    for provider in providers:
        if provider_name(provider) == "CUDAExecutionProvider" and not isinstance(provider, (tuple, list)):
            provider = (provider, {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested"})
        result.append(provider)
    return result


class OrtTransformerBackend:
    """Runs the exported full and/or KV graph with onnxruntime through I/O binding.

    Inputs that do not change across the denoising steps (prompt embeddings, packed references, RoPE tables) are
    copied to the session's device once per generation; only the target latents and the timestep travel per step.
    Reference K/V live in :class:`~sparse_context.runtime.kv_buffers.KVBufferPool` buffers sized at the request's
    bucket maximum: the extract step writes them in place and cached steps read them in place. The same code runs
    on the CPU EP (CI) and the CUDA / TensorRT EPs (device buffers).

    ``plan``: the bucket plan the engines were built for; each call then maps to exactly one bucket (else a
    ProfileError saying what to rebuild) and ``strict_shapes`` also checks target and text lengths (TensorRT EP).
    """

    name = "onnxruntime"

    def __init__(self, full: str | Path | None = None, kv: str | Path | None = None,
                 providers: Sequence[Any] = ("CPUExecutionProvider",), session_options: Any = None, *,
                 plan: Any = None, strict_shapes: bool = False, device_id: int = 0):
        import onnxruntime as ort

        if full is None and kv is None:
            raise ExportConfigError(bad_value("ONNX graphs", "none", "a full graph, a KV graph or both"))
        if not providers:
            raise ExportConfigError(bad_value("execution providers", list(providers), "at least one"))
        first = provider_name(providers[0])
        if first not in DEVICE_BY_PROVIDER:
            raise ExportConfigError(bad_value("execution provider", first, ", ".join(DEVICE_BY_PROVIDER)))
        self._ort = ort
        self.device = DEVICE_BY_PROVIDER[first]
        self.device_id = int(device_id)
        providers = with_default_options(providers, self.device_id)
        self.sessions: dict[str, Any] = {}
        self.manifests: dict[str, dict[str, Any]] = {}
        for graph, given in (("full", full), ("kv", kv)):
            if given is None:
                continue
            path = Path(given)
            path = path / "model.onnx" if path.is_dir() else path
            manifest = read_export_manifest(path)
            if manifest.get("graph") != graph:
                raise ExportConfigError(bad_value(f"{graph} graph", str(path), f"an export of the {graph} graph "
                                                  f"(this one is '{manifest.get('graph')}')"))
            self.manifests[graph] = manifest
            self.sessions[graph] = ort.InferenceSession(str(path), sess_options=session_options,
                                                        providers=list(providers))
        manifest = next(iter(self.manifests.values()))
        weights = {(m["base_weights_sha256"][:12], (m.get("lora") or {}).get("sha256"))
                   for m in self.manifests.values()}
        if len(weights) > 1:
            raise ExportConfigError(bad_value("full and KV graphs", sorted(weights, key=str),
                                              "exports of the same weights and LoRA"))
        if len({m["precision"] for m in self.manifests.values()}) > 1:
            raise ExportConfigError(bad_value("full and KV graphs", "different precisions", "one precision"))
        self.precision = manifest["precision"]
        self.dtype = NUMPY_DTYPES[self.precision]
        if self.dtype is None:
            raise ExportConfigError(bad_value("precision of the ONNX export", self.precision, "fp32 or fp16 (numpy "
                                              "has no bfloat16 for the host side of the runtime)", "--precision"))
        self.dims = ModelDims.from_config(manifest["model_config"])
        self.selector = None
        if plan is not None:
            from sparse_context.engines.profiles import ProfileSelector

            self.selector = ProfileSelector(plan, strict_shapes=strict_shapes)
        self.static = IdentityMemo(STATIC_ENTRIES)
        self._pools: dict[str, KVBufferPool] = {}
        self._scratches: dict[str, Any] = {}
        self.io_device = self.device

    def set_io_device(self, device: str) -> None:
        """Where inputs, outputs and K/V buffers live: the session's device (the default: I/O binding of device
        buffers), or ``"cpu"``, which makes onnxruntime copy every input in and every output out on each call, as
        a plain ``session.run`` does. The benchmark times both to show what device buffers buy."""
        if device not in ("cpu", self.device):
            raise ExportConfigError(bad_value("I/O device", device, f"cpu or {self.device}"))
        self.static.clear()
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
        host = buffer if isinstance(buffer, np.ndarray) else buffer.numpy()
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(host, dtype=self.dtype, count=count).reshape(shape)

    def _to_device(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.io_device, self.device_id)

    def _static_value(self, name: str, sources: tuple[Any, ...], make: Any) -> Any:
        """Device copies of the arrays ``make()`` builds from ``sources`` (one array or a tuple), reused while the
        same source objects come back: the denoising loop passes the same prompt, references and ids every step."""
        def upload() -> Any:
            made = make()
            return tuple(self._to_device(a) for a in made) if isinstance(made, tuple) else self._to_device(made)

        return self.static.get(name, sources, upload)

    def release_static(self) -> None:
        """Drop the device copies of per-generation inputs (the generator calls this after each image)."""
        self.static.clear()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _rope(self, name: str, *ids: np.ndarray) -> tuple[Any, Any]:
        """(cos, sin) device tables for the concatenated position ids."""
        return self._static_value(name, ids, lambda: rope_cos_sin(np.concatenate(ids, axis=0),
                                                                  self.dims.axes_dims_rope, self.dims.rope_theta))

    def _cast(self, array: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(array), dtype=self.dtype)

    def _session(self, graph: str) -> Any:
        if graph not in self.sessions:
            raise ExportConfigError(bad_value("ONNX graphs loaded", sorted(self.sessions), f"the {graph} graph for "
                                              "this call (export it with --graph " + graph + ")"))
        return self.sessions[graph]

    def _choose(self, graph: str, step: str, ref_tokens: int, target: Any, text: Any) -> Any:
        if self.selector is None:
            return None
        return self.selector.choose(graph, step, ref_tokens, int(np.shape(target)[1]), int(np.shape(text)[1]))

    def _kv_shape(self, tokens: int) -> list[int]:
        d = self.dims
        return [d.num_layers, 1, int(tokens), d.heads, d.head_dim]

    def _bind_common(self, binding: Any, target, text, timestep) -> None:
        binding.bind_output("velocity", self.io_device, self.device_id)  # first: _run reads output 0
        binding.bind_ortvalue_input("target", self._to_device(self._cast(target)))
        binding.bind_ortvalue_input("text", self._static_value("text", (text,), lambda: self._cast(text)))
        binding.bind_ortvalue_input("timestep", self._to_device(np.array([timestep], np.float32)))

    def _bind_pointer(self, binding: Any, name: str, pointer: int, shape: list[int], output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.io_device, self.device_id, self.dtype, shape, pointer)

    def _run(self, session: Any, binding: Any) -> np.ndarray:
        session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # only the velocity comes to the host; K/V stay in place

    def run_kv(self, target, target_ids, refs, ref_ids, text, text_ids, timestep, cached: Any = None,
               into: Any = None) -> np.ndarray:
        """One call of the KV graph: new references ``refs`` (may be 0 tokens) written into the buffers ``into``
        (a :class:`KVBuffers`), plus the K/V of ``cached`` (an :class:`EngineKVState`) read in place."""
        session = self._session("kv")
        binding = session.io_binding()
        self._bind_common(binding, target, text, timestep)
        cos, sin = self._rope("rope_text_target", text_ids, target_ids)
        binding.bind_ortvalue_input("rope_cos", cos)
        binding.bind_ortvalue_input("rope_sin", sin)
        num_refs = int(ref_ids.shape[0]) if ref_ids is not None else 0
        if num_refs:
            ref_cos, ref_sin = self._rope("rope_refs", ref_ids)
            binding.bind_ortvalue_input("refs", self._static_value("refs", (refs,), lambda: self._cast(refs)))
            binding.bind_ortvalue_input("ref_rope_cos", ref_cos)
            binding.bind_ortvalue_input("ref_rope_sin", ref_sin)
        else:
            scratch = self._pointer(self._scratch)
            self._bind_pointer(binding, "refs", scratch, [1, 0, self.dims.in_channels])
            for name in ("ref_rope_cos", "ref_rope_sin"):
                binding.bind_input(name, self.io_device, self.device_id, np.float32, [0, self.dims.head_dim], scratch)
        for name, which in (("cached_keys", "keys"), ("cached_values", "values")):
            if cached is None:
                self._bind_pointer(binding, name, self._pointer(self._scratch), self._kv_shape(0))
            else:
                self._bind_pointer(binding, name, self._pointer(getattr(cached.buffers, which)),
                                   self._kv_shape(cached.num_ref_tokens))
        for name, which in (("ref_keys", "keys"), ("ref_values", "values")):
            if into is None:
                if num_refs:
                    raise ExportConfigError("run_kv: new reference K/V need buffers (`into`)")
                self._bind_pointer(binding, name, self._pointer(self._scratch), self._kv_shape(0), output=True)
            else:
                self._bind_pointer(binding, name, self._pointer(getattr(into, which)), self._kv_shape(num_refs),
                                   output=True)
        return self._run(session, binding)

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
        self._bind_common(binding, target, text, timestep)
        if num_refs:
            binding.bind_ortvalue_input("refs", self._static_value("refs", (refs,), lambda: self._cast(refs)))
            cos, sin = self._rope("rope_full", text_ids, target_ids, ref_ids)
        else:
            self._bind_pointer(binding, "refs", self._pointer(self._scratch), [1, 0, self.dims.in_channels])
            cos, sin = self._rope("rope_full", text_ids, target_ids)
        binding.bind_ortvalue_input("rope_cos", cos)
        binding.bind_ortvalue_input("rope_sin", sin)
        return self._run(session, binding)

    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        self._session("kv")
        num_refs = int(ref_ids.shape[0])
        choice = self._choose("kv", "extract", num_refs, target, text)
        buffers = self.kv_pool.acquire(choice.bucket.max_ref_tokens if choice is not None else num_refs)
        velocity = self.run_kv(target, target_ids, refs, ref_ids, text, text_ids, timestep, into=buffers)
        state = EngineKVState(buffers, tuple(self._kv_shape(num_refs)), self.dtype, self._read)
        self.kv_pool.track(state, buffers)
        return velocity, state

    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        self._session("kv")  # fail with the flag to change before touching the arguments
        if not isinstance(kv_state, EngineKVState):
            raise ExportConfigError(bad_value("kv_state", type(kv_state).__name__, "a state from this backend's "
                                              "kv_extract (EngineKVState)"))
        self._choose("kv", "cached", kv_state.num_ref_tokens, target, text)
        return self.run_kv(target, target_ids, None, None, text, text_ids, timestep, cached=kv_state)

    def euler_step(self, latents, velocity, delta):
        # FlowMatchEulerDiscreteScheduler.step: float32 arithmetic, result in the velocity's dtype.
        stepped = latents.astype(np.float32) + np.float32(delta) * velocity.astype(np.float32)
        return stepped.astype(velocity.dtype)
