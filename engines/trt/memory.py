"""Device memory, streams and device identity for the TensorRT runner: cuda-python or PyTorch.

PyTorch is preferred when it sees a CUDA device (its CUDA tensors are passed to TensorRT without a copy);
otherwise cuda-python's runtime API moves numpy arrays. Both are imported lazily.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from sparse_context.engines.errors import RunnerError, TensorRTUnavailableError
from sparse_context.engines.streams import CudaStream, cuda_check
from sparse_context.runtime.errors import bad_value

# TensorRT DataType names -> numpy dtype names. bfloat16 has no numpy dtype: it needs the torch path.
NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
                "UINT8": "uint8", "BOOL": "bool"}
TORCH_DTYPES = {**NUMPY_DTYPES, "BF16": "bfloat16", "FP8": "float8_e4m3fn"}
# TensorRT requires every tensor address it is given to be 256-byte aligned (IExecutionContext::setTensorAddress).
ALIGNMENT = 256


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "9.0"


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


class CudartMemory:
    """numpy <-> device through cuda-python: one stream (:class:`~sparse_context.engines.streams.CudaStream`, whose
    queued copies keep their host arrays until it waits), raw allocations, async copies."""

    def __init__(self, device: int = 0):
        self.queue = CudaStream(device, TensorRTUnavailableError,
                                "`pip install .[tensorrt]` (or install torch with CUDA)")
        self.cudart, self.stream, self.device = self.queue.cudart, self.queue.stream, device

    @property
    def stream_handle(self) -> int:
        return self.queue.handle

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This memory's GPU as the thread's current device while TensorRT runs (engines and contexts belong to the
        device current when they are made, and run only there); the caller's device comes back after."""
        before = cuda_check(self.cudart, self.cudart.cudaGetDevice(), "cudaGetDevice")
        if int(before) != self.device:
            cuda_check(self.cudart, self.cudart.cudaSetDevice(self.device), "cudaSetDevice")
        try:
            yield
        finally:
            if int(before) != self.device:
                cuda_check(self.cudart, self.cudart.cudaSetDevice(int(before)), "cudaSetDevice")

    def device_info(self) -> DeviceInfo:
        props = cuda_check(self.cudart, self.cudart.cudaGetDeviceProperties(self.device), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return DeviceInfo(name.rstrip("\x00"), f"{props.major}.{props.minor}")

    def alloc(self, nbytes: int) -> Any:
        # cudaMalloc(0) may return a null pointer, which TensorRT refuses even for empty tensors.
        return cuda_check(self.cudart, self.cudart.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")

    def pointer(self, buffer: Any) -> int:
        return int(buffer)

    def free(self, buffer: Any) -> None:
        cuda_check(self.cudart, self.cudart.cudaFree(buffer), "cudaFree")

    def upload(self, buffer: Any, value: Any, dtype_name: str) -> int:
        self.queue.write(int(buffer), np.ascontiguousarray(value, dtype=_numpy_dtype(dtype_name)))
        return int(buffer)

    def download(self, buffer: Any, shape: tuple[int, ...], dtype_name: str) -> np.ndarray:
        out = np.empty(shape, dtype=_numpy_dtype(dtype_name))
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(self.cudart, self.cudart.cudaMemcpyAsync(out.ctypes.data, buffer, out.nbytes, kind, self.stream),
                   "cudaMemcpyAsync")
        return out  # valid after synchronize()

    def synchronize(self) -> None:
        self.queue.synchronize()

    def close(self) -> None:
        self.queue.close()


class TorchMemory:
    """Device memory as torch uint8 tensors; CUDA tensor inputs of the right dtype are used in place."""

    def __init__(self, device: int = 0):
        torch = _torch_cuda()
        if torch is None:
            raise TensorRTUnavailableError("torch with a CUDA device is not available")
        self.torch = torch
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(self.device)

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def current(self) -> Any:
        """This memory's GPU as the current device while TensorRT runs (see :meth:`CudartMemory.current`)."""
        return self.torch.cuda.device(self.device)

    def device_info(self) -> DeviceInfo:
        major, minor = self.torch.cuda.get_device_capability(self.device)
        return DeviceInfo(self.torch.cuda.get_device_name(self.device), f"{major}.{minor}")

    def alloc(self, nbytes: int) -> Any:
        return self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device=self.device)

    def pointer(self, buffer: Any) -> int:
        return int(buffer.data_ptr())

    def free(self, buffer: Any) -> None:
        pass  # the caching allocator reclaims it once the runner drops the tensor

    def upload(self, buffer: Any, value: Any, dtype_name: str) -> int:
        dtype = getattr(self.torch, TORCH_DTYPES[dtype_name])
        if (isinstance(value, self.torch.Tensor) and value.is_cuda and value.device == self.device
                and value.dtype == dtype and value.is_contiguous() and value.data_ptr() % ALIGNMENT == 0):
            # Zero copy (a view at an unaligned offset is copied: TensorRT takes 256-byte aligned addresses only);
            # work queued on the caller's stream must finish before ours reads it.
            self.stream.wait_stream(self.torch.cuda.current_stream(value.device))
            return int(value.data_ptr())
        source = self.torch.as_tensor(value).to(dtype).contiguous().view(-1)
        with self.torch.cuda.stream(self.stream):
            target = buffer[: source.numel() * source.element_size()].view(dtype)
            target.copy_(source, non_blocking=True)
        return int(buffer.data_ptr())

    def download(self, buffer: Any, shape: tuple[int, ...], dtype_name: str) -> Any:
        dtype = getattr(self.torch, TORCH_DTYPES[dtype_name])
        count = int(np.prod(shape, dtype=np.int64))
        itemsize = self.torch.empty((), dtype=dtype).element_size()
        with self.torch.cuda.stream(self.stream):
            # A clone, because the next infer() overwrites the preallocated buffer.
            return buffer[: count * itemsize].view(dtype).view(shape).clone()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        pass


def default_memory(device: int = 0) -> CudartMemory | TorchMemory:
    """TorchMemory when torch sees CUDA, else CudartMemory (which raises if cuda-python is missing)."""
    return TorchMemory(device) if _torch_cuda() is not None else CudartMemory(device)


def _numpy_dtype(dtype_name: str) -> np.dtype:
    if dtype_name not in NUMPY_DTYPES:
        raise RunnerError(bad_value("engine tensor type for numpy buffers", dtype_name, ", ".join(NUMPY_DTYPES)
                                    + " (BF16 and FP8 have no numpy dtype: install torch with CUDA, whose tensors "
                                    "hold them)"))
    return np.dtype(NUMPY_DTYPES[dtype_name])
