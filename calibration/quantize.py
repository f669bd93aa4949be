"""ModelOpt ONNX post-training quantization of an exported graph on captured calibration inputs.

``modelopt`` and ``onnxruntime`` are imported inside the functions. Calibration runs on onnxruntime's CUDA
provider when this onnxruntime has one, else on the CPU. The output folder has the export's layout
(``model.onnx`` + ``manifest.json``), so every onnxruntime/TensorRT loader reads it as it reads an export; its
manifest adds ``quantization`` (mode, recipe and its hash, capture key, excluded nodes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

from sparse_context.calibration.capture import Capture
from sparse_context.calibration.errors import CalibrationError, QuantizationUnavailableError
from sparse_context.calibration.recipe import FLAG_EXCLUDE, QuantRecipe

ONNX_FILE = "model.onnx"
MANIFEST = "manifest.json"
EXTERNAL_DATA_LIMIT = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB cap
INSTALL_HINT = 'pip install "sparse-context[quantization]"'


def import_modelopt_quantize() -> Any:
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as error:
        raise QuantizationUnavailableError(f"NVIDIA ModelOpt is not installed ({error}); {INSTALL_HINT}") from None
    return quantize


def calibration_providers() -> list[str]:
    """ModelOpt's execution-provider names: CUDA first where this onnxruntime has it, the CPU always."""
    import onnxruntime as ort

    return (["cuda:0"] if "CUDAExecutionProvider" in ort.get_available_providers() else []) + ["cpu"]


class CaptureReader:
    """onnxruntime's ``CalibrationDataReader`` interface over one graph's calibration records, read lazily
    (ModelOpt also asks for the first record up front and may rewind)."""

    def __init__(self, capture: Capture, graph: str):
        self.capture = capture
        self.records = capture.records(graph, "calibration")
        if not self.records:
            held = sorted({r["graph"] for r in capture.manifest["records"] if r["split"] == "calibration"})
            raise CalibrationError(f"capture {capture.folder} has no calibration records of the {graph} graph (it "
                                   f"holds: {', '.join(held) or 'none'}); capture it with that graph in --graphs")
        self._iterator: Iterator[Mapping[str, Any]] = iter(self.records)

    def get_next(self) -> dict | None:
        record = next(self._iterator, None)
        return None if record is None else self.capture.feeds(record)

    def get_first(self) -> dict:
        return self.capture.feeds(self.records[0])

    def rewind(self) -> None:
        self._iterator = iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


def scale_activation_ranges(model: Any, factor: float) -> int:
    """Multiply the scale of every activation QuantizeLinear (input not a weight) by ``factor``: ranges shrink,
    and values beyond them clip. Returns how many scales changed."""
    import numpy as np
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    changed = set()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers or node.input[1] in changed:
            continue
        scale = initializers.get(node.input[1])
        if scale is None:
            continue
        value = numpy_helper.to_array(scale)
        scale.CopyFrom(numpy_helper.from_array((value * np.asarray(factor, value.dtype)).astype(value.dtype),
                                               scale.name))
        changed.add(node.input[1])
    return len(changed)


# ModelOpt matches node names as regular expressions from the start of the name (re.match), so excluding the
# exporter's "node_linear" (which its own GEMV check does) also excludes "node_linear_11" and every other linear
# layer: nothing gets quantized. A terminator no name contains makes every name match only itself.
NAME_END = "/"


def terminated_copy(source: Path) -> Path:
    """``source`` with NAME_END appended to every node name, written beside it (external weights stay valid)."""
    import os

    import onnx

    model = onnx.load(str(source), load_external_data=False)
    for node in model.graph.node:
        node.name = node.name + NAME_END
    path = Path(source).with_name(f".terminated-{os.getpid()}-{Path(source).name}")
    onnx.save(model, str(path))
    return path


def strip_terminators(model: Any) -> None:
    for node in model.graph.node:
        if node.name.endswith(NAME_END):
            node.name = node.name[: -len(NAME_END)]


def quantize_graph(source: Path, export_manifest: Mapping[str, Any], capture: Capture, graph: str,
                   recipe: QuantRecipe, out_folder: Path) -> dict[str, Any]:
    """Quantize ``source`` (an export's ``model.onnx``) into ``out_folder`` and write its manifest; return it."""
    import onnx

    quantize = import_modelopt_quantize()
    recipe = recipe.validate()
    source_model = onnx.load(str(source), load_external_data=False)  # node names and metadata are enough
    excluded = recipe.nodes_to_exclude(source_model)
    out_folder.mkdir(parents=True, exist_ok=True)
    output = out_folder / ONNX_FILE
    large = Path(source).stat().st_size > EXTERNAL_DATA_LIMIT or any(
        p.name != ONNX_FILE and p.suffix != ".json" for p in Path(source).parent.iterdir())
    terminated = terminated_copy(source)
    try:
        quantize(onnx_path=str(terminated), quantize_mode=recipe.mode,
                 calibration_data_reader=CaptureReader(capture, graph), calibration_method=recipe.calibration_method,
                 calibration_eps=calibration_providers(), nodes_to_exclude=[name + NAME_END for name in excluded],
                 disable_mha_qdq=recipe.keeps_attention, high_precision_dtype=recipe.high_precision_dtype,
                 use_external_data_format=large, output_path=str(output), log_level="WARNING")
    except CalibrationError:
        raise
    except Exception as error:  # ModelOpt raises many internal types; say what was being quantized
        raise CalibrationError(f"ModelOpt could not quantize the {graph} graph ({recipe.mode}, "
                               f"{recipe.calibration_method} calibration): {type(error).__name__}: {error}") from error
    finally:
        terminated.unlink(missing_ok=True)
    model = onnx.load(str(output))
    strip_terminators(model)
    if recipe.range_scale != 1.0:
        scale_activation_ranges(model, recipe.range_scale)
    onnx.save(model, str(output), save_as_external_data=large)
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(out_folder.iterdir())}
    manifest = {**export_manifest, "files": files, "onnx_sha256": files[ONNX_FILE]["sha256"],
                "quantization": {"mode": recipe.mode, "recipe": recipe.to_json(), "recipe_sha256": recipe.sha256(),
                                 "source_onnx_sha256": export_manifest["onnx_sha256"], "capture_key": capture.key,
                                 "calibration_records": len(capture.records(graph, "calibration")),
                                 "nodes_kept_high_precision": excluded,
                                 "validate_at": "ORT_ENABLE_BASIC"}}
    (out_folder / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return manifest


def file_sha256(path: Path, chunk_bytes: int = 1 << 24) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def basic_session_options() -> Any:
    """onnxruntime session options for Q/DQ graphs: basic optimisation only. Higher levels fuse Q/DQ + MatMul
    into integer kernels on the CPU, which is not what TensorRT runs and loses about 10x accuracy."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return options


def check_quantized(path: Path) -> None:
    """The output has Q/DQ pairs (or ModelOpt silently quantized nothing)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = {node.op_type for node in model.graph.node}
    if "QuantizeLinear" not in ops and "DequantizeLinear" not in ops:
        raise CalibrationError(f"{path} has no QuantizeLinear/DequantizeLinear nodes: ModelOpt quantized nothing; "
                               f"check that {FLAG_EXCLUDE} leaves some MatMul/Gemm layers to quantize")
