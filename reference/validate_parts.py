"""Validate a part export (VAE encoder, VAE decoder, text encoder) with onnxruntime against its PyTorch module.

Sizes come from :func:`~sparse_context.export.part_specs.check_sizes` (the profile's corners and an odd prompt
length, never the traced example), so a size baked in at trace time shows up here. Every size is compared before
one :class:`ValidationError` reports them all. Error: ``max |onnx - torch|``, passing where it is at most
``atol + rtol x max |torch|``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparse_context.export.errors import ValidationError
from sparse_context.export.manifest import read_export_manifest
from sparse_context.export.part_specs import PartSpec, check_sizes, sample_inputs

# (atol, rtol); fp32 is the acceptance precision of these graphs.
PART_TOLERANCE = {"fp32": (1e-5, 1e-5), "fp16": (3e-2, 3e-2)}


@dataclass(frozen=True)
class PartRecord:
    sizes: str  # "latent_rows=3 latent_cols=6"
    output: str
    max_abs: float
    max_rel: float
    passed: bool


@dataclass
class PartValidationReport:
    path: str
    graph: str
    atol: float
    rtol: float
    records: list[PartRecord] = field(default_factory=list)

    @property
    def failures(self) -> list[PartRecord]:
        return [r for r in self.records if not r.passed]

    def lines(self) -> list[str]:
        rows = [f"{'sizes':<32}{'output':<16}{'max abs':>12}{'max rel':>12}  ok"]
        rows += [f"{r.sizes:<32}{r.output:<16}{r.max_abs:>12.3e}{r.max_rel:>12.3e}  {'yes' if r.passed else 'NO'}"
                 for r in self.records]
        return rows


def part_module(manifest: Mapping[str, Any], model_dir: str | Path) -> Any:
    """The fp32 PyTorch module an export was traced from, loaded from ``model_dir``."""
    graph = manifest["graph"]
    if graph == "text_encoder":
        from sparse_context.export.text_encoder import TextEncoderGraph, load_text_encoder

        return TextEncoderGraph(load_text_encoder(model_dir), manifest["text_encoder_out_layers"]).eval()
    from sparse_context.export.vae import VaeDecoderGraph, VaeEncoderGraph, load_vae

    return (VaeEncoderGraph if graph == "vae_encoder" else VaeDecoderGraph)(load_vae(model_dir)).eval()


def validate_part_export(onnx_path: str | Path, model_dir: str | Path | None = None, module: Any = None,
                         sizes: Sequence[Mapping[str, int]] | None = None, seed: int = 0, atol: float | None = None,
                         rtol: float | None = None, raise_on_failure: bool = True) -> PartValidationReport:
    """Compare the export at ``onnx_path`` with ``module`` (default: loaded from ``model_dir``, else from the
    folder its manifest names) at ``sizes`` (default: :func:`check_sizes`)."""
    import onnxruntime as ort
    import torch

    # 1. What was exported, the module it came from, the tolerance for its precision
    path = Path(onnx_path)
    path = path / "model.onnx" if path.is_dir() else path
    manifest = read_export_manifest(path)
    spec = PartSpec.from_json(manifest["spec"])
    if module is None:
        module = part_module(manifest, model_dir or manifest["model_dir"])
    default_atol, default_rtol = PART_TOLERANCE.get(spec.precision, PART_TOLERANCE["fp16"])
    report = PartValidationReport(str(path), spec.graph, default_atol if atol is None else atol,
                                  default_rtol if rtol is None else rtol)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    # 2. Every size: the same inputs on both sides (rounded to the graph precision first)
    for index, case in enumerate(sizes if sizes is not None else check_sizes(spec)):
        feeds = sample_inputs(spec, case, seed=seed + index)
        ours = session.run(spec.output_names, feeds)
        args = [torch.from_numpy(feeds[name]) for name in spec.input_names]
        args = [a.float() if a.is_floating_point() else a for a in args]
        with torch.no_grad():
            theirs = module(*args)
        theirs = theirs if isinstance(theirs, (tuple, list)) else (theirs,)
        label = " ".join(f"{b.symbol}={case[b.symbol]}" for b in spec.bounds if b.symbol in case)
        for name, got, expected in zip(spec.output_names, ours, theirs):
            report.records.append(_record(label, name, got, expected.float().numpy(), report))

    # 3. One error with every failure
    if report.failures and raise_on_failure:
        raise ValidationError(f"{path}: {len(report.failures)} of {len(report.records)} comparisons exceed atol "
                              f"{report.atol:g} + rtol {report.rtol:g} x max|torch|:\n" + "\n".join(report.lines()),
                              report)
    return report


def _record(label: str, output: str, got: np.ndarray, expected: np.ndarray,
            report: PartValidationReport) -> PartRecord:
    got, expected = got.astype(np.float64), expected.astype(np.float64)
    if got.shape != expected.shape:
        return PartRecord(label, output, float("inf"), float("inf"), False)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_abs = float(np.abs(got - expected).max()) if got.size else 0.0
    passed = bool(np.isfinite(max_abs)) and max_abs <= report.atol + report.rtol * scale
    return PartRecord(label, output, max_abs, max_abs / scale if scale else max_abs, passed)
