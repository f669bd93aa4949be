"""FLUX.2 rotary embeddings in numpy: diffusers' ``Flux2PosEmbed`` (float64 math, float32 result), no torch.

The graphs take cos/sin as inputs so no float64 enters them; the runtime computes them here from the
(t, h, w, l) position ids of ``runtime.tokens``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def rope_cos_sin(ids: np.ndarray, axes_dims: Sequence[int], theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) position ids -> cos, sin each (N, sum(axes_dims)) float32, as ``Flux2PosEmbed.forward``."""
    ids = np.asarray(ids)
    # diffusers takes ids.float() (float32) and then multiplies by float64 frequencies.
    positions = ids.astype(np.float32).astype(np.float64)  # (N, 4)
    cos_parts, sin_parts = [], []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # (dim/2,)
        angles = np.outer(positions[:, axis], freqs)  # (N, dim/2)
        cos_parts.append(np.repeat(np.cos(angles), 2, axis=1))  # (N, dim): each value twice, interleaved
        sin_parts.append(np.repeat(np.sin(angles), 2, axis=1))
    cos = np.concatenate(cos_parts, axis=1).astype(np.float32)
    sin = np.concatenate(sin_parts, axis=1).astype(np.float32)
    return cos, sin
