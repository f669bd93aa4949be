"""The inputs of each engine call, named as the export spec names them: one builder for both engine backends.

TensorRT and onnxruntime bind memory differently, but what they feed must not differ: the same casts, the same
RoPE tables, the same zero-token placeholders. Inputs that stay the same for a whole generation (prompt, packed
references, RoPE tables) are built once and come back as the same array objects, so a backend can keep one device
copy per object (:class:`~sparse_context.runtime.memo.IdentityMemo`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import ModelDims
from sparse_context.runtime.memo import IdentityMemo

STATIC_ENTRIES = 4  # per input: positive and negative prompt (guidance) and their RoPE tables, with room to spare
KV_INPUTS = ("cached_keys", "cached_values")
KV_OUTPUTS = ("ref_keys", "ref_values")


@dataclass(frozen=True)
class Empty:
    """A zero-token input: bound to any valid address with this shape (nothing is read)."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class CallFeed:
    """Every input of one call except the K/V tensors, which live in the backend's buffers."""

    inputs: dict[str, np.ndarray | Empty]
    static: frozenset[str]  # inputs built once per generation (same object on every step)
    ref_tokens: int


class FeedBuilder:
    """Host arrays for the full and KV graphs, in the engine's precision (``dtype``); RoPE tables in float32."""

    def __init__(self, dims: ModelDims, dtype: Any):
        self.dims = dims
        self.dtype = np.dtype(dtype)
        self.memo = IdentityMemo(STATIC_ENTRIES)

    def clear(self) -> None:
        """Forget this generation's static inputs (backends call this after each image)."""
        self.memo.clear()

    def kv_shape(self, tokens: int) -> tuple[int, ...]:
        d = self.dims
        return (d.num_layers, 1, int(tokens), d.heads, d.head_dim)  # (layers, 1, N_r, H, D)

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep) -> CallFeed:
        """The full graph: ``[text, target, refs]`` attend jointly; RoPE over the three id sets."""
        inputs = self._common(target, text, timestep)
        ref_tokens = _count(ref_ids, refs)
        if ref_tokens:
            inputs["refs"] = self._static("refs", refs)
            inputs["rope_cos"], inputs["rope_sin"] = self._rope("rope_full", text_ids, target_ids, ref_ids)
        else:
            inputs["refs"] = Empty((1, 0, self.dims.in_channels), self.dtype)
            inputs["rope_cos"], inputs["rope_sin"] = self._rope("rope_full", text_ids, target_ids)
        return CallFeed(inputs, frozenset({"text", "refs", "rope_cos", "rope_sin"}), ref_tokens)

    def kv(self, target, target_ids, refs, ref_ids, text, text_ids, timestep) -> CallFeed:
        """The KV graph: new references (extract; 0 tokens on cached steps and without references) on their own
        RoPE tables; text and target on theirs."""
        inputs = self._common(target, text, timestep)
        inputs["rope_cos"], inputs["rope_sin"] = self._rope("rope_text_target", text_ids, target_ids)
        ref_tokens = _count(ref_ids, refs)
        if ref_tokens:
            inputs["refs"] = self._static("refs", refs)
            inputs["ref_rope_cos"], inputs["ref_rope_sin"] = self._rope("rope_refs", ref_ids)
        else:
            inputs["refs"] = Empty((1, 0, self.dims.in_channels), self.dtype)
            inputs["ref_rope_cos"] = inputs["ref_rope_sin"] = Empty((0, self.dims.head_dim), np.dtype(np.float32))
        static = frozenset({"text", "refs", "rope_cos", "rope_sin", "ref_rope_cos", "ref_rope_sin"})
        return CallFeed(inputs, static, ref_tokens)

    # -- helpers ---------------------------------------------------------------------------------------------

    def _common(self, target, text, timestep) -> dict[str, np.ndarray | Empty]:
        # (1, N_t, C), new every step; a backend's device-resident latents (``on_device``) are bound as they are
        target = target if getattr(target, "on_device", False) else self._cast(target)
        return {"target": target,
                "text": self._static("text", text),  # (1, L, D)
                "timestep": np.array([timestep], np.float32)}  # (1,)

    def _cast(self, array: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(array), dtype=self.dtype)

    def _static(self, name: str, source: Any) -> np.ndarray:
        return self.memo.get(name, (source,), lambda: self._cast(source))

    def _rope(self, name: str, *ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) float32 tables (N, head_dim) for the concatenated position ids."""
        return self.memo.get(name, ids, lambda: rope_cos_sin(np.concatenate(ids, axis=0), self.dims.axes_dims_rope,
                                                             self.dims.rope_theta))


def _count(ref_ids: np.ndarray | None, refs: Any) -> int:
    return 0 if refs is None or ref_ids is None else int(ref_ids.shape[0])
