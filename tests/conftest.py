"""Shared fixtures: the tiny real FLUX.2-klein (seeded random weights, no downloads) and test images.

Tests needing torch/diffusers skip with a reason where those are not installed (the runtime-only install).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


def _require_torch_stack():
    pytest.importorskip("torch", reason="the PyTorch reference path needs torch (pip install .[torch])")
    pytest.importorskip("diffusers", reason="the PyTorch reference path needs diffusers (pip install .[torch])")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny model saved once per session as a diffusers folder."""
    _require_torch_stack()
    from sparse_context.reference.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-klein")


@pytest.fixture(scope="session")
def tiny_pipelines(tiny_model_dir):
    """(Flux2KleinPipeline, Flux2KleinKVPipeline) loaded from the tiny folder (fp32, CPU)."""
    from diffusers import Flux2KleinKVPipeline, Flux2KleinPipeline

    dense = Flux2KleinPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    kv = Flux2KleinKVPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    for pipe in (dense, kv):
        pipe.set_progress_bar_config(disable=True)
    return dense, kv


@pytest.fixture(scope="session")
def tiny_generator(tiny_model_dir):
    from sparse_context.reference.generator import SparseContextGenerator

    return SparseContextGenerator.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def engines_dir(tiny_model_dir, tmp_path_factory):
    """``build_engines`` output for the tiny model on onnxruntime CPU (fp32): 3 references of 256x256 px at keep
    0.10 or 1.0, targets up to 512x512 px (the sample photo's own 448x288 among them), 64 text tokens."""
    pytest.importorskip("onnxruntime", reason="the engines need onnxruntime (pip install .[onnx])")
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, build_engines

    out = tmp_path_factory.mktemp("engines")
    plan = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256), Resolution(512, 512)), text_tokens=64).validate()
    build_engines(BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=plan, out_dir=out, precision="fp32"))
    return out


def photo(seed: int, width: int, height: int) -> Image.Image:
    """A smooth random 'photo' with structure (blobs and an edge), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, height // 32), max(2, width // 32), 3))
    import cv2

    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    image[:, width // 2:] *= 0.5  # a vertical edge
    return Image.fromarray(np.clip(image * 255, 0, 255).astype(np.uint8))


@pytest.fixture
def reference_photos():
    # Different sizes: above 1024^2 area is not needed for the tiny model; odd sizes exercise the crop.
    return [photo(1, 200, 168), photo(2, 150, 190), photo(3, 260, 130)]
