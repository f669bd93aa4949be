"""Export the (LoRA-merged) FLUX.2-klein transformer to ONNX: full graph and/or the single-weight-copy KV graph.

Steps: check options -> hash inputs (cache key) -> reuse a complete earlier export, or load, merge, trace with
``torch.onnx.export(dynamo=True)`` into a staging folder, check the graph, write the manifest and rename the folder
into place. Only a folder that went through every step carries the final name, so an interrupted export can never be
taken for a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparse_context.export.errors import ExportConfigError, ExportError
from sparse_context.export.graphs import (
    ATTENTION_FORMS, PROJECTION_FORMS, REF_STREAM_FORMS, FullGraph, KVGraph, attention_form, projection_form,
    ref_stream_form,
)
from sparse_context.export.spec import (
    DEFAULT_MAX_REF_TOKENS, DEFAULT_TARGET_SIZES, GRAPHS, PRECISIONS, ExportSpec, ModelDims, build_spec,
    example_sizes,
)
from sparse_context.export.manifest import FORMAT_VERSION, MANIFEST, ONNX_FILE, read_export_manifest
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.files import replace_folder
from sparse_context.runtime.fingerprints import file_sha256, file_sha256_memo

EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB cap, with room for the graph itself
DEFAULT_OPSET = {"matmul": 19, "fused": 23, "mha": 23}
# matmul: TensorRT 10.3 parses up to 20; Attention is 23; the contrib op (mha) is independent of the opset.
OPSET_RANGE = {"matmul": (18, 20), "fused": (23, 23), "mha": (18, 23)}
DEFAULT_TEXT_TOKENS = 512  # Klein pads prompts to max_sequence_length=512

Progress = Callable[[str, int, int], None]  # (stage, step, total steps)
STAGES = ("hash", "load", "trace", "save", "check", "manifest")


@dataclass(frozen=True)
class ExportOptions:
    model_dir: Path
    graph: str = "kv"
    precision: str = "fp16"
    attention: str = "matmul"
    projections: str = "fused"  # "split": one matrix product per slice of a fused projection (graphs.projection_form)
    ref_stream: str = "guarded"  # "plain": the kv graph's reference RoPE/attention without If nodes (ref_stream_form)
    opset: int | None = None  # None: DEFAULT_OPSET of the attention form
    lora: Path | None = None
    lora_scale: float = 1.0
    transformer_file: Path | None = None
    max_ref_tokens: int = DEFAULT_MAX_REF_TOKENS
    target_sizes: tuple[tuple[int, int], ...] = DEFAULT_TARGET_SIZES
    text_tokens: int | None = None  # None: the folder's max_sequence_length (sparse_context.json) or 512
    out_dir: Path = Path("onnx")

    @property
    def graph_ref_stream(self) -> str:
        """The reference stream form this graph is traced with: 'plain' only changes the kv graph's fused forms
        (the full graph attends jointly, and MatMul attention has no guards), so the full graph is shared."""
        plain = self.ref_stream == "plain" and self.graph == "kv" and self.attention != "matmul"
        return "plain" if plain else "guarded"

    @property
    def resolved_opset(self) -> int:
        return int(self.opset if self.opset is not None else DEFAULT_OPSET.get(self.attention, 19))

    def validate(self) -> "ExportOptions":
        """Raise ExportConfigError for the first option out of range; no side effects."""
        if self.graph not in GRAPHS:
            raise ExportConfigError(bad_value("graph", self.graph, " or ".join(GRAPHS), "--graph"))
        if self.precision not in PRECISIONS:
            raise ExportConfigError(bad_value("precision", self.precision, " or ".join(PRECISIONS), "--precision"))
        if self.attention not in ATTENTION_FORMS:
            raise ExportConfigError(bad_value("attention form", self.attention, " or ".join(ATTENTION_FORMS),
                                              "--attention"))
        if self.projections not in PROJECTION_FORMS:
            raise ExportConfigError(bad_value("projection form", self.projections, " or ".join(PROJECTION_FORMS),
                                              "--projections"))
        if self.ref_stream not in REF_STREAM_FORMS:
            raise ExportConfigError(bad_value("reference stream form", self.ref_stream, " or ".join(REF_STREAM_FORMS),
                                              "--ref-stream"))
        low, high = OPSET_RANGE[self.attention]
        if not low <= self.resolved_opset <= high:
            raise ExportConfigError(bad_value(f"opset for --attention {self.attention}", self.resolved_opset,
                                              f"{low}..{high}", "--opset"))
        if self.lora is not None and not Path(self.lora).is_file():
            raise ExportConfigError(bad_value("LoRA file", str(self.lora), "an existing .safetensors file", "--lora"))
        for width, height in self.target_sizes:  # the example shapes: whole 16-px tokens, as every runtime size
            if min(width, height) < 16 or width % 16 or height % 16:
                raise ExportConfigError(bad_value("target size", f"{width}x{height}", "WIDTHxHEIGHT of whole 16-px "
                                                  "tokens, at least 16x16 (e.g. 1024x1024)", "--target-size"))
        return self


@dataclass
class ExportResult:
    path: Path  # the .onnx file
    manifest: dict[str, Any]
    reused: bool
    spec: ExportSpec = field(repr=False, default=None)


def _report(progress: Progress | None, stage: str) -> None:
    if progress is not None:
        progress(stage, STAGES.index(stage) + 1, len(STAGES))


def _sha256(path: Path) -> str:
    """file_sha256, remembered per file identity across processes: a 9B checkpoint takes a minute to hash, and a
    multi-graph export (or the next build) asks for it again."""
    return file_sha256_memo(path)


def weights_sha256(model_dir: Path, transformer_file: Path | None) -> str:
    """sha256 over the transformer folder's files (names and bytes) and the single-file checkpoint if given."""
    digest = hashlib.sha256()
    folder = Path(model_dir) / "transformer"
    if not folder.is_dir():
        raise ExportConfigError(bad_value("model folder", str(model_dir), "a diffusers folder with transformer/",
                                          "--model"))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(_sha256(path).encode())
    if transformer_file is not None:
        digest.update(b"single-file:" + _sha256(Path(transformer_file)).encode())
    return digest.hexdigest()


