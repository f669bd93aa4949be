"""Token geometry of FLUX.2: the one place where token counts and position ids are defined.

Export profiles, engine buckets, packing and the runtime all take their counts from here, so a count never
gets typed twice. A FLUX.2 token covers 16x16 pixels: the VAE downsamples by 8 and the transformer packs
2x2 latent patches into one 128-channel token.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sparse_context.runtime.errors import InputError, bad_value

TOKEN_PIXELS = 16  # VAE 8x downsampling x 2x2 patchify
LATENT_CHANNELS = 128  # 32 VAE channels x 2x2 patch
MAX_REFERENCE_AREA = 1024 * 1024  # diffusers resizes larger references down to this pixel area
REFERENCE_TIME_SCALE = 10  # reference i gets t = 10 + 10 * i; the target has t = 0 (diffusers _prepare_image_ids)
# FLUX.2 documents up to 10 reference images; positions t = 10..100 are what the model has seen.
MAX_REFERENCES = 10
POSITION_AXES = 4  # (t, h, w, l)


def token_grid(width_px: int, height_px: int, token_pixels: int = TOKEN_PIXELS) -> tuple[int, int]:
    """(rows, cols) of tokens for an image of ``width_px`` x ``height_px`` already cropped to the token size."""
    if width_px < token_pixels or height_px < token_pixels:
        raise InputError(
            bad_value("image size", f"{width_px}x{height_px} px", f"at least {token_pixels}x{token_pixels} px (one token)")
        )
    return height_px // token_pixels, width_px // token_pixels


def kept_token_count(available: int, keep_fraction: float) -> int:
    """Tokens kept from ``available`` at ``keep_fraction``: round half up, at least one, at most all.

    Every component (selection, export axis bounds, engine profiles, buckets) uses this function.
    """
    check_keep_fraction(keep_fraction)
    if available <= 0:
        return 0
    return int(min(available, max(1, math.floor(keep_fraction * available + 0.5))))


KEY_TILE_FLAG = "--key-tile"
MAX_KEY_TILE = 1024  # attention kernels tile keys by 64..256; more would only add tokens


def check_key_tile(key_tile: int | None, flag: str = KEY_TILE_FLAG) -> int | None:
    """Return ``key_tile`` (None or 0: no rounding) if it is an integer 1..MAX_KEY_TILE, else raise InputError."""
    if key_tile is None:
        return None
    if isinstance(key_tile, bool) or not isinstance(key_tile, (int, np.integer)) or not 0 <= key_tile <= MAX_KEY_TILE:
        raise InputError(bad_value("key tile", key_tile, f"an integer from 1 to {MAX_KEY_TILE}, or 0 for none "
                                   "(128: the attention kernels' key tile at head size 128)", flag))
    return int(key_tile) or None


def whole_tile_tokens(kept: int, other_keys: int, key_tile: int | None, available: int) -> int:
    """Reference tokens to keep so that the joint attention's keys fill whole tiles of ``key_tile``.

    The attention of a step runs over ``other_keys`` (text and target tokens) plus the ``kept`` reference tokens;
    a kernel tiles the keys by a fixed size, so a last partial tile costs about a whole one. This returns the
    smallest count >= ``kept`` with ``(count + other_keys) % key_tile == 0``, at most ``available`` (all the
    references' tokens); ``kept`` unchanged without a tile. Never fewer tokens than asked: only more.
    """
    key_tile = check_key_tile(key_tile)
    if key_tile is None or kept <= 0:
        return kept
    return min(max(kept, available), kept + (-(kept + other_keys)) % key_tile)


def check_keep_fraction(keep_fraction: float, flag: str = "--keep") -> float:
    """Return ``keep_fraction`` as a float if 0 < keep_fraction <= 1, else raise InputError."""
    if isinstance(keep_fraction, (str, bytes, bool, np.bool_)):  # "0.1" would pass float() and fail later
        raise InputError(bad_value("keep fraction", keep_fraction, "a number in (0, 1]", flag))
    try:
        value = float(keep_fraction)
    except (TypeError, ValueError):
        raise InputError(bad_value("keep fraction", keep_fraction, "a number in (0, 1]", flag)) from None
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise InputError(bad_value("keep fraction", keep_fraction, "a number in (0, 1]", flag))
    return value


def check_budget(keep_fraction: Any, token_count: Any) -> None:
    """A generation's token budget: ``token_count`` (an integer >= 1) when given, which then overrides
    ``keep_fraction``; else ``keep_fraction`` in (0, 1]."""
    if token_count is None:
        check_keep_fraction(keep_fraction)
    elif isinstance(token_count, (bool, np.bool_)) or not isinstance(token_count, (int, np.integer)) \
            or token_count < 1:
        raise InputError(bad_value("reference token count", token_count, "an integer >= 1", "--tokens"))


def check_reference_count(num_references: int, max_references: int = MAX_REFERENCES) -> int:
    """Raise InputError when more references are given than the (t, h, w, l) position scheme allows."""
    if num_references > max_references:
        raise InputError(
            bad_value(
                "number of reference images",
                num_references,
                f"at most {max_references} (reference i is placed at t = {REFERENCE_TIME_SCALE} + "
                f"{REFERENCE_TIME_SCALE}*i; FLUX.2 documents up to {MAX_REFERENCES})",
                "fewer --ref arguments",
            )
        )
    return num_references


def reference_time(index: int) -> int:
    """The t coordinate of reference ``index`` (0-based), as diffusers' ``_prepare_image_ids`` assigns it."""
    return REFERENCE_TIME_SCALE + REFERENCE_TIME_SCALE * index


def grid_position_ids(rows: int, cols: int, time: int = 0) -> np.ndarray:
    """(rows*cols, 4) int64 ids ``(t, h, w, l)`` in row-major order, as ``torch.cartesian_prod`` lays them out."""
    h, w = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ids = np.zeros((rows * cols, POSITION_AXES), dtype=np.int64)  # (N, 4)
    ids[:, 0] = time
    ids[:, 1] = h.reshape(-1)
    ids[:, 2] = w.reshape(-1)
    return ids


def text_position_ids(num_text_tokens: int) -> np.ndarray:
    """(L, 4) int64 ids ``(0, 0, 0, l)`` for the prompt tokens (diffusers ``_prepare_text_ids``)."""
    ids = np.zeros((num_text_tokens, POSITION_AXES), dtype=np.int64)
    ids[:, 3] = np.arange(num_text_tokens)
    return ids
