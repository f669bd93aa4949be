"""The TensorRT parser's operator table (generated from onnx-tensorrt's docs/operators.md) and the restrictions
export/checks.py enforces from it, on small hand-built graphs."""

from __future__ import annotations

import pytest

onnx = pytest.importorskip("onnx", reason="the graph checks need onnx (pip install .[onnx])")
from onnx import TensorProto, helper  # noqa: E402

from sparse_context.export.checks import _restriction_problems, _tensorrt_problems  # noqa: E402
from sparse_context.export.trt_ops import SUPPORTED, UNSUPPORTED, restriction, unsupported_ops  # noqa: E402


def test_table_facts():
    assert {"MatMul", "Softmax", "LayerNormalization", "If", "Gelu"} <= set(SUPPORTED)
    # the window functions are "N" in the parser's table; Attention (opset 23) is not in it at all
    assert {"BlackmanWindow", "HannWindow", "HammingWindow"} <= UNSUPPORTED
    assert unsupported_ops({"MatMul", "HannWindow", "Attention"}) == ["Attention", "HannWindow"]
    assert "axes must be an initializer" in restriction("Slice") and restriction("MatMul") == ""
    assert not set(SUPPORTED) & UNSUPPORTED


def _model(nodes, inputs, outputs, initializers=(), opset=19):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _tensor(name, rank=1, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, [None] * rank)


def test_slice_axes_must_be_an_initializer():
    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [0])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [2])
    fixed = helper.make_tensor("axes", TensorProto.INT64, [1], [0])
    node = helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["y"], name="s")
    ok = _model([node], [_tensor("x")], [_tensor("y")], [starts, ends, fixed])
    assert _restriction_problems(ok) == []
    dynamic = _model([node], [_tensor("x"), _tensor("axes", dtype=TensorProto.INT64)], [_tensor("y")],
                     [starts, ends])
    problems = _restriction_problems(dynamic)
    assert len(problems) == 1 and "node s (Slice): its axes come from 'axes'" in problems[0]
    assert "axes must be an initializer" in problems[0]


def test_if_branches_need_equal_ranks_and_different_names():
    def branch(name, rank):
        const = helper.make_node("Constant", [], [name], value=helper.make_tensor(
            "v", TensorProto.FLOAT, [1] * rank, [1.0]))
        return helper.make_graph([const], f"b{name}", [], [_tensor(name, rank)])

    def model(then, other):
        node = helper.make_node("If", ["c"], ["y"], name="i", then_branch=then, else_branch=other)
        return _model([node], [_tensor("c", 0, TensorProto.BOOL)], [_tensor("y")])

    assert _restriction_problems(model(branch("a", 1), branch("b", 1))) == []
    same_name = _restriction_problems(model(branch("a", 1), branch("a", 1)))
    assert len(same_name) == 1 and "shared names ['a']" in same_name[0]
    ranks = _restriction_problems(model(branch("a", 1), branch("b", 2)))
    assert len(ranks) == 1 and "ranks [1] and [2]" in ranks[0]


def test_layer_norm_extra_outputs_and_scatter_reduction():
    scale = helper.make_tensor("w", TensorProto.FLOAT, [4], [1.0] * 4)
    norm = helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean"], name="ln")
    used = _model([norm], [_tensor("x", 2)], [_tensor("y", 2), _tensor("mean", 2)], [scale])
    assert "uses outputs beyond Y" in _restriction_problems(used)[0]
    scatter = helper.make_node("ScatterND", ["x", "i", "u"], ["y"], name="sc", reduction="add")
    model = _model([scatter], [_tensor("x"), _tensor("i", 2, TensorProto.INT64), _tensor("u")], [_tensor("y")],
                   opset=18)
    assert "reduction 'add'" in _restriction_problems(model)[0]


def test_window_function_is_reported():
    node = helper.make_node("HannWindow", ["n"], ["y"], name="w")
    model = _model([node], [_tensor("n", 0, TensorProto.INT64)], [_tensor("y")], opset=17)
    assert any("HannWindow is not in TensorRT 10.3" in p for p in _tensorrt_problems(model))
