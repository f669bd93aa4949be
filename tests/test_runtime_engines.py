"""build_engines + the thin runtime on onnxruntime CPU equal the PyTorch reference generator (tiny model, fp32).

Tolerance 1e-4 absolute on latents: onnxruntime and PyTorch run different fp32 kernels (measured ~1e-6 per call),
accumulated over the denoising steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the engines runtime test needs onnxruntime (pip install .[onnx])")

ATOL = 1e-4


@pytest.fixture(scope="module")
def engines_dir(tiny_model_dir, tmp_path_factory):
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, build_engines

    out = tmp_path_factory.mktemp("engines")
    plan = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256),), text_tokens=64).validate()
    build_engines(BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=plan, out_dir=out, precision="fp32"))
    return out


def test_engines_manifest(engines_dir):
    engines = json.loads((engines_dir / "engines.json").read_text())
    assert engines["backend"] == "ort-cpu" and set(engines["graphs"]) == {"full", "kv"}
    steps = {(p["bucket"], p["step"]) for p in engines["graphs"]["kv"]["profiles"]}
    assert {step for _, step in steps} == {"extract", "cached"}  # both KV steps in one engine


@pytest.mark.parametrize("settings", [dict(keep_fraction=1.0), dict(keep_fraction=0.1, strategy="edge"),
                                      dict(keep_fraction=0.1, strategy="saliency", use_kv=True)],
                         ids=["dense", "sparse", "sparse_kv"])
def test_ort_generation_equals_pytorch(engines_dir, tiny_generator, reference_photos, settings):
    from sparse_context.reference.generator import SparseContextGenerator

    runtime = SparseContextGenerator.from_engines(engines_dir)
    kwargs = dict(num_steps=3, seed=2, output_type="latent", height=96, width=96, **settings)
    ours = runtime.generate("a red bicycle", reference_photos, **kwargs)
    reference = tiny_generator.generate("a red bicycle", reference_photos, **kwargs)
    assert ours.ref_tokens == reference.ref_tokens
    np.testing.assert_allclose(ours.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)


def test_persistent_cache_second_call(engines_dir, tiny_generator, reference_photos):
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    runtime = SparseContextGenerator.from_engines(engines_dir)
    runtime.kv_cache = ReferenceKVCache(64 << 20)
    kwargs = dict(keep_fraction=0.1, strategy="edge", use_kv=True, num_steps=2, seed=1, output_type="latent",
                  height=64, width=64)
    first = runtime.generate("a harbour", reference_photos, **kwargs)
    second = runtime.generate("a harbour", reference_photos, **kwargs)
    assert not first.cache_hit and second.cache_hit
    np.testing.assert_allclose(second.image.numpy(), first.image.numpy(), atol=1e-6, rtol=0)
    reference = tiny_generator.generate("a harbour", reference_photos, **kwargs)
    np.testing.assert_allclose(second.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)


def test_build_engines_cli_demo_and_errors(tmp_path, capsys, monkeypatch):
    from sparse_context.build_engines import main

    assert main(["--backend", "ort-cpu"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--backend", "ort-cpu", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--demo", "--backend", "tensorflow"])


def test_engines_json_errors_name_the_fix(tmp_path):
    from sparse_context.engines.errors import BuildOptionError, RunnerError
    from sparse_context.reference.generator import SparseContextGenerator

    (tmp_path / "engines.json").write_text(json.dumps({"backend": "trt", "graphs": {}}))
    with pytest.raises(RunnerError, match="no recorded bucket plan.*--engines"):
        SparseContextGenerator.from_engines(tmp_path)
    (tmp_path / "engines.json").write_text(json.dumps({"backend": "tpu", "graphs": {}}))
    with pytest.raises(BuildOptionError, match="'tpu'.*--backend"):
        SparseContextGenerator.from_engines(tmp_path)
    with pytest.raises(BuildOptionError, match="engines.json written by build_engines.py"):
        SparseContextGenerator.from_engines(tmp_path / "missing")


def test_trt_progress_events_become_build_progress():
    from sparse_context.engines.build import _trt_progress
    from sparse_context.engines.trt_build import BuildProgress

    seen = []
    report = _trt_progress("kv", lambda stage, done, total: seen.append((stage, done, total)))
    for event in (BuildProgress("start", "Building", None, 0, 3), BuildProgress("step", "Building", None, 2, 3),
                  BuildProgress("finish", "Building")):
        report(event)
    assert seen == [("trt kv: Building", 2, 3)]
