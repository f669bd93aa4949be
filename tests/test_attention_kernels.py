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


def test_key_counts_surround_the_call_with_whole_tiles():
    """The persistent-cache call of the check (4,608 queries over 7,068 keys): target only, target plus the same
    partial tile, the call, and the call rounded down and up to tiles of 128 and of 64."""
    from sparse_context.reference.attention_kernels import key_counts

    assert key_counts(4608, 7068) == [4608, 4636, 7040, 7068, 7104, 7168]
    assert key_counts(4608, 4608) == [4608]  # already whole tiles: nothing to compare
    assert key_counts(80, 122) == [64, 80, 122, 128, 202]  # no zero-key count when the call is under one tile


def test_key_sweep_times_every_count_interleaved_and_writes_its_report(tmp_path, capsys):
    from sparse_context.reference.attention_kernels import key_counts, main

    assert main(["--device", "cpu", "--heads", "2", "--head-dim", "16", "--dtype", "fp32", "--chain", "2",
                 "--key-sweep", "40", "71", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "attention_kernels.json").read_text())
    assert [row["keys"] for row in report["rows"]] == key_counts(40, 71)
    for row in report["rows"]:  # every count timed once per round, after its warm-up
        assert len(row["samples_ms"]) == report["rounds"] and row["ms"] > 0 and row["tflops"] > 0, row
    assert (report["keys"], report["aligned_up"], report["aligned_down"]) == (71, 128, 0)
    assert report["aligned_down_ms"] is None  # no whole tile below 71 keys
    out = capsys.readouterr().out
    assert "71 keys rounded up to 128 (whole tiles of 128)" in out and "<- the call" in out


def test_key_sweep_refuses_an_empty_call(capsys):
    from sparse_context.reference.attention_kernels import main

    assert main(["--device", "cpu", "--key-sweep", "4608", "0"]) == 2
    assert "--key-sweep: got 4608 0, need two positive token counts" in capsys.readouterr().err
