"""Task-aware token selection: which 16x16-px tokens of each reference image Sparse Context keeps.

Three steps, each usable alone:

1. ``importance_map`` scores every token of the prepared reference (Canny edge density, spectral-residual
   saliency, a user mask, or flat ones for ``random`` / ``uniform``).
2. ``allocate_budget`` turns ``--keep`` / ``--tokens`` into a token count per reference.
3. ``select_tokens`` picks exactly that many tokens, deterministically for a seed.

``select_references`` runs all three on images exactly as the VAE will see them. numpy, OpenCV and Pillow only.
"""

from __future__ import annotations

import enum
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from sparse_context.runtime.errors import SelectionError, bad_value
from sparse_context.runtime.images import prepare_mask, prepare_reference_with_size, reference_geometry
from sparse_context.runtime.tokens import (
    MAX_REFERENCE_AREA, TOKEN_PIXELS, check_keep_fraction, check_key_tile, check_reference_count, kept_token_count,
    token_grid, whole_tile_tokens,
)


class Strategy(str, enum.Enum):
    """How tokens are ranked; the CLI's ``--strategy`` choices are these values."""

    RANDOM = "random"
    UNIFORM = "uniform"
    EDGE = "edge"
    SALIENCY = "saliency"
    MASK = "mask"


class Allocation(str, enum.Enum):
    """How a budget is split across references: the same share of each, or one pool shared by importance."""

    PER_REFERENCE = "per_reference"
    GLOBAL = "global"


STRATEGY_CHOICES = tuple(strategy.value for strategy in Strategy)
ALLOCATION_CHOICES = tuple(allocation.value for allocation in Allocation)
DEFAULT_FLOOR_FRACTION = 0.25  # share of an importance-driven budget spent on even coverage of the whole image
BUDGET_FLAGS = "--keep or --tokens"

CANNY_BLUR_KERNEL = (5, 5)  # at half resolution; JPEG noise and film grain would otherwise turn into edges
CANNY_MIN_THRESHOLDS = (10.0, 20.0)  # a dark image has median ~0; 0.66/1.33 x 0 would mark every pixel
SALIENCY_AREA = 64 * 64  # Hou & Zhang compute the spectral residual on a ~64-px image
SALIENCY_BLUR_SIGMA = 2.5  # in px of that 64-px image (~40 px of a 1024-px reference)
CENTER_PRIOR_WEIGHT = 0.5  # photographers centre subjects; corners keep >= 0.5x, so off-centre objects still win


