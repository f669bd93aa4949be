"""From a diffusers folder (+ LoRA) to ready engines: export (reused when cached), profiles per sparsity bucket,
a build per backend, and ``engines.json`` (:class:`~sparse_context.engines.index.EnginesIndex`) describing it all
for the runtime."""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from sparse_context.engines.buckets import FLAG_KEEPS, FLAG_MAX_REFS, BucketPlan, CACHED_TOKENS
from sparse_context.engines.errors import REBUILD_PROGRAM, BuildOptionError
from sparse_context.engines.index import BACKENDS, EnginesIndex, GraphEntry
from sparse_context.engines.model_files import copy_model_files
from sparse_context.engines.ort.loader import PROVIDERS, ort_trt_provider_options
from sparse_context.engines.profiles import Profile, engine_profiles
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.files import atomic_write_bytes, nearest_existing
from sparse_context.runtime.fingerprints import file_sha256
from sparse_context.runtime.tokens import TOKEN_PIXELS

# build_engines.py's options that fix what an engine is; the generate CLI's refusals name them.
FLAG_MODEL = "--model"
FLAG_TRANSFORMER = "--transformer"
FLAG_LORA = "--lora"
FLAG_LORA_SCALE = "--lora-scale"
FLAG_BACKEND = "--backend"
FLAG_PRECISION = "--precision"
FLAG_GRAPHS = "--graphs"
FLAG_OUT = "--out"
LOCK_FILE = ".build.lock"
# TensorRT (and its onnxruntime EP) fuse MatMul-Softmax-MatMul and parse opset <= 20 on Jetson (TensorRT 10.3);
# onnxruntime's CUDA EP needs the fused opset-23 Attention op to be fast and right at long sequences (NOTES §3b).
# onnxruntime CUDA runs its contrib MultiHeadAttention (flash kernels): on an H200 at klein-9b width it measured
# 0.94-1.05x PyTorch eager per row at full depth (extrapolated from 2 depths), the ONNX Attention op 1.19-1.34x
# (`sparse-context bench gpu`, reference/measured/). TensorRT parses neither: MatMul-Softmax-MatMul, which it fuses.
ATTENTION_BY_BACKEND = {"trt": "matmul", "ort-trt": "matmul", "ort-cuda": "mha", "ort-cpu": "matmul"}
# How the fused QKV/MLP projections are written (export.graphs.projection_form): "split" removes onnxruntime's
# Split copies. On an H200 at klein-9b width (`bench gpu`, two runs, reference/measured/) onnxruntime CUDA with
# split projections ran 0.83-0.91x PyTorch eager per row, with fused ones 0.91-0.97x: split is the ort-cuda default.
# TensorRT fuses its own layers, and the int8/fp8 recipes name the fused projections' layers: fused elsewhere.
PROJECTIONS = ("fused", "split")
PROJECTIONS_BY_BACKEND = {"ort-cuda": "split"}
# The kv graph's reference stream (export.graphs.ref_stream_form): "plain" removes its If guards (onnxruntime's fused
# RoPE and attention need them for 0 tokens); only ort-cuda's contrib attention has guards. Opt-in until `bench gpu`
# has timed it (variant mha-split-plain).
REF_STREAMS = ("guarded", "plain")
FLAG_REF_STREAM = "--ref-stream"
# The plain form's unfused reference attention holds (heads, N, N) scores, and their softmax, at the largest KV
# extract of the plan: fine at keep 0.10 (6 x 410 tokens at klein-9b: 0.4 GB), 39 GB at 6 dense references.
PLAIN_SCORES_LIMIT_BYTES = 2 << 30
QUANTIZED = ("int8", "fp8")
FLAG_PROJECTIONS = "--projections"
PARTS = ("text_encoder", "vae_encoder", "vae_decoder")
PART_PROFILE = "parts"  # the bucket name of a part engine's one profile (its step is the part's name)


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
    projections: str | None = None  # None: default_projections(backend, precision)
    ref_stream: str = "guarded"

    def __post_init__(self) -> None:
        if self.projections is None:
            object.__setattr__(self, "projections", default_projections(self.backend, self.precision))

    def _check_plain_scores(self) -> None:
        tokens = self.plan.max_ref_tokens
        scores = plain_scores_bytes(self.model_dir, self.precision, tokens)
        if scores > PLAIN_SCORES_LIMIT_BYTES:
            raise BuildOptionError(bad_value(
                f"reference stream form for a plan of up to {tokens} reference tokens", "plain",
                f"guarded: the plain form's unfused reference attention would hold {scores / 2**30:.1f} GiB of "
                f"scores per layer (at most {PLAIN_SCORES_LIMIT_BYTES / 2**30:g} GiB); or a plan with fewer reference "
                f"tokens ({FLAG_KEEPS}, {FLAG_MAX_REFS})", FLAG_REF_STREAM))

    def validate(self) -> "BuildRequest":
        check_backend_precision(self.backend, self.precision)
        if self.projections not in PROJECTIONS:
            raise BuildOptionError(bad_value("projection form", self.projections, " or ".join(PROJECTIONS),
                                             FLAG_PROJECTIONS))
        if self.ref_stream not in REF_STREAMS:
            raise BuildOptionError(bad_value("reference stream form", self.ref_stream, " or ".join(REF_STREAMS),
                                             FLAG_REF_STREAM))
        if self.ref_stream == "plain" and (ATTENTION_BY_BACKEND[self.backend] == "matmul"
                                           or self.precision in QUANTIZED):
            raise BuildOptionError(bad_value(f"reference stream form for {self.backend} {self.precision}", "plain",
                                             "guarded (plain removes the If guards of onnxruntime's fused attention: "
                                             "ort-cuda at fp32/fp16/bf16 only)", FLAG_REF_STREAM))
        if self.projections != "fused" and self.precision in QUANTIZED:
            raise BuildOptionError(bad_value(f"projection form for {self.precision}", self.projections, "fused (the "
                                             "quantization recipe names the fused projections' layers)",
                                             FLAG_PROJECTIONS))
        if self.precision in ("int8", "fp8"):
            from sparse_context.calibration.build import check_backend

            check_backend(self.precision, self.backend)
            if self.calibration is not None:
                self.calibration.validate()
        self.plan.validate()
        if self.ref_stream == "plain":
            self._check_plain_scores()
        # Inputs checked before the folder is created or anything heavy imported
        from sparse_context.engines.model_files import check_build_folder
        from sparse_context.export.model_folder import read_model_index, read_settings
        from sparse_context.runtime.limits import check_lora_scale

        read_model_index(self.model_dir)
        read_settings(self.model_dir)
        check_build_folder(self.model_dir)
        check_weight_files(self.lora, self.transformer_file)
        check_lora_scale(self.lora_scale)
        check_out_folder(self.out_dir)
        return self


