"""Export spec, numpy RoPE and the torch graphs in eager mode (no ONNX): fast contract tests."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from sparse_context.export.errors import ExportConfigError
from sparse_context.export.spec import (
    CACHED_REF_TOKENS, REF_TOKENS, ROPE_TOKENS, TARGET_TOKENS, TEXT_TARGET_TOKENS, TEXT_TOKENS, ModelDims, build_spec,
    check_grid, example_sizes, layer_names, split_layers,
)

DIMS = ModelDims(in_channels=128, text_dim=96, heads=2, head_dim=32, num_layers=3, axes_dims_rope=(8, 8, 8, 8),
                 rope_theta=2000.0)


def test_spec_module_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; "
            "import sparse_context.export.spec, sparse_context.export.trt_ops; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_full_and_kv_specs_declare_axes_once():
    full = build_spec("full", "fp32", DIMS, 64, ((64, 48), (32, 32)), 40)
    assert full.dynamic_axes()["refs"] == {1: REF_TOKENS}
    assert full.dynamic_axes()["rope_cos"] == {0: ROPE_TOKENS}
    assert full.bound(TARGET_TOKENS).min == 4 and full.bound(TARGET_TOKENS).max == 12
    assert full.bound(REF_TOKENS).min == 0 and full.bound(REF_TOKENS).opt == 4  # kept_token_count(40, 0.1)
    kv = build_spec("kv", "fp16", DIMS, 64, ((64, 48),), 40)
    # One K/V tensor per layer (DIMS has 3), keys then values: the order of KVGraph.forward's two lists.
    assert kv.output_names == ["velocity", "ref_keys_0", "ref_keys_1", "ref_keys_2",
                               "ref_values_0", "ref_values_1", "ref_values_2"]
    assert kv.input_names[-6:] == ["cached_keys_0", "cached_keys_1", "cached_keys_2",
                                   "cached_values_0", "cached_values_1", "cached_values_2"]
    assert all(kv.dynamic_axes()[f"cached_keys_{layer}"] == {1: CACHED_REF_TOKENS} for layer in range(3))
    assert kv.dynamic_axes()["ref_values_2"] == {1: REF_TOKENS}
    assert kv.dynamic_axes()["rope_cos"] == {0: TEXT_TARGET_TOKENS}
    profile = kv.profile()
    assert profile["refs"] == ((1, 0, 128), (1, 4, 128), (1, 40, 128))
    assert profile["cached_keys_1"] == ((1, 0, 2, 32), (1, 4, 2, 32), (1, 40, 2, 32))
    assert profile["rope_cos"][2] == (64 + 12, 32)
    feeds = kv.sample_inputs({REF_TOKENS: 0, CACHED_REF_TOKENS: 5})
    assert feeds["refs"].shape == (1, 0, 128) and feeds["refs"].dtype == np.float16
    assert feeds["cached_values_2"].shape == (1, 5, 2, 32) and feeds["rope_cos"].dtype == np.float32
    assert set(feeds) == set(kv.input_names)


def test_layer_tensors_split_and_stack_the_stacked_layout():
    """A state's K/V are stacked (layers, 1, N, H, D) in one buffer; the graph takes one tensor per layer. Splitting
    gives views of the layers (no copy) and stacking them back gives the same array."""
    stacked = np.arange(3 * 1 * 5 * 2 * 4, dtype=np.float32).reshape(3, 1, 5, 2, 4)
    layers = split_layers("cached_keys", stacked)
    assert list(layers) == layer_names("cached_keys", 3) == ["cached_keys_0", "cached_keys_1", "cached_keys_2"]
    assert all(np.shares_memory(view, stacked) and view.shape == (1, 5, 2, 4) for view in layers.values())
    np.testing.assert_array_equal(np.stack(list(layers.values())), stacked)
    # Layer l starts l * N * H * D elements into the stacked buffer: the offsets the backends bind at.
    assert [view.ctypes.data - stacked.ctypes.data for view in layers.values()] == [0, 5 * 2 * 4 * 4, 2 * 5 * 2 * 4 * 4]


def test_check_grid_excludes_the_traced_example():
    spec = build_spec("kv", "fp32", DIMS, 64, ((64, 48),), 40)
    example = example_sizes(spec)
    grid = check_grid(spec)
    assert example[REF_TOKENS] not in grid and grid[:2] == [0, 1] and grid[-1] == 40
    assert any(n % 2 for n in grid[2:-1])
    assert len({example[s] for s in (TEXT_TOKENS, TARGET_TOKENS, REF_TOKENS, CACHED_REF_TOKENS)}) == 4


@pytest.mark.parametrize("kwargs,flag", [
    (dict(graph="dense"), "--graph"), (dict(precision="int8"), "--precision"),
    (dict(max_ref_tokens=1), "--max-ref-tokens"), (dict(target_sizes=((16, 16),)), "--target-size"),
    (dict(target_sizes=()), "--target-size"), (dict(text_tokens=1), "text tokens"),
])
def test_build_spec_refuses_bad_options(kwargs, flag):
    settings = dict(graph="full", precision="fp32", dims=DIMS, text_tokens=64, target_sizes=((64, 48),),
                    max_ref_tokens=40)
    settings.update(kwargs)
    with pytest.raises(ExportConfigError, match=flag):
        build_spec(**settings)


def test_numpy_rope_equals_flux2_pos_embed():
    torch = pytest.importorskip("torch")
    from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed

    from sparse_context.export.rope import rope_cos_sin
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    ids = np.concatenate([text_position_ids(7), grid_position_ids(5, 9), grid_position_ids(64, 64, time=100)])
    cos, sin = rope_cos_sin(ids, (32, 32, 32, 32), 2000)
    their_cos, their_sin = Flux2PosEmbed(2000, [32, 32, 32, 32])(torch.from_numpy(ids))
    assert cos.dtype == np.float32
    np.testing.assert_allclose(cos, their_cos.numpy(), atol=1e-7, rtol=0)
    np.testing.assert_allclose(sin, their_sin.numpy(), atol=1e-7, rtol=0)


@pytest.fixture(scope="module")
def tiny_transformer():
    pytest.importorskip("torch")
    from sparse_context.reference.tiny import build_tiny_components

    return build_tiny_components()["transformer"]


@pytest.mark.parametrize("form", ["matmul", "fused"])
def test_eager_graphs_equal_diffusers(tiny_transformer, form):
    """Before any export: the functional forward equals diffusers' dense and kv_cache_mode paths (atol 1e-5)."""
    import torch

    from sparse_context.export.graphs import FullGraph, KVGraph, attention_form
    from sparse_context.export.rope import rope_cos_sin
    from sparse_context.reference.torch_backend import TorchTransformerBackend
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    backend = TorchTransformerBackend(tiny_transformer)
    gen = torch.Generator().manual_seed(0)
    target, refs, text = (torch.randn(1, 12, 128, generator=gen), torch.randn(1, 7, 128, generator=gen),
                          torch.randn(1, 5, 96, generator=gen))
    ids = {"t": grid_position_ids(3, 4), "r": grid_position_ids(1, 7, time=10), "x": text_position_ids(5)}
    rope = lambda *parts: [torch.from_numpy(a) for a in rope_cos_sin(np.concatenate(parts), (8, 8, 8, 8), 2000)]
    step = torch.tensor([0.7])
    empty = [torch.zeros(1, 0, 2, 32)] * 3  # one tensor per layer, as the exported graph takes them
    with attention_form(form), torch.no_grad():
        full = FullGraph(tiny_transformer)(target, refs, text, step, *rope(ids["x"], ids["t"], ids["r"]))
        velocity, keys, values = KVGraph(tiny_transformer)(target, refs, text, step, *rope(ids["x"], ids["t"]),
                                                           *rope(ids["r"]), empty, empty)
        cached, new_keys, _ = KVGraph(tiny_transformer)(target, refs[:, :0], text, torch.tensor([0.2]),
                                                        *rope(ids["x"], ids["t"]), *rope(ids["r"][:0]), keys, values)
        stacked_too, _, _ = KVGraph(tiny_transformer)(target, refs[:, :0], text, torch.tensor([0.2]),
                                                      *rope(ids["x"], ids["t"]), *rope(ids["r"][:0]),
                                                      torch.stack(keys), torch.stack(values))
    assert len(keys) == len(values) == 3 and torch.equal(stacked_too, cached)
    keys = torch.stack(keys)
    torch.testing.assert_close(full, backend.full(target, ids["t"], refs, ids["r"], text, ids["x"], 0.7),
                               atol=1e-5, rtol=0)
    expected, cache = backend.kv_extract(target, ids["t"], refs, ids["r"], text, ids["x"], np.float32(0.7))
    torch.testing.assert_close(velocity, expected, atol=1e-5, rtol=0)
    layers = cache.double_block_caches + cache.single_block_caches
    torch.testing.assert_close(keys, torch.stack([c.k_ref for c in layers]), atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, backend.kv_cached(target, ids["t"], cache, text, ids["x"], np.float32(0.2)),
                               atol=1e-5, rtol=0)
    assert [k.shape for k in new_keys] == [(1, 0, 2, 32)] * 3


