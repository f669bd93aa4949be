"""The Euler-step and guidance graphs against the host arithmetic they replace: bit-equal, float16 and float32."""

from __future__ import annotations

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

from sparse_context.engines.step_graphs import euler_graph, guidance_graph, rounded_scalar  # noqa: E402
from sparse_context.runtime.schedule import euler_step  # noqa: E402

CASES = [(np.float32, np.float16), (np.float16, np.float16), (np.float32, np.float32)]


def _session(model: bytes):
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("model", [euler_graph(np.dtype(a), np.dtype(b)) for a, b in CASES]
                         + [guidance_graph(np.dtype(np.float16)), guidance_graph(np.dtype(np.float32))])
def test_graphs_are_valid_onnx(model):
    onnx = pytest.importorskip("onnx")
    parsed = onnx.load_from_string(model)
    onnx.checker.check_model(parsed, full_check=True)
    assert parsed.opset_import[0].version == 17 and parsed.graph.input[0].type.tensor_type.shape.dim[1].dim_param


@pytest.mark.parametrize("latents_dtype,dtype", CASES)
def test_euler_graph_equals_host_step_bit_for_bit(latents_dtype, dtype):
    rng = np.random.default_rng(1)
    session = _session(euler_graph(np.dtype(latents_dtype), np.dtype(dtype)))
    for tokens in (1, 77):  # other lengths than any export example: the graph is dynamic
        latents = (rng.standard_normal((1, tokens, 16)) * 3).astype(latents_dtype)
        velocity = (rng.standard_normal((1, tokens, 16)) * 5).astype(dtype)
        velocity[0, 0, :3] = [6e-8, -65504, 1e-5]  # a float16 subnormal, the largest float16, a small normal
        for delta in (*np.linspace(-1, 1, 17), 1 / 3, -0.0625):
            got = session.run(None, {"latents": latents, "velocity": velocity,
                                     "delta": rounded_scalar(delta, dtype)})[0]
            expected = euler_step(latents, velocity, delta)
            assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), (delta, tokens)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_guidance_graph_equals_numpy_bit_for_bit(dtype):
    rng = np.random.default_rng(2)
    session = _session(guidance_graph(np.dtype(dtype)))
    positive, negative = ((rng.standard_normal((1, 50, 8)) * 4).astype(dtype) for _ in range(2))
    for scale in (1.0, 2.5, 3.7, 7.123):
        got = session.run(None, {"positive": positive, "negative": negative, "scale": rounded_scalar(scale, dtype)})[0]
        expected = negative + scale * (positive - negative)
        assert got.dtype == expected.dtype and got.tobytes() == expected.tobytes(), scale


def test_rounded_scalar_rounds_to_the_working_dtype():
    assert rounded_scalar(0.1, np.float16)[0] == np.float32(np.float16(0.1)) != np.float32(0.1)
    assert rounded_scalar(0.1, np.float32)[0] == np.float32(0.1)
    assert rounded_scalar(0.1, np.float32).shape == (1,)
