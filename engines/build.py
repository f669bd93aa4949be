"""From a diffusers folder (+ LoRA) to ready engines: export (reused when cached), profiles per sparsity bucket,
a build per backend, and ``engines.json`` describing it all for the runtime."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from sparse_context.engines.buckets import BucketPlan, CACHED_TOKENS
from sparse_context.engines.errors import BuildOptionError
from sparse_context.engines.manifest import atomic_write_bytes
from sparse_context.engines.profiles import Profile, engine_profiles
from sparse_context.runtime.errors import bad_value

BACKENDS = ("trt", "ort-cuda", "ort-trt", "ort-cpu")
ENGINES_FILE = "engines.json"
# TensorRT (and its onnxruntime EP) fuse MatMul-Softmax-MatMul and parse opset <= 20 on Jetson (TensorRT 10.3);
# onnxruntime's CUDA EP needs the fused opset-23 Attention op to be fast and right at long sequences (NOTES §3b).
ATTENTION_BY_BACKEND = {"trt": "matmul", "ort-trt": "matmul", "ort-cuda": "fused", "ort-cpu": "matmul"}
PROVIDERS = {"ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
             "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
             "ort-cpu": ("CPUExecutionProvider",)}


@dataclass(frozen=True)
class BuildRequest:
    model_dir: Path
    backend: str
    plan: BucketPlan
    out_dir: Path
    precision: str = "fp16"
    lora: Path | None = None
    lora_scale: float = 1.0
    transformer_file: Path | None = None
    graphs: tuple[str, ...] = ("full", "kv")
    workspace_bytes: int | None = None
    calibration: Any = None  # calibration.build.CalibrationOptions for precision int8/fp8 (None: defaults)

    def validate(self) -> "BuildRequest":
        if self.backend not in BACKENDS:
            raise BuildOptionError(bad_value("backend", self.backend, ", ".join(BACKENDS), "--backend"))
        if self.backend == "ort-cpu" and self.precision == "bf16":
            raise BuildOptionError(bad_value("precision for ort-cpu", "bf16", "fp32 or fp16 (onnxruntime CPU has no "
                                             "bfloat16 kernels)", "--precision"))
        if self.precision in ("int8", "fp8"):
            from sparse_context.calibration.build import check_backend

            check_backend(self.precision, self.backend)
        self.plan.validate()
        return self


def engine_input_shapes(spec: Any) -> dict[str, tuple[Any, ...]]:
    """The export spec's inputs with derived symbols spelled as sums, as ``engines.profiles`` reads them."""
    from sparse_context.export.spec import DERIVED_AXES

    spelled = {derived: " + ".join(parts) for derived, parts in DERIVED_AXES.items()}
    return {t.name: tuple(spelled.get(d, d) if isinstance(d, str) else d for d in t.shape) for t in spec.inputs}


def symbol_names(spec: Any) -> dict[str, str]:
    """This package's bucket symbols -> the export spec's (only the cached-reference axis is named differently)."""
    from sparse_context.export.spec import CACHED_REF_TOKENS

    return {CACHED_TOKENS: CACHED_REF_TOKENS}


def ort_trt_provider_options(profiles: Sequence[Profile], cache_dir: Path) -> dict[str, str]:
    """onnxruntime TensorRT EP options: every profile's shapes (a repeated name starts another profile) and an
    engine cache, so engines are built once per bucket set and reused."""
    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in ranges[which])}"
                        for profile in profiles for name, ranges in profile.shapes)

    return {"trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1),
            "trt_profile_max_shapes": shapes(2), "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": "True"}


