"""onnxruntime behind the sampler's :class:`~sparse_context.runtime.sampler.TransformerBackend` protocol.

Tensors are numpy arrays; RoPE tables are computed here from position ids (numpy, float64 math, float32 tables).
One session of the KV graph serves both extract and cached steps, so the weights are held once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sparse_context.export.errors import ExportConfigError, ExportError
from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import NUMPY_DTYPES, ModelDims
from sparse_context.runtime.errors import bad_value

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class OrtKVState:
    """Reference K/V after RoPE, (layers, 1, N, heads, head_dim) each; reusable for the same references/model."""

    keys: np.ndarray
    values: np.ndarray

    @property
    def num_ref_tokens(self) -> int:
        return int(self.keys.shape[2])


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


class OrtTransformerBackend:
    """Runs the exported full and/or KV graph with onnxruntime (CPU by default)."""

    name = "onnxruntime"

    def __init__(self, full: str | Path | None = None, kv: str | Path | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), session_options: Any = None):
        import onnxruntime as ort

        if full is None and kv is None:
            raise ExportConfigError(bad_value("ONNX graphs", "none", "a full graph, a KV graph or both"))
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
        first = next(iter(self.manifests.values()))
        weights = {(m["base_weights_sha256"][:12], (m.get("lora") or {}).get("sha256")) for m in self.manifests.values()}
        if len(weights) > 1:
            raise ExportConfigError(bad_value("full and KV graphs", sorted(weights, key=str),
                                              "exports of the same weights and LoRA"))
        if len({m["precision"] for m in self.manifests.values()}) > 1:
            raise ExportConfigError(bad_value("full and KV graphs", "different precisions", "one precision"))
        self.precision = first["precision"]
        self.dtype = NUMPY_DTYPES[self.precision]
        if self.dtype is None:
            raise ExportConfigError(bad_value("precision of the ONNX export", self.precision, "fp32 or fp16 (numpy "
                                              "and onnxruntime CPU have no bfloat16)", "--precision"))
        self.dims = ModelDims.from_config(first["model_config"])

    # -- helpers ---------------------------------------------------------------------------------------------

    def _rope(self, *ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rope_cos_sin(np.concatenate(ids, axis=0), self.dims.axes_dims_rope, self.dims.rope_theta)

    def _cast(self, array: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(array), dtype=self.dtype)

    def _empty_refs(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((1, 0, self.dims.in_channels), self.dtype), np.zeros((0, 4), np.int64)

    def _empty_cache(self) -> np.ndarray:
        d = self.dims
        return np.zeros((d.num_layers, 1, 0, d.heads, d.head_dim), self.dtype)

    def _session(self, graph: str) -> Any:
        if graph not in self.sessions:
            raise ExportConfigError(bad_value("ONNX graphs loaded", sorted(self.sessions), f"the {graph} graph for "
                                              "this call (export it with --graph " + graph + ")"))
        return self.sessions[graph]

    def run_kv(self, target, target_ids, refs, ref_ids, keys, values, text, text_ids, timestep):
        """One call of the KV graph: new references ``refs`` (may be 0 tokens) plus cached ``keys``/``values``."""
        session = self._session("kv")
        cos, sin = self._rope(text_ids, target_ids)
        ref_cos, ref_sin = self._rope(ref_ids)
        feeds = {"target": self._cast(target), "refs": self._cast(refs), "text": self._cast(text),
                 "timestep": np.array([timestep], np.float32), "rope_cos": cos, "rope_sin": sin,
                 "ref_rope_cos": ref_cos, "ref_rope_sin": ref_sin, "cached_keys": self._cast(keys),
                 "cached_values": self._cast(values)}
        velocity, new_keys, new_values = session.run(None, feeds)
        return velocity, new_keys, new_values

    # -- TransformerBackend ----------------------------------------------------------------------------------

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        if refs is None or ref_ids is None:
            refs, ref_ids = self._empty_refs()
        if "full" not in self.sessions and ref_ids.shape[0] == 0:
            # Without references the KV graph computes the dense forward: no need for a second engine.
            empty = self._empty_cache()
            return self.run_kv(target, target_ids, refs, ref_ids, empty, empty, text, text_ids, timestep)[0]
        cos, sin = self._rope(text_ids, target_ids, ref_ids)
        feeds = {"target": self._cast(target), "refs": self._cast(refs), "text": self._cast(text),
                 "timestep": np.array([timestep], np.float32), "rope_cos": cos, "rope_sin": sin}
        return self._session("full").run(None, feeds)[0]

    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        self._session("kv")
        empty = self._empty_cache()
        velocity, keys, values = self.run_kv(target, target_ids, refs, ref_ids, empty, empty, text, text_ids,
                                             timestep)
        return velocity, OrtKVState(keys, values)

    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        self._session("kv")  # fail with the flag to change before touching the arguments
        refs, ref_ids = self._empty_refs()
        return self.run_kv(target, target_ids, refs, ref_ids, kv_state.keys, kv_state.values, text, text_ids,
                           timestep)[0]

    def euler_step(self, latents, velocity, delta):
        # FlowMatchEulerDiscreteScheduler.step: float32 arithmetic, result in the velocity's dtype.
        stepped = latents.astype(np.float32) + np.float32(delta) * velocity.astype(np.float32)
        return stepped.astype(velocity.dtype)
