"""The command line: each command end to end on the tiny model, and user errors as exit code 2 with a message."""

from __future__ import annotations

import pytest

from sparse_context.cli import main


def test_select_writes_overlays(tmp_path, capsys):
    assert main(["select", "--keep", "0.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "edge" in out and "saliency" in out
    assert (tmp_path / "selections.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "select_edge_ref0.png").is_file()


def test_select_bad_keep_is_a_clear_error(tmp_path, capsys):
    assert main(["select", "--keep", "1.5", "--out", str(tmp_path)]) == 2
    assert "keep fraction: got 1.5" in capsys.readouterr().err


def test_generate_with_tiny_folder(tiny_model_dir, tmp_path, capsys):
    from sparse_context.runtime.images import sample_images

    ref = str(next(iter(sample_images().values())))
    out = tmp_path / "image.png"
    code = main(["generate", "--model", str(tiny_model_dir), "--prompt", "a cat", "--ref", ref, "--keep", "0.1",
                 "--strategy", "saliency", "--kv", "--steps", "2", "--width", "64", "--height", "64", "--out",
                 str(out)])
    assert code == 0
    assert "kv=on" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_generate_missing_model_folder(tmp_path, capsys):
    pytest.importorskip("diffusers", reason="generate needs the PyTorch stack")
    code = main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert code == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPARSE_CONTEXT_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "sparse_kv" in out and "vs dense" in out
    for name in ("selections.png", "generated_dense.png", "generated_sparse.png", "generated_sparse_kv.png"):
        assert (tmp_path / "demo" / name).is_file()