def test_attention_form_restores_and_refuses_unknown():
    pytest.importorskip("torch")
    from sparse_context.export import graphs

    before = graphs._ATTENTION["fn"]
    with pytest.raises(RuntimeError):
        with graphs.attention_form("fused"):
            assert graphs._ATTENTION["fn"] is graphs.fused_attention
            raise RuntimeError("inside")
    assert graphs._ATTENTION["fn"] is before
    with pytest.raises(ExportConfigError, match="--attention"):
        with graphs.attention_form("flash"):
            pass


def test_ref_stream_form_restores_and_refuses_unknown():
    """The reference stream form is restored after an error; 'plain' makes the reference stream's attention and RoPE
    the plain ones (0 tokens in, 0 tokens out, no guard) even under the contrib attention form."""
    torch = pytest.importorskip("torch")
    from sparse_context.export import graphs

    with pytest.raises(RuntimeError):
        with graphs.ref_stream_form("plain"):
            assert graphs._REF_STREAM["form"] == "plain"
            raise RuntimeError("inside")
    assert graphs._REF_STREAM["form"] == "guarded"
    with pytest.raises(ExportConfigError, match="reference stream form: got 'bare'.*--ref-stream"):
        with graphs.ref_stream_form("bare"):
            pass
    empty, keys = torch.zeros(1, 0, 2, 8), torch.randn(1, 3, 2, 8)
    with graphs.attention_form("mha"), graphs.ref_stream_form("plain"):
        assert graphs.attend(empty, keys, keys, may_be_empty=True).shape == (1, 0, 2, 8)
        table = torch.ones(0, 8)
        assert graphs.rope(empty, table, table, may_be_empty=True).shape == (1, 0, 2, 8)
        query = torch.randn(1, 3, 2, 8)
        torch.testing.assert_close(graphs.attend(query, keys, keys, may_be_empty=True),
                                   graphs.matmul_attention(query, keys, keys))
