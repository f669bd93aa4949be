"""The PyTorch reference generator equals diffusers' Klein pipelines on the tiny real model (fp32, CPU).

Tolerance: 1e-5 absolute on images in [0, 1]. Both sides run the same fp32 kernels, so differences come only
from the order of floating-point operations; anything larger means a different computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

ATOL = 1e-5
PROMPT = "a red fox sitting in snow"
TEXT_LAYERS = (1, 2, 3)


def _diffusers_image(pipe, images, **kwargs):
    out = pipe(image=images or None, prompt=PROMPT, num_inference_steps=kwargs.pop("steps", 3),
               generator=torch.Generator().manual_seed(kwargs.pop("seed", 7)), max_sequence_length=64,
               text_encoder_out_layers=TEXT_LAYERS, output_type="np", **kwargs)
    return out.images[0]


def test_prepare_image_latents_equal_dense_packing(tiny_pipelines, tiny_generator, reference_photos):
    """keep = 1: our tokens and (t, h, w, l) ids equal prepare_image_latents exactly."""
    from sparse_context.runtime.packing import pack_references

    dense, _ = tiny_pipelines
    prepared = tiny_generator.prepare_references(reference_photos)
    processed = [dense.image_processor.preprocess(im, height=im.height, width=im.width, resize_mode="crop")
                 for im in prepared]
    with torch.no_grad():
        theirs, their_ids = dense.prepare_image_latents(processed, 1, None, torch.device("cpu"), torch.float32)
    packed = pack_references([tiny_generator.encode_reference(im) for im in prepared])
    torch.testing.assert_close(packed.tokens, theirs[0].detach(), atol=1e-6, rtol=0)
    assert np.array_equal(packed.position_ids, their_ids[0].numpy())
    assert packed.counts == tuple((im.height // 16) * (im.width // 16) for im in prepared)


@pytest.mark.parametrize("num_refs", [0, 1, 3])
def test_dense_equals_flux2_klein_pipeline(tiny_pipelines, tiny_generator, reference_photos, num_refs):
    dense, _ = tiny_pipelines
    refs = reference_photos[:num_refs]
    kwargs = {} if refs else dict(height=96, width=128)
    expected = _diffusers_image(dense, refs, **kwargs)
    ours = tiny_generator.generate(PROMPT, refs, num_steps=3, seed=7, output_type="np", **kwargs).image
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("num_refs", [1, 3])
def test_kv_equals_flux2_klein_kv_pipeline(tiny_pipelines, tiny_generator, reference_photos, num_refs):
    _, kv = tiny_pipelines
    refs = reference_photos[:num_refs]
    expected = _diffusers_image(kv, refs)
    result = tiny_generator.generate(PROMPT, refs, num_steps=3, seed=7, use_kv=True, output_type="np")
    np.testing.assert_allclose(result.image, expected, atol=ATOL, rtol=0)
    assert result.ref_tokens == result.ref_tokens_available


def _subset_prepare_image_latents(pipe, selections):
    """Patch the pipeline so that its own path runs on the same kept tokens as ours."""
    original = pipe.prepare_image_latents

    def sparse(*args, **kwargs):
        latents, ids = original(*args, **kwargs)
        offsets = np.cumsum([0] + [int((ids[0, :, 0] == 10 + 10 * i).sum()) for i in range(len(selections))])
        keep = np.concatenate([offsets[i] + s for i, s in enumerate(selections)])
        index = torch.from_numpy(keep)
        return latents[:, index], ids[:, index]

    return original, sparse


@pytest.mark.parametrize("strategy,keep", [("uniform", 0.1), ("random", 0.25), ("edge", 0.05), ("saliency", 0.2)])
def test_sparse_kv_equals_diffusers_kv_on_same_subset(tiny_pipelines, tiny_generator, reference_photos, strategy,
                                                      keep):
    _, kv = tiny_pipelines
    result = tiny_generator.generate(PROMPT, reference_photos, keep_fraction=keep, strategy=strategy, num_steps=3,
                                     seed=7, use_kv=True, output_type="np")
    assert 0 < result.ref_tokens < result.ref_tokens_available
    original, sparse = _subset_prepare_image_latents(kv, result.selections)
    kv.prepare_image_latents = sparse
    try:
        expected = _diffusers_image(kv, reference_photos)
    finally:
        kv.prepare_image_latents = original
    np.testing.assert_allclose(result.image, expected, atol=ATOL, rtol=0)


def test_sparse_dense_equals_diffusers_dense_on_same_subset(tiny_pipelines, tiny_generator, reference_photos):
    dense, _ = tiny_pipelines
    result = tiny_generator.generate(PROMPT, reference_photos, keep_fraction=0.15, strategy="edge", num_steps=3,
                                     seed=7, output_type="np")
    original, sparse = _subset_prepare_image_latents(dense, result.selections)
    dense.prepare_image_latents = sparse
    try:
        expected = _diffusers_image(dense, reference_photos)
    finally:
        dense.prepare_image_latents = original
    np.testing.assert_allclose(result.image, expected, atol=ATOL, rtol=0)


def test_kv_state_reuse_is_exact(tiny_generator, reference_photos):
    """Reference K/V depend only on references + model: reusing them gives the same image for another prompt."""
    first = tiny_generator.generate(PROMPT, reference_photos, keep_fraction=0.1, num_steps=2, seed=3, use_kv=True,
                                    output_type="np")
    fresh = tiny_generator.generate("another prompt", reference_photos, selections=first.selections, num_steps=2,
                                    seed=5, use_kv=True, output_type="np")
    reused = tiny_generator.generate("another prompt", num_steps=2, seed=5, use_kv=True, kv_state=first.kv_state,
                                     width=fresh.image.shape[1], height=fresh.image.shape[0], output_type="np")
    np.testing.assert_allclose(reused.image, fresh.image, atol=ATOL, rtol=0)
    assert reused.timings["vae_encode"] < fresh.timings["vae_encode"] + 1.0


def test_position_ids_go_to_the_device_once_per_generation(tiny_generator, reference_photos):
    """A blocking upload per call would stall the GPU twice per step: the backend uploads each id set once per
    generation (text ids; extract ids; cached-step ids) and the dense path once per generation too."""
    memo = tiny_generator.backend._ids_on_device
    before = memo.misses
    tiny_generator.generate(PROMPT, reference_photos, keep_fraction=0.1, num_steps=4, seed=3, use_kv=True,
                            output_type="latent")
    assert memo.misses - before == 3 and memo.hits >= 2 * 3
    before = memo.misses
    tiny_generator.generate(PROMPT, reference_photos, keep_fraction=0.1, num_steps=4, seed=3, output_type="latent")
    assert memo.misses - before == 2  # text ids; target + reference ids