@dataclass(frozen=True, eq=False)
class Selection:
    """Tokens kept from one reference. ``indices`` are row-major into ``grid``; arrays are read-only.

    ``pixels`` is the prepared reference exactly as the VAE encodes it. When the reference was handed in as an
    8-bit RGB array that needed no resize, it is a view of that array (no copy): change the array afterwards
    and the view changes with it.
    """

    indices: np.ndarray  # (K,) int64, sorted, unique
    grid: tuple[int, int]  # (rows, cols)
    strategy: Strategy
    importance: np.ndarray  # (rows, cols) float32
    pixels: np.ndarray  # (rows * 16, cols * 16, 3) uint8, read-only

    @functools.cached_property
    def image(self) -> Image.Image:
        """``pixels`` as a PIL image, made on first use (selection itself never needs one)."""
        return Image.fromarray(self.pixels)

    @property
    def available(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def keep_fraction(self) -> float:
        """The fraction actually kept (budgets are rounded to whole tokens)."""
        return len(self.indices) / self.available


def parse_strategy(strategy: str | Strategy) -> Strategy:
    try:
        return Strategy(strategy)
    except ValueError:
        allowed = ", ".join(STRATEGY_CHOICES)
        raise SelectionError(bad_value("selection strategy", strategy, allowed, "--strategy")) from None


def parse_allocation(allocation: str | Allocation) -> Allocation:
    try:
        return Allocation(allocation)
    except ValueError:
        allowed = ", ".join(ALLOCATION_CHOICES)
        raise SelectionError(bad_value("budget allocation", allocation, allowed, "--allocation")) from None


# ---------------------------------------------------------------------------------------------- importance


def importance_map(
    image_rgb: np.ndarray, grid: tuple[int, int], strategy: str | Strategy, mask: np.ndarray | None = None
) -> np.ndarray:
    """(rows, cols) float32 non-negative score per token of ``image_rgb`` ((H, W, 3) uint8, the prepared image)."""
    strategy = parse_strategy(strategy)
    if not (isinstance(image_rgb, np.ndarray) and image_rgb.dtype == np.uint8 and image_rgb.ndim == 3
            and image_rgb.shape[2] == 3):
        given = f"{type(image_rgb).__name__} {getattr(image_rgb, 'shape', '')} {getattr(image_rgb, 'dtype', '')}"
        raise SelectionError(bad_value("image to score", given.strip(), "an (H, W, 3) uint8 RGB array"))
    rows, cols = grid
    height, width = image_rgb.shape[:2]
    if (height, width) != (rows * TOKEN_PIXELS, cols * TOKEN_PIXELS):
        raise SelectionError(bad_value("image to score", f"{width}x{height} px for a {rows}x{cols} token grid",
                                       f"{cols * TOKEN_PIXELS}x{rows * TOKEN_PIXELS} px: the prepared reference "
                                       "(prepare_reference), whose grid is token_grid(width, height)"))
    if mask is not None and strategy is not Strategy.MASK:
        raise SelectionError(bad_value("importance mask with strategy", strategy.value, "a mask only with 'mask'",
                                       "--strategy mask, or drop --mask"))
    if strategy is Strategy.EDGE:
        return edge_importance(image_rgb, grid)
    if strategy is Strategy.SALIENCY:
        return saliency_importance(image_rgb, grid)
    if strategy is Strategy.MASK:
        return mask_importance(mask, image_rgb.shape[:2], grid)
    return np.ones((rows, cols), dtype=np.float32)  # random / uniform: every token counts the same


def edge_importance(image_rgb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of Canny edge pixels in each token; thresholds follow the image median (0.66x / 1.33x).

    Canny runs at half resolution (8 px per token): four times cheaper, and texture finer than a token
    (wood grain, fur) blurs away while outlines of objects stay.
    """
    height, width = image_rgb.shape[:2]
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)  # (H, W) uint8
    gray = cv2.resize(gray, (max(1, width // 2), max(1, height // 2)), interpolation=cv2.INTER_AREA)  # (H/2, W/2)
    gray = cv2.GaussianBlur(gray, CANNY_BLUR_KERNEL, 0)
    # O(N) median (np.median sorts); calcHist counts in float32, exact below 2**24 pixels but cast anyway.
    histogram = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel().astype(np.int64)  # (256,)
    median = float(np.searchsorted(np.cumsum(histogram), (gray.size + 1) // 2))
    low = min(max(0.66 * median, CANNY_MIN_THRESHOLDS[0]), 254.0)
    high = min(max(1.33 * median, CANNY_MIN_THRESHOLDS[1]), 255.0)
    edges = cv2.Canny(gray, low, high)  # (H/2, W/2) uint8, 0 or 255
    return _pool(edges, grid) / 255.0


def saliency_importance(image_rgb: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang, CVPR 2007) of the L, a and b channels, weak centre prior, max 1.

    The log-amplitude spectrum of natural images is smooth; what sticks out of its local average (the residual),
    put back with the original phase, marks the regions that differ from their surroundings. Two changes from
    the paper, both checked on the sample photos: colour channels, so a red cup on brown wood stands out even
    at equal brightness; and the magnitude instead of its square, which let a few specular lights (the
    launch-pad lamps of rocket.jpg) take the whole budget.
    """
    height, width = image_rgb.shape[:2]
    scale = math.sqrt(SALIENCY_AREA / (height * width))
    small_size = (max(8, round(width * scale)), max(8, round(height * scale)))
    small = cv2.resize(image_rgb, small_size, interpolation=cv2.INTER_AREA)  # (h, w, 3) uint8
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float64)  # (h, w, 3)

    spectrum = np.fft.fft2(lab, axes=(0, 1))  # (h, w, 3) complex
    log_amplitude = np.log(np.abs(spectrum) + 1e-9)
    residual = log_amplitude - _wrapped_mean_3x3(log_amplitude)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)), axes=(0, 1)))  # (h, w, 3)
    saliency = cv2.GaussianBlur(saliency.astype(np.float32), (0, 0), SALIENCY_BLUR_SIGMA)
    saliency /= saliency.mean(axis=(0, 1)) + 1e-9  # each channel counts the same, whatever its contrast
    saliency = _pool(saliency.sum(axis=2), grid)  # (rows, cols)

    saliency *= (1.0 - CENTER_PRIOR_WEIGHT) + CENTER_PRIOR_WEIGHT * _center_prior(grid)
    peak = float(saliency.max())
    return saliency / peak if peak > 0 else saliency


