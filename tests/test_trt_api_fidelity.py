"""Where the real TensorRT Python API differs from what a first reading suggests, and what the build and runner do
about it (checked against the 10.3 and 11.1 bindings' source; the stand-in models each behaviour):

- ``set_optimization_profile_async`` raises RuntimeError instead of returning False;
- ``set_tensor_address`` takes 256-byte aligned addresses only;
- engines and contexts belong to the CUDA device current when they are made, and run only there;
- ``set_timing_cache`` returns False for a cache of another GPU or version, ``create_timing_cache`` None for bytes
  that are no cache, ``get_timing_cache`` may be None;
- ``IOptimizationProfile.set_shape`` raises on inconsistent min/opt/max;
- an exception in a progress callback cancels the build inside TensorRT (it cannot cross back into it);
- a version-compatible plan deserializes only with ``engine_host_code_allowed``.

The stand-in runs the "engines" with onnxruntime on host memory; the build steps, runner and backend are the
package's own.
"""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the stand-in executes engines with onnxruntime (pip install .[onnx])")

from sparse_context.engines.buckets import BucketPlan  # noqa: E402
from sparse_context.engines.build import timing_cache_name  # noqa: E402
from sparse_context.engines.errors import EngineBuildError, RunnerError  # noqa: E402
from sparse_context.engines.manifest import EngineManifest  # noqa: E402
from sparse_context.engines.profiles import Profile, engine_profiles  # noqa: E402
from sparse_context.engines.trt import loader as trt_loader  # noqa: E402
from sparse_context.engines.trt.runner import DeviceTensor, TrtRunner  # noqa: E402
import trt_standin  # noqa: E402
from test_engines_trt import tiny_matmul_onnx  # noqa: E402


@pytest.fixture
def trt(monkeypatch):
    module = trt_standin.make_module()
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    return module


@pytest.fixture
def tiny(tmp_path):
    """A one-MatMul ONNX graph with a dynamic token axis and a manifest with two profiles (0..205, 206..4096)."""
    weight = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    onnx_path = tmp_path / "tiny.onnx"
    tiny_matmul_onnx(onnx_path, weight)
    plan = BucketPlan(keep_fractions=(0.05, 1.0), max_refs=1)
    profiles = engine_profiles(plan, "full", {"refs": (1, "ref_tokens", 8)})
    manifest = EngineManifest("full", trt_standin.VERSION, "Stand-in GPU (host memory)", "8.7", "tiny", "fp32",
                              profiles, build_args=("--graph", "full"))
    return onnx_path, manifest, weight


def build(tiny, tmp_path, **kwargs):
    onnx_path, manifest, _ = tiny
    return trt_loader.build_engine(onnx_path, tmp_path / "tiny.engine", manifest, **kwargs)


# -- timing cache ---------------------------------------------------------------------------------------------
def test_timing_cache_of_another_gpu_is_left_unused_and_replaced(trt, tiny, tmp_path, caplog):
    cache = tmp_path / timing_cache_name(trt.__version__, "8.7")
    build(tiny, tmp_path, timing_cache_path=cache)
    ours = cache.read_bytes()
    assert ours.startswith(trt_standin.TIMING_CACHE_MAGIC)
    cache.write_bytes(trt_standin.TIMING_CACHE_MAGIC + b"sm9.9.9")  # timed on another GPU / TensorRT
    with caplog.at_level(logging.WARNING):
        build(tiny, tmp_path, timing_cache_path=cache)
    assert "TensorRT refused the timing cache" in caplog.text and str(cache) in caplog.text
    assert cache.read_bytes() == ours  # replaced by this build's own
    caplog.clear()
    cache.write_bytes(b"\x00 half-written")  # no cache at all: create_timing_cache returns None
    with caplog.at_level(logging.WARNING):
        build(tiny, tmp_path, timing_cache_path=cache)
    assert "TensorRT refused the timing cache" in caplog.text and cache.read_bytes() == ours
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build(tiny, tmp_path, timing_cache_path=cache)  # its own cache: used without a word
    assert "timing cache" not in caplog.text


