"""Generator behaviour beyond the diffusers equivalence: guidance on base models, inputs, errors, the benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparse_context.runtime.errors import ImageError, InputError, SelectionError

PROMPT = "a lighthouse at dusk"


def test_base_model_guidance_equals_diffusers(tiny_model_dir, reference_photos):
    """A non-distilled (base) Klein runs classifier-free guidance with an empty negative prompt, as diffusers does."""
    from diffusers import Flux2KleinPipeline

    from sparse_context.reference.generator import SparseContextGenerator

    pipe = Flux2KleinPipeline.from_pretrained(tiny_model_dir, local_files_only=True, is_distilled=False)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(image=reference_photos[:2], prompt=PROMPT, num_inference_steps=2, guidance_scale=3.0,
                    generator=torch.Generator().manual_seed(1), max_sequence_length=64,
                    text_encoder_out_layers=(1, 2, 3), output_type="np").images[0]
    generator = SparseContextGenerator.from_pipeline(pipe, text_encoder_out_layers=(1, 2, 3), max_sequence_length=64)
    assert not generator.is_distilled
    ours = generator.generate(PROMPT, reference_photos[:2], num_steps=2, guidance_scale=3.0, seed=1,
                              output_type="np").image
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_precomputed_prompt_and_reference_latents(tiny_generator, reference_photos):
    """Precomputed embeddings and latents (what an app caches) give the same image as the raw inputs."""
    prepared = tiny_generator.prepare_references(reference_photos[:2])
    latents = [tiny_generator.encode_reference(im) for im in prepared]
    embeds, _ = tiny_generator.encode_prompt(PROMPT)
    direct = tiny_generator.generate(PROMPT, reference_photos[:2], keep_fraction=0.2, strategy="uniform",
                                     num_steps=2, output_type="latent")
    cached = tiny_generator.generate(prompt_embeds=embeds, reference_latents=latents, selections=direct.selections,
                                     num_steps=2, output_type="latent", height=prepared[0].height,
                                     width=prepared[0].width)
    torch.testing.assert_close(cached.image, direct.image, atol=1e-6, rtol=0)


def test_reference_counts_odd_and_token_budget(tiny_generator, reference_photos):
    result = tiny_generator.generate(PROMPT, reference_photos, token_count=7, strategy="saliency", num_steps=1,
                                     output_type="latent", allocation="per_reference")
    assert result.ref_tokens == 21 and [s.size for s in result.selections] == [7, 7, 7]
    result = tiny_generator.generate(PROMPT, reference_photos, token_count=13, strategy="edge", num_steps=1,
                                     output_type="latent", allocation="global", use_kv=True)
    assert result.ref_tokens == 13 and all(s.size >= 1 for s in result.selections)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(keep_fraction=float("nan")), InputError, r"keep fraction: got nan"),
    (dict(keep_fraction=0.0), InputError, r"\(0, 1\]"),
    (dict(keep_fraction=0.5, strategy="sharpest"), SelectionError, r"--strategy"),
    (dict(token_count=10_000), SelectionError, r"--keep|--tokens"),
    (dict(output_type="jpeg"), InputError, "output_type"),
    (dict(kv_state=object()), InputError, "--kv"),
])
def test_generate_rejects_bad_input(tiny_generator, reference_photos, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tiny_generator.generate(PROMPT, reference_photos[:1], num_steps=1, output_type=kwargs.pop("output_type", "np"),
                                **kwargs)


def test_generate_rejects_bad_references(tiny_generator, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageError):
        tiny_generator.generate(PROMPT, [broken], num_steps=1)
    with pytest.raises(InputError, match="at most 10"):
        tiny_generator.generate(PROMPT, [np.zeros((64, 64, 3), np.uint8)] * 11, num_steps=1)
    with pytest.raises(InputError, match="exactly one"):
        tiny_generator.generate(num_steps=1)
    with pytest.raises(InputError, match="output width: got 8; allowed: an integer from 16 .*--width"):
        tiny_generator.generate(PROMPT, num_steps=1, width=8, height=8)


def test_speed_benchmark_writes_json_and_plot(tmp_path):
    from sparse_context.reference.benchmark import benchmark_speed, write_speed_report

    rows = []
    result = benchmark_speed(refs=(1, 2), keeps=(1.0, 0.1), target_px=128, ref_px=128, steps=2, repeats=1,
                             on_row=rows.append)
    assert len(result["rows"]) == len(rows) == 2 * 2 * 2
    dense = [r for r in result["rows"] if r["keep"] == 1.0 and not r["kv"]]
    assert all(r["speedup"] == pytest.approx(1.0) for r in dense)
    assert [r["ref_tokens"] for r in result["rows"] if r["refs"] == 2] == [128, 128, 12, 12]  # 2 x round(0.1 x 64)
    json_path, png_path = write_speed_report(result, tmp_path)
    assert json.loads(json_path.read_text())["config"] == "tiny"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match="--config"):
        benchmark_speed(config="klein-99b")


def test_prompt_embedding_cache_skips_the_text_encoder(tiny_generator):
    """A cached prompt comes back as the very tensor encoded the first time; images do not change."""
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.prompt_cache import PromptEmbeddingCache

    g = tiny_generator
    cached = SparseContextGenerator(g.transformer, vae=g.vae, text_encoder=g.text_encoder, tokenizer=g.tokenizer,
                                    scheduler_config=g.scheduler_config, is_distilled=g.is_distilled,
                                    text_encoder_out_layers=g.text_encoder_out_layers,
                                    max_sequence_length=g.max_sequence_length,
                                    prompt_cache=PromptEmbeddingCache(64 << 20))
    first, _ = cached.encode_prompt("a red bicycle")
    again, _ = cached.encode_prompt("a red bicycle")
    other, _ = cached.encode_prompt("a blue bicycle")
    assert again is first and other is not first and cached.prompt_cache.stats.hits == 1
    kwargs = dict(num_steps=2, seed=0, output_type="latent", height=64, width=64)
    ours = cached.generate("a red bicycle", **kwargs).image
    assert cached.prompt_cache.stats.hits == 2
    torch.testing.assert_close(ours, g.generate("a red bicycle", **kwargs).image, atol=0, rtol=0)
