"""numpy ends of the VAE graphs: prepared reference image -> encoder input, target tokens -> decoder input,
decoder output -> uint8 image. Torch-free, so an application running the exported VAE needs only numpy."""

from __future__ import annotations

from typing import Any

import numpy as np

from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.packing import unpack_grid


def reference_pixels(image: Any) -> np.ndarray:
    """(1, 3, H, W) float32 in [-1, 1] from a prepared (resized, cropped) RGB reference, as the Klein pipeline's
    image processor produces it: x / 255, then 2x - 1."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise InputError(bad_value("reference image", f"an array of shape {pixels.shape}", "an RGB image (H, W, 3)"))
    pixels = pixels[None] / 255.0  # (1, H, W, 3)
    return np.ascontiguousarray(2.0 * pixels.transpose(0, 3, 1, 2) - 1.0, dtype=np.float32)  # (1, 3, H, W)


def target_latent_grid(packed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """(1, rows*cols, C) packed target latents -> (1, C, rows, cols), the decoder graph's input."""
    rows, cols = (int(n) for n in grid)
    packed = np.asarray(packed, dtype=np.float32)
    if packed.ndim != 3 or packed.shape[0] != 1 or packed.shape[1] != rows * cols:
        raise InputError(bad_value("packed latents shape", packed.shape, f"(1, {rows * cols}, C) for a "
                                   f"{rows}x{cols} token grid"))
    return np.ascontiguousarray(unpack_grid(packed[0], rows, cols)[None])  # (1, C, rows, cols)


def postprocess_image(image: np.ndarray) -> np.ndarray:
    """(1, 3, H, W) decoder output in [-1, 1] -> (H, W, 3) uint8, as diffusers' ``VaeImageProcessor.postprocess``
    to PIL: x / 2 + 0.5, clamp to [0, 1], x255, round."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 4 or array.shape[:2] != (1, 3):
        raise InputError(bad_value("decoded image shape", array.shape, "(1, 3, H, W)"))
    array = np.clip(array / 2.0 + 0.5, 0.0, 1.0)[0].transpose(1, 2, 0)  # (H, W, 3)
    return (array * 255.0).round().astype(np.uint8)
