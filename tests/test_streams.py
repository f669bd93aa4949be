"""engines.streams: the host stream's immediate copies, and cuda-python's stream (refused with the failing call
named where there is no GPU; on a GPU, queued writes land in order and wait once)."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.engines.errors import RunnerError
from sparse_context.engines.streams import CudaStream, HostStream


def _cudart():
    return pytest.importorskip("cuda.bindings.runtime",
                               reason="cuda-python is not installed (pip install .[onnxruntime-gpu])")


def _has_gpu(cudart) -> bool:
    error, *count = cudart.cudaGetDeviceCount()
    return error == cudart.cudaError_t.cudaSuccess and count and count[0] > 0


def test_host_stream_copies_at_once_and_counts():
    stream = HostStream()
    target = np.zeros(6, np.float32)
    stream.write(target.ctypes.data, np.arange(6, dtype=np.float32)[::-1].copy())
    stream.write(target.ctypes.data, np.float32([7, 8]))  # a shorter write overwrites the first elements only
    stream.synchronize()
    assert target.tolist() == [7, 8, 3, 2, 1, 0] and (stream.writes, stream.synchronizations) == (2, 1)
    copy = np.zeros(6, np.float32)
    stream.copy(copy.ctypes.data + 8, target.ctypes.data, 12)  # device-to-device on a GPU: 3 floats, 2 in
    assert copy.tolist() == [0, 0, 7, 8, 3, 0] and stream.copies == 1
    assert stream.handle is None  # no provider gets a stream option on the CPU


def test_cuda_stream_without_a_gpu_names_the_failing_call():
    cudart = _cudart()
    if _has_gpu(cudart):
        pytest.skip("a CUDA device is present: test_cuda_stream_writes_land_in_order covers it")
    with pytest.raises(RunnerError, match=r"CUDA call cudaSetDevice failed with cudaError"):
        CudaStream(0)


@pytest.mark.gpu
def test_cuda_stream_writes_land_in_order():
    cudart = _cudart()
    if not _has_gpu(cudart):
        pytest.skip("needs a CUDA device")
    from sparse_context.engines.streams import cuda_check

    stream = CudaStream(0)
    pointer = cuda_check(cudart, cudart.cudaMalloc(64), "cudaMalloc")
    try:
        for value in range(50):  # queued back to back; each overwrites the last
            stream.write(pointer, np.full(8, value, np.float32))
        stream.copy(pointer + 32, pointer, 32)  # then the first half onto the second, after the writes
        stream.synchronize()
        out = np.empty(16, np.float32)
        cuda_check(cudart, cudart.cudaMemcpy(out.ctypes.data, pointer, out.nbytes,
                                             cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy")
        assert out.tolist() == [49.0] * 16 and (stream.writes, stream.copies, stream.synchronizations) == (50, 1, 1)
    finally:
        cuda_check(cudart, cudart.cudaFree(pointer), "cudaFree")
        stream.close()


def test_tensorrt_memory_queues_on_the_same_stream_and_names_its_own_extra(monkeypatch):
    """CudartMemory (the TensorRT runner's cuda-python memory) is built on CudaStream: without cuda-python it says
    how to install the TensorRT extra, and without a GPU it names the failing call."""
    import sys

    from sparse_context.engines.errors import TensorRTUnavailableError
    from sparse_context.engines.trt.memory import CudartMemory

    cudart = _cudart()
    if not _has_gpu(cudart):
        with pytest.raises(RunnerError, match=r"CUDA call cudaSetDevice failed with cudaError"):
            CudartMemory(0)
    for name in [name for name in sys.modules if name == "cuda" or name.startswith("cuda.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cuda", None)  # import of a None entry raises ImportError
    with pytest.raises(TensorRTUnavailableError, match=r"cuda-python is not installed; `pip install .\[tensorrt\]`"):
        CudartMemory(0)