def _wrapped_mean_3x3(values: np.ndarray) -> np.ndarray:
    """3x3 mean over the first two axes with wrap-around: a spectrum is periodic, so its borders have
    neighbours on the other side. The same additions in the same order as the mean of the nine
    ``np.roll(values, (dy, dx))``, so the same bits, without making nine shifted copies (half the time)."""
    height, width = values.shape[:2]
    padded = np.empty((height + 2, width + 2) + values.shape[2:], dtype=values.dtype)  # (h+2, w+2, ...)
    padded[1:-1, 1:-1] = values
    padded[0, 1:-1] = values[-1]
    padded[-1, 1:-1] = values[0]
    padded[:, 0] = padded[:, -2]
    padded[:, -1] = padded[:, 1]
    # np.roll by (dy, dx) puts values[i - dy, j - dx] at (i, j): rows 1 - dy ... of the padded array
    shifted = [padded[1 - dy:1 - dy + height, 1 - dx:1 - dx + width] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    total = shifted[0] + shifted[1]
    for view in shifted[2:]:
        total += view
    total /= 9.0
    return total


def mask_importance(mask: np.ndarray | None, image_hw: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """A user mask, non-negative, at pixel resolution of the prepared image or already per token, as (rows, cols)."""
    rows, cols = grid
    allowed_shapes = (f"{tuple(image_hw)} (pixels of the prepared reference) or {(rows, cols)} (its token grid), "
                      "non-negative finite values")
    if mask is None:
        raise SelectionError(bad_value("importance mask", None, allowed_shapes, "--mask"))
    values = np.asarray(mask)
    if values.dtype == bool:
        values = values.astype(np.float32)
    if not (np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.floating)):
        raise SelectionError(bad_value("importance mask dtype", str(values.dtype), "bool, integer or float", "--mask"))
    if values.shape not in (tuple(image_hw), (rows, cols)):
        raise SelectionError(bad_value("importance mask shape", values.shape, allowed_shapes, "--mask"))
    values = values.astype(np.float32, copy=False)  # a float32 mask at 1024^2 is 4 MB: not copied to be read
    low, high = float(values.min()), float(values.max())  # NaN propagates into both, -inf/+inf into one
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
        finite = np.isfinite(values)
        span = f"finite range [{values[finite].min()}, {values[finite].max()}]" if finite.any() else "no finite values"
        raise SelectionError(bad_value("importance mask values", f"{span}, {int((~finite).sum())} NaN or infinite",
                                       "non-negative finite values", "--mask"))
    # A token-grid mask is copied: the result is made read-only and must not be the caller's array.
    return values.copy() if values.shape == (rows, cols) else _pool(values, grid)


def _pool(values: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Mean of ``values`` (h, w) over each token cell -> (rows, cols) float32."""
    rows, cols = grid
    height, width = values.shape
    if height >= rows and width >= cols:
        # INTER_AREA on an exact multiple is the plain block mean; float32 so densities are not rounded to uint8.
        pooled = cv2.resize(values.astype(np.float32, copy=False), (cols, rows), interpolation=cv2.INTER_AREA)
    else:
        pooled = cv2.resize(values.astype(np.float32, copy=False), (cols, rows), interpolation=cv2.INTER_LINEAR)
    return np.maximum(pooled, 0.0)  # (rows, cols); bilinear/area on non-negative data stays >= 0 up to rounding


def _center_prior(grid: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    y = (np.arange(rows, dtype=np.float32) + 0.5) / rows - 0.5  # (rows,)
    x = (np.arange(cols, dtype=np.float32) + 0.5) / cols - 0.5  # (cols,)
    return np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * 0.3**2))  # (rows, cols), 1 at the centre


# ---------------------------------------------------------------------------------------------- selection


def select_tokens(
    importance: np.ndarray,
    count: int,
    strategy: str | Strategy,
    seed: int,
    floor_fraction: float = DEFAULT_FLOOR_FRACTION,
) -> np.ndarray:
    """Exactly ``count`` sorted, unique, row-major token indices (int64) of an ``importance`` (rows, cols) grid.

    - ``random``: a uniform random subset.
    - ``uniform``: ``spread_tokens``, an evenly spaced staggered lattice (even spatial coverage).
    - ``edge`` / ``saliency`` / ``mask``: ``round(floor_fraction * count)`` tokens spread like ``uniform``, so
      every part of the image keeps some context, then the most important remaining tokens; equal
      importance is ordered by a seeded random key, so flat regions are not filled in raster order.
    """
    strategy = parse_strategy(strategy)
    importance = np.asarray(importance)
    if importance.ndim != 2 or importance.size == 0:
        raise SelectionError(bad_value("importance shape", importance.shape, "(rows, cols) with rows, cols >= 1"))
    if not (0.0 <= floor_fraction <= 1.0):  # also rejects NaN
        raise SelectionError(bad_value("floor fraction", floor_fraction, "a number in [0, 1]"))
    rows, cols = importance.shape
    available = rows * cols
    if not np.all(np.isfinite(importance)) or float(importance.min()) < 0:
        raise SelectionError(bad_value("importance values", f"min {importance.min()}", "finite, non-negative"))
    if not _is_int(count) or not 0 <= count <= available:
        allowed = f"an integer from 0 to {available} (all tokens of a {rows}x{cols} grid)"
        raise SelectionError(bad_value("token count", count, allowed, BUDGET_FLAGS))
    count = int(count)
    rng = np.random.default_rng(seed)

    if strategy is Strategy.RANDOM:
        chosen = rng.choice(available, size=count, replace=False)
    elif strategy is Strategy.UNIFORM:
        chosen = spread_tokens(rows, cols, count, rng)
    else:
        floor_count = math.floor(floor_fraction * count + 0.5)
        floor = spread_tokens(rows, cols, floor_count, rng)
        keys = rng.random(available)  # (N,) orders tokens of equal importance
        chosen = np.concatenate([floor, _most_important(importance, keys, floor, count - floor_count)])
    return np.sort(chosen).astype(np.int64)


def top_up_tokens(importance: np.ndarray, kept: np.ndarray, extra: int, strategy: str | Strategy,
                  seed: int) -> np.ndarray:
    """``extra`` more tokens for a selection that already keeps ``kept`` (sorted, unique), none of them kept:
    what the strategy would take next. ``edge`` / ``saliency`` / ``mask``: the most important tokens left (ties by
    a seeded key); ``uniform``: farthest-point, each the token farthest from every kept one, so coverage stays
    even; ``random``: a seeded random subset of the rest. The key-tile top-up adds these to the selection as kept,
    so a topped-up selection holds every token the plain one does."""
    strategy = parse_strategy(strategy)
    importance = np.asarray(importance)
    rows, cols = importance.shape
    kept = np.asarray(kept, dtype=np.int64)
    rest = rows * cols - kept.size
    if not _is_int(extra) or not 0 <= extra <= rest:
        raise SelectionError(bad_value("extra tokens", extra, f"an integer from 0 to {rest} (tokens not kept)"))
    if extra == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([int(seed), 1])  # apart from the plain selection's stream
    if strategy is Strategy.RANDOM:
        free = np.ones(rows * cols, dtype=bool)
        free[kept] = False
        return np.sort(rng.choice(np.flatnonzero(free), size=extra, replace=False))
    if strategy is Strategy.UNIFORM:
        return np.sort(_farthest_tokens(rows, cols, kept, extra))
    return np.sort(_most_important(importance, rng.random(rows * cols), kept, extra))


def _farthest_tokens(rows: int, cols: int, kept: np.ndarray, count: int) -> np.ndarray:
    """``count`` tokens picked one at a time, each farthest (Euclidean, in tokens; ties: lowest index) from every
    token kept or picked before. One (N,) distance update per pick: ~20 us on a 64x64 grid."""
    y, x = np.divmod(np.arange(rows * cols, dtype=np.int64), cols)  # (N,) each
    if kept.size:
        grid = np.ones((rows, cols), np.uint8)
        grid.flat[kept] = 0
        distance = cv2.distanceTransform(grid, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)  # (rows, cols) exact, float32
        nearest = np.rint(distance.ravel().astype(np.float64) ** 2)  # (N,) whole squared distances, as below
    else:
        nearest = np.full(rows * cols, np.inf)
    picked = np.empty(count, dtype=np.int64)
    for index in range(count):
        token = int(np.argmax(nearest))  # first maximum; kept and picked tokens are at 0
        picked[index] = token
        np.minimum(nearest, (y - y[token]) ** 2 + (x - x[token]) ** 2, out=nearest)
    return picked


def _most_important(importance: np.ndarray, keys: np.ndarray, taken: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` tokens not in ``taken`` by importance descending, then ``keys`` ascending, then index.

    The same set as the head of ``np.lexsort((keys, -importance))`` without ``taken``, in any order. Only the
    cut matters, so one partition replaces sorting the whole grid (0.03 ms instead of 0.5 ms on a 64x64 grid,
    six times per generation). numpy orders complex numbers by real part, then imaginary part: a partition of
    ``-importance + 1j * key`` is a partition by both. A float partition by importance alone took 0.36 ms on
    an edge map with 85 % zeros (numpy's introselect is slow on long runs of equal values); keys have none.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    values = importance.ravel().astype(np.float64)  # (N,) a copy; float64 as the ranking always compared
    values[taken] = -1.0  # importance is >= 0, so a taken token ranks after every other one
    ranks = np.empty(values.size, dtype=np.complex128)  # (N,) no arithmetic: the parts keep their exact values
    ranks.real = -values
    ranks.imag = keys
    last = np.partition(ranks, count - 1)[count - 1]  # the count-th in ranking order; never a taken token
    ahead = np.flatnonzero(ranks < last)  # (< count,) complex < is lexicographic too
    level = np.flatnonzero(ranks == last)  # ascending index; more than one only where keys repeat too
    return np.concatenate([ahead, level[: count - ahead.size]])


def spread_tokens(rows: int, cols: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly ``count`` distinct token indices spread evenly over a rows x cols grid (a staggered lattice).

    The grid is cut into ``lattice_rows`` bands about sqrt(rows*cols/count) tokens tall; each band holds
    count/lattice_rows evenly spaced tokens, shifted by half a spacing on alternate bands (a hexagonal-like
    pattern). The seed shifts the whole lattice by up to a quarter spacing. Distinct by construction: at most
    one lattice row per grid row and at most ``cols`` tokens per lattice row. The farthest any token is from a
    kept one is about half of what a random subset leaves, and close to greedy farthest-point sampling.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    spacing = math.sqrt(rows * cols / count)  # in tokens, between neighbouring kept tokens
    lattice_rows = min(rows, max(math.ceil(count / cols), round(rows / spacing), 1))
    per_row = np.full(lattice_rows, count // lattice_rows, dtype=np.int64)  # (L,)
    extra = count - int(per_row.sum())
    if extra:  # one more token in `extra` bands spread over the height, not bunched at the top
        per_row[((np.arange(extra) + 0.5) * lattice_rows / extra).astype(np.int64)] += 1
    shift_y, shift_x = rng.uniform(-0.25, 0.25, size=2)

    band = np.repeat(np.arange(lattice_rows), per_row)  # (count,) lattice row of each token
    position = np.arange(count) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # (count,) index in its row
    stagger = np.where(band % 2 == 0, 0.25, 0.75)  # (count,)
    row = np.floor((band + 0.5 + shift_y) * rows / lattice_rows).astype(np.int64)  # (count,)
    col = np.floor((position + stagger + shift_x) * cols / per_row[band]).astype(np.int64)  # (count,)
    return row * cols + col


# ---------------------------------------------------------------------------------------------- budgets


def allocate_budget(
    importances: Sequence[np.ndarray],
    keep_fraction: float | None = None,
    token_count: int | None = None,
    allocation: str | Allocation = Allocation.PER_REFERENCE,
    key_tile: int | None = None,
    other_keys: int = 0,
) -> list[int]:
    """Tokens to keep per reference, from exactly one of ``keep_fraction`` (--keep) or ``token_count`` (--tokens).

    ``per_reference``: each reference keeps ``kept_token_count(n_i, keep_fraction)``, or ``token_count`` each.
    ``global``: one pool of ``kept_token_count(sum n_i, keep_fraction)`` or ``token_count`` tokens, shared in
    proportion to each reference's total importance (flat maps: its token count), at least one and at most
    ``n_i`` per reference, rounded by largest remainder so the sum is exact.

    ``key_tile`` (--key-tile): then the total is topped up so that it and ``other_keys`` (the step's text and
    target tokens) fill whole tiles of that many attention keys (``whole_tile_tokens``); the extra tokens go one
    per reference in turn, to those with tokens left, so each reference keeps its next-best tokens.
    """
    return _top_up_counts(importances, _allocate(importances, keep_fraction, token_count, allocation), key_tile,
                          other_keys)


def _top_up_counts(importances: Sequence[np.ndarray], counts: list[int], key_tile: int | None,
                   other_keys: int) -> list[int]:
    """``counts`` (:func:`_allocate`'s) topped up to whole key tiles, as :func:`allocate_budget` describes."""
    key_tile = check_key_tile(key_tile)
    if not _is_int(other_keys) or other_keys < 0:
        raise SelectionError(bad_value("other attention keys", other_keys, "an integer >= 0"))
    if key_tile is None or not counts:
        return counts
    available = np.array([np.asarray(importance).size for importance in importances], dtype=np.int64)  # (R,)
    kept = np.array(counts, dtype=np.int64)  # (R,)
    extra = whole_tile_tokens(int(kept.sum()), int(other_keys), key_tile, int(available.sum())) - int(kept.sum())
    while extra > 0:  # at most key_tile rounds; each gives one token to every reference with tokens left
        open_ = np.flatnonzero(kept < available)[:extra]
        kept[open_] += 1
        extra -= len(open_)
    return kept.tolist()


def _allocate(
    importances: Sequence[np.ndarray],
    keep_fraction: float | None,
    token_count: int | None,
    allocation: str | Allocation,
) -> list[int]:
    """:func:`allocate_budget` before any top-up to whole key tiles."""
    allocation = parse_allocation(allocation)
    check_budget_choice(keep_fraction, token_count)
    available = np.array([np.asarray(importance).size for importance in importances], dtype=np.int64)  # (R,)
    if len(available) == 0:
        return []
    if token_count is not None:
        most = int(available.min()) if allocation is Allocation.PER_REFERENCE else int(available.sum())
        least = 1 if allocation is Allocation.PER_REFERENCE else len(available)
        what = "tokens per reference" if allocation is Allocation.PER_REFERENCE else "tokens in total"
        if not _is_int(token_count) or not least <= token_count <= most:
            allowed = f"an integer from {least} to {most} (tokens available: {available.tolist()})"
            raise SelectionError(bad_value(f"token count ({what})", token_count, allowed, "--tokens or --keep"))
    if allocation is Allocation.PER_REFERENCE:
        if token_count is not None:
            return [int(token_count)] * len(available)
        return [kept_token_count(int(n), keep_fraction) for n in available]

    total = int(token_count) if token_count is not None else kept_token_count(int(available.sum()), keep_fraction)
    if total < len(available):
        allowed = f"at least {len(available)} (one per reference)"
        raise SelectionError(bad_value("kept tokens in total", total, allowed, BUDGET_FLAGS))
    mass = np.array([float(np.sum(importance, dtype=np.float64)) for importance in importances])  # (R,)
    if mass.sum() <= 0:
        mass = available.astype(np.float64)
    # A whisker of token-count weight lets an all-zero map take tokens when the others are full.
    weights = mass + 1e-9 * mass.sum() * available / available.sum()  # (R,)
    quotas = _capped_proportional(weights, total, available)  # (R,) real, sum == total, 1 <= q_i <= n_i
    counts = np.floor(quotas).astype(np.int64)
    remainder = total - int(counts.sum())
    room = counts < available
    order = np.argsort(-(quotas - counts) + 2.0 * ~room, kind="stable")  # largest fraction first, full ones last
    counts[order[:remainder]] += 1
    return counts.tolist()


def check_budget_choice(keep_fraction: float | None, token_count: int | None) -> None:
    """Raise unless exactly one of ``keep_fraction`` and ``token_count`` is given (and a given fraction is valid)."""
    if (keep_fraction is None) == (token_count is None):
        given = {"keep_fraction": keep_fraction, "token_count": token_count}
        raise SelectionError(bad_value("token budget", given, "exactly one of a keep fraction or a token count",
                                       BUDGET_FLAGS))
    if keep_fraction is not None:
        check_keep_fraction(keep_fraction)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _capped_proportional(weights: np.ndarray, total: int, caps: np.ndarray) -> np.ndarray:
    """Real quotas ``clip(scale * weights, 1, caps)`` with ``scale`` found by bisection so they sum to ``total``."""
    low, high = 0.0, float(np.max(caps / weights))
    for _ in range(100):  # sum(clip(scale * w)) grows monotonically with scale
        scale = 0.5 * (low + high)
        if np.clip(scale * weights, 1.0, caps).sum() < total:
            low = scale
        else:
            high = scale
    return np.clip(high * weights, 1.0, caps)


# ---------------------------------------------------------------------------------------------- all together


def reference_seed(seed: int, reference_index: int) -> int:
    """Independent, reproducible seed for reference ``reference_index`` (adding a reference leaves others alone)."""
    return int(np.random.SeedSequence(seed, spawn_key=(reference_index,)).generate_state(1, np.uint64)[0])


def _mask_for_prepared(mask, index, original_hw, prepared_hw, grid, max_area, multiple_of):
    """Accept a mask drawn on the original reference too: map it through the resize and crop of the image."""
    if mask is None:
        return None
    shape = np.shape(mask)
    numeric = np.asarray(mask).dtype.kind in "biuf"  # anything else is reported by mask_importance
    if shape in (prepared_hw, tuple(grid)) or not numeric:
        return mask
    if shape == original_hw or (len(shape) == 2 and _prepared_shape(shape, max_area, multiple_of) == prepared_hw):
        # drawn on the reference as given; a caller that prepared the reference itself (the generation paths)
        # no longer knows that size, but a mask that prepares to the prepared size was drawn on it
        return prepare_mask(mask, max_area, multiple_of)
    as_given = f"{original_hw} (pixels of the reference as given), " if original_hw != prepared_hw else \
        "the reference's size as given, "
    allowed = f"{as_given}{prepared_hw} (pixels of the prepared reference) or {tuple(grid)} (its token grid)"
    raise SelectionError(bad_value(f"importance mask shape for reference {index}", shape, allowed, "--mask"))


def _load_mask(mask: Any) -> Any:
    """A mask given as a path is read as the CLI reads ``--mask``: grayscale, 0..1."""
    if isinstance(mask, (str, os.PathLike)):
        from sparse_context.runtime.images import load_image

        return np.asarray(load_image(mask, "mask image", "--mask").convert("L"), dtype=np.float32) / 255.0
    return mask


def _prepared_shape(shape: tuple[int, ...], max_area: int, multiple_of: int) -> tuple[int, int] | None:
    """(h, w) a reference of ``shape`` (h, w) becomes when prepared; None for a size no reference can have."""
    try:
        _, (left, top, right, bottom) = reference_geometry(int(shape[1]), int(shape[0]), max_area, multiple_of)
    except ValueError:  # InputError (an image too small or too narrow) is one
        return None
    return bottom - top, right - left


def select_references(
    images: Sequence,
    *,
    strategy: str | Strategy,
    keep_fraction: float | None = None,
    token_count: int | None = None,
    allocation: str | Allocation = Allocation.PER_REFERENCE,
    seed: int = 0,
    masks: Sequence[np.ndarray | None] | None = None,
    max_area: int = MAX_REFERENCE_AREA,
    multiple_of: int = TOKEN_PIXELS,
    floor_fraction: float = DEFAULT_FLOOR_FRACTION,
    workers: int | None = None,
    key_tile: int | None = None,
    other_keys: int = 0,
) -> list[Selection]:
    """Prepare each reference as the VAE will see it, score its tokens, split the budget and pick the tokens.

    References are prepared and scored in parallel threads (OpenCV, Pillow and numpy release the GIL), up to
    ``workers`` (default: one per reference, at most the CPU count); the result does not depend on it. When
    there is nothing to decode, resize or score (8-bit RGB arrays within the area limit, ``uniform`` or
    ``random``), each reference takes microseconds and a thread pool would cost more than it saves.

    ``images``: anything ``load_image`` accepts. ``masks``: one per image, only with ``strategy="mask"``, each of
    the shape of the image as given (then resized and cropped like the image), of the prepared image, or of its
    token grid. ``key_tile`` and ``other_keys``: round the budget up to whole attention-key tiles
    (:func:`allocate_budget`).
    """
    # 1. check inputs before any decoding
    strategy = parse_strategy(strategy)
    allocation = parse_allocation(allocation)
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray)) or hasattr(images, "getpixel"):
        # a path would otherwise be taken as a sequence of one-character "images", an array as rows
        raise SelectionError(bad_value("images", repr(images) if isinstance(images, (str, bytes, os.PathLike))
                                       else type(images).__name__, "a list of images, e.g. [\"ref.jpg\"]", "--ref"))
    images = list(images)
    if not images:
        raise SelectionError(bad_value("number of reference images", 0, "at least 1", "--ref"))
    check_reference_count(len(images))
    check_budget_choice(keep_fraction, token_count)
    check_key_tile(key_tile)
    if not _is_int(seed) or seed < 0:
        raise SelectionError(bad_value("seed", seed, "a non-negative integer", "--seed"))
    if strategy is Strategy.MASK:
        if masks is None or len(masks) != len(images):
            given = None if masks is None else f"{len(masks)} masks"
            raise SelectionError(bad_value("importance masks for --strategy mask", given,
                                           f"one mask per reference ({len(images)})", "--mask"))
    elif masks is not None and any(mask is not None for mask in masks):
        allowed = "masks only with 'mask'"
        raise SelectionError(bad_value("importance masks with strategy", strategy.value, allowed,
                                       "--strategy mask, or drop --mask"))
    masks = [_load_mask(mask) for mask in masks] if masks is not None else [None] * len(images)

    if workers is not None and (not _is_int(workers) or workers < 1):
        raise SelectionError(bad_value("selection workers", workers, "an integer >= 1"))

    # 2. per reference: the pixels it becomes inside the pipeline, its token grid, its mask on those pixels, and
    #    its token importance (in parallel: this is the runtime's only per-reference CPU work)
    def score(index: int) -> tuple[np.ndarray, tuple[int, int], np.ndarray]:
        pixels, (width, height) = prepare_reference_with_size(images[index], max_area, multiple_of)  # (h, w, 3)
        grid = token_grid(pixels.shape[1], pixels.shape[0])
        mask = _mask_for_prepared(masks[index], index, (height, width), pixels.shape[:2], grid, max_area,
                                  multiple_of)
        return pixels, grid, importance_map(pixels, grid, strategy, mask)

    count = workers or min(len(images), os.cpu_count() or 1)
    scores_pixels = strategy in (Strategy.EDGE, Strategy.SALIENCY, Strategy.MASK)
    cheap = not scores_pixels and all(_is_view_ready(image, max_area) for image in images)
    if count > 1 and len(images) > 1 and not cheap:
        pool = _thread_pool(count, os.getpid())
        scored = list(pool.map(score, range(len(images))))  # in order; the first error propagates
    else:
        scored = [score(index) for index in range(len(images))]
    prepared = [pixels for pixels, _, _ in scored]
    grids = [grid for _, grid, _ in scored]
    importances = [importance for _, _, importance in scored]

    # 3. budget, select (a top-up to whole key tiles adds tokens to the plain selection, never replaces any)
    plain = _allocate(importances, keep_fraction, token_count, allocation)
    budgets = _top_up_counts(importances, plain, key_tile, other_keys)
    selections = []
    for index, (pixels, grid, importance, base, budget) in enumerate(zip(prepared, grids, importances, plain,
                                                                          budgets)):
        own_seed = reference_seed(int(seed), index)
        indices = select_tokens(importance, base, strategy, own_seed, floor_fraction)
        if budget > base:
            extra = top_up_tokens(importance, indices, budget - base, strategy, own_seed)
            indices = np.sort(np.concatenate([indices, extra]))
        indices.setflags(write=False)
        importance.setflags(write=False)
        selections.append(Selection(indices, grid, strategy, importance, pixels))
    return selections


@functools.lru_cache(maxsize=8)
def _thread_pool(workers: int, process_id: int) -> ThreadPoolExecutor:
    """A pool kept between calls: starting and joining threads costs ~0.6 ms a call, a tenth of scoring six
    references. Keyed by process id: a forked child inherits the pool object but none of its threads."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="select")


def _is_view_ready(image: Any, max_area: int) -> bool:
    """Whether preparing ``image`` is only a view: an 8-bit RGB array that needs no resize (a crop is a view)."""
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] * image.shape[1] <= max_area)
