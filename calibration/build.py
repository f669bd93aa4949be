"""``build_engines.py --precision fp8|int8``: capture (or reuse) calibration data, quantize the exported graphs
with ModelOpt, gate their accuracy and hand the quantized graphs to the engine build.

Quantized graphs are staged next to their final folders and renamed into place only after the gate passes, so a
refused build leaves nothing an engines folder or a loader could pick up.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from sparse_context.calibration.capture import (
    FLAG_SAMPLES, FLAG_STRATEGIES, CAPTURE_MANIFEST, CaptureOptions, capture, check_capture_matches, read_capture,
)
from sparse_context.calibration.dataset import FLAG_CALIBRATION, bundled_set, load_set
from sparse_context.calibration.errors import CalibrationConfigError, CalibrationError
from sparse_context.calibration.gate import (
    DEMO_THRESHOLDS, FLAG_MAX_LATENT_ERROR, FLAG_MIN_COSINE, FLAG_MIN_PSNR, GateThresholds, run_gate,
)
from sparse_context.calibration.recipe import CALIBRATION_METHODS, FLAG_EXCLUDE, FLAG_METHOD, QuantRecipe
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.files import replace_folder

QUANTIZED_PRECISIONS = ("int8", "fp8")
# FP8 Q/DQ runs on TensorRT (Hopper/Ada); onnxruntime's CPU runs it only as a reference for validation.
BACKENDS_BY_PRECISION = {"int8": ("trt", "ort-trt", "ort-cuda", "ort-cpu"), "fp8": ("trt", "ort-trt", "ort-cpu")}
QUANTIZED_FORMAT = 1
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class CalibrationOptions:
    """Everything ``--precision int8|fp8`` needs besides the engine build's own options."""

    calibration: Path | None = None  # a calibration set folder or an earlier capture; None: the bundled samples
    samples: int = 32
    holdout: int = 2
    strategies: tuple[str, ...] = ("saliency", "uniform")
    method: str = "max"
    exclude: tuple[str, ...] = ()
    thresholds: GateThresholds = field(default_factory=GateThresholds)
    seed: int = 0
    num_steps: int = 4
    range_scale: float = 1.0  # below 1 clips every calibrated range (a deliberately bad calibration)
    # (model folder, transformer backend) -> the reference generator (text encoder, VAE, token selection) running
    # that backend. It lives in a layer above this one, so the caller passes it: build_engines.py does.
    generator_factory: Callable[[Path, Any], Any] | None = field(default=None, compare=False)

    def capture_options(self) -> CaptureOptions:
        return CaptureOptions(samples=self.samples, holdout=self.holdout, strategies=tuple(self.strategies),
                              num_steps=self.num_steps, seed=self.seed)

    def recipe(self, mode: str, backend: str) -> QuantRecipe:
        # onnxruntime's CPU has slow or missing fp16 kernels for many ops; every GPU path keeps fp16.
        return QuantRecipe(mode=mode, calibration_method=self.method, exclude=tuple(self.exclude),
                           high_precision_dtype="fp32" if backend == "ort-cpu" else "fp16",
                           range_scale=self.range_scale)

    def validate(self) -> "CalibrationOptions":
        self.capture_options().validate()
        self.thresholds.validate()
        if self.calibration is not None and not Path(self.calibration).is_dir():
            raise CalibrationConfigError(bad_value("calibration folder", str(self.calibration), "an existing folder",
                                                   FLAG_CALIBRATION))
        if self.calibration is not None and not (Path(self.calibration) / CAPTURE_MANIFEST).is_file():
            load_set(self.calibration)  # its prompts and images, read now: a wrong set fails before the export
        return self


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--precision int8|fp8`` for ``build_engines.py``."""
    defaults, gate, demo = CalibrationOptions(), GateThresholds(), DEMO_THRESHOLDS
    group = parser.add_argument_group("calibration (--precision int8 or fp8)")
    group.add_argument(FLAG_CALIBRATION, type=Path, default=None,
                       help="calibration set: a folder with calibration.json or images + prompts.txt, or an earlier "
                            "capture folder (default: the bundled sample photos)")
    group.add_argument(FLAG_SAMPLES, type=int, default=defaults.samples,
                       help=f"generations per graph to calibrate on (default {defaults.samples}; 32-256 is usual)")
    group.add_argument(FLAG_STRATEGIES, nargs="+", default=list(defaults.strategies),
                       help="token-selection strategies of the captured sparse runs")
    group.add_argument(FLAG_METHOD, choices=CALIBRATION_METHODS, default=defaults.method)
    group.add_argument(FLAG_EXCLUDE, nargs="+", default=[], metavar="LAYER",
                       help="module paths or node names (regular expressions) kept in high precision")
    group.add_argument(FLAG_MIN_COSINE, type=float, default=None, help="accuracy gate: lowest per-step velocity "
                       f"cosine similarity (default {gate.min_cosine}; {demo.min_cosine} with --demo)")
    group.add_argument(FLAG_MAX_LATENT_ERROR, type=float, default=None, help="accuracy gate: highest final-latent "
                       f"relative error (default {gate.max_latent_error}; {demo.max_latent_error} with --demo)")
    group.add_argument(FLAG_MIN_PSNR, type=float, default=None, help="accuracy gate: lowest decoded-image PSNR in "
                       f"dB (default {gate.min_psnr}; {demo.min_psnr} with --demo)")


def options_from_args(args: argparse.Namespace, demo: bool = False,
                      generator_factory: Callable[[Path, Any], Any] | None = None) -> CalibrationOptions:
    """CalibrationOptions from the flags above; gate limits not given take the defaults (the demo's with
    ``demo``: see ``calibration.gate.DEMO_THRESHOLDS``)."""
    base = DEMO_THRESHOLDS if demo else GateThresholds()
    given = (args.gate_min_cosine, args.gate_max_latent_error, args.gate_min_psnr)
    thresholds = GateThresholds(*(value if value is not None else default for value, default in
                                  zip(given, (base.min_cosine, base.max_latent_error, base.min_psnr))))
    return CalibrationOptions(calibration=args.calibration, samples=args.calibration_samples,
                              strategies=tuple(args.calibration_strategies), method=args.calibration_method,
                              exclude=tuple(args.calibration_exclude), thresholds=thresholds,
                              generator_factory=generator_factory).validate()


def export_precision(precision: str) -> str:
    """The precision to export in: quantized builds start from the fp32 graph ModelOpt calibrates."""
    return "fp32" if precision in QUANTIZED_PRECISIONS else precision


def check_backend(precision: str, backend: str) -> None:
    allowed = BACKENDS_BY_PRECISION.get(precision)
    if allowed is not None and backend not in allowed:
        raise CalibrationConfigError(bad_value(f"backend for --precision {precision}", backend, ", ".join(allowed)
                                               + " (onnxruntime's CUDA provider has no FP8 Q/DQ kernels)",
                                               "--backend"))


@dataclass
class QuantizedBuild:
    exports: list[Any]  # ExportResult-like: path, manifest, reused, spec
    report: dict[str, Any]


def quantize_for_build(request: Any, exports: Sequence[Any], open_backend: Callable[..., Any],
                       progress: Progress | None = None) -> QuantizedBuild:
    """Capture -> quantize -> gate -> publish for ``request`` (an ``engines.build.BuildRequest`` with
    ``precision`` int8 or fp8 and ``calibration`` options) and its fp32 ``exports``; the returned exports point at
    the quantized graphs. ``open_backend(paths, quantized)``: an onnxruntime transformer backend for
    ``{graph: model.onnx}`` (``quantized``: at the basic optimisation level)."""
    from sparse_context.export.exporter import ExportResult

    options = (request.calibration or CalibrationOptions()).validate()
    if options.generator_factory is None:
        raise CalibrationConfigError(bad_value("calibration generator", None, "a generator_factory in "
                                               "CalibrationOptions (build_engines.py passes the reference one)"))
    check_backend(request.precision, request.backend)
    recipe = options.recipe(request.precision, request.backend).validate()
    graphs = [e.manifest["graph"] for e in exports]
    sources = {e.manifest["graph"]: Path(e.path) for e in exports}
    out_dir = Path(request.out_dir)

    # 1. Capture on the unquantized graphs (or reuse a capture: the one given, or the one cached for these inputs)
    reference = open_backend(sources, False)
    loaded: list[Any] = []

    def generator() -> Any:  # the text encoder and VAE load only if capture or the gate runs
        if not loaded:
            loaded.append(options.generator_factory(Path(request.model_dir), reference))
        return loaded[0]

    given = Path(options.calibration) if options.calibration is not None else None
    if given is not None and (given / CAPTURE_MANIFEST).is_file():
        found = read_capture(given)
        if found is None:
            raise CalibrationError(bad_value("capture folder", str(given), "a complete capture (an interrupted one "
                                             "has no complete shards; capture again)", FLAG_CALIBRATION))
        found = check_capture_matches(found, reference)
    else:
        calibration_set = load_set(given, request.plan.max_refs) if given else bundled_set(request.plan.max_refs)
        found = capture(generator, reference, request.plan, calibration_set, options.capture_options(),
                        out_dir / "calibration", graphs, progress)

    # 2. Reuse graphs that passed this gate before, else quantize each graph into a staging folder
    key = hashlib.sha256(json.dumps({"format": QUANTIZED_FORMAT, "recipe": recipe.sha256(), "capture": found.key,
                                     "sources": {g: e.manifest["onnx_sha256"] for g, e in zip(graphs, exports)},
                                     "gate": asdict(options.thresholds)}, sort_keys=True).encode()).hexdigest()
    finals = {g: out_dir / "onnx" / f"{g}-{recipe.mode}-{key[:16]}" for g in graphs}
    reused = {g: _passed_manifest(finals[g], key) for g in graphs}
    if all(reused.values()):
        report = next(iter(reused.values()))["quantization"]["gate"]
        return QuantizedBuild([ExportResult(finals[g] / "model.onnx", reused[g], True, e.spec)
                               for g, e in zip(graphs, exports)], report)
    from sparse_context.calibration.quantize import check_quantized, quantize_graph

    staging = {g: Path(tempfile.mkdtemp(prefix=f".staging-{finals[g].name}-", dir=out_dir / "onnx")) for g in graphs}
    try:
        manifests = {}
        for done, (graph, export) in enumerate(zip(graphs, exports), start=1):
            manifests[graph] = quantize_graph(sources[graph], export.manifest, found, graph, recipe, staging[graph])
            check_quantized(staging[graph] / "model.onnx")
            if progress is not None:
                progress(f"quantize {recipe.mode}", done, len(graphs))

        # 3. The accuracy gate (raises GateFailedError; the finally below removes the staging folders)
        quantized = open_backend({g: staging[g] / "model.onnx" for g in graphs}, True)
        report = run_gate(generator(), reference, quantized, found, request.plan, graphs, sources,
                          {g: staging[g] / "model.onnx" for g in graphs}, options.thresholds, FLAG_SAMPLES, progress)
        report.update(recipe=recipe.to_json(), recipe_sha256=recipe.sha256(), capture=str(found.folder),
                      capture_key=found.key, calibration_samples=found.manifest["sample_count"])

        # 4. Publish: the gate's numbers into each manifest, then rename the folders into place
        results = []
        for graph, export in zip(graphs, exports):
            manifest = manifests[graph]
            manifest["quantization"].update(gate=report, key=key)
            (staging[graph] / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
            replace_folder(staging[graph], finals[graph])
            results.append(ExportResult(finals[graph] / "model.onnx", manifest, False, export.spec))
        return QuantizedBuild(results, report)
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)


def _passed_manifest(folder: Path, key: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = manifest.get("quantization", {})
    if quantization.get("key") != key or not quantization.get("gate", {}).get("passed"):
        return None
    files_ok = all((folder / n).is_file() and (folder / n).stat().st_size == i.get("bytes")
                   for n, i in manifest.get("files", {}).items())
    return manifest if files_ok else None


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The gate's numbers as ``build_engines.py`` prints them."""
    lines = [f"calibration: {report.get('calibration_samples')} samples, recipe {report.get('recipe_sha256', '')[:12]}"
             f", gate {'passed' if report.get('passed') else 'FAILED'}"]
    for mode, row in report.get("modes", {}).items():
        lines.append(f"  {mode:9s} velocity cosine >= {row['min_velocity_cosine']:.6f}, final-latent error "
                     f"{row['latent_rel_error']:.4f}, PSNR {row['psnr_db']:.2f} dB")
    return lines
