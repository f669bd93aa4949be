"""Pictures of a selection: dropped tokens dimmed to grey, kept regions outlined, several overlays on one sheet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from sparse_context.runtime.files import atomic_write_bytes
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.tokens import TOKEN_PIXELS

DROPPED_BRIGHTNESS = 0.35  # dropped tokens stay readable as context but clearly recede
DROPPED_SATURATION = 0.3  # and lose most of their colour, so kept tokens read at a glance
OUTLINE_RGB = (255, 214, 0)  # amber: visible on sky, skin and foliage alike
LABEL_HEIGHT = 28
TILE_GAP = 8
BACKGROUND_RGB = (255, 255, 255)


def draw_selection(
    image_rgb: np.ndarray, selection_indices: np.ndarray, grid: tuple[int, int], token_pixels: int = TOKEN_PIXELS
) -> np.ndarray:
    """(H, W, 3) uint8 copy of ``image_rgb`` with dropped tokens dimmed and the kept regions outlined."""
    image = _check_rgb(image_rgb, "image to draw on")
    rows, cols = grid
    if image.shape[:2] != (rows * token_pixels, cols * token_pixels):
        raise InputError(bad_value("overlay image size", f"{image.shape[1]}x{image.shape[0]} px",
                                   f"{cols * token_pixels}x{rows * token_pixels} px ({rows}x{cols} tokens of "
                                   f"{token_pixels} px; draw on the prepared reference)"))
    indices = np.asarray(selection_indices, dtype=np.int64).ravel()
    if indices.size and (indices.min() < 0 or indices.max() >= rows * cols):
        raise InputError(bad_value("token index range", (int(indices.min()), int(indices.max())),
                                   f"0 to {rows * cols - 1} for a {rows}x{cols} grid"))

    kept_tokens = np.zeros(rows * cols, dtype=np.uint8)
    kept_tokens[indices] = 1
    kept_tokens = kept_tokens.reshape(rows, cols)  # (rows, cols)
    kept = np.kron(kept_tokens, np.ones((token_pixels, token_pixels), dtype=np.uint8))  # (H, W) 0/1

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)[:, :, None].astype(np.float32)  # (H, W, 1)
    muted = DROPPED_SATURATION * image + (1.0 - DROPPED_SATURATION) * gray  # (H, W, 3)
    dimmed = (DROPPED_BRIGHTNESS * muted).astype(np.uint8)
    out = np.where(kept[:, :, None].astype(bool), image, dimmed)  # (H, W, 3)

    # Outline the boundary of each kept region rather than every token: neighbouring kept tokens merge into one
    # shape, which is what the eye should compare between strategies.
    thickness = max(1, token_pixels // 8)
    kernel = np.ones((2 * thickness + 1, 2 * thickness + 1), np.uint8)
    inner = cv2.erode(kept, kernel, borderType=cv2.BORDER_CONSTANT, borderValue=0)  # frame tokens at the edge too
    out[(kept == 1) & (inner == 0)] = OUTLINE_RGB
    return out


def save_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB image as PNG atomically: readers never see a half-written file."""
    image = _check_rgb(rgb, "image to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError(bad_value("PNG encoding of image", image.shape, "an image OpenCV can encode"))
    atomic_write_bytes(path, encoded.tobytes())
    return path


def selection_grid_png(
    path: str | os.PathLike,
    rows_of_images: Sequence[Sequence[np.ndarray]],
    labels: Sequence[Sequence[str]],
    tile_height: int = 320,
) -> np.ndarray:
    """Tile overlays (one list per sheet row) with a text label above each; save as PNG and return the sheet."""
    if len(labels) != len(rows_of_images) or any(len(a) != len(b) for a, b in zip(labels, rows_of_images)):
        raise InputError(bad_value("label layout", [len(row) for row in labels],
                                   f"one label per image: {[len(row) for row in rows_of_images]}"))
    sheet_rows = []
    for images, row_labels in zip(rows_of_images, labels):
        tiles = [_labelled_tile(_check_rgb(image, "image to tile"), label, tile_height)
                 for image, label in zip(images, row_labels)]
        sheet_rows.append(_join(tiles, axis=1))
    sheet = _join(sheet_rows, axis=0) if sheet_rows else np.full((1, 1, 3), BACKGROUND_RGB, np.uint8)
    save_png(path, sheet)
    return sheet


def _labelled_tile(image: np.ndarray, label: str, tile_height: int) -> np.ndarray:
    width = max(1, round(image.shape[1] * tile_height / image.shape[0]))
    scaled = cv2.resize(image, (width, tile_height), interpolation=cv2.INTER_AREA)  # (tile_height, w, 3)
    bar = np.full((LABEL_HEIGHT, width, 3), BACKGROUND_RGB, dtype=np.uint8)  # (LABEL_HEIGHT, w, 3)
    cv2.putText(bar, label, (4, LABEL_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, scaled], axis=0)  # (LABEL_HEIGHT + tile_height, w, 3)


def _join(parts: list[np.ndarray], axis: int) -> np.ndarray:
    """Concatenate along ``axis`` with a white gap, padding the other axis to the largest part."""
    if not parts:
        return np.full((1, 1, 3), BACKGROUND_RGB, np.uint8)
    other = 1 - axis
    extent = max(part.shape[other] for part in parts)
    padded = []
    for i, part in enumerate(parts):
        pad = [(0, 0), (0, 0), (0, 0)]
        pad[other] = (0, extent - part.shape[other])
        pad[axis] = (0, TILE_GAP if i < len(parts) - 1 else 0)
        padded.append(np.pad(part, pad, constant_values=BACKGROUND_RGB[0]))
    return np.concatenate(padded, axis=axis)


def _check_rgb(rgb: np.ndarray, what: str) -> np.ndarray:
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            and rgb.shape[0] and rgb.shape[1]):
        given = f"{type(rgb).__name__} {getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}".strip()
        raise InputError(bad_value(what, given, "an (H, W, 3) uint8 RGB array, at least 1x1"))
    return rgb
