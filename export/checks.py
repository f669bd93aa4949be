"""Post-export checks of a written ONNX graph against its :class:`ExportSpec`. Every problem is collected, then one
:class:`GraphCheckError` lists them all (a user fixes them in one go, not one per run)."""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any, Iterator

from sparse_context.export.errors import GraphCheckError
from sparse_context.export.spec import ExportSpec
from sparse_context.export.trt_ops import (
    MAX_OPSET, SUPPORTED, TENSORRT_PARSER_VERSION, restriction, unsupported_ops,
)


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
    for node in _all_nodes(model.graph):
        for attribute in node.attribute:
            if node.op_type in ("Cast", "CastLike") and attribute.name == "to" and attribute.i == double:
                problems.append(f"node {node.name} casts to float64")
            if attribute.name == "value" and attribute.t.data_type == double:
                problems.append(f"node {node.name} ({node.op_type}) holds a float64 constant")
    return problems


def _all_nodes(graph: Any) -> Iterator[Any]:
    """Every node of ``graph``, those of its control-flow subgraphs (If branches, at any depth) included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for subgraph in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                yield from _all_nodes(subgraph)


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _tensorrt_problems(model: Any) -> list[str]:
    problems = []
    if _opset(model) > MAX_OPSET:
        problems.append(f"opset {_opset(model)} > {MAX_OPSET}, the newest TensorRT {TENSORRT_PARSER_VERSION} parses "
                        "(export with --attention matmul --opset 19)")
    nodes = list(_all_nodes(model.graph))
    ops = {n.op_type for n in nodes if n.domain in ("", "ai.onnx")}
    foreign = sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")})
    problems += [f"operator {op} is not in TensorRT {TENSORRT_PARSER_VERSION}'s ONNX parser support list"
                 for op in unsupported_ops(ops)]
    problems += [f"operator {op} is outside the ONNX domain (TensorRT would need a plugin)" for op in foreign]
    return problems + _restriction_problems(model)


def _restriction_problems(model: Any) -> list[str]:
    """The parser table's restrictions that can apply to our graphs: axes (and CumSum's axis) fed by an initializer
    or a Constant, the two branches of an If giving outputs of equal rank under different names, only the first
    output of LayerNormalization used, no ScatterND reduction."""
    from onnx import defs

    graph, opset = model.graph, _opset(model)
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant"
                                                       for o in n.output}
    consumed = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    problems = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in SUPPORTED:
            continue
        rule = restriction(node.op_type)
        label = f"node {node.name or '?'} ({node.op_type})"
        if re.search(r"\bax[ie]s must be (an initializer|a constant)", rule):
            names = [i.name for i in defs.get_schema(node.op_type, opset).inputs]
            wanted = "axes" if "axes" in names else "axis"
            index = names.index(wanted) if wanted in names else None
            given = node.input[index] if index is not None and index < len(node.input) else ""
            if given and given not in constants:
                problems.append(f"{label}: its {wanted} come from {given!r}; TensorRT {TENSORRT_PARSER_VERSION}: "
                                f"{rule}")
        elif node.op_type == "If":
            branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
            then, other = branches.get("then_branch"), branches.get("else_branch")
            if then is not None and other is not None:
                ranks = [[len(o.type.tensor_type.shape.dim) for o in g.output] for g in (then, other)]
                shared = {o.name for o in then.output} & {o.name for o in other.output}
                if ranks[0] != ranks[1] or shared:
                    problems.append(f"{label}: branch outputs of ranks {ranks[0]} and {ranks[1]}, shared names "
                                    f"{sorted(shared)}; TensorRT {TENSORRT_PARSER_VERSION}: {rule}")
        elif node.op_type == "LayerNormalization" and any(o and o in consumed for o in node.output[1:]):
            problems.append(f"{label}: uses outputs beyond Y; TensorRT {TENSORRT_PARSER_VERSION}: {rule}")
        elif node.op_type == "ScatterND":
            reduction = next((a.s.decode() for a in node.attribute if a.name == "reduction"), "none")
            if reduction != "none":
                problems.append(f"{label}: reduction {reduction!r}; TensorRT {TENSORRT_PARSER_VERSION}: {rule}")
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
    # ops: every operator the graph runs, inside If branches too (the guarded graphs' attention lives there)
    return {"opset": _opset(model), "ops": sorted({n.op_type for n in _all_nodes(model.graph)}),
            "nodes": len(model.graph.node)}