def exporter_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxscript
    import torch

    from sparse_context import __version__

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "diffusers": diffusers.__version__, "sparse_context": __version__, "format": str(FORMAT_VERSION)}


def load_transformer(options: ExportOptions) -> tuple[Any, dict[str, Any]]:
    """The fp32 transformer of the folder, with the single-file checkpoint and the LoRA applied, in eval mode.

    Only the transformer is loaded (``load_pipeline`` would also load the multi-GB text encoder and VAE, which the
    export never touches); the folder check, checkpoint loading and LoRA merge are the reference loaders'.
    """
    import torch
    from diffusers import Flux2Transformer2DModel

    from sparse_context.export.loading import check_module_weights, load_transformer_file, read_model_index
    from sparse_context.export.lora import merge_lora
    from sparse_context.runtime.errors import ModelLoadError

    read_model_index(options.model_dir)
    try:
        transformer = Flux2Transformer2DModel.from_pretrained(str(options.model_dir), subfolder="transformer",
                                                              use_safetensors=True,
                                                              torch_dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the transformer of {options.model_dir}: {error} (check --model)") \
            from error
    check_module_weights(transformer, "transformer", options.model_dir)
    if options.transformer_file is not None:
        load_transformer_file(transformer, options.transformer_file)
    lora_info = merge_lora(transformer, options.lora, options.lora_scale) if options.lora is not None else None
    return transformer.eval(), {"lora": lora_info}


def text_tokens_for(options: ExportOptions) -> int:
    from sparse_context.export.loading import read_settings

    if options.text_tokens is not None:
        return int(options.text_tokens)
    return int(read_settings(options.model_dir).get("max_sequence_length", DEFAULT_TEXT_TOKENS))


def spec_for(options: ExportOptions, config: dict[str, Any]) -> ExportSpec:
    return build_spec(options.graph, options.precision, ModelDims.from_config(config), text_tokens_for(options),
                      options.target_sizes, options.max_ref_tokens)


def cache_key(options: ExportOptions, spec: ExportSpec, weights: str, lora: str | None) -> str:
    blob = {"weights": weights, "lora": lora, "lora_scale": options.lora_scale if lora else None,
            "attention": options.attention, "opset": options.resolved_opset, "spec": spec.to_json(),
            "versions": exporter_versions()}
    if options.projections != "fused":  # keys of the default form stay what they were
        blob["projections"] = options.projections
    if options.graph_ref_stream != "guarded":
        blob["ref_stream"] = options.graph_ref_stream
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _final_dir(options: ExportOptions, key: str) -> Path:
    split = "-split" if options.projections == "split" else ""
    split += "-plain" if options.graph_ref_stream == "plain" else ""
    name = f"{options.graph}-{options.precision}-{options.attention}{split}-op{options.resolved_opset}-{key[:16]}"
    return Path(options.out_dir) / name


def _load_complete(folder: Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete export for ``key`` in ``folder``, or None (missing, foreign, damaged)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("cache_key") != key:
        return None
    for name, info in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != info.get("bytes"):
            return None
    return manifest


def _trace(transformer: Any, spec: ExportSpec, options: ExportOptions, path: Path) -> None:
    import torch

    from sparse_context.export.spec import ROPE_TOKENS, TEXT_TARGET_TOKENS

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec.precision]
    if transformer.dtype != dtype:
        transformer = transformer.to(dtype)
    module = (FullGraph if spec.graph == "full" else KVGraph)(transformer).eval()
    sizes = example_sizes(spec)
    feeds = spec.sample_inputs(sizes, seed=0)
    tensors = [torch.from_numpy(feeds[t.name].astype("float32")).to(torch.float32 if t.float32 else dtype)
               for t in spec.inputs]
    dims: dict[str, Any] = {}
    for bound in spec.bounds:
        # Dims are only hints to the dynamo exporter (it relaxes them to Dim.DYNAMIC); the names become dim_params.
        dims[bound.symbol] = torch.export.Dim(bound.symbol, min=0, max=max(bound.max, sizes.get(bound.symbol, 0) + 1))
    for symbol in (ROPE_TOKENS, TEXT_TARGET_TOKENS):
        dims[symbol] = torch.export.Dim(symbol, min=1)
    shapes = [{axis: dims[symbol] for axis, symbol in t.dynamic_axes().items()} or None for t in spec.inputs]
    args, dynamic_shapes = _forward_arguments(spec, tensors), _forward_arguments(spec, shapes)
    with torch.no_grad(), attention_form(options.attention), projection_form(options.projections), \
            ref_stream_form(options.graph_ref_stream):
        try:
            program = torch.onnx.export(module, args, dynamo=True, opset_version=options.resolved_opset,
                                        dynamic_shapes=dynamic_shapes, input_names=spec.input_names,
                                        output_names=spec.output_names, verbose=False,
                                        custom_translation_table=_translations(options.attention))
        except Exception as error:  # the exporter raises many internal types; wrap with what was being exported
            raise ExportError(f"torch.onnx.export failed for the {spec.graph} graph ({options.attention} attention, "
                              f"opset {options.resolved_opset}, {spec.precision}): {error}") from error
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_LIMIT)


