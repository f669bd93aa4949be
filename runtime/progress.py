"""Progress for long work (generation, export, engine builds): a callable that reports ``done`` of ``total``."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

ProgressCallback = Callable[[int, int], None]


def stderr_progress(label: str, stream: TextIO | None = None) -> ProgressCallback:
    """A callback drawing ``label [#####-----] 3/6 1.2s`` on one stderr line, ending it when done."""
    started = time.perf_counter()
    out = stream or sys.stderr

    interactive = out.isatty() if hasattr(out, "isatty") else False

    def report(done: int, total: int) -> None:
        if not interactive and done < total:
            return  # logs and CI get one line per task, not a redrawn bar
        width = 20
        filled = width * done // max(total, 1)
        elapsed = time.perf_counter() - started
        out.write(f"\r{label} [{'#' * filled}{'-' * (width - filled)}] {done}/{total} {elapsed:.1f}s")
        if done >= total:
            out.write("\n")
        out.flush()

    return report
