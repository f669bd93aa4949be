"""A generation whose latents come out NaN or Inf (NaN weights or LoRA, NaN inputs, a float16 overflow) is an
error, not a black image with exit code 0: nothing is written, nothing is cached."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_context.runtime.core import check_finite_latents
from sparse_context.runtime.errors import GenerationError


def test_check_finite_latents_on_numpy_and_torch():
    check_finite_latents(np.zeros((1, 16, 8), np.float32))
    check_finite_latents(torch.zeros(1, 16, 8, dtype=torch.bfloat16))
    values = np.zeros((1, 16, 8), np.float16)
    values[0, 3, :2] = [np.nan, np.inf]
    with pytest.raises(GenerationError, match=r"non-finite latents \(2 of 128 values NaN or Inf\).*no image was "
                                              r"written.*--transformer, --lora"):
        check_finite_latents(values)
    with pytest.raises(GenerationError, match=r"\(1 of 4 values"):
        check_finite_latents(torch.tensor([0.0, float("-inf"), 1.0, 2.0]))


def test_a_nan_transformer_file_is_an_error_without_an_image(tiny_model_dir, tmp_path, capsys):
    """The reviewer's case: a single-file transformer with one NaN tensor gave an all-black PNG and exit 0."""
    from safetensors.torch import load_file, save_file

    from sparse_context.cli import main

    weights = load_file(str(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    weights["x_embedder.weight"] = torch.full_like(weights["x_embedder.weight"], float("nan"))
    save_file(weights, str(tmp_path / "nan.safetensors"))
    out = tmp_path / "out" / "x.png"
    code = main(["generate", "--prompt", "a cat", "--model", str(tiny_model_dir), "--transformer",
                 str(tmp_path / "nan.safetensors"), "--width", "64", "--height", "64", "--steps", "1",
                 "--out", str(out)])
    assert code == 2
    assert "error: the generation produced non-finite latents (" in capsys.readouterr().err
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temporary file left either


def test_nan_inputs_to_the_engine_runtime_are_an_error_and_not_cached(engines_dir):
    from sparse_context.engines.runtime import EngineRuntime
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    runtime = EngineRuntime.from_engines(engines_dir, kv_cache=ReferenceKVCache(16 << 20))
    dims = runtime.backend.dims
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 64, dims.text_dim)).astype(np.float32)
    grids = [rng.standard_normal((dims.in_channels, 4, 4)).astype(np.float32)]
    kwargs = dict(keep_fraction=0.5, strategy="uniform", use_kv=True, num_steps=1, height=64, width=64)
    bad_grids = [grids[0].copy()]
    bad_grids[0][0, 0, 0] = np.nan
    with pytest.raises(GenerationError, match="non-finite latents"):
        runtime.generate_latents(embeds, bad_grids, **kwargs)
    assert len(runtime.kv_cache) == 0  # the NaN K/V were not kept for the next call
    with pytest.raises(GenerationError, match="non-finite latents"):
        runtime.generate_latents(np.full_like(embeds, np.nan), grids, **kwargs)
    latents = np.full((1, 16, dims.in_channels), np.nan, np.float32)
    with pytest.raises(GenerationError, match="non-finite latents"):
        runtime.generate_latents(embeds, grids, latents=latents, **kwargs)
    good = runtime.generate_latents(embeds, grids, **kwargs)
    assert np.isfinite(good.latents).all() and len(runtime.kv_cache) == 1
