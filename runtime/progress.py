"""Progress for long work (generation, export, engine builds): a callable that reports ``done`` of ``total``."""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from typing import Callable, Iterator, TextIO

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


@contextlib.contextmanager
def stderr_warnings(stream: TextIO | None = None) -> Iterator[None]:
    """Inside: this package's warnings (a cut prompt) as one ``warning: ...`` line each on stderr, like its errors,
    every time they occur; other warnings as Python shows them."""
    from sparse_context.runtime.errors import PromptTruncatedWarning

    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, PromptTruncatedWarning):
                print(f"warning: {message}", file=stream or sys.stderr, flush=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.simplefilter("always", PromptTruncatedWarning)
        warnings.showwarning = show
        yield
