"""Tiny ONNX graphs for the sampler's elementwise arithmetic, so latents can stay on the engines' device.

The Euler step and the guidance mix are a few elementwise operations on (1, N, C) tensors. Done on the host, each
step copies the velocity out and the latents back in, and numpy's float16 arithmetic is slow (about 5 ms per step
for a 1024^2 target on one core: numpy converts float16 element by element). As onnxruntime graphs, or TensorRT
engines built from them next to the transformer's (:func:`step_models`), they run where the transformer runs, on
its buffers.

Both graphs reproduce :func:`~sparse_context.runtime.schedule.euler_step` and numpy's float16 rounding bit for bit:
numpy computes every float16 operation in float32 and rounds the result, which is what a float32 operation
followed by a ``Cast`` to float16 does. The models are serialized here directly (a few protobuf fields), because
the runtime must not need the ``onnx`` package; a test parses them with ``onnx`` and runs its checker.
"""

from __future__ import annotations

import functools

import numpy as np

OPSET = 17  # Cast, Mul, Add, Sub: unchanged since opset 13/14; old enough for any onnxruntime >= 1.15
IR_VERSION = 8
ELEMENT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}
FLOAT = ELEMENT_TYPES[np.dtype(np.float32)]
TOKENS, CHANNELS = "tokens", "channels"  # symbolic axes of the (1, N, C) latents


# -- protobuf, the few field types an ONNX model needs -------------------------------------------------------------

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _bytes(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _str(field: int, text: str) -> bytes:
    return _bytes(field, text.encode())


def _tensor_value(name: str, element_type: int, dims: tuple[int | str, ...]) -> bytes:
    """ValueInfoProto of a tensor: name (1), type (2) -> tensor_type (1) -> elem_type (1), shape (2) -> dim (1)."""
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _str(2, d)) for d in dims)
    tensor = _int(1, element_type) + _bytes(2, shape)
    return _str(1, name) + _bytes(2, _bytes(1, tensor))


def _node(op: str, inputs: tuple[str, ...], output: str, to: int | None = None) -> bytes:
    """NodeProto: input (1), output (2), name (3), op_type (4), attribute (5: name 1, i 3, type 20 = INT)."""
    body = b"".join(_str(1, name) for name in inputs) + _str(2, output) + _str(3, output) + _str(4, op)
    if to is not None:
        body += _bytes(5, _str(1, "to") + _int(3, to) + _int(20, 2))
    return body


def _model(name: str, nodes: list[bytes], inputs: list[bytes], outputs: list[bytes]) -> bytes:
    """ModelProto: ir_version (1), producer_name (2), graph (7), opset_import (8: version 2)."""
    graph = (b"".join(_bytes(1, node) for node in nodes) + _str(2, name)
             + b"".join(_bytes(11, value) for value in inputs) + b"".join(_bytes(12, value) for value in outputs))
    return _int(1, IR_VERSION) + _str(2, "sparse_context") + _bytes(7, graph) + _bytes(8, _int(2, OPSET))