def build_engines(request: BuildRequest, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Export, plan profiles and build for ``request.backend``; write and return the ``engines.json`` contents."""
    from sparse_context.calibration.build import QUANTIZED_PRECISIONS, export_precision, quantize_for_build
    from sparse_context.export.exporter import ExportOptions, export_graphs

    request = request.validate()
    plan = request.plan
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Export (reused when the same weights, LoRA and options were exported before)
    options = ExportOptions(
        model_dir=Path(request.model_dir), precision=export_precision(request.precision),
        attention=ATTENTION_BY_BACKEND[request.backend], lora=request.lora, lora_scale=request.lora_scale,
        transformer_file=request.transformer_file, max_ref_tokens=plan.max_ref_tokens,
        target_sizes=tuple((r.width_px, r.height_px) for r in plan.target_resolutions), text_tokens=plan.text_tokens,
        out_dir=out_dir / "onnx")
    exports = export_graphs(options, request.graphs, progress)
    calibration = None
    if request.precision in QUANTIZED_PRECISIONS:  # capture, quantize and gate; the build takes the Q/DQ graphs
        quantized = quantize_for_build(request, exports, _calibration_backend, progress)
        exports, calibration = quantized.exports, quantized.report

    # 2. One profile per bucket (and per KV step) for each graph; 3. the backend's build
    graphs: dict[str, Any] = {}
    for graph, exported in zip(request.graphs, exports):
        profiles = engine_profiles(plan, graph, engine_input_shapes(exported.spec), symbol_names(exported.spec))
        entry: dict[str, Any] = {"onnx": str(exported.path), "onnx_sha256": exported.manifest["onnx_sha256"],
                                 "reused_export": exported.reused, "profiles": [p.to_json() for p in profiles]}
        if request.backend == "trt":
            entry["engine"] = str(_build_trt(request, graph, exported, profiles, progress))
        elif request.backend == "ort-trt":
            entry["provider_options"] = ort_trt_provider_options(profiles, out_dir / "ort-trt-cache" / graph)
        graphs[graph] = entry

    engines = {"format": 1, "backend": request.backend, "model_dir": str(Path(request.model_dir).resolve()),
               "precision": request.precision, "attention": options.attention,
               "providers": list(PROVIDERS.get(request.backend, ())), "build_args": list(plan.build_args()),
               "plan": plan.to_json(),
               "graphs": graphs}
    if calibration is not None:
        engines.update(calibration=calibration, graph_optimization_level="basic")
    atomic_write_bytes(out_dir / ENGINES_FILE, json.dumps(engines, indent=2).encode())
    return engines


def _calibration_backend(paths: Mapping[str, Path], quantized: bool) -> Any:
    """onnxruntime on ``{graph: model.onnx}`` for calibration: CUDA where this onnxruntime has it, else the CPU;
    Q/DQ graphs at the basic optimisation level (see ``calibration.quantize.basic_session_options``)."""
    import onnxruntime as ort

    from sparse_context.calibration.quantize import basic_session_options
    from sparse_context.export.ort_backend import OrtTransformerBackend

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
    return OrtTransformerBackend(providers=providers, session_options=basic_session_options() if quantized else None,
                                 **paths)


def _build_trt(request: BuildRequest, graph: str, exported: Any, profiles: Sequence[Profile],
               progress: Callable[[str, int, int], None] | None) -> Path:
    from sparse_context.engines.cuda_memory import default_memory
    from sparse_context.engines.manifest import EngineManifest, engine_cache_path, find_cached_engine, recipe_sha256
    from sparse_context.engines.trt_build import build_engine, import_tensorrt

    trt = import_tensorrt()
    device = default_memory().device_info()
    gpu_name, capability = device.name, device.compute_capability
    recipe = {"precision": request.precision, "attention": ATTENTION_BY_BACKEND["trt"]}
    quantization = (exported.manifest.get("quantization") or {}).get("recipe_sha256")
    if quantization:  # only quantized builds: earlier engines' keys stay valid
        recipe["quantization"] = quantization
    wanted = EngineManifest(
        graph=graph, tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability,
        onnx_sha256=exported.manifest["onnx_sha256"], precision_recipe_sha256=recipe_sha256(recipe),
        profiles=tuple(profiles), lora_sha256=(exported.manifest.get("lora") or {}).get("sha256"),
        build_args=tuple(request.plan.build_args()))
    cached = find_cached_engine(request.out_dir / "trt", wanted)
    if cached is not None:
        return cached
    engine_path = engine_cache_path(request.out_dir / "trt", wanted)
    build_engine(exported.path, engine_path, wanted, workspace_bytes=request.workspace_bytes,
                 timing_cache_path=request.out_dir / "trt" / "timing.cache",
                 progress=_trt_progress(graph, progress) if progress else None)
    return engine_path


def _trt_progress(graph: str, progress: Callable[[str, int, int], None]) -> Callable[[Any], None]:
    """TensorRT phase events -> the ``(stage, done, total)`` progress of the rest of the build."""
    def report(event: Any) -> None:
        if event.kind == "step" and event.num_steps:
            progress(f"trt {graph}: {event.phase}", event.step, event.num_steps)

    return report


def engine_backend(engines: Mapping[str, Any], memory: Any = None) -> Any:
    """The transformer backend for an ``engines.json``: TensorRT engines, or onnxruntime sessions with the
    recorded providers (the TensorRT EP gets its per-bucket profiles and engine cache)."""
    from sparse_context.engines.buckets import BucketPlan

    backend = engines.get("backend")
    if backend not in BACKENDS:
        raise BuildOptionError(bad_value("engines backend", backend, ", ".join(BACKENDS), "--backend"))
    if backend == "trt":
        from sparse_context.engines.trt_backend import TrtTransformerBackend

        return TrtTransformerBackend(engines, memory=memory)
    from sparse_context.export.ort_backend import OrtTransformerBackend

    graphs = engines["graphs"]
    providers: list[Any] = list(engines["providers"])
    options = graphs.get("kv", graphs.get("full", {})).get("provider_options")
    if options and providers and providers[0] == "TensorrtExecutionProvider":
        providers[0] = (providers[0], options)
    plan = BucketPlan.from_json(engines["plan"]) if "plan" in engines else None
    session_options = None
    if engines.get("graph_optimization_level") == "basic":  # Q/DQ graphs: see calibration.quantize
        from sparse_context.calibration.quantize import basic_session_options

        session_options = basic_session_options()
    return OrtTransformerBackend(full=graphs.get("full", {}).get("onnx"), kv=graphs.get("kv", {}).get("onnx"),
                                 providers=providers, session_options=session_options, plan=plan,
                                 strict_shapes=backend == "ort-trt")


def read_engines(engines_dir: str | Path) -> Mapping[str, Any]:
    path = Path(engines_dir) / ENGINES_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise BuildOptionError(bad_value("engines folder", str(engines_dir), f"a folder with {ENGINES_FILE} written "
                                         "by build_engines.py", "--engines")) from error
