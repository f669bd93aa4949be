"""How long scoring and selecting tokens takes per 1024x1024 reference, per strategy, on the CPU.

``python -m sparse_context.runtime.benchmark_selection`` prints the result as JSON; library callers get the dict.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from sparse_context.runtime.images import sample_images
from sparse_context.runtime.selection import Strategy, importance_map, parse_strategy, select_tokens
from sparse_context.runtime.tokens import kept_token_count, token_grid

BENCHMARK_SAMPLE = "astronaut"
BENCHMARK_KEEP_FRACTION = 0.10


def benchmark_selection(
    strategies: Iterable[str | Strategy] = tuple(Strategy),
    size: int = 1024,
    repeats: int = 20,
    threads: int = 1,
) -> dict:
    """Median milliseconds of ``importance_map`` + ``select_tokens`` at keep 0.10 on a ``size`` x ``size`` sample.

    Returns ``{"size", "threads", "repeats", "keep_fraction", "tokens_kept", "ms_per_reference": {strategy: ms},
    "ms_importance": {...}, "ms_select": {...}}``. OpenCV's thread count is restored afterwards.
    """
    strategies = [parse_strategy(strategy) for strategy in strategies]
    photo = Image.open(sample_images()[BENCHMARK_SAMPLE]).convert("RGB")
    image = np.asarray(photo.resize((size, size), Image.Resampling.LANCZOS))  # (size, size, 3) uint8
    grid = token_grid(size, size)
    count = kept_token_count(grid[0] * grid[1], BENCHMARK_KEEP_FRACTION)
    # The mask strategy needs a mask: a centred disc covering about a third of the image, at pixel resolution.
    mask = np.zeros((size, size), dtype=np.float32)  # (H, W)
    cv2.circle(mask, (size // 2, size // 2), size // 3, 1.0, thickness=-1)

    previous_threads = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        timings = {strategy: _time_strategy(image, grid, strategy, count, mask, repeats) for strategy in strategies}
    finally:
        cv2.setNumThreads(previous_threads)
    return {
        "size": size,
        "threads": threads,
        "repeats": repeats,
        "keep_fraction": BENCHMARK_KEEP_FRACTION,
        "tokens_kept": count,
        "ms_per_reference": {strategy.value: total for strategy, (total, _, _) in timings.items()},
        "ms_importance": {strategy.value: scoring for strategy, (_, scoring, _) in timings.items()},
        "ms_select": {strategy.value: picking for strategy, (_, _, picking) in timings.items()},
    }


def _time_strategy(image, grid, strategy, count, mask, repeats) -> tuple[float, float, float]:
    """Median (total, importance, selection) milliseconds; one untimed run first warms caches and FFT plans."""
    strategy_mask = mask if strategy is Strategy.MASK else None
    samples = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        importance = importance_map(image, grid, strategy, strategy_mask)
        scored = time.perf_counter()
        select_tokens(importance, count, strategy, seed=repeat)
        done = time.perf_counter()
        if repeat:
            samples.append(((done - start) * 1e3, (scored - start) * 1e3, (done - scored) * 1e3))
    total, scoring, picking = np.median(np.array(samples), axis=0)  # per column: medians taken separately
    return round(float(total), 3), round(float(scoring), 3), round(float(picking), 3)


if __name__ == "__main__":
    print(json.dumps(benchmark_selection(), indent=2))