def plain_scores_bytes(model_dir: Path, precision: str, ref_tokens: int) -> int:
    """Bytes of one (heads, N, N) score tensor of the plain reference attention at ``ref_tokens`` (heads from the
    folder's transformer config; 32, klein-9b's, when it has none)."""
    try:
        heads = int(json.loads((Path(model_dir) / "transformer" / "config.json").read_text())["num_attention_heads"])
    except (OSError, ValueError, KeyError, TypeError):
        heads = 32
    return heads * ref_tokens * ref_tokens * (4 if precision == "fp32" else 2)


def default_projections(backend: str, precision: str) -> str:
    """The projection form a build uses when ``--projections`` is not given: split for onnxruntime CUDA (measured
    faster), fused for TensorRT, the CPU and the quantized precisions."""
    return "fused" if precision in QUANTIZED else PROJECTIONS_BY_BACKEND.get(backend, "fused")


def check_backend_precision(backend: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise BuildOptionError(bad_value("backend", backend, ", ".join(BACKENDS), FLAG_BACKEND))
    if backend == "ort-cpu" and precision == "bf16":
        raise BuildOptionError(bad_value("precision for ort-cpu", "bf16", "fp32 or fp16 (onnxruntime CPU has no "
                                         "bfloat16 kernels)", FLAG_PRECISION))


def check_out_folder(out_dir: Path) -> None:
    """The engines folder is a folder, or can become one (nothing is created here)."""
    out_dir = Path(out_dir)
    existing = nearest_existing(out_dir, "engines folder", FLAG_OUT)
    if not existing.is_dir():
        raise BuildOptionError(bad_value("engines folder", str(out_dir), f"a folder ({existing} is a file)",
                                         FLAG_OUT))


def check_weight_files(lora: Path | None, transformer_file: Path | None) -> None:
    """The LoRA and the single-file transformer exist and are safetensors files (checked before any loading)."""
    from sparse_context.export.model_folder import check_safetensors

    for path, what, flag in ((lora, "LoRA file", FLAG_LORA), (transformer_file, "transformer checkpoint",
                                                                FLAG_TRANSFORMER)):
        if path is not None:
            if not Path(path).is_file():
                raise BuildOptionError(bad_value(what, str(path), "an existing .safetensors file", flag))
            check_safetensors(Path(path), what, flag)


def engine_input_shapes(spec: Any) -> dict[str, tuple[Any, ...]]:
    """The export spec's inputs with derived symbols spelled as sums, as ``engines.profiles`` reads them."""
    from sparse_context.export.spec import DERIVED_AXES

    spelled = {derived: " + ".join(parts) for derived, parts in DERIVED_AXES.items()}
    return {t.name: tuple(spelled.get(d, d) if isinstance(d, str) else d for d in t.shape) for t in spec.inputs}


def symbol_names(spec: Any) -> dict[str, str]:
    """This package's bucket symbols -> the export spec's (only the cached-reference axis is named differently)."""
    from sparse_context.export.spec import CACHED_REF_TOKENS

    return {CACHED_TOKENS: CACHED_REF_TOKENS}


def reference_resolutions(plan: BucketPlan) -> tuple[tuple[int, int], ...]:
    """(width, height) px the VAE encoder's profile covers: references of the plan's area at any aspect ratio
    from 1:2 to 2:1 (prepared references keep their photo's), down to one token. The transformer's buckets bound
    the tokens; this bounds the image sides."""
    width = max(TOKEN_PIXELS, plan.ref_resolution.width_px // TOKEN_PIXELS * TOKEN_PIXELS)
    height = max(TOKEN_PIXELS, plan.ref_resolution.height_px // TOKEN_PIXELS * TOKEN_PIXELS)
    side = max(TOKEN_PIXELS, math.isqrt(width * height // 2) // TOKEN_PIXELS * TOKEN_PIXELS)  # short side at 2:1
    return (width, height), (2 * side, side), (side, 2 * side), (TOKEN_PIXELS, TOKEN_PIXELS)


def target_resolutions(plan: BucketPlan) -> tuple[tuple[int, int], ...]:
    return tuple((r.width_px // TOKEN_PIXELS * TOKEN_PIXELS, r.height_px // TOKEN_PIXELS * TOKEN_PIXELS)
                 for r in plan.target_resolutions)


def part_profile(spec: Any) -> Profile:
    """The one optimization profile of a part engine: its export spec's min/opt/max."""
    return Profile(PART_PROFILE, spec.graph, tuple(spec.profile().items()))


def build_engines(request: BuildRequest, progress: Callable[[str, int, int], None] | None = None) -> EnginesIndex:
    """Export, plan profiles and build for ``request.backend``; write and return the ``engines.json`` index.

    Beside the transformer graphs: the text encoder (prompts up to the plan's text tokens), the VAE encoder
    (references of the plan's reference area) and decoder (its target resolutions), and the model's tokenizer
    and scheduler files, so the folder alone runs prompt + references -> image."""
    request = request.validate()
    if request.backend == "trt":  # before minutes of export: TensorRT and a GPU must be there to build for
        from sparse_context.engines.trt.loader import import_tensorrt
        from sparse_context.engines.trt.memory import default_memory

        import_tensorrt()
        default_memory().close()
    out_dir = Path(request.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BuildOptionError(bad_value("engines folder", str(out_dir), f"a folder that can be created and "
                                         f"written ({error.strerror or error})", FLAG_OUT)) from error
    with folder_lock(out_dir):
        return _build_locked(request, out_dir, progress)


@contextmanager
def folder_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``<out>/.build.lock`` (an advisory lock the kernel drops with the process, even on ``kill -9``), so
    two builds into one folder cannot interleave; the second is refused at once."""
    import fcntl

    path = out_dir / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as error:
        raise BuildOptionError(bad_value("engines folder", str(out_dir), f"a folder where the build can write its "
                                         f"lock file {LOCK_FILE} ({path}: {error.strerror})", FLAG_OUT)) from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise BuildOptionError(bad_value("engines folder", str(out_dir), f"a folder no other build is writing "
                                             f"(locked by {owner}; wait for it or choose another folder)",
                                             FLAG_OUT)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_locked(request: BuildRequest, out_dir: Path,
                  progress: Callable[[str, int, int], None] | None) -> EnginesIndex:
    from sparse_context.calibration.build import QUANTIZED_PRECISIONS, export_precision, quantize_for_build
    from sparse_context.export.exporter import ExportOptions, export_graphs

    plan = request.plan

    # 1. Export (reused when the same weights, LoRA and options were exported before)
    options = ExportOptions(
        model_dir=Path(request.model_dir), precision=export_precision(request.precision),
        attention=ATTENTION_BY_BACKEND[request.backend], projections=request.projections,
        ref_stream=request.ref_stream, lora=request.lora,
        lora_scale=request.lora_scale, transformer_file=request.transformer_file, max_ref_tokens=plan.max_ref_tokens,
        target_sizes=tuple((r.width_px, r.height_px) for r in plan.target_resolutions), text_tokens=plan.text_tokens,
        out_dir=out_dir / "onnx")
    exports = export_graphs(options, request.graphs, progress)
    calibration = None
    if request.precision in QUANTIZED_PRECISIONS:  # capture, quantize and gate; the build takes the Q/DQ graphs
        quantized = quantize_for_build(request, exports, _calibration_backend, progress)
        exports, calibration = quantized.exports, quantized.report

    # 2. One profile per bucket (and per KV step) for each graph; 3. the backend's build
    graphs: dict[str, GraphEntry] = {}
    for graph, exported in zip(request.graphs, exports):
        profiles = engine_profiles(plan, graph, engine_input_shapes(exported.spec), symbol_names(exported.spec))
        graphs[graph] = _graph_entry(request, graph, exported, profiles, out_dir, progress)

    # 4. The parts around the transformer: export, one profile each, the same backend build
    parts = _build_parts(request, out_dir, progress)
    steps = _build_steps(request, out_dir, progress)

    # 5. The index the runtime reads (paths relative to the folder, so it can be moved), with the model files it
    #    needs copied beside it
    from sparse_context.engines.runtime import read_model_settings

    files = copy_model_files(request.model_dir, out_dir)
    scheduler, is_distilled = read_model_settings(request.model_dir)
    index = EnginesIndex(
        backend=request.backend, model_dir=str(Path(request.model_dir).resolve()), precision=request.precision,
        attention=options.attention, plan=plan, graphs=graphs, providers=PROVIDERS.get(request.backend, ()),
        lora=str(Path(request.lora).resolve()) if request.lora else None,
        lora_sha256=file_sha256(request.lora) if request.lora else None,
        lora_scale=float(request.lora_scale) if request.lora else 1.0,
        transformer_file=str(Path(request.transformer_file).resolve()) if request.transformer_file else None,
        parts=parts, steps=steps, files=files, calibration=calibration,
        graph_optimization_level="basic" if calibration is not None else None,
        scheduler_config=scheduler, is_distilled=is_distilled, projections=options.projections,
        ref_stream=request.ref_stream)
    index.write(out_dir)
    return replace(index, folder=str(out_dir.resolve()))


def _inside(path: Path, folder: Path) -> str:
    """``path`` relative to the engines folder it was written into."""
    return Path(path).resolve().relative_to(Path(folder).resolve()).as_posix()


def build_command(index: EnginesIndex, out_dir: str | Path, **changes: Any) -> str:
    """The ``build_engines.py`` command that rebuilds ``index`` into ``out_dir`` with ``changes`` (keys: model,
    transformer, lora, lora_scale, precision, backend; None drops an option)."""
    values = {"model": index.model_dir, "transformer": index.transformer_file, "lora": index.lora,
              "lora_scale": index.lora_scale if index.lora else None, "backend": index.backend,
              "precision": index.precision}
    unknown = set(changes) - set(values)
    if unknown:
        raise BuildOptionError(bad_value("build_command changes", sorted(unknown), ", ".join(values)))
    values.update(changes)
    flags = {"model": FLAG_MODEL, "transformer": FLAG_TRANSFORMER, "lora": FLAG_LORA, "lora_scale": FLAG_LORA_SCALE,
             "backend": FLAG_BACKEND, "precision": FLAG_PRECISION}
    words = [REBUILD_PROGRAM]
    for key, flag in flags.items():
        if values[key] is not None and not (key == "lora_scale" and values["lora"] is None):
            words += [flag, f"{values[key]:g}" if isinstance(values[key], float) else str(values[key])]
    graphs = sorted(index.graphs)
    if graphs != ["full", "kv"]:
        words += [FLAG_GRAPHS, *graphs]
    projections = "fused" if values["precision"] in QUANTIZED else index.projections
    if projections != default_projections(values["backend"], values["precision"]):
        words += [FLAG_PROJECTIONS, projections]
    if index.ref_stream != "guarded" and ATTENTION_BY_BACKEND.get(values["backend"]) != "matmul" and \
            values["precision"] not in QUANTIZED:
        words += [FLAG_REF_STREAM, index.ref_stream]
    words += [*index.plan.build_args(), FLAG_OUT, str(out_dir)]
    return " ".join(words)


def _build_parts(request: BuildRequest, out_dir: Path,
                 progress: Callable[[str, int, int], None] | None) -> dict[str, GraphEntry]:
    # The text encoder and VAE stay unquantized (int8/fp8 builds quantize the transformer graphs only).
    from sparse_context.calibration.build import export_precision
    from sparse_context.export.part_exporter import export_parts

    plan = request.plan
    exports = export_parts(request.model_dir, out_dir / "onnx", reference_resolutions(plan),
                           target_resolutions(plan), text_tokens=plan.text_tokens,
                           precision=export_precision(request.precision),
                           parts=PARTS, progress=progress)
    return {part: _graph_entry(request, part, exported, (part_profile(exported.spec),), out_dir, progress)
            for part, exported in exports.items()}


STEP_BUCKET = "steps"  # the bucket name of a step engine's one profile (its step is the graph's name)


@dataclass(frozen=True)
class StepExport:
    """A step graph written into the engines folder, shaped like an export result for the engine build."""

    path: Path
    manifest: Mapping[str, Any]
    reused: bool


def _build_steps(request: BuildRequest, out_dir: Path,
                 progress: Callable[[str, int, int], None] | None) -> dict[str, GraphEntry]:
    """TensorRT engines of the sampler's step graphs (``engines.step_graphs``: the Euler step on float32 noise and
    on latents, the guidance mix) for the transformer's velocity dtype, one profile over every target size of the
    plan: the TensorRT backend then keeps latents on the GPU through a generation. Only for ``--backend trt`` and
    fp32/fp16 velocities (bf16 has no numpy dtype for the host step these graphs equal)."""
    import numpy as np

    from sparse_context.calibration.build import export_precision
    from sparse_context.engines.step_graphs import step_models, step_shapes
    from sparse_context.export.spec import NUMPY_DTYPES

    dtype = NUMPY_DTYPES.get(export_precision(request.precision))
    if request.backend != "trt" or dtype is None:
        return {}
    config = json.loads((Path(request.model_dir) / "transformer" / "config.json").read_text())
    max_tokens = max((r.width_px // TOKEN_PIXELS) * (r.height_px // TOKEN_PIXELS)
                     for r in request.plan.target_resolutions)
    folder = out_dir / "onnx" / "steps"
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, model in step_models(dtype).items():
        path = folder / f"{name}-{np.dtype(dtype).name}.onnx"
        digest = hashlib.sha256(model).hexdigest()
        reused = path.is_file() and file_sha256(path) == digest
        if not reused:
            atomic_write_bytes(path, model)
        shapes = step_shapes(name, max_tokens, int(config["in_channels"]))
        profile = Profile(STEP_BUCKET, name, tuple(shapes.items()))
        entries[name] = _graph_entry(request, name, StepExport(path, {"onnx_sha256": digest}, reused), (profile,),
                                     out_dir, progress)
    return entries


def _graph_entry(request: BuildRequest, graph: str, exported: Any, profiles: Sequence[Profile], out_dir: Path,
                 progress: Callable[[str, int, int], None] | None) -> GraphEntry:
    """The backend's build of one export (a TensorRT engine, or the TensorRT EP's options) and its index entry,
    paths inside the engines folder."""
    engine = provider_options = None
    if request.backend == "trt":
        engine = _inside(_build_trt(request, graph, exported, profiles, progress), out_dir)
    elif request.backend == "ort-trt":
        provider_options = ort_trt_provider_options(profiles, Path("ort-trt-cache") / graph)
    return GraphEntry(onnx=_inside(exported.path, out_dir), onnx_sha256=exported.manifest["onnx_sha256"],
                      profiles=tuple(p.to_json() for p in profiles), reused_export=exported.reused, engine=engine,
                      provider_options=provider_options)


def _calibration_backend(paths: Mapping[str, Path], quantized: bool) -> Any:
    """onnxruntime on ``{graph: model.onnx}`` for calibration: CUDA where this onnxruntime has it, else the CPU;
    Q/DQ graphs at the basic optimisation level (see ``calibration.quantize.basic_session_options``)."""
    import onnxruntime as ort

    from sparse_context.calibration.quantize import basic_session_options
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    providers = (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]
    # Host steps: capture records every call's inputs as host arrays anyway.
    return OrtTransformerBackend(providers=providers, session_options=basic_session_options() if quantized else None,
                                 device_steps=False, **paths)


def _build_trt(request: BuildRequest, graph: str, exported: Any, profiles: Sequence[Profile],
               progress: Callable[[str, int, int], None] | None) -> Path:
    from sparse_context.engines.trt.memory import default_memory
    from sparse_context.engines.manifest import EngineManifest, engine_cache_path, find_cached_engine, recipe_sha256
    from sparse_context.engines.trt.loader import build_engine, import_tensorrt

    trt = import_tensorrt()
    memory = default_memory()
    try:
        device = memory.device_info()
    finally:
        memory.close()
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
                 timing_cache_path=request.out_dir / "trt" / timing_cache_name(trt.__version__, capability),
                 progress=_trt_progress(graph, progress) if progress else None)
    return engine_path


def timing_cache_name(tensorrt_version: str, compute_capability: str) -> str:
    """One timing cache per TensorRT version and GPU architecture: a cache holds kernel timings of one GPU, and
    TensorRT refuses another's, so an engines folder built on two machines keeps one for each."""
    safe = lambda text: "".join(c if c.isalnum() or c in ".-" else "_" for c in str(text))
    return f"timing-trt{safe(tensorrt_version)}-sm{safe(compute_capability).replace('.', '')}.cache"


def _trt_progress(graph: str, progress: Callable[[str, int, int], None]) -> Callable[[Any], None]:
    """TensorRT phase events -> the ``(stage, done, total)`` progress of the rest of the build."""
    def report(event: Any) -> None:
        if event.kind == "step" and event.num_steps:
            progress(f"trt {graph}: {event.phase}", event.step, event.num_steps)

    return report
