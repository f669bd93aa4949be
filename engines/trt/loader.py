"""Build TensorRT engines with the Python API in small named steps (Polygraphy style, no shelling out).

``tensorrt`` is imported inside the functions, so this module (and the package) imports without it.
Written against TensorRT 10.x (Jetson Orin: 10.3) and 11.x. Precision is never a builder flag: TensorRT 11
removed FP16/BF16/INT8/FP8 flags and calibrators, and a strongly typed 10.x network rejects them, so precision
comes from the ONNX tensor types and explicit Q/DQ nodes.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sparse_context.engines.errors import BuildOptionError, EngineBuildError, TensorRTUnavailableError
from sparse_context.engines.manifest import EngineManifest, atomic_write_bytes, stamp_manifest, write_manifest
from sparse_context.engines.profiles import Profile
from sparse_context.runtime.errors import bad_value

LOG = logging.getLogger(__name__)
# Builder flags that set precision: removed in TensorRT 11, refused by strongly typed networks in 10.x. (TF32 is a
# math mode of float32 layers, on by default, and stays in both.)
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4",
                   "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS")
# Flags whose engines run only after the weights are refitted into them, which the runner does not do.
UNSUPPORTED_FLAGS = ("STRIP_PLAN", "WEIGHTLESS")
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder_optimization_level; 3 is its default


def import_tensorrt() -> Any:
    """``tensorrt`` or TensorRTUnavailableError saying how to install it."""
    try:
        import tensorrt
    except ImportError as error:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed ({error}); install it with `pip install .[tensorrt]` on a machine with an "
            "NVIDIA GPU (Jetson: use the JetPack TensorRT)") from None
    return tensorrt


def trt_major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def _logger_class(base: type) -> type:
    class CollectingLogger(base):
        """Routes TensorRT messages to ``logging`` and keeps errors, so a failed build can quote them."""

        def __init__(self, severity_names: dict):
            base.__init__(self)
            self.errors: list[str] = []
            self._levels = severity_names

        def log(self, severity, message):  # TensorRT calls this from its own threads too
            name = self._levels.get(severity, "INFO")
            if name in ("ERROR", "INTERNAL_ERROR"):
                self.errors.append(str(message))
            LOG.log(getattr(logging, "ERROR" if name == "INTERNAL_ERROR" else name, logging.INFO), "%s", message)

    return CollectingLogger


def logged_errors(logger: Any) -> list[str]:
    """The errors TensorRT logged since the last call (taken: a later failure does not quote earlier ones)."""
    errors = getattr(logger, "errors", None)  # a caller-supplied trt.Logger keeps none
    if not errors:
        return []
    taken = list(errors)
    del errors[: len(taken)]
    return taken


def make_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity
    names = {severity.INTERNAL_ERROR: "INTERNAL_ERROR", severity.ERROR: "ERROR", severity.WARNING: "WARNING",
             severity.INFO: "INFO", severity.VERBOSE: "DEBUG"}
    return _logger_class(trt.ILogger)(names)


@dataclass(frozen=True)
class BuildProgress:
    """One progress event: ``kind`` is "start", "step" or "finish"; ``step``/``num_steps`` count the phase."""

    kind: str
    phase: str
    parent: str | None = None
    step: int = 0
    num_steps: int = 0


ProgressCallback = Callable[[BuildProgress], Any]  # return False to cancel the build


def _progress_class(base: type) -> type:
    class ProgressMonitor(base):
        """``IProgressMonitor`` forwarding to a callback; a callback returning False cancels the build."""

        def __init__(self, callback: ProgressCallback):
            base.__init__(self)
            self._callback = callback
            self._steps: dict[str, int] = {}
            self.cancelled = False
            self.error: BaseException | None = None  # what the callback raised (the build is then cancelled)

        def _report(self, event: BuildProgress) -> bool:
            # TensorRT calls these from its build; an exception cannot cross back into it, so it is kept, the
            # build is cancelled at the next step, and engine_bytes_from_network raises it.
            if self.error is not None:
                return False
            try:
                return self._callback(event) is not False
            except BaseException as error:  # noqa: BLE001 - Ctrl-C lands here too; engine_bytes_from_network
                self.error = error          # raises it once TensorRT has stopped
                return False

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._steps[phase_name] = num_steps
            self._report(BuildProgress("start", phase_name, parent_phase, 0, num_steps))

        def step_complete(self, phase_name, step):
            keep_going = self._report(BuildProgress("step", phase_name, None, step + 1,
                                                    self._steps.get(phase_name, 0)))
            self.cancelled = self.cancelled or not keep_going
            return keep_going  # False asks TensorRT to stop; build_serialized_network then returns None

        def phase_finish(self, phase_name):
            self._report(BuildProgress("finish", phase_name, None, self._steps.get(phase_name, 0),
                                       self._steps.get(phase_name, 0)))

    return ProgressMonitor


def progress_monitor(callback: ProgressCallback, trt: Any = None) -> Any:
    """A ``trt.IProgressMonitor`` that reports to ``callback``. Keep a reference while the build runs."""
    trt = trt or import_tensorrt()
    return _progress_class(trt.IProgressMonitor)(callback)


@dataclass
class ParsedNetwork:
    """Builder, network and parser together: the network's layers reference parser-owned weights."""

    builder: Any
    network: Any
    parser: Any
    logger: Any
    strongly_typed: bool


