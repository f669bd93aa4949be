"""The torch-free thin runtime (``runtime/engine_runtime.py``) on onnxruntime CPU engines of the tiny model.

Given the same prompt embeddings, reference latents, selections and initial noise, its target latents equal the
PyTorch reference generator's within 1e-4 (fp32; onnxruntime and PyTorch kernels differ by ~1e-6 per call).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the thin runtime test needs onnxruntime (pip install .[onnx])")

ATOL = 1e-4


@pytest.fixture(scope="module")
def conditioning(tiny_model_dir):
    """Prompt embeddings, reference latents and prepared images from the tiny model's own text encoder and VAE."""
    import torch

    from conftest import photo
    from sparse_context.reference.generator import SparseContextGenerator

    generator = SparseContextGenerator.from_pretrained(tiny_model_dir)
    prepared = generator.prepare_references([photo(1, 200, 168), photo(2, 150, 190), photo(3, 260, 130)])
    with torch.no_grad():
        embeds = generator.encode_prompt("a red bicycle")[0].numpy()
        grids = [generator.encode_reference(image).numpy() for image in prepared]
    noise = np.random.default_rng(7).standard_normal((1, 36, 128)).astype(np.float32)  # 96x96 px target
    return generator, embeds, grids, prepared, noise


@pytest.mark.parametrize("settings", [dict(keep_fraction=1.0), dict(keep_fraction=0.1, strategy="edge"),
                                      dict(keep_fraction=0.1, strategy="saliency", use_kv=True)],
                         ids=["dense", "sparse", "sparse_kv"])
def test_runtime_equals_pytorch_generator(engines_dir, conditioning, settings):
    import torch

    from sparse_context.engines.runtime import EngineRuntime

    generator, embeds, grids, prepared, noise = conditioning
    runtime = EngineRuntime.from_engines(engines_dir)
    ours = runtime.generate_latents(embeds, grids, reference_images=prepared, height=96, width=96, num_steps=3,
                                    latents=noise, seed=3, **settings)
    reference = generator.generate(prompt_embeds=torch.from_numpy(embeds), reference_latents=[torch.from_numpy(g)
                                   for g in grids], selections=ours.selections if settings["keep_fraction"] < 1
                                   else None, use_kv=settings.get("use_kv", False), height=96, width=96,
                                   num_steps=3, latents=torch.from_numpy(noise), output_type="latent")
    assert ours.ref_tokens == reference.ref_tokens and ours.grid == (6, 6)
    np.testing.assert_allclose(ours.latents, reference.latents.numpy(), atol=ATOL, rtol=0)


def test_persistent_cache_second_call(engines_dir, conditioning):
    from sparse_context.engines.runtime import EngineRuntime
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    _, embeds, grids, prepared, noise = conditioning
    runtime = EngineRuntime.from_engines(engines_dir, kv_cache=ReferenceKVCache(64 << 20))
    kwargs = dict(reference_images=prepared, keep_fraction=0.1, strategy="edge", use_kv=True, height=96, width=96,
                  num_steps=2, latents=noise)
    first = runtime.generate_latents(embeds, grids, **kwargs)
    second = runtime.generate_latents(embeds, grids, **kwargs)
    assert not first.cache_hit and second.cache_hit and second.ref_tokens == first.ref_tokens
    np.testing.assert_allclose(second.latents, first.latents, atol=1e-6, rtol=0)
    other_prompt = runtime.generate_latents(embeds * 0.5, grids, **kwargs)  # K/V do not depend on the prompt
    assert other_prompt.cache_hit and not np.allclose(other_prompt.latents, first.latents)
    # The repeated requests took their kept tokens from the cache: scored once, for the first call.
    assert (runtime.kv_cache.selection_stats.misses, runtime.kv_cache.selection_stats.hits) == (1, 2)
    assert [s.tolist() for s in second.selections] == [s.tolist() for s in first.selections]
    mirrored = [np.ascontiguousarray(np.asarray(image)[:, ::-1]) for image in prepared]
    other_images = runtime.generate_latents(embeds, grids, **{**kwargs, "reference_images": mirrored})
    assert runtime.kv_cache.selection_stats.misses == 2 and not other_images.cache_hit  # scored images differ