def test_a_build_without_a_timing_cache_to_save_still_saves_its_engine(trt, tiny, tmp_path, monkeypatch, caplog):
    """The engine (minutes to hours of work) is written before the timing cache, and a cache that cannot be saved
    costs a warning, not the engine."""
    monkeypatch.setattr(trt_standin._Config, "get_timing_cache", lambda self: None)
    cache = tmp_path / "timing.cache"
    with caplog.at_level(logging.WARNING):
        manifest = build(tiny, tmp_path, timing_cache_path=cache)
    assert (tmp_path / "tiny.engine").is_file() and manifest.engine_sha256
    assert not cache.exists() and "kept no timing cache" in caplog.text


def test_timing_cache_names_carry_version_and_architecture():
    assert timing_cache_name("10.3.0", "8.7") == "timing-trt10.3.0-sm87.cache"
    assert timing_cache_name("11.1.0.post1", "10.0") == "timing-trt11.1.0.post1-sm100.cache"
    assert timing_cache_name("10/3", "9.0") == "timing-trt10_3-sm90.cache"  # nothing outside the folder


# -- profiles, progress, flags ----------------------------------------------------------------------------------
def test_inconsistent_profile_shapes_become_a_build_error(trt, tiny, tmp_path):
    onnx_path, manifest, _ = tiny
    bad = Profile("keep0.05", "full", (("refs", ((1, 9, 8), (1, 4, 8), (1, 2, 8))),))  # min > opt > max
    with pytest.raises(EngineBuildError, match=r"rejected the shapes of 'refs' in profile keep0.05/full \(min "
                                               r"\(1, 9, 8\), opt \(1, 4, 8\), max \(1, 2, 8\), network "
                                               r"\(1, -1, 8\)\): Shape provided for min is inconsistent"):
        trt_loader.build_engine(onnx_path, tmp_path / "bad.engine", EngineManifest(
            "full", trt.__version__, "g", "8.7", "tiny", "fp32", (bad,)))
    assert not (tmp_path / "bad.engine").exists()


def test_a_progress_callback_that_raises_cancels_the_build_and_is_named(trt, tiny, tmp_path):
    def broken(event):
        if event.kind == "step":
            raise ValueError("progress bar closed")

    with pytest.raises(EngineBuildError, match="cancelled: the progress callback raised ValueError: progress bar "
                                               "closed") as error:
        build(tiny, tmp_path, progress=broken)
    assert isinstance(error.value.__cause__, ValueError)
    assert not (tmp_path / "tiny.engine").exists()

    def interrupted(event):
        raise KeyboardInterrupt  # Ctrl-C lands in the callback: TensorRT runs no other Python code during a build

    with pytest.raises(KeyboardInterrupt):
        build(tiny, tmp_path, progress=interrupted)
    assert not (tmp_path / "tiny.engine").exists()


def test_logged_errors_are_taken_once():
    logger = trt_loader._logger_class(object)({1: "ERROR"})
    logger.log(1, "profile 3 out of range")
    assert trt_loader.logged_errors(logger) == ["profile 3 out of range"]
    assert trt_loader.logged_errors(logger) == []  # a later failure does not quote it again
    assert trt_loader.logged_errors(object()) == []


def test_version_compatible_engines_may_run_their_embedded_runtime(trt, tiny, tmp_path):
    onnx_path, manifest, _ = tiny
    flagged = EngineManifest(**{**manifest.__dict__, "build_flags": ("VERSION_COMPATIBLE",)})
    trt_loader.build_engine(onnx_path, tmp_path / "vc.engine", flagged)
    with TrtRunner(tmp_path / "vc.engine", memory=trt_standin.HostMemory()) as runner:
        assert runner.runtime.engine_host_code_allowed is True
    build(tiny, tmp_path)
    with TrtRunner(tmp_path / "tiny.engine", memory=trt_standin.HostMemory()) as runner:
        assert not hasattr(runner.runtime, "engine_host_code_allowed")


