"""Speed benchmark of the PyTorch reference backend: references x keep fraction x KV cache, side by side.

Transformer only: random weights at the chosen config's real shapes (weights do not
change cost), random tokens, the real denoising loop (``runtime.sampler.denoise``). Every configuration runs in
the same process, so the printed ratios compare like with like; absolute times only mean something on a GPU.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sparse_context.reference.benchmark_configs import CONFIGS, KLEIN_SCHEDULER  # noqa: F401 (re-exported)
from sparse_context.reference.torch_backend import TorchTransformerBackend
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.files import atomic_write_bytes
from sparse_context.runtime.packing import pack_references
from sparse_context.runtime.sampler import Conditioning, denoise
from sparse_context.runtime.schedule import flow_match_schedule
from sparse_context.runtime.tokens import grid_position_ids, kept_token_count, text_position_ids



@dataclass(frozen=True)
class SpeedRow:
    refs: int
    keep: float
    kv: bool
    ref_tokens: int
    seconds: float  # median over repeats
    speedup: float = 0.0  # vs dense with the same number of references


def build_transformer(config: str, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    from diffusers import Flux2Transformer2DModel

    if config not in CONFIGS:
        raise InputError(bad_value("benchmark config", config, ", ".join(CONFIGS), "--config"))
    torch.manual_seed(seed)
    with torch.device(device):
        model = Flux2Transformer2DModel(**CONFIGS[config])
    return model.to(dtype).eval()


def benchmark_speed(
    config: str = "tiny",
    refs: Sequence[int] = (1, 2, 3, 4, 5, 6),
    keeps: Sequence[float] = (1.0, 0.25, 0.10, 0.05),
    kv_modes: Sequence[bool] = (False, True),
    target_px: int = 512,
    ref_px: int = 512,
    text_tokens: int = 64,
    steps: int = 4,
    repeats: int = 3,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    on_row: Callable[[SpeedRow], None] | None = None,
) -> dict[str, Any]:
    """Time the denoising loop for every (refs, keep, kv) and the target-only limit; return rows and ratios."""
    transformer = build_transformer(config, device, dtype)
    backend = TorchTransformerBackend(transformer)
    generator = torch.Generator("cpu").manual_seed(0)
    rows_t = cols_t = target_px // 16
    ref_grid = ref_px // 16
    channels = transformer.config.in_channels
    text = torch.randn(1, text_tokens, transformer.config.joint_attention_dim, generator=generator).to(device, dtype)
    conditioning = Conditioning(text, text_position_ids(text_tokens))
    latents = torch.randn(1, rows_t * cols_t, channels, generator=generator).to(device, dtype)
    target_ids = grid_position_ids(rows_t, cols_t)
    schedule = flow_match_schedule(steps, rows_t * cols_t, KLEIN_SCHEDULER)
    grids = [torch.randn(channels, ref_grid, ref_grid, generator=generator).to(device, dtype) for _ in range(max(refs))]
    rng = np.random.default_rng(0)

    def timed(num_refs: int, keep: float, use_kv: bool) -> tuple[float, int]:
        packed_tokens = packed_ids = None
        count = 0
        if num_refs:
            available = ref_grid * ref_grid
            kept = [np.sort(rng.choice(available, kept_token_count(available, keep), replace=False))
                    for _ in range(num_refs)]
            packed = pack_references(grids[:num_refs], kept)
            packed_tokens, packed_ids, count = packed.tokens[None], packed.position_ids, packed.num_tokens
        times = []
        for attempt in range(repeats + 1):  # the first run warms up kernels and allocators
            _sync(device)
            start = time.perf_counter()
            denoise(backend, latents, target_ids, conditioning, schedule, packed_tokens, packed_ids, use_kv=use_kv)
            _sync(device)
            if attempt:
                times.append(time.perf_counter() - start)
        return statistics.median(times), count

    target_only, _ = timed(0, 1.0, False)
    rows: list[SpeedRow] = []
    for num_refs in refs:
        dense_seconds = None
        for keep in keeps:
            for use_kv in kv_modes:
                seconds, count = timed(num_refs, keep, use_kv)
                if keep == 1.0 and not use_kv:
                    dense_seconds = seconds
                row = SpeedRow(num_refs, keep, use_kv, count, seconds,
                               (dense_seconds / seconds) if dense_seconds else 0.0)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return {
        "config": config, "device": _device_name(device), "dtype": str(dtype).replace("torch.", ""),
        "target_px": target_px, "ref_px": ref_px, "text_tokens": text_tokens, "steps": steps, "repeats": repeats,
        "target_only_seconds": target_only, "rows": [asdict(row) for row in rows],
        "torch": torch.__version__,
    }


def write_speed_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``speed.json`` and ``speed.png`` (speedup over dense vs number of references) in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "speed.json"
    atomic_write_bytes(json_path, json.dumps(result, indent=2).encode())
    png_path = out_dir / "speed.png"
    _plot_speedups(result, png_path)
    return json_path, png_path


def _plot_speedups(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        for use_kv in (False, True):
            series = [r for r in rows if r["keep"] == keep and r["kv"] == use_kv]
            if series and not (keep == 1.0 and not use_kv):
                axis.plot([r["refs"] for r in series], [r["speedup"] for r in series], marker="o",
                          linestyle="-" if use_kv else "--", label=f"keep {keep:g}{' + KV' if use_kv else ''}")
    limit = [(r["refs"], next(d["seconds"] for d in rows if d["refs"] == r["refs"] and d["keep"] == 1.0
                               and not d["kv"]) / result["target_only_seconds"])
             for r in rows if r["keep"] == 1.0 and not r["kv"]]
    axis.plot([x for x, _ in limit], [y for _, y in limit], color="gray", linestyle=":", label="limit (target only)")
    axis.set_xlabel("reference images")
    axis.set_ylabel("speedup over dense (same refs)")
    axis.set_title(f"Sparse Context speedup — {result['config']}, {result['device']}, {result['dtype']}, "
                   f"{result['steps']} steps", fontsize=9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"
