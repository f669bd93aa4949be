"""Export one part graph (VAE encoder, VAE decoder, text encoder) the way the transformer is exported.

Steps: check options -> hash the part's weight folder and the spec (cache key) -> reuse a complete earlier export,
or load, trace with ``torch.onnx.export(dynamo=True)`` into a staging folder, check the graph, write the manifest and
rename the folder into place. The staging, manifest and reuse rules are the transformer exporter's
(:mod:`~sparse_context.export.exporter`), so a part folder is complete exactly when its manifest says so.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from sparse_context.export.errors import ExportConfigError, ExportError
from sparse_context.export.exporter import (
    EXTERNAL_DATA_LIMIT, MANIFEST, ONNX_FILE, ExportResult, Progress, _load_complete, _report, _sha256,
    exporter_versions,
)
from sparse_context.export.part_specs import PIXEL_AXES, PartSpec, example_sizes, sample_inputs
from sparse_context.runtime.fingerprints import file_sha256
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.files import replace_folder
from sparse_context.runtime.tokens import TOKEN_PIXELS

DEFAULT_PART_OPSET = 19
PART_OPSET_RANGE = (18, 20)  # TensorRT 10.3 parses up to opset 20; dynamo writes nothing older than 18
SUBFOLDERS = {"vae_encoder": "vae", "vae_decoder": "vae", "text_encoder": "text_encoder"}


def check_opset(opset: int) -> int:
    low, high = PART_OPSET_RANGE
    if not low <= int(opset) <= high:
        raise ExportConfigError(bad_value("opset", opset, f"{low}..{high}", "--opset"))
    return int(opset)


def folder_sha256(model_dir: str | Path, subfolder: str) -> str:
    """sha256 over a component folder's files (relative names and bytes), as the transformer's weights hash."""
    folder = Path(model_dir) / subfolder
    if not folder.is_dir():
        raise ExportConfigError(bad_value("model folder", str(model_dir), f"a diffusers folder with {subfolder}/",
                                          "--model"))
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(_sha256(path).encode())
    return digest.hexdigest()


def part_cache_key(spec: PartSpec, weights: str, opset: int) -> str:
    blob = {"part": spec.graph, "weights": weights, "opset": int(opset), "spec": spec.to_json(),
            "versions": exporter_versions()}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def part_dir(out_dir: str | Path, spec: PartSpec, opset: int, key: str) -> Path:
    return Path(out_dir) / f"{spec.graph}-{spec.precision}-op{int(opset)}-{key[:16]}"


def graph_dim(symbol: str) -> str:
    """The dim_param written for a spec symbol: pixel axes keep the exporter's ``16*latent_rows`` form, which says
    how they relate to the latent axes."""
    return f"{TOKEN_PIXELS}*{PIXEL_AXES[symbol]}" if symbol in PIXEL_AXES else symbol


def _dynamic_shapes(spec: PartSpec, sizes: dict[str, int]) -> tuple[dict[int, Any] | None, ...]:
    import torch

    dims = {b.symbol: torch.export.Dim(b.symbol, min=1, max=max(b.max, sizes[b.symbol]))
            for b in spec.bounds}
    for pixel, latent in PIXEL_AXES.items():
        if latent in dims:
            # Derived: the image axes are whole tokens, so the exporter never has to guard divisibility.
            dims[pixel] = TOKEN_PIXELS * dims[latent]
    return tuple({axis: dims[symbol] for axis, symbol in t.dynamic_axes().items()} or None for t in spec.inputs)


def _name_dims(program: Any, spec: PartSpec) -> None:
    """Give every dynamic input/output axis its spec name; the exporter names output axes like ``s59``."""
    import onnx_ir as ir

    declared = {t.name: t for t in spec.inputs + spec.outputs}
    for value in list(program.model.graph.inputs) + list(program.model.graph.outputs):
        tensor = declared.get(value.name)
        if tensor is None or value.shape is None:
            continue
        dims = [graph_dim(d) if isinstance(d, str) else value.shape[axis] for axis, d in enumerate(tensor.shape)]
        value.shape = ir.Shape(dims)


def trace_part(module: Any, spec: PartSpec, opset: int, path: Path) -> None:
    """Trace ``module`` (inputs in spec order) at :func:`example_sizes` and save it to ``path``."""
    import torch

    sizes = example_sizes(spec)
    feeds = sample_inputs(spec, sizes, seed=0)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=int(opset),
                                        dynamic_shapes=_dynamic_shapes(spec, sizes), input_names=spec.input_names,
                                        output_names=spec.output_names, verbose=False)
        except Exception as error:  # the exporter raises many internal types; say what was being exported
            raise ExportError(f"torch.onnx.export failed for the {spec.graph} graph (opset {opset}, "
                              f"{spec.precision}): {error}") from error
    _name_dims(program, spec)
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_LIMIT)


def export_part(spec: PartSpec, model_dir: str | Path, out_dir: str | Path, load_module: Callable[[], Any],
                opset: int = DEFAULT_PART_OPSET, progress: Progress | None = None,
                extra_manifest: dict[str, Any] | None = None) -> ExportResult:
    """Export ``spec.graph`` of the folder's part (``load_module()`` builds the fp32 torch module), or reuse the
    cached export with the same weights, spec, opset and exporter versions."""
    # 1. Cache key
    check_opset(opset)
    _report(progress, "hash")
    weights = folder_sha256(model_dir, SUBFOLDERS[spec.graph])
    key = part_cache_key(spec, weights, opset)
    final = part_dir(out_dir, spec, opset, key)
    manifest = _load_complete(final, key)
    if manifest is not None:
        return ExportResult(final / ONNX_FILE, manifest, reused=True, spec=spec)

    # 2. Load and trace into a staging folder next to the final one (same filesystem: the rename is atomic)
    _report(progress, "load")
    module = load_module()
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=out_dir))
    try:
        _report(progress, "trace")
        trace_part(module, spec, opset, staging / ONNX_FILE)
        _report(progress, "save")
        # 3. Checks: axes symbolic where declared, no float64, ONNX-valid, TensorRT 10.3 operators
        _report(progress, "check")
        from sparse_context.export.checks import check_graph

        summary = check_graph(staging / ONNX_FILE, spec, for_tensorrt=True)
        # 4. Manifest last: its presence marks the folder complete
        _report(progress, "manifest")
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(staging.iterdir())}
        config_path = Path(model_dir) / SUBFOLDERS[spec.graph] / "config.json"
        manifest = {
            "cache_key": key, "graph": spec.graph, "precision": spec.precision, "opset": summary["opset"],
            "for_tensorrt": True, "ops": summary["ops"], "files": files, "onnx_sha256": files[ONNX_FILE]["sha256"],
            "weights_sha256": weights, "model_dir": str(Path(model_dir).resolve()),
            "model_config": json.loads(config_path.read_text()) if config_path.is_file() else None,
            "spec": spec.to_json(), "dynamic_axes": spec.dynamic_axes(), "profile": spec.profile(),
            "versions": exporter_versions(), **(extra_manifest or {}),
        }
        text = json.dumps(manifest, indent=2, default=str)
        manifest = json.loads(text)  # the same lists-not-tuples form a reused export reads back
        (staging / MANIFEST).write_text(text)
        replace_folder(staging, final)  # an older folder there failed _load_complete (damaged)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(final / ONNX_FILE, manifest, reused=False, spec=spec)


def is_part_cached(spec: PartSpec, model_dir: str | Path, out_dir: str | Path,
                   opset: int = DEFAULT_PART_OPSET) -> bool:
    """Whether a complete export of ``spec`` for this folder is already in ``out_dir``."""
    key = part_cache_key(spec, folder_sha256(model_dir, SUBFOLDERS[spec.graph]), check_opset(opset))
    return _load_complete(part_dir(out_dir, spec, opset, key), key) is not None


def export_parts(model_dir: str | Path, out_dir: str | Path, reference_resolutions: Any = None,
                 target_resolutions: Any = None, text_tokens: int | None = None, precision: str = "fp32",
                 opset: int = DEFAULT_PART_OPSET, parts: tuple[str, ...] = ("text_encoder", "vae_encoder",
                                                                             "vae_decoder"),
                 progress: Progress | None = None) -> dict[str, ExportResult]:
    """Export (or reuse) several parts of one folder, loading the VAE at most once. Resolutions default to the
    part specs' (references up to 1024^2 px area, 512^2 and 1024^2 px targets); ``text_tokens`` to the folder's
    max_sequence_length."""
    from sparse_context.export.part_specs import (
        DEFAULT_REFERENCE_RESOLUTIONS, DEFAULT_TARGET_RESOLUTIONS, vae_decoder_spec, vae_encoder_spec,
    )
    from sparse_context.export.text_encoder import export_text_encoder
    from sparse_context.export.vae import export_vae_decoder, export_vae_encoder, load_vae

    unknown = [p for p in parts if p not in SUBFOLDERS]
    if unknown:
        raise ExportConfigError(bad_value("parts", unknown, ", ".join(SUBFOLDERS)))
    references = tuple(reference_resolutions or DEFAULT_REFERENCE_RESOLUTIONS)
    targets = tuple(target_resolutions or DEFAULT_TARGET_RESOLUTIONS)
    specs = {"vae_encoder": lambda: vae_encoder_spec(references, precision),
             "vae_decoder": lambda: vae_decoder_spec(targets, precision)}
    vae_parts = [p for p in parts if p in specs]
    vae = None
    if any(not is_part_cached(specs[p](), model_dir, out_dir, opset) for p in vae_parts):
        vae = load_vae(model_dir, precision)
    results = {}
    for part in parts:
        if part == "text_encoder":
            results[part] = export_text_encoder(model_dir, out_dir, text_tokens, precision=precision, opset=opset,
                                                progress=progress)
        elif part == "vae_encoder":
            results[part] = export_vae_encoder(model_dir, out_dir, references, precision, opset, progress=progress,
                                               vae=vae)
        else:
            results[part] = export_vae_decoder(model_dir, out_dir, targets, precision, opset, progress=progress,
                                               vae=vae)
    return results
