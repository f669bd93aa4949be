"""Where a generation's GPU time goes, by kernel, for PyTorch and onnxruntime alike.

onnxruntime's own profile times each node on the host (CUDA launches are asynchronous), so it cannot say which
kernels a call spends its GPU time in. CUPTI, which ``torch.profiler`` drives, records every kernel launched in the
process, whichever library launched it, so one profiler serves both backends: kernel time per category (matrix
products, attention, copies, normalisation, other), the busy share of the wall time, and the top kernels.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

# First match wins; names are CUDA kernel names as CUPTI reports them.
CATEGORIES = (
    ("attention", re.compile(r"sdpa|fmha|flash|attention|attn", re.IGNORECASE)),
    ("matmul", re.compile(r"gemm|xmma|cutlass|nvjet|cublas|matmul", re.IGNORECASE)),
    ("copy", re.compile(r"concat|gather|copy|memcpy|memset|slice|transpose|split|cat_|catarray|index",
                        re.IGNORECASE)),
    ("norm", re.compile(r"norm", re.IGNORECASE)),
)


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def summarize_kernels(kernels: Iterable[tuple[str, float]], wall_s: float, top: int = 12) -> dict[str, Any]:
    """``kernels``: (name, microseconds) per launch. Milliseconds per category, the busy share of ``wall_s``
    (kernels on one stream do not overlap, so their sum is the busy time), and the ``top`` kernels by time."""
    per_category: dict[str, float] = {}
    per_kernel: dict[str, list[float]] = {}
    for name, us in kernels:
        per_category[category(name)] = per_category.get(category(name), 0.0) + us / 1e3
        entry = per_kernel.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us / 1e3
    busy_ms = sum(per_category.values())
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][1])[:top]
    return {"wall_ms": wall_s * 1e3, "busy_ms": busy_ms, "busy_share": busy_ms / (wall_s * 1e3) if wall_s else None,
            "launches": sum(count for count, _ in per_kernel.values()),
            "ms_per_category": dict(sorted(per_category.items(), key=lambda item: -item[1])),
            "top_kernels": [{"name": name[:160], "category": category(name), "count": count, "ms": ms}
                            for name, (count, ms) in ranked]}


def profile_kernels(run: Callable[[], Any], sync: Callable[[], None]) -> dict[str, Any]:
    """Runs ``run`` once under ``torch.profiler`` with CUDA activity and summarizes its kernels (and device copies
    and fills), read from the profiler's trace file, which lists them the same way in every torch version."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: kernel times need CUPTI on a GPU"}
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        start = time.perf_counter()
        run()
        sync()
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    return {"status": "done", **summarize_kernels(kernel_events(events), wall)}


def kernel_events(events: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(name, microseconds) of the device-side events of a chrome trace: kernels, copies and fills."""
    return [(str(event.get("name", "?")), float(event.get("dur", 0.0))) for event in events
            if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and event.get("ph") == "X"]
