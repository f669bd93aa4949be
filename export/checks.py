"""Post-export checks of a written ONNX graph against its :class:`ExportSpec`. Every problem is collected, then one
:class:`GraphCheckError` lists them all (a user fixes them in one go, not one per run)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparse_context.export.errors import GraphCheckError
from sparse_context.export.spec import ExportSpec
from sparse_context.export.trt_ops import MAX_OPSET, TENSORRT_PARSER_VERSION, unsupported_ops


def _dims(value_info: Any) -> list[int | str | None]:
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_param if dim.HasField("dim_param") else dim.dim_value if dim.HasField("dim_value") else None)
    return dims


def _io_problems(model: Any, spec: ExportSpec) -> list[str]:
    problems = []
    declared = {t.name: t for t in spec.inputs + spec.outputs}
    graph_io = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    initializers = {t.name for t in model.graph.initializer}
    for name in declared:
        if name not in graph_io:
            problems.append(f"{name}: declared in the spec but not a graph input/output")
    for name, value in graph_io.items():
        if name in initializers:
            continue
        if name not in declared:
            problems.append(f"{name}: graph input/output not declared in the spec")
            continue
        expected, dims = declared[name].shape, _dims(value)
        if len(dims) != len(expected):
            problems.append(f"{name}: rank {len(dims)}, spec says {len(expected)} ({list(expected)})")
            continue
        for axis, (got, want) in enumerate(zip(dims, expected)):
            if isinstance(want, str) and not isinstance(got, str):
                problems.append(f"{name}: axis {axis} should be symbolic '{want}' but is fixed to {got} "
                                "(the exporter baked the example size)")
            elif isinstance(want, int) and got != want:
                problems.append(f"{name}: axis {axis} is {got!r}, spec fixes it to {want} (an undeclared dynamic or "
                                "wrong fixed size)")
    return problems


def _float64_problems(model: Any) -> list[str]:
    from onnx import TensorProto

    double = TensorProto.DOUBLE
    problems = [f"initializer {t.name} is float64" for t in model.graph.initializer if t.data_type == double]
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    problems += [f"tensor {v.name} is float64" for v in values if v.type.tensor_type.elem_type == double]
    for node in model.graph.node:
        for attribute in node.attribute:
            if node.op_type in ("Cast", "CastLike") and attribute.name == "to" and attribute.i == double:
                problems.append(f"node {node.name} casts to float64")
            if attribute.name == "value" and attribute.t.data_type == double:
                problems.append(f"node {node.name} ({node.op_type}) holds a float64 constant")
    return problems


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _tensorrt_problems(model: Any) -> list[str]:
    problems = []
    if _opset(model) > MAX_OPSET:
        problems.append(f"opset {_opset(model)} > {MAX_OPSET}, the newest TensorRT {TENSORRT_PARSER_VERSION} parses "
                        "(export with --attention matmul --opset 19)")
    ops = {n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    problems += [f"operator {op} is not in TensorRT {TENSORRT_PARSER_VERSION}'s ONNX parser support list"
                 for op in unsupported_ops(ops)]
    problems += [f"operator {op} is outside the ONNX domain (TensorRT would need a plugin)" for op in foreign]
    return problems


def check_graph(path: str | Path, spec: ExportSpec, for_tensorrt: bool = False) -> dict[str, Any]:
    """Check the ONNX file at ``path``; return a summary (opset, ops) or raise GraphCheckError with every problem.

    Checks: ``onnx.checker`` with the path (so external data is read), declared dynamic axes symbolic, no fixed size
    where the spec has a symbol and vice versa, no float64 anywhere, and with ``for_tensorrt`` opset and operators
    within TensorRT 10.3's parser.
    """
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except (onnx.checker.ValidationError, OSError) as error:
        raise GraphCheckError(f"{path} is not a valid ONNX model", [str(error).strip().splitlines()[0]]) from error
    model = onnx.load(str(path), load_external_data=False)  # structure only: weights are not needed here
    problems = _io_problems(model, spec) + _float64_problems(model)
    if for_tensorrt:
        problems += _tensorrt_problems(model)
    if problems:
        raise GraphCheckError(f"{path.name} ({spec.graph} graph) breaks its export contract", problems)
    return {"opset": _opset(model), "ops": sorted({n.op_type for n in model.graph.node}),
            "nodes": len(model.graph.node)}
