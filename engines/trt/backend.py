"""TensorRT engines behind the sampler's :class:`~sparse_context.runtime.sampler.TransformerBackend` protocol.

Each call maps to exactly one optimization profile (:class:`~sparse_context.engines.profiles.ProfileSelector`:
bucket of its reference tokens, KV step, and the built target/text ranges) or fails before touching the GPU with
the build option that would cover it. Reference K/V never leave the GPU: the extract step writes them into pooled
device buffers sized at the bucket maximum, and cached steps bind the same addresses as inputs. Prompt embeddings,
packed references and RoPE tables are uploaded once per generation. ``tensorrt`` is imported lazily (by the runner).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sparse_context.engines.buckets import BucketPlan
from sparse_context.engines.trt.memory import default_memory
from sparse_context.engines.errors import RunnerError
from sparse_context.engines.profiles import ProfileSelector
from sparse_context.engines.trt.runner import DeviceTensor, TrtRunner, _itemsize
from sparse_context.engines.ort.backend import read_export_manifest
from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import ModelDims
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.kv_buffers import EngineKVState, KVBufferPool
from sparse_context.runtime.memo import IdentityMemo

KV_TENSORS = ("cached_keys", "cached_values", "ref_keys", "ref_values")
STATIC_INPUTS = ("text", "refs", "rope_cos", "rope_sin", "ref_rope_cos", "ref_rope_sin")


class TrtTransformerBackend:
    """The full and/or KV engine of one ``engines.json`` (``build_engines.py --backend trt``)."""

    name = "tensorrt"

    def __init__(self, engines: Mapping[str, Any], memory: Any = None, device: int = 0):
        if "plan" not in engines:
            raise RunnerError(bad_value("engines.json", "no recorded bucket plan", "engines written by this "
                                        "version of build_engines.py (rebuild them)", "--engines"))
        graphs = {graph: entry for graph, entry in engines["graphs"].items() if entry.get("engine")}
        if not graphs:
            raise RunnerError(bad_value("TensorRT engines", "none in engines.json", "a full and/or kv engine",
                                        "--engines"))
        self.memory = memory if memory is not None else default_memory(device)
        self.runners: dict[str, TrtRunner] = {}
        try:
            for graph, entry in graphs.items():
                external = KV_TENSORS if graph == "kv" else ()
                runner = TrtRunner(Path(entry["engine"]), memory=self.memory, device=device, external=external,
                                   static=STATIC_INPUTS)
                self.runners[graph] = runner.activate()
        except BaseException:
            self.close()
            raise
        self.manifests = {graph: read_export_manifest(entry["onnx"]) for graph, entry in graphs.items()}
        self.dims = ModelDims.from_config(next(iter(self.manifests.values()))["model_config"])
        self.selector = ProfileSelector(BucketPlan.from_json(engines["plan"]),
                                        {g: r.manifest.profiles for g, r in self.runners.items()}, strict_shapes=True)
        d = self.dims
        kv_itemsize = _itemsize(self.runners["kv"].dtypes["ref_keys"]) if "kv" in self.runners else 2
        self.kv_pool = KVBufferPool(self.memory.alloc, d.num_layers * d.heads * d.head_dim * kv_itemsize,
                                    free=self.memory.free)
        self.static = IdentityMemo()
        self._scratch = self.memory.alloc(64)  # the address of zero-token tensors

    def close(self) -> None:
        for runner in self.runners.values():
            runner.deactivate()
        self.runners.clear()

    # -- helpers ---------------------------------------------------------------------------------------------

    def _rope(self, name: str, *ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.static.get(name, ids, lambda: rope_cos_sin(np.concatenate(ids, axis=0), self.dims.axes_dims_rope,
                                                               self.dims.rope_theta))

    def _runner(self, graph: str) -> TrtRunner:
        if graph not in self.runners:
            raise RunnerError(bad_value("TensorRT engines loaded", sorted(self.runners), f"the {graph} engine for "
                                        f"this call (build it with --graphs {graph})", "--graphs"))
        return self.runners[graph]

    def _kv_shape(self, tokens: int) -> tuple[int, ...]:
        d = self.dims
        return (d.num_layers, 1, int(tokens), d.heads, d.head_dim)

    def _empty(self, *shape: int) -> DeviceTensor:
        return DeviceTensor(self.memory.pointer(self._scratch), tuple(shape), 0)

    def _velocity(self, results: Mapping[str, Any]) -> np.ndarray:
        velocity = results["velocity"]
        if hasattr(velocity, "cpu"):  # the torch memory path returns CUDA tensors
            velocity = velocity.float().cpu().numpy()
        return np.asarray(velocity, dtype=np.float32)

    def _feed(self, target, text, timestep) -> dict[str, Any]:
        return {"target": np.asarray(target), "text": text, "timestep": np.array([timestep], np.float32)}

    def _run_kv(self, target, target_ids, refs, ref_ids, text, text_ids, timestep, step: str,
                cached: EngineKVState | None = None, into: Any = None, choice: Any = None) -> np.ndarray:
        runner = self._runner("kv")
        num_refs = 0 if ref_ids is None else int(ref_ids.shape[0])
        if choice is None:
            counted = cached.num_ref_tokens if cached is not None else num_refs
            choice = self.selector.choose("kv", step, counted, np.shape(target)[1], np.shape(text)[1])
        feed = self._feed(target, text, timestep)
        feed["rope_cos"], feed["rope_sin"] = self._rope("rope_text_target", text_ids, target_ids)
        if num_refs:
            feed["refs"] = refs
            feed["ref_rope_cos"], feed["ref_rope_sin"] = self._rope("rope_refs", ref_ids)
        else:
            feed["refs"] = self._empty(1, 0, self.dims.in_channels)
            feed["ref_rope_cos"] = feed["ref_rope_sin"] = self._empty(0, self.dims.head_dim)
        if cached is None:
            feed["cached_keys"] = feed["cached_values"] = self._empty(*self._kv_shape(0))
        else:
            feed["cached_keys"] = DeviceTensor(self.memory.pointer(cached.buffers.keys), cached.shape)
            feed["cached_values"] = DeviceTensor(self.memory.pointer(cached.buffers.values), cached.shape)
        if into is None:
            outputs = {name: self._empty(*self._kv_shape(0)) for name in ("ref_keys", "ref_values")}
        else:
            capacity = into.nbytes // 2
            outputs = {"ref_keys": DeviceTensor(self.memory.pointer(into.keys), self._kv_shape(num_refs), capacity),
                       "ref_values": DeviceTensor(self.memory.pointer(into.values), self._kv_shape(num_refs),
                                                  capacity)}
        return self._velocity(runner.infer(feed, choice.index, into=outputs))

    def _read(self, buffer: Any, shape: tuple[int, ...]) -> np.ndarray:
        array = self.memory.download(buffer, shape, self.runners["kv"].dtypes["ref_keys"])
        self.memory.synchronize()
        return np.asarray(array.float().cpu().numpy() if hasattr(array, "cpu") else array)

    # -- TransformerBackend ----------------------------------------------------------------------------------

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        num_refs = 0 if refs is None or ref_ids is None else int(ref_ids.shape[0])
        if "full" not in self.runners and num_refs == 0:  # no references: the KV engine's extract is the dense pass
            return self._run_kv(target, target_ids, None, None, text, text_ids, timestep, "extract")
        runner = self._runner("full")
        choice = self.selector.choose("full", "full", num_refs, np.shape(target)[1], np.shape(text)[1])
        feed = self._feed(target, text, timestep)
        if num_refs:
            feed["refs"] = refs
            feed["rope_cos"], feed["rope_sin"] = self._rope("rope_full", text_ids, target_ids, ref_ids)
        else:
            feed["refs"] = self._empty(1, 0, self.dims.in_channels)
            feed["rope_cos"], feed["rope_sin"] = self._rope("rope_full", text_ids, target_ids)
        return self._velocity(runner.infer(feed, choice.index))

    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        num_refs = int(ref_ids.shape[0])
        choice = self.selector.choose("kv", "extract", num_refs, np.shape(target)[1], np.shape(text)[1])
        buffers = self.kv_pool.acquire(choice.bucket.max_ref_tokens)
        velocity = self._run_kv(target, target_ids, refs, ref_ids, text, text_ids, timestep, "extract", into=buffers,
                                choice=choice)
        dtype = np.float16 if self.runners["kv"].dtypes["ref_keys"] in ("HALF", "BF16") else np.float32
        state = EngineKVState(buffers, self._kv_shape(num_refs), dtype, self._read)
        self.kv_pool.track(state, buffers)
        return velocity, state

    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        if not isinstance(kv_state, EngineKVState):
            raise RunnerError(bad_value("kv_state", type(kv_state).__name__, "a state from this backend's kv_extract"))
        return self._run_kv(target, target_ids, None, None, text, text_ids, timestep, "cached", cached=kv_state)

    def euler_step(self, latents, velocity, delta):
        return np.asarray(latents, np.float32) + np.float32(delta) * np.asarray(velocity, np.float32)

    def release_static(self) -> None:
        self.static.clear()
