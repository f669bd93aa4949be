"""The stream an onnxruntime backend queues its runs on when it synchronizes once per image (``sync="image"``).

onnxruntime's CUDA EP ends every run with a ``cudaStreamSynchronize`` of its own stream, and each session has its
own, so a 4-step generation waits for the GPU after every transformer call and every step graph. With one stream
shared by all of a backend's sessions (the ``user_compute_stream`` provider option), the runs are ordered by the
stream itself and need no wait between them: the host queues a whole generation and waits once, for the final
latents.

That only holds if every host write into a buffer the queued work reads is queued on the same stream too (an
in-place synchronous copy would overwrite a timestep the previous step has not read yet), and if nothing is read
back or freed before the stream has drained. :class:`CudaStream` and :class:`HostStream` give the backend exactly
those two operations, on a GPU and on the host, plus the device-to-device copies that feed CUDA graph replays
(:mod:`~sparse_context.engines.ort.graphs`). ``cuda-python`` is imported on use.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from sparse_context.engines.errors import BackendOptionError, RunnerError

# When an onnxruntime backend waits for its device: after every run (onnxruntime's default), or once per image.
SYNC_MODES = ("run", "image")


def import_cudart(missing: type[Exception] = BackendOptionError, hint: str = "") -> Any:
    """cuda-python's runtime module; 13.x moved it to ``cuda.bindings`` and removed ``from cuda import cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.x
        except ImportError:
            raise missing("cuda-python is not installed" + (f"; {hint}" if hint else "")) from None
    return cudart


def cuda_check(cudart: Any, result: Any, call: str) -> Any:
    """cuda-python returns ``(error, *values)``; raise RunnerError naming the call on any error."""
    error, *values = result if isinstance(result, tuple) else (result,)
    if error != cudart.cudaError_t.cudaSuccess:
        raise RunnerError(f"CUDA call {call} failed with {getattr(error, 'name', error)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


class HostStream:
    """The CPU I/O device's stream: onnxruntime's CPU runs return when done, so a write is an immediate copy and
    synchronizing has nothing to wait for. It counts both, like :class:`CudaStream`."""

    handle = None

    def __init__(self) -> None:
        self.writes = self.copies = self.synchronizations = 0

    def write(self, pointer: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        ctypes.memmove(int(pointer), array.ctypes.data, array.nbytes)
        self.writes += 1

    def copy(self, destination: int, source: int, nbytes: int) -> None:
        ctypes.memmove(int(destination), int(source), int(nbytes))
        self.copies += 1

    def synchronize(self) -> None:
        self.synchronizations += 1

    def close(self) -> None:
        pass


class CudaStream:
    """One CUDA stream of cuda-python's runtime API.

    A blocking stream (``cudaStreamCreate``), on purpose: onnxruntime's own synchronous copies (``OrtValue.numpy()``,
    a new device ``OrtValue``) run on the legacy default stream, which waits for a blocking stream's queued work, so
    a read this module does not know of still sees finished results. Host arrays of queued copies stay referenced
    until the next :meth:`synchronize`. ``missing`` and ``hint``: the error raised without cuda-python (the
    TensorRT runner's memory, which queues its copies here too, names its own extra).

    Copies come from pageable memory. CUDA may then wait for the stream before staging a large one; inside the loop
    the writes are a timestep and a step scalar per step (bytes, which the driver queues without waiting) and the
    first latents and new references at the first step, before anything of the image is queued (with guidance, the
    negative prompt's copy may wait for the positive call: once per image, and never for a prompt kept read-only).
    """

    def __init__(self, device_id: int = 0, missing: type[Exception] = BackendOptionError,
                 hint: str = "install it (pip install sparse-context[onnxruntime-gpu]) or synchronize after every "
                             "run (--sync run)"):
        self.cudart = import_cudart(missing, hint)
        cuda_check(self.cudart, self.cudart.cudaSetDevice(int(device_id)), "cudaSetDevice")
        self.stream = cuda_check(self.cudart, self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._queued: list[np.ndarray] = []
        self.writes = self.copies = self.synchronizations = 0

    @property
    def handle(self) -> int:
        return int(self.stream)

    def write(self, pointer: int, array: np.ndarray) -> None:
        """Queue a copy of ``array`` into device memory at ``pointer``, after everything queued before it."""
        array = np.ascontiguousarray(array)
        self._queued.append(array)
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(self.cudart, self.cudart.cudaMemcpyAsync(int(pointer), array.ctypes.data, array.nbytes, kind,
                                                            self.stream), "cudaMemcpyAsync")
        self.writes += 1

    def copy(self, destination: int, source: int, nbytes: int) -> None:
        """Queue a device-to-device copy of ``nbytes`` from ``source`` to ``destination``."""
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        cuda_check(self.cudart, self.cudart.cudaMemcpyAsync(int(destination), int(source), int(nbytes), kind,
                                                            self.stream), "cudaMemcpyAsync")
        self.copies += 1

    def synchronize(self) -> None:
        cuda_check(self.cudart, self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self._queued.clear()
        self.synchronizations += 1

    def close(self) -> None:
        if self.stream is not None:
            self.synchronize()
            cuda_check(self.cudart, self.cudart.cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None
