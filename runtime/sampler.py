"""The denoising loop of FLUX.2-klein with sparse references and the reference KV cache, for any backend.

The loop never sees which backend runs the transformer (PyTorch, onnxruntime, TensorRT): it only calls
the three entry points of :class:`TransformerBackend`. Step order and arithmetic follow diffusers'
``Flux2KleinPipeline`` (dense/sparse: ``[target, references]``) and ``Flux2KleinKVPipeline`` (KV: step 0
extracts reference K/V with ``[references, target]``, later steps reuse them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from sparse_context.runtime.schedule import FlowMatchSchedule


class TransformerBackend(Protocol):
    """What the loop needs from a transformer. Tensors are the backend's own type; ids are numpy int64.

    Shapes: ``target`` (1, N_t, C), ``target_ids`` (N_t, 4), ``refs`` (1, N_r, C), ``ref_ids`` (N_r, 4),
    ``text`` (1, L, D), ``text_ids`` (L, 4); the velocity has the target's shape.
    """

    def full(self, target: Any, target_ids: np.ndarray, refs: Any | None, ref_ids: np.ndarray | None, text: Any,
             text_ids: np.ndarray, timestep: np.float32) -> Any: ...

    def kv_extract(self, target: Any, target_ids: np.ndarray, refs: Any, ref_ids: np.ndarray, text: Any,
                   text_ids: np.ndarray, timestep: np.float32) -> tuple[Any, Any]: ...

    def kv_cached(self, target: Any, target_ids: np.ndarray, kv_state: Any, text: Any, text_ids: np.ndarray,
                  timestep: np.float32) -> Any: ...

    def euler_step(self, latents: Any, velocity: Any, delta: np.float32) -> Any: ...

    # Optional, for a backend that keeps latents on its device: ``device_loop()``, a context the whole loop runs
    # in; ``guide(positive, negative, scale)``, the classifier-free guidance mix (default: array arithmetic); and
    # ``finish_latents(latents)``, what the caller gets from the last step's latents (default: them as they are).


@dataclass(frozen=True)
class Conditioning:
    """Prompt embeddings (and optional negative ones for classifier-free guidance)."""

    text: Any  # (1, L, D)
    text_ids: np.ndarray  # (L, 4)
    negative_text: Any | None = None
    negative_text_ids: np.ndarray | None = None
    guidance_scale: float = 1.0

    @property
    def uses_guidance(self) -> bool:
        return self.negative_text is not None and self.guidance_scale > 1.0


def denoise(
    backend: TransformerBackend,
    latents: Any,
    target_ids: np.ndarray,
    conditioning: Conditioning,
    schedule: FlowMatchSchedule,
    refs: Any | None = None,
    ref_ids: np.ndarray | None = None,
    use_kv: bool = False,
    kv_state: Any | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[Any, Any | None]:
    """Run every step of ``schedule`` and return ``(latents, kv_state)``.

    With ``use_kv`` the first step extracts reference K/V unless ``kv_state`` is given (a persistent cache hit:
    reference K/V depend only on the references and the model, so reuse is exact).
    """
    loop = getattr(backend, "device_loop", contextlib.nullcontext)
    with loop():
        return _denoise(backend, latents, target_ids, conditioning, schedule, refs, ref_ids, use_kv, kv_state, on_step)


def _denoise(backend, latents, target_ids, conditioning, schedule, refs, ref_ids, use_kv, kv_state, on_step):
    has_refs = refs is not None and ref_ids is not None and ref_ids.shape[0] > 0
    for step in range(schedule.num_steps):
        timestep = schedule.model_timestep(step)

        def velocity(text: Any, text_ids: np.ndarray) -> Any:
            nonlocal kv_state
            if not has_refs and kv_state is None:
                return backend.full(latents, target_ids, None, None, text, text_ids, timestep)
            if not use_kv:
                return backend.full(latents, target_ids, refs, ref_ids, text, text_ids, timestep)
            if kv_state is None:
                prediction, kv_state = backend.kv_extract(latents, target_ids, refs, ref_ids, text, text_ids, timestep)
                return prediction
            return backend.kv_cached(latents, target_ids, kv_state, text, text_ids, timestep)

        prediction = velocity(conditioning.text, conditioning.text_ids)
        if conditioning.uses_guidance:
            negative = velocity(conditioning.negative_text, conditioning.negative_text_ids)
            guide = getattr(backend, "guide", _guide)
            prediction = guide(prediction, negative, conditioning.guidance_scale)
        latents = backend.euler_step(latents, prediction, schedule.step_delta(step))
        if on_step is not None:
            on_step(step + 1, schedule.num_steps)
    finish = getattr(backend, "finish_latents", None)
    return (finish(latents) if finish is not None else latents), kv_state


def _guide(positive: Any, negative: Any, scale: float) -> Any:
    return negative + scale * (positive - negative)
