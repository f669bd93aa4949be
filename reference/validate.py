"""Validate an export with onnxruntime against the PyTorch reference (diffusers' own forward and KV path).

Reference-token counts come from :func:`~sparse_context.export.spec.check_grid` (0, 1, an odd count, the maximum;
never the traced example), so a size baked in at trace time shows up as an error here. Errors are collected for
every case and output first; one :class:`ValidationError` then carries the whole report.

Relative error is ``max |onnx - torch| / max |torch|`` per output (element-wise ratios explode near zero).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from sparse_context.export.errors import ValidationError
from sparse_context.engines.ort.backend import OrtTransformerBackend
from sparse_context.export.manifest import read_export_manifest
from sparse_context.export.spec import (
    REF_TOKENS, TARGET_TOKENS, TEXT_TOKENS, build_spec, check_grid, ModelDims, sample_position_ids,
)

# (atol, rtol) against the fp32 PyTorch model; fp16 carries ~3 decimal digits through every layer.
DEFAULT_TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (3e-2, 3e-2)}
CACHED_TIMESTEPS = (0.8, 0.45, 0.1)  # cached steps after each extract, as a 4-step schedule would run them


@dataclass(frozen=True)
class ErrorRecord:
    graph: str
    case: str  # "full", "extract", "cached step k"
    output: str  # "velocity", "ref_keys", "ref_values"
    ref_tokens: int
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class ValidationReport:
    path: str
    atol: float
    rtol: float
    records: list[ErrorRecord] = field(default_factory=list)

    @property
    def failures(self) -> list[ErrorRecord]:
        return [r for r in self.records if not r.passed]

    def max_errors(self) -> dict[tuple[str, str], tuple[float, float]]:
        """{(case kind, output): (max abs, max rel)} over every token count."""
        worst: dict[tuple[str, str], tuple[float, float]] = {}
        for r in self.records:
            kind = r.case.split(" ")[0]
            old = worst.get((kind, r.output), (0.0, 0.0))
            worst[(kind, r.output)] = (max(old[0], r.max_abs), max(old[1], r.max_rel))
        return worst

    def lines(self) -> list[str]:
        rows = [f"{'case':<16}{'output':<12}{'ref tokens':>11}{'max abs':>12}{'max rel':>12}  ok"]
        rows += [f"{r.case:<16}{r.output:<12}{r.ref_tokens:>11}{r.max_abs:>12.3e}{r.max_rel:>12.3e}  "
                 f"{'yes' if r.passed else 'NO'}" for r in self.records]
        return rows


def _numpy(x: Any) -> np.ndarray:
    return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x, dtype=np.float32)


class _Comparer:
    def __init__(self, report: ValidationReport, graph: str):
        self.report, self.graph = report, graph

    def __call__(self, case: str, output: str, ref_tokens: int, onnx_value: Any, torch_value: Any) -> None:
        ours, theirs = _numpy(onnx_value).astype(np.float64), _numpy(torch_value).astype(np.float64)
        if ours.shape != theirs.shape:
            self.report.records.append(ErrorRecord(self.graph, case, output, ref_tokens, float("inf"), float("inf"),
                                                   False))
            return
        scale = float(np.abs(theirs).max()) if theirs.size else 0.0
        max_abs = float(np.abs(ours - theirs).max()) if ours.size else 0.0
        passed = bool(np.isfinite(max_abs)) and max_abs <= self.report.atol + self.report.rtol * scale
        self.report.records.append(ErrorRecord(self.graph, case, output, ref_tokens, max_abs,
                                               max_abs / scale if scale else max_abs, passed))


def _stacked_cache(kv_cache: Any) -> tuple[Any, Any]:
    import torch

    layers = list(kv_cache.double_block_caches) + list(kv_cache.single_block_caches)
    return torch.stack([c.k_ref for c in layers]), torch.stack([c.v_ref for c in layers])


def validate_export(onnx_path: str | Path, transformer: Any, ref_token_counts: Sequence[int] | None = None,
                    target_tokens: int | None = None, seed: int = 0, atol: float | None = None,
                    rtol: float | None = None, raise_on_failure: bool = True) -> ValidationReport:
    """Compare the export at ``onnx_path`` with ``transformer`` (the fp32 PyTorch model with the same weights and
    LoRA) over ``ref_token_counts`` (default: the spec's check grid). KV graphs: each count is extracted, then run
    for several cached steps, velocity and new K/V compared with diffusers' ``kv_cache_mode`` path."""
    import torch

    from sparse_context.reference.torch_backend import TorchTransformerBackend

    # 1. What was exported, and the tolerance for its precision
    path = Path(onnx_path)
    path = path / "model.onnx" if path.is_dir() else path
    manifest = read_export_manifest(path)
    graph, precision = manifest["graph"], manifest["precision"]
    bounds = manifest["spec"]["bounds"]
    dims = ModelDims.from_config(manifest["model_config"])
    spec = build_spec(graph, precision, dims, bounds[TEXT_TOKENS][2], ((32, 16),), bounds[REF_TOKENS][2])
    default_atol, default_rtol = DEFAULT_TOLERANCE.get(precision, DEFAULT_TOLERANCE["fp16"])
    report = ValidationReport(str(path), default_atol if atol is None else atol, default_rtol if rtol is None else rtol)
    compare = _Comparer(report, graph)
    ours = OrtTransformerBackend(**{graph: path}, device_steps=False)  # single calls compared on the host
    theirs = TorchTransformerBackend(transformer)
    counts = list(ref_token_counts) if ref_token_counts is not None else check_grid(spec)
    num_target = int(target_tokens or bounds[TARGET_TOKENS][2])
    num_text = int(bounds[TEXT_TOKENS][2])
    rng = np.random.default_rng(seed)
    dtype = ours.dtype

    def tokens(*shape: int) -> tuple[np.ndarray, torch.Tensor]:
        # Round to the graph precision first, so both sides see identical inputs.
        array = rng.standard_normal(shape).astype(dtype)
        return array, torch.from_numpy(array.astype(np.float32))

    # 2. Every reference-token count
    for count in counts:
        ids = sample_position_ids(num_text, num_target, count)
        (target, target_t), (refs, refs_t) = tokens(1, num_target, dims.in_channels), tokens(1, count, dims.in_channels)
        text, text_t = tokens(1, num_text, dims.text_dim)
        timestep = np.float32(rng.uniform(0.05, 1.0))
        args = (ids["target"], ids["refs"], ids["text"])
        if graph == "full":
            expected = theirs.full(target_t, args[0], refs_t if count else None, args[1] if count else None, text_t,
                                   args[2], timestep)
            compare("full", "velocity", count, ours.full(target, args[0], refs, args[1], text, args[2], timestep), expected)
            continue
        got, state = ours.kv_extract(target, args[0], refs, args[1], text, args[2], timestep)
        if count == 0:  # diffusers' extract without references is the dense forward and returns no cache
            compare("extract", "velocity", 0, got, theirs.full(target_t, args[0], None, None, text_t, args[2],
                                                                timestep))
            continue
        expected, kv_cache = theirs.kv_extract(target_t, args[0], refs_t, args[1], text_t, args[2], timestep)
        keys, values = _stacked_cache(kv_cache)
        compare("extract", "velocity", count, got, expected)
        compare("extract", "ref_keys", count, state.keys, keys)
        compare("extract", "ref_values", count, state.values, values)
        for step, step_time in enumerate(CACHED_TIMESTEPS, start=1):
            step_time = np.float32(step_time)
            compare(f"cached step {step}", "velocity", count,
                    ours.kv_cached(target, args[0], state, text, args[2], step_time),
                    theirs.kv_cached(target_t, args[0], kv_cache, text_t, args[2], step_time))

    # 3. One error with every failure
    if report.failures and raise_on_failure:
        shown = "\n".join(report.lines())
        raise ValidationError(f"{path}: {len(report.failures)} of {len(report.records)} comparisons exceed "
                              f"atol {report.atol:g} + rtol {report.rtol:g} x max|torch|:\n{shown}", report)
    return report


def validate_export_dir(onnx_path: str | Path, model_dir: str | Path, lora: str | Path | None = None,
                        lora_scale: float = 1.0, transformer_file: str | Path | None = None,
                        **kwargs: Any) -> ValidationReport:
    """:func:`validate_export` with the PyTorch model loaded from a folder (+ checkpoint, + LoRA) like the export."""
    from sparse_context.export.exporter import ExportOptions, load_transformer

    options = ExportOptions(model_dir=Path(model_dir), lora=Path(lora) if lora else None, lora_scale=lora_scale,
                            transformer_file=Path(transformer_file) if transformer_file else None)
    transformer, _ = load_transformer(options)
    return validate_export(onnx_path, transformer, **kwargs)