# -- runner: device, alignment, profiles ----------------------------------------------------------------------
def test_the_runner_calls_tensorrt_on_its_memorys_device(trt, tiny, tmp_path):
    """An engine is deserialized and run with the memory's GPU current, whatever the caller's current device is,
    and the caller's device comes back after each call."""
    _, _, weight = tiny
    build(tiny, tmp_path)
    memory = trt_standin.HostMemory(device=1)
    assert trt_standin.CURRENT_DEVICE == [0]
    refs = np.random.default_rng(1).standard_normal((1, 7, 8)).astype(np.float32)
    with TrtRunner(tmp_path / "tiny.engine", memory=memory) as runner:
        assert runner.engine.device == 1 and trt_standin.CURRENT_DEVICE == [0]
        out = runner.infer({"refs": refs}, "keep0.05/full")["out"]
        assert trt_standin.CURRENT_DEVICE == [0]
    np.testing.assert_allclose(out, refs @ weight, rtol=1e-6, atol=1e-6)


def test_unaligned_addresses_are_refused_with_the_reason(trt, tiny, tmp_path):
    build(tiny, tmp_path)
    memory = trt_standin.HostMemory()
    buffer = memory.alloc(4096)
    with TrtRunner(tmp_path / "tiny.engine", memory=memory) as runner:
        pointer = memory.pointer(buffer) + 128
        with pytest.raises(RunnerError, match=rf"tensor 'refs': address {pointer:#x} is not 256-byte aligned "
                                              r"\(offset 128\), which TensorRT requires"):
            runner.infer({"refs": DeviceTensor(pointer, (1, 7, 8))}, "keep0.05/full")
        runner.context.set_tensor_address = lambda name, address: False
        runner.logger.log(1, "address refused")
        with pytest.raises(RunnerError, match="TensorRT refused the address 0x[0-9a-f]+ for tensor 'refs': address "
                                              "refused"):
            runner.infer({"refs": np.zeros((1, 7, 8), np.float32)}, "keep0.05/full")


def test_an_out_of_range_profile_raises_in_the_binding_and_becomes_a_runner_error(trt, tiny, tmp_path):
    """The binding raises RuntimeError (never returns False); an engine holding fewer profiles than its manifest
    reaches it while the runner sizes its buffers."""
    onnx_path, manifest, _ = tiny
    build(tiny, tmp_path)
    context = trt_standin._Context
    with pytest.raises(RuntimeError, match="Error in set optimization profile async"):
        context(trt_standin._Engine((tmp_path / "tiny.engine").read_bytes())).set_optimization_profile_async(5, 0)
    runner = TrtRunner(tmp_path / "tiny.engine", memory=trt_standin.HostMemory())
    runner.activate()
    try:
        with pytest.raises(RunnerError, match=r"TensorRT refused profile 1 \(keep1.00/full\) of 2 for tiny.engine: "
                                              r"Error in set optimization profile async.; rebuild"):
            runner.engine.profiles = runner.engine.profiles[:1]
            runner._switch_profile(1, 0)
    finally:
        runner.deactivate()


def test_kv_layer_strides_start_every_layer_aligned():
    """Layers of a stacked K/V buffer start at 256-byte aligned offsets for any token count; a real model's token
    (heads x head_dim x 2 bytes, a multiple of 256) never needs padding."""
    from sparse_context.engines.feeds import FeedBuilder
    from sparse_context.export.spec import ModelDims

    def feeds(heads, head_dim, layers=3):
        dims = ModelDims(in_channels=8, text_dim=16, heads=heads, head_dim=head_dim, num_layers=layers,
                         axes_dims_rope=(head_dim // 4,) * 4, rope_theta=2000.0)
        return FeedBuilder(dims, np.float16)

    tiny = feeds(2, 32)  # 128 bytes a token in float16
    assert [tiny.kv_stride_tokens(n, 2, 256) for n in (0, 1, 13, 14)] == [0, 2, 14, 14]
    assert tiny.kv_stride_tokens(13, 4, 256) == 13 and tiny.kv_stride_tokens(13, 2) == 13
    assert [offset for _, offset, _ in tiny.kv_layers("ref_keys", 13, 2, 256)] == [0, 14 * 128, 28 * 128]
    assert all(offset % 256 == 0 for _, offset, _ in feeds(3, 16).kv_layers("ref_keys", 13, 2, 256))
    assert feeds(3, 16).kv_stride_tokens(13, 2, 256) == 16  # 96-byte tokens: runs of 8
    klein_9b = feeds(32, 128, layers=32)
    assert klein_9b.kv_stride_tokens(2459, 2, 256) == 2459
