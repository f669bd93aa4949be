"""calibration/: capture of graph inputs, ModelOpt INT8/FP8 quantization, the accuracy gate, and
``build_engines --precision int8|fp8`` on the tiny model (onnxruntime CPU and the TensorRT stand-in).

Quantized graphs are validated at onnxruntime's basic optimisation level (Q/DQ around float kernels, as TensorRT
computes them). ModelOpt is an optional extra: tests that quantize skip without it.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from sparse_context.runtime.errors import PromptTruncatedWarning

pytest.importorskip("onnxruntime", reason="calibration runs the exported graphs with onnxruntime (pip install .[onnx])")


def needs_modelopt():
    pytest.importorskip("modelopt.onnx.quantization", reason="quantizing needs ModelOpt: pip install "
                        ".[quantization]")


def small_plan():
    from sparse_context.engines.buckets import BucketPlan, Resolution

    return BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256),), text_tokens=64).validate()  # engines_dir's plan


@pytest.fixture(scope="module")
def exports(engines_dir):
    engines = json.loads((engines_dir / "engines.json").read_text())
    return {graph: engines_dir / entry["onnx"] for graph, entry in engines["graphs"].items()}  # inside the folder


@pytest.fixture(scope="module")
def reference_backend(exports):
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    return OrtTransformerBackend(**exports)


@pytest.fixture(scope="module")
def generator(tiny_model_dir, reference_backend):
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.export.loading import load_generator_parts

    return SparseContextGenerator(backend=reference_backend,
                                  **load_generator_parts(tiny_model_dir, with_transformer=False))


@pytest.fixture(scope="module")
def captured(generator, reference_backend, tmp_path_factory):
    from sparse_context.calibration.capture import CaptureOptions, capture
    from sparse_context.calibration.dataset import bundled_set

    return capture(lambda: generator, reference_backend, small_plan(), bundled_set(3),
                   CaptureOptions(samples=3, holdout=1), tmp_path_factory.mktemp("capture"))


# -- recipe -------------------------------------------------------------------------------------------------------

def test_recipe_keeps_embeddings_modulation_and_final_projection(exports):
    import onnx

    from sparse_context.calibration.recipe import QuantRecipe, module_path

    model = onnx.load(str(exports["kv"]), load_external_data=False)
    kept = set(QuantRecipe("int8").nodes_to_exclude(model))
    paths = {node.name: module_path(node) for node in model.graph.node}
    kept_paths = {paths[name] for name in kept}
    for expected in ("transformer.x_embedder", "transformer.context_embedder", "transformer.proj_out",
                     "transformer.norm_out.linear", "transformer.single_stream_modulation.linear"):
        assert expected in kept_paths
    assert not any(".attn.to_q" in path or ".ff." in path for path in kept_paths)  # the blocks are quantized
    extra = QuantRecipe("int8", exclude=("transformer.transformer_blocks.0.ff.linear_out",)).nodes_to_exclude(model)
    assert {paths[n] for n in set(extra) - kept} == {"transformer.transformer_blocks.0.ff.linear_out"}


def test_recipe_hash_follows_every_field():
    from sparse_context.calibration.recipe import QuantRecipe

    base = QuantRecipe("int8")
    variants = [QuantRecipe("fp8"), QuantRecipe("int8", calibration_method="entropy"),
                QuantRecipe("int8", exclude=("x",)), QuantRecipe("int8", high_precision=("embeddings",)),
                QuantRecipe("int8", high_precision_dtype="fp16"), QuantRecipe("int8", range_scale=0.5)]
    assert len({base.sha256(), *(v.sha256() for v in variants)}) == len(variants) + 1
    assert QuantRecipe("int8").sha256() == base.sha256()


@pytest.mark.parametrize("fields, flag", [(dict(mode="int4"), "--precision"),
                                          (dict(mode="int8", calibration_method="percentile"),
                                           "--calibration-method"),
                                          (dict(mode="int8", exclude=("(",)), "--calibration-exclude"),
                                          (dict(mode="int8", high_precision=("heads",)), None),
                                          (dict(mode="int8", range_scale=0.0), None)])
def test_recipe_errors_name_the_flag(fields, flag):
    from sparse_context.calibration.errors import CalibrationConfigError
    from sparse_context.calibration.recipe import QuantRecipe

    with pytest.raises(CalibrationConfigError) as error:
        QuantRecipe(**fields).validate()
    if flag:
        assert flag in str(error.value)


# -- calibration sets ---------------------------------------------------------------------------------------------

def test_sets_from_folder_and_manifest(tmp_path, reference_photos):
    from sparse_context.calibration.dataset import draw_samples, load_set

    for index, image in enumerate(reference_photos):
        image.save(tmp_path / f"ref{index}.png")
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog\nthe sea\n")
    folder_set = load_set(tmp_path, max_refs=2)
    assert [item.prompt for item in folder_set.items] == ["a cat", "a dog", "the sea"]
    assert [len(item.references) for item in folder_set.items] == [1, 2, 1]
    (tmp_path / "calibration.json").write_text(json.dumps({"samples": [
        {"prompt": "two refs", "references": ["ref0.png", "ref2.png"]}]}))
    manifest_set = load_set(tmp_path)
    assert manifest_set.items[0].references == (tmp_path / "ref0.png", tmp_path / "ref2.png")
    assert manifest_set.digest() != folder_set.digest()
    samples = draw_samples(folder_set, 5, (1.0, 0.1), ("saliency", "uniform"), ((256, 256),), 3, seed=7)
    assert [s.keep_fraction for s in samples] == [0.1, 1.0, 0.1, 1.0, 0.1]
    assert [s.strategy for s in samples] == ["saliency", "saliency", "uniform", "uniform", "saliency"]
    assert [s.seed for s in samples] == [7, 8, 9, 10, 11]


@pytest.mark.parametrize("layout", ["missing", "no_prompts", "bad_manifest", "missing_image"])
def test_bad_calibration_folders_name_the_flag(tmp_path, reference_photos, layout):
    from sparse_context.calibration.dataset import load_set
    from sparse_context.calibration.errors import CalibrationConfigError

    reference_photos[0].save(tmp_path / "a.png")
    if layout == "bad_manifest":
        (tmp_path / "calibration.json").write_text("{not json")
    elif layout == "missing_image":
        (tmp_path / "calibration.json").write_text(json.dumps({"samples": [{"prompt": "p", "references": ["b.png"]}]}))
    with pytest.raises(CalibrationConfigError, match="--calibration"):
        load_set(tmp_path / "nowhere" if layout == "missing" else tmp_path)


# -- capture ------------------------------------------------------------------------------------------------------

def test_recorded_feeds_reproduce_the_backend(reference_backend, generator):
    """What the recording stores is exactly what the graph was fed: running the session on it gives the same
    velocity (same kernels, so to float rounding)."""
    from sparse_context.calibration.capture import RecordingBackend, replace_backend, run_sample
    from sparse_context.calibration.dataset import bundled_set, draw_samples

    calls = []
    recorder = RecordingBackend(reference_backend, lambda *call: calls.append(call))
    spec = draw_samples(bundled_set(3), 1, (0.1,), ("saliency",), ((128, 128),), 3, seed=3)[0]
    for graph in ("full", "kv"):
        recorder.restart()
        run_sample(replace_backend(generator, recorder), spec, graph, (256, 256), num_steps=3)
    assert [(g, kind, step) for g, kind, step, _, _ in calls] == [
        ("full", "full", 0), ("full", "full", 1), ("full", "full", 2),
        ("kv", "extract", 0), ("kv", "cached", 1), ("kv", "cached", 2)]
    for graph, kind, step, feeds, velocity in calls:
        session = reference_backend.sessions[graph]
        replayed = session.run(["velocity"], feeds)[0]
        np.testing.assert_allclose(replayed, velocity, atol=1e-6, rtol=0)
        if kind == "cached":
            layers = reference_backend.dims.num_layers  # one cached input per layer and family, as the graph's
            assert {feeds[f"cached_values_{layer}"].shape[1] for layer in range(layers)} == {
                calls[3][3]["refs"].shape[1]} and calls[3][3]["refs"].shape[1] > 0
            assert feeds["refs"].shape[1] == 0


def test_capture_is_deterministic_and_reused(captured, generator, reference_backend, tmp_path, monkeypatch):
    from sparse_context.calibration import capture as capture_module
    from sparse_context.calibration.capture import CaptureOptions, capture
    from sparse_context.calibration.dataset import bundled_set

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = capture(lambda: generator, reference_backend, small_plan(), bundled_set(3),
                        CaptureOptions(samples=3, holdout=1), tmp_path)
    # The tiny tokenizer spells bytes: every bundled prompt is over its 64 tokens. One line says so for all.
    cut = [str(w.message) for w in caught if issubclass(w.category, PromptTruncatedWarning)]
    prompts = {s["prompt"] for s in again.manifest["samples"]}
    assert cut == [f"calibration capture: {len(prompts)} of {len(prompts)} prompts have more tokens than the text "
                   "encoder reads and were cut, as generation cuts them"]
    assert again.manifest["cut_prompts"] == sorted(prompts)
    assert again.key == captured.key
    for graph in ("full", "kv"):
        for first, second in zip(captured.iter_feeds(graph), again.iter_feeds(graph)):
            assert first.keys() == second.keys()
            assert all(np.array_equal(first[name], second[name]) for name in first)
    kinds = {(r["graph"], r["kind"]) for r in captured.records("kv")}
    assert kinds == {("kv", "extract"), ("kv", "cached")}  # the KV graph is calibrated on both steps
    manifest = captured.manifest
    assert manifest["sample_count"] == 3 and manifest["holdout_count"] == 1 and manifest["seed"] == 0
    assert [b["keep_fraction"] for b in manifest["buckets"]] == [0.1, 1.0]
    assert set(manifest["model_fingerprint"]) == {"full", "kv"} and manifest["steps"] == [0, 1, 2, 3]
    assert {r["split"] for r in manifest["records"]} == {"calibration", "holdout"}
    held_out = captured.holdout_samples()  # their images travel inside the capture folder
    assert len(held_out) == 1 and all(Path(p).is_file() and Path(p).is_relative_to(captured.folder)
                                      for p in held_out[0].references)
    # A complete capture is reused without generating anything.
    monkeypatch.setattr(capture_module, "run_sample", lambda *a, **k: pytest.fail("capture was not reused"))
    capture(lambda: pytest.fail("loaded the generator"), reference_backend, small_plan(), bundled_set(3),
            CaptureOptions(samples=3, holdout=1), tmp_path)
    other_seed = capture_module.capture_key(manifest["model_fingerprint"], bundled_set(3), [],
                                            CaptureOptions(seed=1), small_plan().to_json())
    assert other_seed != capture_module.capture_key(manifest["model_fingerprint"], bundled_set(3), [],
                                                    CaptureOptions(seed=0), small_plan().to_json())


def test_cut_prompts_are_said_once_and_other_warnings_pass_through():
    """The capture and the accuracy gate run each prompt many times: one line for all its cut prompts."""
    from sparse_context.calibration.capture import counting_cuts, warn_cut_prompts

    def run():
        warnings.warn("cut", PromptTruncatedWarning)
        warnings.warn("other", RuntimeWarning)
        return 3

    cut: set[str] = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert counting_cuts(cut, "a", run) == counting_cuts(cut, "a", run) == 3
        counting_cuts(cut, "b", lambda: None)
        warn_cut_prompts("accuracy gate", cut, {"a", "b"})
        warn_cut_prompts("accuracy gate", set(), {"a", "b"})  # nothing cut: nothing said
    assert [str(w.message) for w in caught] == ["other", "other", "accuracy gate: 1 of 2 prompts have more tokens "
                                                "than the text encoder reads and were cut, as generation cuts them"]


def test_incomplete_or_foreign_captures_are_refused(captured, tmp_path):
    from sparse_context.calibration.capture import check_capture_matches, read_capture
    from sparse_context.calibration.errors import CalibrationError

    copy = tmp_path / "copy"
    shutil.copytree(captured.folder, copy)
    assert read_capture(copy) is not None
    shard = next(copy.glob("*.npz"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert read_capture(copy) is None  # a truncated shard: not a capture
    foreign = type("Backend", (), {"manifests": {"full": {"onnx_sha256": "0" * 64}}})()
    with pytest.raises(CalibrationError, match="--calibration"):
        check_capture_matches(captured, foreign)


@pytest.mark.parametrize("fields", [dict(samples=0), dict(holdout=0), dict(strategies=("mask",)),
                                    dict(steps=(4,)), dict(num_steps=0)])
def test_capture_option_errors(fields):
    from sparse_context.calibration.capture import CaptureOptions
    from sparse_context.calibration.errors import CalibrationConfigError

    with pytest.raises(CalibrationConfigError):
        CaptureOptions(**fields).validate()


# -- quantize, gate, build ----------------------------------------------------------------------------------------

def build_quantized(tiny_model_dir, engines_dir, out, precision, backend="ort-cpu", **calibration):
    """build_engines with the fp32 export of ``engines_dir`` copied in (reused, not exported again)."""
    from sparse_context.calibration.build import CalibrationOptions
    from sparse_context.calibration.gate import DEMO_THRESHOLDS
    from sparse_context.engines.build import BuildRequest, build_engines

    shutil.copytree(engines_dir / "onnx", out / "onnx", dirs_exist_ok=True)
    from sparse_context.build_engines import reference_generator

    options = CalibrationOptions(samples=4, thresholds=DEMO_THRESHOLDS, generator_factory=reference_generator,
                                 **calibration)
    stages = []
    build_engines(BuildRequest(model_dir=tiny_model_dir, backend=backend, plan=small_plan(), out_dir=out,
                               precision=precision, calibration=options),
                  progress=lambda stage, done, total: stages.append(stage))
    return json.loads((out / "engines.json").read_text()), stages  # the file as a loader reads it


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir, engines_dir, tmp_path_factory):
    needs_modelopt()
    out = tmp_path_factory.mktemp("int8")
    engines, stages = build_quantized(tiny_model_dir, engines_dir, out, "int8")
    assert {"calibration capture", "quantize int8", "accuracy gate"} <= set(stages)  # progress is shown
    return out


def qdq_consumers(path: Path) -> set[str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    return {node.name for node in model.graph.node
            if node.op_type in ("MatMul", "Gemm") and producers.get(node.input[0]) == "DequantizeLinear"}


def test_int8_build_records_the_gate_and_quantizes_the_blocks(int8_dir, exports):
    import onnx

    from sparse_context.calibration.recipe import module_path

    engines = json.loads((int8_dir / "engines.json").read_text())
    report = engines["calibration"]
    assert report["passed"] and engines["precision"] == "int8" and engines["graph_optimization_level"] == "basic"
    assert set(report["modes"]) == {"dense", "sparse", "sparse_kv"}
    for row in report["modes"].values():
        assert row["min_velocity_cosine"] >= 0.9999 and row["latent_rel_error"] <= 0.002 and row["psnr_db"] >= 70
        assert len(row["velocity_cosine_by_step"]) == 4
    for graph in ("full", "kv"):
        path = int8_dir / engines["graphs"][graph]["onnx"]
        manifest = json.loads((path.parent / "manifest.json").read_text())
        assert manifest["quantization"]["gate"] == report  # the gate's numbers are in the graph's manifest
        assert manifest["quantization"]["recipe_sha256"] == report["recipe_sha256"]
        source = onnx.load(str(exports[graph]), load_external_data=False)
        paths = {node.name: module_path(node) for node in source.graph.node}
        quantized = {paths[name] for name in qdq_consumers(path)}
        assert any(".ff." in p for p in quantized) and any(".attn.to_" in p for p in quantized)
        assert not any(p in quantized for p in ("transformer.x_embedder", "transformer.proj_out"))


def test_int8_engines_run_in_the_runtime(int8_dir, engines_dir, tiny_model_dir, reference_photos):
    """The runtime loads the Q/DQ graphs at the basic level and stays close to the fp32 engines."""
    from sparse_context.reference.generator import SparseContextGenerator

    kwargs = dict(keep_fraction=0.1, strategy="saliency", use_kv=True, num_steps=4, seed=5, height=256, width=256,
                  output_type="latent")
    quantized = SparseContextGenerator.from_engines(int8_dir).generate("a red bicycle", reference_photos, **kwargs)
    reference = SparseContextGenerator.from_engines(engines_dir).generate("a red bicycle", reference_photos, **kwargs)
    a, b = quantized.latents.numpy(), reference.latents.numpy()
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-3


def test_build_output_reused_when_nothing_changed(int8_dir, tiny_model_dir, engines_dir, monkeypatch):
    from sparse_context.calibration import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "quantize_graph", lambda *a, **k: pytest.fail("not reused"))
    monkeypatch.setattr("sparse_context.build_engines.reference_generator", lambda *a: pytest.fail("loaded the generator"))
    engines, stages = build_quantized(tiny_model_dir, engines_dir, int8_dir, "int8")
    assert engines["calibration"]["passed"] and "quantize int8" not in stages


def test_clipped_ranges_are_refused_and_nothing_is_loadable(tiny_model_dir, engines_dir, tmp_path):
    needs_modelopt()
    from sparse_context.calibration.errors import GateFailedError

    with pytest.raises(GateFailedError) as error:
        build_quantized(tiny_model_dir, engines_dir, tmp_path, "int8", range_scale=0.1)
    message = str(error.value)
    assert "nothing was written where it could be loaded" in message
    assert "final-latent relative error" in message and "PSNR" in message  # the numbers
    assert "worst quantized layers" in message and "--calibration-exclude transformer." in message
    for flag in ("--gate-min-cosine", "--gate-max-latent-error", "--gate-min-psnr", "--calibration-samples"):
        assert flag in message
    report = error.value.report
    assert not report["passed"] and report["worst_layers"]["full"][0]["rel_error"] > 0.1
    assert not (tmp_path / "engines.json").exists()
    leftovers = [p.name for p in (tmp_path / "onnx").iterdir() if "int8" in p.name]
    assert leftovers == []  # neither a published folder nor a staging one


def test_fp8_build_on_the_cpu_reference(tiny_model_dir, engines_dir, tmp_path):
    needs_modelopt()
    engines, _ = build_quantized(tiny_model_dir, engines_dir, tmp_path, "fp8")
    assert engines["calibration"]["passed"] and engines["precision"] == "fp8"
    import onnx

    model = onnx.load(tmp_path / engines["graphs"]["kv"]["onnx"], load_external_data=False)
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    assert any(i.data_type == fp8 for i in model.graph.initializer if i.name.endswith("zero_point"))


@pytest.mark.slow
def test_trt_standin_builds_the_qdq_graph_strongly_typed(tiny_model_dir, engines_dir, tmp_path, monkeypatch):
    needs_modelopt()
    from trt_standin import HostMemory, make_module

    memory = HostMemory()
    monkeypatch.setitem(sys.modules, "tensorrt", make_module())
    for module in ("trt.memory", "trt.backend", "trt.runner"):
        monkeypatch.setattr(f"sparse_context.engines.{module}.default_memory", lambda device=0: memory)
    engines, _ = build_quantized(tiny_model_dir, engines_dir, tmp_path, "int8", backend="trt")
    for graph in ("full", "kv"):
        described = json.loads((tmp_path / engines["graphs"][graph]["engine"]).read_bytes())
        assert described["strongly_typed"] and described["qdq"]
    from sparse_context.engines.manifest import read_manifest
    from sparse_context.reference.generator import SparseContextGenerator

    manifest = read_manifest(tmp_path / engines["graphs"]["kv"]["engine"])
    assert manifest.precision_recipe_sha256  # keyed by the quantization recipe too
    result = SparseContextGenerator.from_engines(tmp_path, memory=memory).generate(
        "a cat", [], num_steps=2, height=256, width=256, output_type="latent")
    assert np.isfinite(result.latents.numpy()).all()


@pytest.mark.trt
@pytest.mark.gpu
def test_real_tensorrt_builds_the_int8_graph(int8_dir):
    """On a GPU with TensorRT: the Q/DQ graph parses and builds strongly typed."""
    pytest.importorskip("tensorrt", reason="needs TensorRT and an NVIDIA GPU")
    from sparse_context.engines.build import engine_input_shapes, symbol_names
    from sparse_context.engines.profiles import engine_profiles
    from sparse_context.engines.trt.loader import (
        add_profiles, builder_config, engine_bytes_from_network, network_from_onnx_path,
    )
    from sparse_context.export.spec import ModelDims, build_spec

    engines = json.loads((int8_dir / "engines.json").read_text())
    path = int8_dir / engines["graphs"]["kv"]["onnx"]
    manifest = json.loads((path.parent / "manifest.json").read_text())
    plan = small_plan()
    spec = build_spec("kv", "fp32", ModelDims.from_config(manifest["model_config"]), plan.text_tokens,
                      ((256, 256),), plan.max_ref_tokens)
    parsed = network_from_onnx_path(path, strongly_typed=True)
    config = builder_config(parsed)
    add_profiles(parsed, config, engine_profiles(plan, "kv", engine_input_shapes(spec), symbol_names(spec)))
    assert engine_bytes_from_network(parsed, config)


# -- options and errors -------------------------------------------------------------------------------------------

def test_library_build_without_a_generator_says_what_is_missing(tmp_path):
    from sparse_context.calibration.build import CalibrationOptions, quantize_for_build
    from sparse_context.calibration.errors import CalibrationConfigError
    from sparse_context.engines.build import BuildRequest

    request = BuildRequest(model_dir=tmp_path, backend="ort-cpu", plan=small_plan(), out_dir=tmp_path,
                           precision="int8", calibration=CalibrationOptions())
    with pytest.raises(CalibrationConfigError, match="generator_factory"):
        quantize_for_build(request, [], open_backend=lambda *a: pytest.fail("opened a backend"))


def test_fp8_is_refused_on_onnxruntime_cuda(tmp_path):
    from sparse_context.calibration.errors import CalibrationConfigError
    from sparse_context.engines.build import BuildRequest

    with pytest.raises(CalibrationConfigError, match="--backend"):
        BuildRequest(model_dir=tmp_path, backend="ort-cuda", plan=small_plan(), out_dir=tmp_path,
                     precision="fp8").validate()


def test_cli_flags_and_demo_gate(tmp_path):
    from sparse_context import build_engines

    from sparse_context.calibration.build import options_from_args
    from sparse_context.calibration.gate import DEMO_THRESHOLDS, GateThresholds

    parser = build_engines.build_parser()
    args = parser.parse_args(["--demo", "--precision", "int8", "--calibration-samples", "8",
                              "--calibration-exclude", "transformer.proj_out", "--gate-min-psnr", "40"])
    demo = options_from_args(args, demo=True)
    assert demo.samples == 8 and demo.exclude == ("transformer.proj_out",)
    assert demo.thresholds == GateThresholds(DEMO_THRESHOLDS.min_cosine, DEMO_THRESHOLDS.max_latent_error, 40.0)
    assert options_from_args(parser.parse_args(["--precision", "fp8"])).thresholds == GateThresholds()
    code = build_engines.main(["--demo", "--precision", "int8", "--calibration", str(tmp_path / "missing"),
                               "--out", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out" / "engines.json").exists()


def test_missing_modelopt_says_how_to_install(monkeypatch):
    from sparse_context.calibration.errors import QuantizationUnavailableError
    from sparse_context.calibration.quantize import import_modelopt_quantize

    monkeypatch.setitem(sys.modules, "modelopt", None)
    monkeypatch.setitem(sys.modules, "modelopt.onnx", None)
    monkeypatch.setitem(sys.modules, "modelopt.onnx.quantization", None)
    hint = r"ModelOpt is not installed.*pip install \"sparse-context\[quantization\]\"$"
    with pytest.raises(QuantizationUnavailableError, match=hint):
        import_modelopt_quantize()


def test_gate_threshold_errors_name_the_flag():
    from sparse_context.calibration.errors import CalibrationConfigError
    from sparse_context.calibration.gate import GateThresholds

    for fields, flag in ((dict(min_cosine=2.0), "--gate-min-cosine"), (dict(max_latent_error=-1),
                                                                       "--gate-max-latent-error"),
                         (dict(min_psnr=float("nan")), "--gate-min-psnr")):
        with pytest.raises(CalibrationConfigError, match=flag):
            GateThresholds(**fields).validate()


def test_gate_metrics():
    from sparse_context.calibration.gate import PSNR_CAP_DB, cosine, gate_modes, psnr, relative_error

    a = np.array([1.0, 2.0, 3.0])
    assert cosine(a, 2 * a) == pytest.approx(1.0) and cosine(a, -a) == pytest.approx(-1.0)
    assert relative_error(a * 1.1, a) == pytest.approx(0.1)
    assert psnr(np.full((2, 2), 0.5), np.full((2, 2), 0.6)) == pytest.approx(20.0)
    assert psnr(a, a) == PSNR_CAP_DB
    assert gate_modes(("full", "kv"), (0.05, 1.0)) == {"dense": ("full", 1.0), "sparse": ("full", 0.05),
                                                     "sparse_kv": ("kv", 0.05)}
    assert gate_modes(("kv",), (1.0,)) == {"dense_kv": ("kv", 1.0)}