class _Builder:
    """Nodes in order; each float16 operation is a float32 one followed by a rounding Cast pair."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.nodes: list[bytes] = []

    def op(self, op: str, *inputs: str, to: int | None = None) -> str:
        output = f"{op.lower()}_{len(self.nodes)}"
        self.nodes.append(_node(op, inputs, output, to))
        return output

    def as_float(self, name: str, dtype: np.dtype) -> str:
        return name if np.dtype(dtype) == np.float32 else self.op("Cast", name, to=FLOAT)

    def rounded(self, name: str) -> str:
        """A float32 value rounded to the working dtype and back to float32 (nothing for float32)."""
        if self.dtype == np.float32:
            return name
        return self.op("Cast", self.op("Cast", name, to=ELEMENT_TYPES[self.dtype]), to=FLOAT)

    def output(self, name: str, as_name: str) -> None:
        self.nodes.append(_node("Cast", (name,), as_name, ELEMENT_TYPES[self.dtype]))


def _latents(name: str, dtype: np.dtype) -> bytes:
    return _tensor_value(name, ELEMENT_TYPES[np.dtype(dtype)], (1, TOKENS, CHANNELS))


def _check_dtype(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in ELEMENT_TYPES:
        raise ValueError(f"step graphs exist for float32 and float16, not {dtype}")  # internal: callers pass those
    return dtype


@functools.lru_cache(maxsize=8)
def euler_graph(latents_dtype: np.dtype, dtype: np.dtype) -> bytes:
    """``latents + delta * velocity`` as :func:`~sparse_context.runtime.schedule.euler_step` computes it.

    Inputs ``latents`` (1, N, C) in ``latents_dtype`` (float32 noise on the first step, then ``dtype``),
    ``velocity`` (1, N, C) and ``delta`` (1,) float32, already rounded to ``dtype``; output ``next`` in ``dtype``:
    the product rounded to ``dtype``, the sum in float32, rounded to ``dtype``.
    """
    latents_dtype, dtype = _check_dtype(latents_dtype), _check_dtype(dtype)
    graph = _Builder(dtype)
    product = graph.rounded(graph.op("Mul", graph.as_float("velocity", dtype), "delta"))
    graph.output(graph.op("Add", graph.as_float("latents", latents_dtype), product), "next")
    return _model("euler_step", graph.nodes,
                  [_latents("latents", latents_dtype), _latents("velocity", dtype),
                   _tensor_value("delta", FLOAT, (1,))],
                  [_latents("next", dtype)])


@functools.lru_cache(maxsize=4)
def guidance_graph(dtype: np.dtype) -> bytes:
    """``negative + scale * (positive - negative)`` with numpy's rounding after each operation.

    Inputs ``positive``, ``negative`` (1, N, C) in ``dtype`` and ``scale`` (1,) float32, already rounded to
    ``dtype`` (numpy turns a Python float into the array's dtype); output ``guided`` in ``dtype``.
    """
    dtype = _check_dtype(dtype)
    graph = _Builder(dtype)
    positive, negative = graph.as_float("positive", dtype), graph.as_float("negative", dtype)
    difference = graph.rounded(graph.op("Sub", positive, negative))
    scaled = graph.rounded(graph.op("Mul", difference, "scale"))
    graph.output(graph.op("Add", negative, scaled), "guided")
    return _model("guidance", graph.nodes,
                  [_latents("positive", dtype), _latents("negative", dtype), _tensor_value("scale", FLOAT, (1,))],
                  [_latents("guided", dtype)])


def rounded_scalar(value: float, dtype: np.dtype) -> np.ndarray:
    """``value`` as numpy would use it with a ``dtype`` array: rounded to ``dtype``, fed as a float32 (1,) array."""
    return np.array([np.dtype(dtype).type(np.float32(value))], np.float32)


def step_models(dtype: np.dtype) -> dict[str, bytes]:
    """The step graphs of engines whose velocity is ``dtype`` (float32 or float16), by name: ``euler`` (latents in
    ``dtype``), ``euler_noise`` (the first step, on float32 noise; float32 engines use ``euler`` for it) and
    ``guidance``."""
    dtype = _check_dtype(dtype)
    models = {"euler": euler_graph(dtype, dtype), "guidance": guidance_graph(dtype)}
    if dtype != np.float32:
        models["euler_noise"] = euler_graph(np.dtype(np.float32), dtype)
    return models


STEP_INPUTS = {"euler": ("latents", "velocity"), "euler_noise": ("latents", "velocity"),
               "guidance": ("positive", "negative")}  # the (1, N, C) inputs; the scalar is static (1,)
STEP_OUTPUTS = {"euler": "next", "euler_noise": "next", "guidance": "guided"}


def step_shapes(name: str, max_tokens: int, channels: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """``{input: (min, opt, max)}`` of a step graph for targets of 1 to ``max_tokens`` tokens (one profile)."""
    low, high = (1, 1, int(channels)), (1, int(max_tokens), int(channels))
    return {tensor: (low, high, high) for tensor in STEP_INPUTS[name]}
