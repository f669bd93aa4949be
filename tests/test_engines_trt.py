"""TensorRT build steps and runner.

CPU tests drive the steps' own logic (flag checks, profile/name checks, error collection, progress events,
verify-before-deserialize) through a minimal stand-in ``tensorrt`` module; it mimics only the calls those
steps make. The real build/run test at the end needs TensorRT and a GPU and is skipped without them.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from sparse_context.engines.trt import loader as trt_build
from sparse_context.engines.buckets import BucketPlan
from sparse_context.engines.trt.memory import DeviceInfo
from sparse_context.engines.errors import (
    BuildOptionError, EngineBuildError, EngineCorruptError, EngineMismatchError, ProfileError, RunnerError,
    TensorRTUnavailableError,
)
from sparse_context.engines.manifest import EngineManifest
from sparse_context.engines.profiles import Profile
from sparse_context.engines.trt.loader import (
    BuildProgress, ParsedNetwork, _logger_class, _progress_class, add_profiles, builder_config, check_build_flags,
    engine_bytes_from_network, import_tensorrt, network_from_onnx_path, save_engine,
)
from sparse_context.engines.trt.runner import TrtRunner


class Recorder:
    """Records attribute sets and method calls; ``attrs`` are plain attributes, methods return ``returns[name]``."""

    def __init__(self, attrs=None, **returns):
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "returns", returns)
        for name, value in (attrs or {}).items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        self.calls.append((name, value))

    def __getattr__(self, name):
        def method(*args, **kwargs):
            self.calls.append((name, *args))
            value = self.returns.get(name)
            return value(*args) if callable(value) else value
        return method


def fake_trt(version="10.3.0", parse_ok=True, parse_errors=(), engine=b"engine"):
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", STRIP_PLAN="STRIP_PLAN", FP16="FP16", INT8="INT8",
                                            TF32="TF32", WEIGHTLESS="WEIGHTLESS")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.ILogger = type("ILogger", (), {"Severity": types.SimpleNamespace(
        INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)})
    trt.IProgressMonitor = object
    network = Recorder({"num_inputs": 0})
    trt.Builder = lambda logger: Recorder(create_network=network, create_builder_config=Recorder(),
                                          build_serialized_network=engine)
    trt.OnnxParser = lambda net, logger: Recorder({"num_errors": len(parse_errors)}, parse_from_file=parse_ok,
                                                  get_error=lambda i: parse_errors[i])
    return trt


@pytest.fixture
def install(monkeypatch):
    def put(trt):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt
    return put


def test_import_tensorrt_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import of a None entry raises ImportError
    with pytest.raises(TensorRTUnavailableError, match=r"pip install .\[tensorrt\]"):
        import_tensorrt()


def test_progress_monitor_events_and_cancel():
    events = []
    monitor = _progress_class(object)(lambda event: events.append(event))
    monitor.phase_start("Building", None, 2)
    assert monitor.step_complete("Building", 0) is True
    monitor.phase_finish("Building")
    assert events == [BuildProgress("start", "Building", None, 0, 2), BuildProgress("step", "Building", None, 1, 2),
                      BuildProgress("finish", "Building", None, 2, 2)]
    stopper = _progress_class(object)(lambda event: False)
    assert stopper.step_complete("Tactics", 3) is False and stopper.cancelled


def test_logger_collects_errors(caplog):
    logger = _logger_class(object)({0: "INTERNAL_ERROR", 1: "ERROR", 2: "WARNING"})
    logger.log(2, "slow layer")
    logger.log(1, "out of memory")
    logger.log(0, "assertion failed")
    assert logger.errors == ["out of memory", "assertion failed"]
    assert "slow layer" in caplog.text


@pytest.mark.parametrize("version, strongly_typed", [("11.0.0", False), ("11.0.0", True), ("10.3.0", True)])
def test_precision_flags_refused(version, strongly_typed):
    with pytest.raises(BuildOptionError, match="builder flag 'FP16' sets precision.*ONNX types and Q/DQ") as error:
        check_build_flags(fake_trt(version), ["REFIT", "FP16"], strongly_typed)
    assert isinstance(error.value, EngineBuildError)


def test_flags_by_name():
    trt = fake_trt("10.3.0")
    assert check_build_flags(trt, ["refit", "tf32"], True) == ["REFIT", "TF32"]  # TF32: a math mode, not a type
    assert check_build_flags(trt, ["FP16"], strongly_typed=False) == ["FP16"]  # weakly typed 10.x only
    with pytest.raises(BuildOptionError, match="builder flag: got 'SPEED'; allowed: REFIT, TF32.*flags="):
        check_build_flags(trt, ["SPEED"], True)


@pytest.mark.parametrize("flag", ["STRIP_PLAN", "weightless"])
def test_flags_whose_engines_need_a_refit_are_refused(flag):
    """A weight-stripped plan runs only after a refit, which the runner does not do: refuse the flag at build time
    instead of building an engine that cannot run."""
    with pytest.raises(BuildOptionError, match=rf"builder flag '{flag}' is not supported: .* refitted .*drop the flag"):
        check_build_flags(fake_trt("10.3.0"), ["REFIT", flag], True)


def test_network_from_onnx_path_collects_parser_errors(install, tmp_path):
    onnx_path = tmp_path / "kv.onnx"
    onnx_path.write_bytes(b"x")
    install(fake_trt(parse_ok=False, parse_errors=("node 3 (Attention): unsupported op", "node 9: bad type")))
    with pytest.raises(EngineBuildError, match="could not parse .*kv.onnx:\n  node 3 .*\n  node 9: bad type"):
        network_from_onnx_path(onnx_path)
    with pytest.raises(EngineBuildError, match="missing.onnx not found; export it first"):
        network_from_onnx_path(tmp_path / "missing.onnx")
    install(fake_trt("11.0.0"))
    parsed = network_from_onnx_path(onnx_path, strongly_typed=False)
    assert parsed.strongly_typed  # TensorRT 11 networks are always strongly typed
    assert ("parse_from_file", str(onnx_path)) in parsed.parser.calls


def parsed_network(inputs, add_profile_index=0, made=None):
    made = [] if made is None else made
    network = Recorder({"num_inputs": len(inputs)},
                       get_input=lambda i: types.SimpleNamespace(name=inputs[i][0], shape=inputs[i][1]))
    builder = Recorder(create_optimization_profile=lambda: made.append(Recorder()) or made[-1],
                       build_serialized_network=None,
                       create_builder_config=lambda: Recorder())
    return ParsedNetwork(builder, network, Recorder(), _logger_class(object)({}), True), \
        Recorder(add_optimization_profile=add_profile_index)


def test_builder_config_options(install, tmp_path):
    install(fake_trt())
    parsed, _ = parsed_network([])
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache")
    config = builder_config(parsed, workspace_bytes=8 << 30, timing_cache_path=cache, flags=["REFIT"],
                            optimization_level=4, monitor="monitor")
    assert ("set_memory_pool_limit", "WORKSPACE", 8 << 30) in config.calls
    assert ("set_flag", "REFIT") in config.calls and ("builder_optimization_level", 4) in config.calls
    assert ("create_timing_cache", b"cache") in config.calls and ("progress_monitor", "monitor") in config.calls
    with pytest.raises(BuildOptionError, match="workspace: got 0; allowed: bytes > 0"):
        builder_config(parsed, workspace_bytes=0)
    with pytest.raises(BuildOptionError, match="builder optimization level: got 7; allowed: 0..5"):
        builder_config(parsed, optimization_level=7)


def test_add_profiles_checks_names_and_skips_static_inputs():
    profile = Profile("keep0.10", "extract", (("refs", ((1, 0, 8), (1, 4, 8), (1, 9, 8))), ("timestep", ((1,),) * 3)))
    made = []
    parsed, config = parsed_network([("refs", (1, -1, 8)), ("timestep", (1,))], made=made)
    assert add_profiles(parsed, config, [profile, profile]) == [0, 0]
    assert [p.calls for p in made] == [[("set_shape", "refs", (1, 0, 8), (1, 4, 8), (1, 9, 8))]] * 2
    parsed, config = parsed_network([("refs", (1, -1, 8)), ("cached_keys", (2, 1, -1, 4))])
    with pytest.raises(EngineBuildError, match="export spec drift") as error:
        add_profiles(parsed, config, [profile])
    assert error.value.problems == [
        "keep0.10/extract: no shapes for dynamic input 'cached_keys'",
        "keep0.10/extract: input 'timestep' is not in the network (inputs: ['cached_keys', 'refs'])"]
    parsed, config = parsed_network([("refs", (1, -1, 8)), ("timestep", (1,))], add_profile_index=-1)
    with pytest.raises(EngineBuildError, match="TensorRT rejected profile keep0.10/extract"):
        add_profiles(parsed, config, [profile])


def test_engine_bytes_none_is_typed_error():
    parsed, config = parsed_network([])
    parsed.logger.errors.append("Requested amount of GPU memory could not be allocated")
    with pytest.raises(EngineBuildError, match="returned no engine.*\n  Requested amount of GPU memory"):
        engine_bytes_from_network(parsed, config)
    cancelled = types.SimpleNamespace(cancelled=True)
    with pytest.raises(EngineBuildError, match="cancelled by the progress callback"):
        engine_bytes_from_network(parsed, config, cancelled)


class FakeMemory:
    def __init__(self, cc="8.7"):
        self.cc = cc

    def device_info(self):
        return DeviceInfo("Fake GPU", self.cc)


def test_runner_refuses_before_deserializing(install, tmp_path):
    trt = install(fake_trt("10.3.0"))

    def must_not_run(*_):
        raise AssertionError("deserialize_cuda_engine reached")

    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=must_not_run)
    path = tmp_path / "kv.engine"
    manifest = save_engine(b"engine", path, EngineManifest("kv", "10.3.0", "Fake GPU", "8.7", "a", "b", ()))
    path.write_bytes(b"enginf")
    with pytest.raises(EngineCorruptError, match="modified or truncated"):
        TrtRunner(path, memory=FakeMemory()).activate()
    with pytest.raises(EngineMismatchError, match="compute capability 8.7 .* compute capability 9.0"):
        TrtRunner(path, manifest, memory=FakeMemory("9.0")).activate()


def test_runner_reports_failed_deserialize(install, tmp_path):
    trt = install(fake_trt("10.3.0"))
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda data: None)
    path = tmp_path / "kv.engine"
    save_engine(b"engine", path, EngineManifest("kv", "10.3.0", "Fake GPU", "8.7", "a", "b", ()))
    with pytest.raises(EngineCorruptError, match="could not deserialize .* rebuild it on this machine"):
        TrtRunner(path, memory=FakeMemory()).activate()


def test_runner_infer_before_activate():
    with pytest.raises(RunnerError, match=r"infer\(\) before activate\(\)"):
        TrtRunner("x.engine").infer({}, "keep0.10/full")


def test_runner_shape_check_names_the_range():
    profile = Profile("keep0.10", "full", (("refs", ((1, 0, 8), (1, 4, 8), (1, 9, 8))),))
    TrtRunner._check_in_profile(profile, "refs", (1, 9, 8))
    with pytest.raises(ProfileError, match=r"shape \(1, 10, 8\) is outside profile keep0.10/full "
                                           r"\(min \(1, 0, 8\), max \(1, 9, 8\)\).*bucket_for"):
        TrtRunner._check_in_profile(profile, "refs", (1, 10, 8))


# -- real TensorRT ------------------------------------------------------------------------------------------
def tiny_matmul_onnx(path, weight):
    """(1, n, 8) @ (8, 4) with a dynamic token axis ``ref_tokens``."""
    onnx = pytest.importorskip("onnx", reason="building the tiny ONNX needs onnx")
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["refs", "weight"], ["out"])], "tiny",
        [helper.make_tensor_value_info("refs", TensorProto.FLOAT, [1, "ref_tokens", 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "ref_tokens", 4])],
        [numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.trt
@pytest.mark.gpu
def test_tiny_engine_matches_onnxruntime(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install .[tensorrt])")
    ort = pytest.importorskip("onnxruntime", reason="the reference output needs onnxruntime")
    from sparse_context.engines.trt.memory import default_memory
    from sparse_context.engines.profiles import engine_profiles

    try:
        memory = default_memory()
        device = memory.device_info()
    except (TensorRTUnavailableError, RunnerError) as error:
        pytest.skip(f"no CUDA device: {error}")
    rng = np.random.default_rng(0)
    onnx_path = tmp_path / "tiny.onnx"
    tiny_matmul_onnx(onnx_path, rng.standard_normal((8, 4)).astype(np.float32))
    plan = BucketPlan(keep_fractions=(0.05, 1.0), max_refs=1)  # buckets 0..205 and 206..4096 tokens
    profiles = engine_profiles(plan, "full", {"refs": (1, "ref_tokens", 8)})
    manifest = EngineManifest("full", trt.__version__, device.name, device.compute_capability, "tiny", "fp32",
                              profiles, build_args=("--graph", "full"))
    events = []
    trt_build.build_engine(onnx_path, tmp_path / "tiny.engine", manifest, workspace_bytes=1 << 28,
                           timing_cache_path=tmp_path / "timing.cache", progress=events.append)
    assert (tmp_path / "timing.cache").is_file()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with TrtRunner(tmp_path / "tiny.engine", memory=memory) as runner:
        for tokens in (0, 7, 205, 206, 4096):
            refs = rng.standard_normal((1, tokens, 8)).astype(np.float32)
            profile = f"{plan.bucket_for(tokens).name}/full"
            out = runner.infer({"refs": refs}, profile)["out"]
            expected = session.run(None, {"refs": refs})[0]
            np.testing.assert_allclose(np.asarray(out.cpu() if hasattr(out, "cpu") else out), expected,
                                       rtol=1e-3, atol=1e-3)
        with pytest.raises(ProfileError, match="outside profile keep0.05/full"):
            runner.infer({"refs": np.zeros((1, 206, 8), np.float32)}, "keep0.05/full")