def network_from_onnx_path(path: str | os.PathLike, strongly_typed: bool = True, logger: Any = None) -> ParsedNetwork:
    """Parse an ONNX file into a TensorRT network; every parser error is collected into one EngineBuildError."""
    trt = import_tensorrt()
    path = Path(path)
    if not path.is_file():
        raise EngineBuildError(f"ONNX file {path} not found; export it first (python -m sparse_context export)")
    logger = logger or make_logger(trt)
    builder = trt.Builder(logger)
    # Accepted but ignored on TensorRT 11 (always strongly typed); required on 10.x to opt in.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser resolves external-data weights next to the ONNX file.
    ok = parser.parse_from_file(str(path))
    problems = [str(parser.get_error(index)) for index in range(parser.num_errors)]
    if not ok or problems:
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {path}", problems or logged_errors(logger))
    return ParsedNetwork(builder, network, parser, logger, strongly_typed or trt_major(trt) >= 11)


def check_build_flags(trt: Any, flags: Sequence[str], strongly_typed: bool) -> list[Any]:
    """Builder flags by name -> ``trt.BuilderFlag`` values; BuildOptionError for unknown or precision flags."""
    values = []
    for name in flags:
        if name.upper() in PRECISION_FLAGS and (strongly_typed or trt_major(trt) >= 11):
            raise BuildOptionError(
                f"builder flag {name!r} sets precision, which TensorRT {trt.__version__} takes from the ONNX types "
                "and Q/DQ nodes of a strongly typed network (TensorRT 11 removed these flags); export the graph "
                "in the precision you want (--dtype) or quantize it with ModelOpt, and drop the flag")
        if name.upper() in UNSUPPORTED_FLAGS:
            raise BuildOptionError(f"builder flag {name!r} is not supported: its plan must be refitted with the "
                                   "weights before it runs, and the runner does not refit; drop the flag")
        if not hasattr(trt.BuilderFlag, name.upper()):
            known = sorted(n for n in dir(trt.BuilderFlag)
                           if n.isupper() and n not in PRECISION_FLAGS and n not in UNSUPPORTED_FLAGS)
            raise BuildOptionError(bad_value("builder flag", name, ", ".join(known), "flags="))
        values.append(getattr(trt.BuilderFlag, name.upper()))
    return values


def builder_config(parsed: ParsedNetwork, *, workspace_bytes: int | None = None,
                   timing_cache_path: str | os.PathLike | None = None, flags: Sequence[str] = (),
                   optimization_level: int | None = None, monitor: Any = None) -> Any:
    """An ``IBuilderConfig``: workspace limit, persistent timing cache, flags by name, optimization level."""
    trt = import_tensorrt()
    config = parsed.builder.create_builder_config()
    if workspace_bytes is not None:
        if workspace_bytes <= 0:
            raise BuildOptionError(bad_value("workspace", workspace_bytes, "bytes > 0", "--workspace-gb"))
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    for flag in check_build_flags(trt, flags, parsed.strongly_typed):
        config.set_flag(flag)
    if optimization_level is not None:
        if optimization_level not in OPTIMIZATION_LEVELS:
            raise BuildOptionError(bad_value("builder optimization level", optimization_level, "0..5",
                                             "optimization_level="))
        config.builder_optimization_level = int(optimization_level)
    if timing_cache_path is not None:
        use_timing_cache(config, Path(timing_cache_path))
    if monitor is not None:
        config.progress_monitor = monitor
    return config