def test_digests_only_when_the_cache_is_consulted(engines_dir, conditioning, monkeypatch):
    from sparse_context.engines import runtime as runtime_module
    from sparse_context.engines.runtime import EngineRuntime
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    _, embeds, grids, prepared, noise = conditioning
    hashed = []
    real = runtime_module.array_digests
    monkeypatch.setattr(runtime_module, "array_digests", lambda arrays: hashed.append(len(arrays)) or real(arrays))
    kwargs = dict(reference_images=prepared, keep_fraction=0.1, strategy="edge", height=96, width=96, num_steps=1,
                  latents=noise)
    runtime = EngineRuntime.from_engines(engines_dir)
    runtime.generate_latents(embeds, grids, use_kv=True, **kwargs)  # no cache
    runtime.kv_cache = ReferenceKVCache(64 << 20)
    runtime.generate_latents(embeds, grids, use_kv=False, **kwargs)  # a cache, but no KV: not consulted
    assert hashed == []
    runtime.generate_latents(embeds, grids, use_kv=True, **kwargs)
    assert hashed == [len(grids)]  # the reference latents, once


def test_runtime_runs_without_torch(engines_dir):
    """The engine path imports no torch: run it in a process where importing torch fails."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from sparse_context.engines.runtime import EngineRuntime
        runtime = EngineRuntime.from_engines({str(engines_dir)!r})
        rng = np.random.default_rng(0)
        embeds = rng.standard_normal((1, 64, runtime.backend.dims.text_dim)).astype(np.float32)
        grids = [rng.standard_normal((128, 8, 8)).astype(np.float32) for _ in range(2)]
        result = runtime.generate_latents(embeds, grids, keep_fraction=0.25, strategy="uniform", use_kv=True,
                                          height=64, width=64, num_steps=2)
        assert result.latents.shape == (1, 16, 128) and np.isfinite(result.latents).all()
        assert result.ref_tokens == 2 * 16 and "torch" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m]}}
        print("ok", result.ref_tokens)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok 32"


def test_runtime_input_errors(engines_dir):
    from sparse_context.engines.runtime import EngineRuntime, read_model_settings
    from sparse_context.runtime.errors import InputError, ModelLoadError

    runtime = EngineRuntime.from_engines(engines_dir)
    embeds = np.zeros((1, 64, runtime.backend.dims.text_dim), np.float32)
    grid = np.zeros((128, 8, 8), np.float32)
    with pytest.raises(InputError, match=r"prompt_embeds shape: got \(64, 32\)"):
        runtime.generate_latents(np.zeros((64, 32), np.float32))
    with pytest.raises(InputError, match=r"reference latent shapes.*\(128, rows, cols\)"):
        runtime.generate_latents(embeds, [np.zeros((128, 64), np.float32)])
    with pytest.raises(InputError, match=r"latents shape: got \(1, 10, 128\).*\(1, 16, 128\).*--width/--height"):
        runtime.generate_latents(embeds, height=64, width=64, latents=np.zeros((1, 10, 128), np.float32))
    with pytest.raises(InputError, match="strategy 'edge' without reference_images.*--strategy"):
        runtime.generate_latents(embeds, [grid], keep_fraction=0.1, strategy="edge", height=64, width=64)
    wrong_size = [np.zeros((96, 96, 3), np.uint8)]  # a 6x6 token image for an 8x8 latent grid
    with pytest.raises(InputError, match=r"reference image 0: got 'a \(6, 6\) token grid'"):
        runtime.generate_latents(embeds, [grid], reference_images=wrong_size, keep_fraction=0.5, strategy="edge",
                                 height=64, width=64)
    with pytest.raises(ModelLoadError, match="scheduler_config.json.*--model"):
        read_model_settings(engines_dir)


def test_a_token_count_alone_is_a_budget(engines_dir, conditioning):
    """``token_count`` overrides ``keep_fraction``, which may then be None (it used to be compared with 1.0)."""
    from sparse_context.engines.runtime import EngineRuntime

    _, embeds, grids, prepared, noise = conditioning
    runtime = EngineRuntime.from_engines(engines_dir)
    kwargs = dict(reference_images=prepared, strategy="uniform", height=96, width=96, num_steps=1, latents=noise)
    counted = runtime.generate_latents(embeds, grids, keep_fraction=None, token_count=5, **kwargs)
    assert counted.ref_tokens == 5 * len(grids)
    same = runtime.generate_latents(embeds, grids, keep_fraction=0.5, token_count=5, **kwargs)
    np.testing.assert_array_equal(same.latents, counted.latents)
