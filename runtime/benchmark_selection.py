"""How long token selection takes on the CPU: per 1024x1024 reference and strategy, and for a whole request.

``benchmark_selection`` times ``importance_map`` + ``select_tokens`` on one prepared reference.
``benchmark_references`` times what a generation pays before its transformer runs: ``select_references`` on six
1024x1024 numpy references (checks, preparation, scoring, budget, selection) and ``pack_references`` of their
128-channel latent grids, as a share of the generation it precedes.

``python -m sparse_context.runtime.benchmark_selection`` prints both as JSON; library callers get the dicts.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np
from PIL import Image

from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.files import atomic_write_bytes
from sparse_context.runtime.images import sample_images
from sparse_context.runtime.packing import pack_references
from sparse_context.runtime.progress import ProgressCallback
from sparse_context.runtime.selection import (
    Strategy, importance_map, parse_strategy, select_references, select_tokens,
)
from sparse_context.runtime.tokens import TOKEN_PIXELS, check_reference_count, kept_token_count, token_grid

BENCHMARK_SAMPLE = "astronaut"
BENCHMARK_KEEP_FRACTION = 0.10
BENCHMARK_REFERENCES = 6
LATENT_CHANNELS = 128  # FLUX.2 packed latents: 32 VAE channels x 2 x 2 patches, one token per 16x16 px
# The generation selection is measured against: FLUX.2-klein-9B, 6 references of 1024^2 at keep 0.10 with the
# reference KV cache, 4 steps, PyTorch bf16 on an H200 (0.803 s). Another GPU or model: pass its own time.
DEFAULT_GENERATION_S = 0.80
SELECTION_BUDGET_SHARE = 0.02  # selection + packing may cost at most this share of the generation
GENERATION_FLAG = "--generation-s"
REPORT_NAME = "select.json"


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


def benchmark_references(
    strategies: Iterable[str | Strategy] = tuple(Strategy),
    references: int = BENCHMARK_REFERENCES,
    size: int = 1024,
    repeats: int = 20,
    generation_s: float = DEFAULT_GENERATION_S,
    workers: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict:
    """Median milliseconds of ``select_references`` + ``pack_references`` for ``references`` numpy references.

    The references are the bundled photos resized to ``size`` x ``size`` (uint8 RGB arrays, as a caller holding
    decoded frames passes them); the latents are seeded random (128, size/16, size/16) float32 grids. Each
    strategy's ``share`` is its median total over ``generation_s`` seconds, and ``passes`` says whether it is
    within 2 %. Medians of ``select_ms``, ``pack_ms`` and ``total_ms`` are taken separately; one untimed run
    first warms caches, FFT plans and the thread pool. ``on_progress(done, total)`` follows the strategies.
    """
    strategies = [parse_strategy(strategy) for strategy in strategies]
    check_reference_count(references)
    if not (isinstance(generation_s, (int, float)) and math.isfinite(generation_s) and generation_s > 0):
        raise InputError(bad_value("generation seconds", generation_s, "a positive number of seconds",
                                   GENERATION_FLAG))
    if not (isinstance(repeats, int) and repeats >= 1):
        raise InputError(bad_value("benchmark repeats", repeats, "an integer >= 1"))
    if not (isinstance(size, int) and size >= 64 and size % TOKEN_PIXELS == 0):
        raise InputError(bad_value("reference size", size, f"a multiple of {TOKEN_PIXELS} px, at least 64"))

    photos = list(sample_images().values())
    images = []
    for index in range(references):
        with Image.open(photos[index % len(photos)]) as photo:
            images.append(np.asarray(photo.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)))
    rows, cols = token_grid(size, size)
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal((LATENT_CHANNELS, rows, cols), dtype=np.float32) for _ in range(references)]
    mask = np.zeros((size, size), dtype=np.float32)  # (H, W): a centred disc, a third of the image
    cv2.circle(mask, (size // 2, size // 2), size // 3, 1.0, thickness=-1)

    results = {}
    for done, strategy in enumerate(strategies, start=1):
        masks = [mask] * references if strategy is Strategy.MASK else None
        select_ms, pack_ms, total_ms = [], [], []
        for repeat in range(repeats + 1):
            start = time.perf_counter()
            selections = select_references(images, strategy=strategy, keep_fraction=BENCHMARK_KEEP_FRACTION,
                                           seed=repeat, masks=masks, workers=workers)
            selected = time.perf_counter()
            packed = pack_references(latents, [selection.indices for selection in selections])
            finished = time.perf_counter()
            if repeat:
                select_ms.append((selected - start) * 1e3)
                pack_ms.append((finished - selected) * 1e3)
                total_ms.append((finished - start) * 1e3)
        repeat_ms = _time_repeated_request(images, strategy, masks, workers, repeats)
        total = statistics.median(total_ms)
        share = total / (generation_s * 1e3)
        results[strategy.value] = {
            "select_ms": round(statistics.median(select_ms), 3),
            "pack_ms": round(statistics.median(pack_ms), 3),
            "total_ms": round(total, 3),
            "min_total_ms": round(min(total_ms), 3),
            "share": share,
            "passes": share <= SELECTION_BUDGET_SHARE,
            "ref_tokens": packed.num_tokens,
            **repeat_ms,
        }
        if on_progress is not None:
            on_progress(done, len(strategies))
    return {
        "references": references,
        "size": size,
        "keep_fraction": BENCHMARK_KEEP_FRACTION,
        "latent_channels": LATENT_CHANNELS,
        "grid": [rows, cols],
        "repeats": repeats,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "opencv_threads": cv2.getNumThreads(),
        "generation_s": generation_s,
        "budget_share": SELECTION_BUDGET_SHARE,
        "budget_ms": round(SELECTION_BUDGET_SHARE * generation_s * 1e3, 3),
        "strategies": results,
        "passes": all(row["passes"] for row in results.values()),
    }


def _time_repeated_request(images, strategy, masks, workers, repeats) -> dict:
    """What a request the reference K/V cache has seen pays before its transformer runs, median milliseconds:
    scoring again and hashing the references one by one (``rescored_ms``, the way before the selection memo)
    against hashing them in threads and finding the selection in the cache (``remembered_ms``)."""
    from sparse_context.runtime.core import References, remembered_selections, selection_settings
    from sparse_context.runtime.fingerprints import array_digest, array_digests
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    grids = [token_grid(image.shape[1], image.shape[0]) for image in images]

    def select():
        return [s.indices for s in select_references(images, strategy=strategy, keep_fraction=BENCHMARK_KEEP_FRACTION,
                                                     seed=0, masks=masks, workers=workers)]

    settings = selection_settings(strategy, BENCHMARK_KEEP_FRACTION, None, "per_reference", 0, masks, TOKEN_PIXELS)
    cache = ReferenceKVCache(0)
    rescored, remembered = [], []
    for repeat in range(repeats + 1):  # the first call fills the cache and warms both paths
        start = time.perf_counter()
        select()
        tuple(array_digest(image) for image in images)
        middle = time.perf_counter()
        references = References(tuple(grids), lambda: array_digests(images), lambda: [])
        remembered_selections(cache, True, references, settings, select)
        references.digest()  # the K/V key needs them too: free here, they were computed for the lookup
        finished = time.perf_counter()
        if repeat:
            rescored.append((middle - start) * 1e3)
            remembered.append((finished - middle) * 1e3)
    return {"rescored_ms": round(statistics.median(rescored), 3),
            "remembered_ms": round(statistics.median(remembered), 3),
            "repeat_speedup": statistics.median(rescored) / statistics.median(remembered)}


def summary_lines(result: dict) -> list[str]:
    """Readable lines of a ``benchmark_references`` result: one per strategy, then the verdict."""
    head = (f"{result['references']} x {result['size']}^2 numpy references, keep {result['keep_fraction']:g}, "
            f"median of {result['repeats']}, against a {result['generation_s']:g} s generation "
            f"(budget {result['budget_share']:.0%} = {result['budget_ms']:g} ms):")
    lines = [head]
    for strategy, row in result["strategies"].items():
        verdict = "pass" if row["passes"] else "FAIL"
        lines.append(f"  {strategy:<9} select {row['select_ms']:8.2f} ms  pack {row['pack_ms']:6.2f} ms  "
                     f"total {row['total_ms']:8.2f} ms  {row['share']:7.2%}  {verdict}")
    verdict = "yes" if result["passes"] else "no"
    lines.append(f"selection + packing within {result['budget_share']:.0%}: {verdict}")
    lines.append("a request the K/V cache has seen (selection + reference digests before the transformer):")
    for strategy, row in result["strategies"].items():
        lines.append(f"  {strategy:<9} scored again, hashed one by one {row['rescored_ms']:8.2f} ms  remembered, "
                     f"hashed in threads {row['remembered_ms']:6.2f} ms  {row['repeat_speedup']:6.1f}x")
    return lines


def write_selection_report(result: dict, out_dir: str | os.PathLike) -> Path:
    """Write ``result`` to ``out_dir``/select.json atomically (a temporary file in the folder, then a rename)."""
    return atomic_write_bytes(Path(out_dir) / REPORT_NAME, json.dumps(result, indent=2).encode())


if __name__ == "__main__":
    print(json.dumps({"per_reference": benchmark_selection(), "references": benchmark_references()}, indent=2))
