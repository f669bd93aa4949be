"""The attention-kernel timing on the CPU at tiny sizes: every shape of the check runs on both runtimes, the
onnxruntime chain of contrib MultiHeadAttention equals PyTorch's SDPA chain, and the report is written whole."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("torch")


def test_every_shape_on_both_runtimes_agrees_with_pytorch(tmp_path):
    from sparse_context.reference.attention_kernels import SHAPES, main

    assert main(["--device", "cpu", "--heads", "2", "--head-dim", "16", "--token-scale", "0.01", "--dtype", "fp32",
                 "--chain", "3", "--repeats", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "attention_kernels.json").read_text())
    assert {(row["shape"], row["runtime"]) for row in report["rows"]} == {
        (shape, runtime) for shape in SHAPES for runtime in ("torch", "onnxruntime")}
    for row in report["rows"]:
        assert "error" not in row and row["ms"] > 0 and row["max_abs_diff"] < 1e-5, row
    assert [row["keys"] for row in report["rows"] if row["shape"] == "cached step"] == [71, 71]  # 7068 x 0.01
    assert not list(tmp_path.glob(".*.tmp"))