def use_timing_cache(config: Any, path: Path) -> bool:
    """Start the build from the timing cache at ``path`` (an earlier build's kernel timings) where TensorRT accepts
    it; a cache it refuses (another GPU or TensorRT version, a damaged file) is left unused with a warning and the
    build starts from an empty one, which is saved over it. Returns whether the file's timings are used."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False) is not False
    if data and not accepted:
        LOG.warning("TensorRT refused the timing cache %s (made on another GPU or TensorRT version, or damaged); "
                    "building without it and saving a new one", path)
    if not accepted:
        empty = config.create_timing_cache(b"")
        if empty is None or config.set_timing_cache(empty, ignore_mismatch=False) is False:
            LOG.warning("TensorRT refused an empty timing cache; building without one")
    return accepted


def add_profiles(parsed: ParsedNetwork, config: Any, profiles: Sequence[Profile]) -> list[int]:
    """Add each profile in order (list position = profile index); check names against the network first."""
    network = parsed.network
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    dynamic = {name for name, shape in inputs.items() if any(d < 0 for d in shape)}
    problems = []
    for profile in profiles:
        shapes = profile.shape_dict()
        problems += [f"{profile.name}: no shapes for dynamic input {name!r}" for name in sorted(dynamic - set(shapes))]
        problems += [f"{profile.name}: input {name!r} is not in the network (inputs: {sorted(inputs)})"
                     for name in sorted(set(shapes) - set(inputs))]
    if problems:
        raise EngineBuildError("profiles do not match the ONNX graph's inputs (export spec drift?)", problems)
    indices = []
    for profile in profiles:
        trt_profile = parsed.builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes:
            if name in dynamic:  # static inputs need no range and some TensorRT versions reject one
                try:
                    trt_profile.set_shape(name, low, opt, high)
                except (RuntimeError, TypeError, ValueError) as error:  # the binding raises where C++ returns false
                    raise EngineBuildError(
                        f"TensorRT rejected the shapes of {name!r} in profile {profile.name} (min {tuple(low)}, opt "
                        f"{tuple(opt)}, max {tuple(high)}, network {inputs[name]}): {error}; check --keeps, "
                        f"--max-refs and the resolutions against the export", logged_errors(parsed.logger)) from None
        index = config.add_optimization_profile(trt_profile)
        if index < 0:
            raise EngineBuildError(f"TensorRT rejected profile {profile.name}", logged_errors(parsed.logger))
        indices.append(index)
    return indices


def engine_bytes_from_network(parsed: ParsedNetwork, config: Any, monitor: Any = None) -> bytes:
    """``build_serialized_network``; None (failure or cancel) becomes an EngineBuildError quoting TensorRT."""
    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    error = getattr(monitor, "error", None)
    if error is not None and not isinstance(error, Exception):
        raise error  # KeyboardInterrupt / SystemExit: TensorRT has stopped, now the caller's handlers run
    if error is not None:
        raise EngineBuildError(f"engine build cancelled: the progress callback raised "
                               f"{type(error).__name__}: {error}") from error
    if serialized is None:
        if monitor is not None and getattr(monitor, "cancelled", False):
            raise EngineBuildError("engine build cancelled by the progress callback")
        raise EngineBuildError("TensorRT returned no engine (see its errors; a common cause is too little GPU "
                               "memory for the workspace or the largest profile)", logged_errors(parsed.logger))
    return bytes(memoryview(serialized))


def save_timing_cache(config: Any, path: str | os.PathLike) -> Path | None:
    """Write the build's timing cache (atomic); None, with a warning, where there is none to write or writing it
    fails: the cache only saves time, and the engine it came with is saved already."""
    cache = config.get_timing_cache()
    if cache is None:
        LOG.warning("TensorRT kept no timing cache for this build; %s is left as it was", path)
        return None
    try:
        return atomic_write_bytes(path, bytes(memoryview(cache.serialize())))
    except OSError as error:
        LOG.warning("could not save the timing cache %s: %s", path, error)
        return None


def save_engine(engine_bytes: bytes, path: str | os.PathLike, manifest: EngineManifest) -> EngineManifest:
    """Write the engine, then its manifest (both atomic): a manifest on disk always describes a whole engine."""
    stamped = stamp_manifest(manifest, engine_bytes)
    atomic_write_bytes(path, engine_bytes)
    write_manifest(path, stamped)
    return stamped


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, manifest: EngineManifest, *,
                 workspace_bytes: int | None = None, timing_cache_path: str | os.PathLike | None = None,
                 optimization_level: int | None = None, progress: ProgressCallback | None = None) -> EngineManifest:
    """The steps in order: parse -> config -> profiles -> build -> engine + manifest -> timing cache."""
    parsed = network_from_onnx_path(onnx_path)  # 1. ONNX -> strongly typed network
    monitor = progress_monitor(progress) if progress else None  # held here: TensorRT keeps no Python reference
    config = builder_config(parsed, workspace_bytes=workspace_bytes, timing_cache_path=timing_cache_path,
                            flags=manifest.build_flags, optimization_level=optimization_level, monitor=monitor)
    add_profiles(parsed, config, manifest.profiles)  # 2. one profile per bucket and step
    engine = engine_bytes_from_network(parsed, config, monitor)  # 3. minutes to hours for the 9B model
    saved = save_engine(engine, engine_path, manifest)  # 4. engine first, manifest last
    if timing_cache_path is not None:  # 5. after the engine: nothing here may cost a finished build
        save_timing_cache(config, timing_cache_path)
    return saved