def _forward_arguments(spec: ExportSpec, flat: list[Any]) -> tuple[Any, ...]:
    """``flat`` (one entry per spec input, in order) as the graph module's ``forward`` takes them: the kv graph's
    per-layer K/V as two lists (keys, values), which the exporter flattens back into one input per layer."""
    if spec.graph != "kv":
        return tuple(flat)
    layers = spec.dims.num_layers
    head = len(flat) - 2 * layers
    return (*flat[:head], list(flat[head:head + layers]), list(flat[head + layers:]))


def _translations(attention: str) -> dict[Any, Any] | None:
    if attention != "mha":
        return None
    from sparse_context.export.ort_attention import translation_table

    return translation_table()


def export_onnx(options: ExportOptions, progress: Progress | None = None, transformer: Any = None) -> ExportResult:
    """Export one graph (``options.graph``) or reuse the cached export of the same inputs; see the module doc.

    ``transformer``: an already loaded transformer (the same weights/LoRA the options name) to skip loading; it is
    cast in place to the export precision. The cache key still hashes the files.
    """
    # 1. Options and cache key
    options.validate()
    _report(progress, "hash")
    from sparse_context.export.loading import read_model_index

    read_model_index(options.model_dir)
    config = json.loads((Path(options.model_dir) / "transformer" / "config.json").read_text())
    spec = spec_for(options, config)
    weights = weights_sha256(options.model_dir, options.transformer_file)
    lora_sha = file_sha256(options.lora) if options.lora is not None else None
    key = cache_key(options, spec, weights, lora_sha)
    final = _final_dir(options, key)
    manifest = _load_complete(final, key)
    if manifest is not None:
        return ExportResult(final / ONNX_FILE, manifest, reused=True, spec=spec)

    # 2. Load and trace into a staging folder next to the final one (same filesystem, so the rename is atomic)
    _report(progress, "load")
    lora_info = None
    if transformer is None:
        transformer, info = load_transformer(options)
        lora_info = info["lora"]
    Path(options.out_dir).mkdir(parents=True, exist_ok=True)
    remove_abandoned_staging(Path(options.out_dir))
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{final.name}-", dir=options.out_dir))
    try:
        _report(progress, "trace")
        _trace(transformer, spec, options, staging / ONNX_FILE)
        _report(progress, "save")
        # 3. Checks
        _report(progress, "check")
        from sparse_context.export.checks import check_graph

        summary = check_graph(staging / ONNX_FILE, spec, for_tensorrt=options.attention == "matmul")
        # 4. Manifest last: its presence marks the folder complete
        _report(progress, "manifest")
        # remembered per file identity, which the rename below keeps: loading the export does not hash it again
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256_memo(p)} for p in sorted(staging.iterdir())}
        manifest = {
            "cache_key": key, "graph": spec.graph, "precision": spec.precision, "attention": options.attention,
            "projections": options.projections, "ref_stream": options.graph_ref_stream,
            "opset": summary["opset"], "for_tensorrt": options.attention == "matmul", "ops": summary["ops"],
            "files": files, "onnx_sha256": files[ONNX_FILE]["sha256"], "base_weights_sha256": weights,
            "lora": {"sha256": lora_sha, "scale": options.lora_scale, **(lora_info or {})} if lora_sha else None,
            "model_config": config, "spec": spec.to_json(), "dynamic_axes": spec.dynamic_axes(),
            "versions": exporter_versions(),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        replace_folder(staging, final)  # an older folder there failed _load_complete (damaged)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(final / ONNX_FILE, manifest, reused=False, spec=spec)


STAGING_PREFIX = ".staging-"


def remove_abandoned_staging(folder: Path) -> list[Path]:
    """Delete staging folders whose exporting process is gone (``kill -9``, a power cut): at 9B each holds 18 GB.
    A staging folder is named ``.staging-<pid>-...``; one of a live process (or of an unknown one) is left alone."""
    removed = []
    for path in folder.glob(f"{STAGING_PREFIX}*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def export_graphs(options: ExportOptions, graphs: tuple[str, ...] = ("full", "kv"),
                  progress: Progress | None = None) -> list[ExportResult]:
    """Export several graphs of the same model (same precision), loading and merging the weights at most once."""
    results, loaded = [], None
    for graph in graphs:
        graph_options = _replace(options, graph=graph)
        if loaded is None and not is_cached(graph_options):
            loaded, _ = load_transformer(graph_options.validate())
        results.append(export_onnx(graph_options, progress, transformer=loaded))
    return results


def is_cached(options: ExportOptions) -> bool:
    """Whether a complete export for these options is already in ``options.out_dir``."""
    from sparse_context.export.loading import read_model_index

    options.validate()
    read_model_index(options.model_dir)
    config = json.loads((Path(options.model_dir) / "transformer" / "config.json").read_text())
    spec = spec_for(options, config)
    lora_sha = file_sha256(options.lora) if options.lora is not None else None
    key = cache_key(options, spec, weights_sha256(options.model_dir, options.transformer_file), lora_sha)
    return _load_complete(_final_dir(options, key), key) is not None


def _replace(options: ExportOptions, **changes: Any) -> ExportOptions:
    from dataclasses import replace

    return replace(options, **changes)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest next to an exported ``model.onnx`` (or in the export folder given)."""
    return read_export_manifest(path)
