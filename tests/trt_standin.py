"""A stand-in ``tensorrt`` module that executes "engines" with onnxruntime on host memory.

TensorRT cannot be installed here, so the CPU tests drive the real build steps, runner and backend through this
module: the builder records the parsed ONNX path and the optimization profiles into the "engine" bytes; the
execution context checks shapes against the active profile (as TensorRT does), reads every input from the address
it was given, runs the ONNX graph with onnxruntime and writes every output to its address. Only TensorRT is stood
in for: the model, the graphs, the buffers, the profile logic and the runtime under test are the real ones.
``HostMemory`` is the runner's device-memory interface on host RAM, so addresses are real host pointers.
"""

from __future__ import annotations

import ctypes
import json
import types

import numpy as np

from sparse_context.engines.trt.memory import DeviceInfo

VERSION = "10.3.0"
STRONGLY_TYPED = 1  # NetworkDefinitionCreationFlag.STRONGLY_TYPED in 10.x (EXPLICIT_BATCH is 0; 11.x made it 0)
ALIGNMENT = 256  # setTensorAddress: "the pointer must have at least 256-byte alignment"
CURRENT_DEVICE = [0]  # the thread's current CUDA device, as HostMemory.current() sets it
TRT_TYPES = {1: "FLOAT", 10: "HALF", 7: "INT64", 6: "INT32"}  # ONNX elem_type -> TensorRT DataType name
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}


TIMING_CACHE_MAGIC = b"stand-in timing cache:"


def _scaled(dim: str) -> tuple[int, str]:
    """``"16*latent_rows"`` -> (16, "latent_rows"); a plain symbol -> (1, symbol)."""
    factor, star, symbol = dim.partition("*")
    return (int(factor), symbol) if star and factor.isdigit() else (1, dim)


def _evaluate(dim: str, values: dict) -> int:
    if dim in values:
        return values[dim]
    factor, symbol = _scaled(dim)
    return factor * values[symbol] if symbol in values else -1


def host_array(pointer: int, shape, dtype) -> np.ndarray:
    """The array of ``shape`` at a host address (a view: writes go to that memory)."""
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_uint8 * nbytes).from_address(int(pointer))
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class HostMemory:
    """The runner's memory interface on host RAM; counts uploads per tensor size to check what travels."""

    stream_handle = 0

    def __init__(self, compute_capability: str = "8.7", device: int = 0):
        self.cc, self.device = compute_capability, device
        self.uploads: list[int] = []  # bytes of each upload
        self.downloads: list[int] = []
        self.allocated: list[int] = []
        self.freed = 0

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("Stand-in GPU (host memory)", self.cc)

    def current(self):
        """This memory's device as the current one while the runner calls TensorRT (like cudaSetDevice)."""
        import contextlib

        @contextlib.contextmanager
        def scope():
            before = CURRENT_DEVICE[0]
            CURRENT_DEVICE[0] = self.device
            try:
                yield
            finally:
                CURRENT_DEVICE[0] = before
        return scope()

    def alloc(self, nbytes: int) -> np.ndarray:
        """Zeroed bytes at a 256-byte aligned address, as cudaMalloc gives (numpy alone aligns to 16 or 64)."""
        self.allocated.append(int(nbytes))
        raw = np.zeros(max(int(nbytes), 1) + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start: start + max(int(nbytes), 1)]

    def pointer(self, buffer: np.ndarray) -> int:
        return int(buffer.ctypes.data)

    def free(self, buffer: np.ndarray) -> None:
        self.freed += 1

    def upload(self, buffer: np.ndarray, value, dtype_name: str) -> int:
        array = np.ascontiguousarray(value, dtype=NUMPY[dtype_name])
        buffer[: array.nbytes] = array.reshape(-1).view(np.uint8)
        self.uploads.append(array.nbytes)
        return self.pointer(buffer)

    def download(self, buffer: np.ndarray, shape, dtype_name: str) -> np.ndarray:
        array = host_array(self.pointer(buffer), shape, NUMPY[dtype_name]).copy()
        self.downloads.append(array.nbytes)
        return array

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Tensor:
    def __init__(self, name, shape):
        self.name, self.shape = name, tuple(shape)


