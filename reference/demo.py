"""The main job on the embedded default: select tokens with every strategy, draw them, and generate dense,
sparse and sparse + KV images with the tiny FLUX.2-klein, all on the CPU in well under a minute."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sparse_context.reference.generator import SparseContextGenerator
from sparse_context.reference.tiny import TINY_SEED, tiny_model_dir
from sparse_context.runtime.files import publish_mode
from sparse_context.runtime.images import load_image, sample_images
from sparse_context.runtime.limits import check_seed, check_steps
from sparse_context.runtime.overlay import draw_selection, save_png, selection_grid_png
from sparse_context.runtime.selection import STRATEGY_CHOICES, select_references
from sparse_context.runtime.tokens import check_keep_fraction

# Within the tiny model's 64 prompt tokens (its tokenizer spells bytes) with the chat template: not cut.
DEMO_PROMPT = "the cat in a spacesuit drinking coffee"
DEMO_STRATEGIES = tuple(s for s in STRATEGY_CHOICES if s != "mask")  # mask needs a user mask


def run_demo(out_dir: str | Path, keep_fraction: float = 0.10, steps: int = 4, seed: int = 0, size: int = 256,
             cache_dir: str | Path | None = None,
             progress: Callable[[str], Callable[[int, int], None]] | None = None) -> dict[str, Any]:
    """Write overlays and generated images to ``out_dir``; return token counts, timings and file paths.

    Files are written into a staging folder inside ``out_dir`` and moved into place only when the whole demo
    succeeded, so a failed run leaves no partial overlays."""
    check_keep_fraction(keep_fraction)
    check_steps(steps)
    check_seed(seed)
    final_dir = Path(out_dir)
    final_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-demo-", dir=final_dir))
    try:
        report = _run(staging, keep_fraction, steps, seed, size, cache_dir, progress)
        for path in sorted(staging.iterdir()):
            publish_mode(path)
            os.replace(path, final_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report["out_dir"] = str(final_dir)
    for entry in report["generation"].values():
        entry["image"] = str(final_dir / Path(entry["image"]).name)
    return report


def _run(out_dir: Path, keep_fraction: float, steps: int, seed: int, size: int, cache_dir: str | Path | None,
         progress: Callable[[str], Callable[[int, int], None]] | None) -> dict[str, Any]:
    references = [load_image(path) for path in sample_images().values()]
    report: dict[str, Any] = {"out_dir": str(out_dir), "keep_fraction": keep_fraction, "selection": {},
                              "generation": {}}

    # 1. Token selection with each strategy; one overlay sheet per strategy plus a combined sheet
    sheet_rows, sheet_labels = [], []
    for strategy in DEMO_STRATEGIES:
        start = time.perf_counter()
        selections = select_references(references, strategy=strategy, keep_fraction=keep_fraction, seed=seed)
        elapsed = time.perf_counter() - start
        overlays = [draw_selection(np.asarray(s.image), s.indices, s.grid) for s in selections]
        labels = [f"{strategy}: {s.indices.size}/{s.available} tokens" for s in selections]
        for index, overlay in enumerate(overlays):
            save_png(out_dir / f"select_{strategy}_ref{index}.png", overlay)
        sheet_rows.append(overlays)
        sheet_labels.append(labels)
        report["selection"][strategy] = {
            "kept": [int(s.indices.size) for s in selections],
            "available": [int(s.available) for s in selections],
            "ms_per_reference": 1000 * elapsed / len(selections),
        }
    selection_grid_png(out_dir / "selections.png", sheet_rows, sheet_labels)

    # 2. The tiny model (created on first use, seeded), and three generations on the same references
    model_dir = tiny_model_dir(cache_dir, seed=TINY_SEED)
    generator = SparseContextGenerator.from_pretrained(model_dir)
    modes = {
        "dense": dict(keep_fraction=1.0, use_kv=False),
        "sparse": dict(keep_fraction=keep_fraction, strategy="edge", use_kv=False),
        "sparse_kv": dict(keep_fraction=keep_fraction, strategy="edge", use_kv=True),
    }
    for mode, settings in modes.items():
        on_step = progress(f"generate {mode:9s}") if progress else None
        start = time.perf_counter()
        result = generator.generate(DEMO_PROMPT, references, num_steps=steps, seed=seed, selection_seed=seed,
                                    height=size, width=size, on_step=on_step, **settings)
        total = time.perf_counter() - start
        path = out_dir / f"generated_{mode}.png"
        save_png(path, np.asarray(result.image))
        report["generation"][mode] = {
            "ref_tokens": result.ref_tokens, "ref_tokens_available": result.ref_tokens_available,
            "transformer_seconds": result.timings["transformer"], "total_seconds": total, "image": str(path),
        }
    dense_seconds = report["generation"]["dense"]["transformer_seconds"]
    for entry in report["generation"].values():
        entry["transformer_speedup"] = dense_seconds / entry["transformer_seconds"]
    report["model_dir"] = str(model_dir)
    return report