class _Network:
    def __init__(self, strongly_typed=False):
        self.path, self.inputs, self.outputs = None, [], []
        self.strongly_typed = strongly_typed
        self.has_qdq = False

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, index):
        return self.inputs[index]


class _Parser:
    def __init__(self, network, logger):
        self.network, self.num_errors = network, 0

    def parse_from_file(self, path):
        import onnx

        model = onnx.load(path, load_external_data=False)
        dims = lambda value: [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        initializers = {i.name for i in model.graph.initializer}
        self.network.path = str(path)
        self.network.has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        self.network.inputs = [_Tensor(v.name, dims(v)) for v in model.graph.input if v.name not in initializers]
        return True


class _OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, low, opt, high):
        # The binding raises (it does not return false) on ranks that differ or min > opt > max.
        if not len(low) == len(opt) == len(high) or not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self.shapes[name] = [list(low), list(opt), list(high)]


class _Config:
    def __init__(self):
        self.profiles, self.flags, self.progress_monitor = [], [], None
        self.builder_optimization_level = 3

    def set_memory_pool_limit(self, pool, nbytes):
        self.workspace = nbytes

    def set_flag(self, flag):
        self.flags.append(flag)

    def create_timing_cache(self, data):
        """A cache records the device it timed; bytes that are no cache at all are refused (None)."""
        data = bytes(data)
        if data and not data.startswith(TIMING_CACHE_MAGIC):
            return None
        device = data[len(TIMING_CACHE_MAGIC):].decode() if data else None
        return types.SimpleNamespace(device=device, serialize=lambda: TIMING_CACHE_MAGIC + b"sm" + VERSION.encode())

    def set_timing_cache(self, cache, ignore_mismatch):
        """False for a cache made on another device (or TensorRT version), as setTimingCache returns."""
        if cache.device is not None and cache.device != "sm" + VERSION and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return getattr(self, "timing_cache", None)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile.shapes)
        return len(self.profiles) - 1


class _Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags):
        return _Network(strongly_typed=bool(flags & (1 << STRONGLY_TYPED)))

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _OptimizationProfile()

    def build_serialized_network(self, network, config):
        monitor = config.progress_monitor
        if monitor is not None:
            monitor.phase_start("Building engine", None, 2)
            for step in range(2):
                if monitor.step_complete("Building engine", step) is False:
                    return None  # cancelled: TensorRT stops and returns no engine
            monitor.phase_finish("Building engine")
        if network.has_qdq and not network.strongly_typed:
            # TensorRT 10 takes Q/DQ precision only from a strongly typed network (or the removed INT8/FP8 flags).
            self.logger.log(1, "Q/DQ layers need a strongly typed network (STRONGLY_TYPED)")
            return None
        return json.dumps({"onnx": network.path, "profiles": config.profiles,
                           "strongly_typed": network.strongly_typed, "qdq": network.has_qdq}).encode()


def _deserialize(data):
    """``Runtime.deserialize_cuda_engine``: None for bytes that are no engine (TensorRT logs why)."""
    try:
        json.loads(data)
    except ValueError:
        return None
    return _Engine(data)


class _Engine:
    def __init__(self, data: bytes):
        import onnx
        import onnxruntime as ort

        self.device = CURRENT_DEVICE[0]  # an engine belongs to the device current when it is deserialized
        described = json.loads(data)
        self.profiles = described["profiles"]
        self.strongly_typed = described.get("strongly_typed", False)
        options = ort.SessionOptions()
        if described.get("qdq"):
            # TensorRT computes Q/DQ graphs as quantize-dequantize around float kernels: that is onnxruntime's basic
            # level (higher levels fuse integer kernels that round differently).
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        self.session = ort.InferenceSession(described["onnx"], options, providers=["CPUExecutionProvider"])
        model = onnx.load(described["onnx"], load_external_data=False)
        initializers = {i.name for i in model.graph.initializer}
        self.io = {}  # name -> (mode, dtype name, dims with symbols)
        for mode, values in (("INPUT", [v for v in model.graph.input if v.name not in initializers]),
                             ("OUTPUT", model.graph.output)):
            for value in values:
                dims = [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
                self.io[value.name] = (mode, TRT_TYPES[value.type.tensor_type.elem_type], dims)
        self.names = list(self.io)

    num_optimization_profiles = property(lambda self: len(self.profiles))
    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return types.SimpleNamespace(name=self.io[name][1])

    def get_tensor_shape(self, name):
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][2])

    def get_tensor_profile_shape(self, name, index):
        return [tuple(s) for s in self.profiles[index][name]]

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
        self.executions = []  # (profile index, {input: shape}, {tensor: address}) per call

    def set_optimization_profile_async(self, index, stream):
        # The binding turns the C++ call's false into a RuntimeError: it returns True or raises.
        if not 0 <= index < len(self.engine.profiles):
            raise RuntimeError("Error in set optimization profile async.")
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        ranges = self.engine.profiles[self.profile].get(name)
        if ranges is not None and not all(a <= d <= b for a, d, b in zip(ranges[0], shape, ranges[2])):
            return False  # TensorRT: "does not satisfy any optimization profile"
        self.shapes[name] = tuple(int(d) for d in shape)
        return True

    def _symbols(self):
        values = {}
        for name, (mode, _, dims) in self.engine.io.items():
            if mode == "INPUT" and name in self.shapes:
                for dim, size in zip(dims, self.shapes[name]):
                    if isinstance(dim, str):
                        factor, symbol = _scaled(dim)
                        values[dim] = size
                        values.setdefault(symbol, size // factor)  # "16*latent_rows": the VAE's pixel axes
        return values

    def get_tensor_shape(self, name):
        if name in self.shapes:
            return self.shapes[name]
        values = self._symbols()
        return tuple(d if isinstance(d, int) else _evaluate(d, values) for d in self.engine.io[name][2])

    def set_tensor_address(self, name, pointer):
        if int(pointer) % ALIGNMENT:
            return False  # TensorRT refuses (and logs) an address that is not 256-byte aligned
        self.addresses[name] = int(pointer)
        return True

    def execute_async_v3(self, stream):
        if CURRENT_DEVICE[0] != self.engine.device:
            return False  # the engine's kernels and memory live on another device than the current one
        feeds = {}
        for name, (mode, dtype, _) in self.engine.io.items():
            if mode == "INPUT":
                feeds[name] = host_array(self.addresses[name], self.shapes[name], NUMPY[dtype]).copy()
        self.executions.append((self.profile, {n: a.shape for n, a in feeds.items()}, dict(self.addresses)))
        outputs = [n for n, (mode, _, _) in self.engine.io.items() if mode == "OUTPUT"]
        for name, value in zip(outputs, self.engine.session.run(outputs, feeds)):
            host_array(self.addresses[name], value.shape, value.dtype)[...] = value
        return True


def make_module():
    """A ``tensorrt`` module object for ``sys.modules``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSION
    trt.BuilderFlag = types.SimpleNamespace(REFIT="REFIT", STRIP_PLAN="STRIP_PLAN", FP16="FP16", INT8="INT8",
                                            TF32="TF32", VERSION_COMPATIBLE="VERSION_COMPATIBLE")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=STRONGLY_TYPED)
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.ILogger = type("ILogger", (), {"Severity": types.SimpleNamespace(
        INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)})
    trt.IProgressMonitor = object
    trt.Builder = _Builder
    trt.OnnxParser = _Parser
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=_deserialize)
    return trt
