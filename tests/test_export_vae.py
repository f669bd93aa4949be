"""VAE encoder/decoder ONNX graphs equal diffusers' Klein VAE path (fp32, onnxruntime CPU) at sizes other than the
traced one; export is staged, checked, cached; numpy ends (pixels, grids, uint8) match the pipeline's."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from sparse_context.export.errors import ExportConfigError
from sparse_context.export.part_specs import (
    IMAGE_HEIGHT, LATENT_COLS, LATENT_ROWS, check_sizes, example_sizes, resolution_bounds, vae_decoder_spec,
    vae_encoder_spec,
)
from sparse_context.runtime.errors import InputError
from sparse_context.runtime.tokens import grid_position_ids
from sparse_context.runtime.vae_io import postprocess_image, reference_pixels, target_latent_grid

pytest.importorskip("torch", reason="the export needs torch (pip install .[torch,onnx])")
pytest.importorskip("onnxruntime", reason="the graphs run on onnxruntime (pip install .[onnx])")

TOLERANCE = 1e-5  # max |onnxruntime - diffusers|, fp32
TRACED = (80, 64)  # (width, height) px of example_sizes: 5 x 4 tokens
CHECKED = [(96, 48), (32, 96), (16, 16)]  # (width, height) px, none the traced size
RESOLUTIONS = ((128, 128), (32, 96), (96, 48))


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from sparse_context.export.vae import load_vae

    return load_vae(tiny_model_dir)


@pytest.fixture(scope="module")
def exports(tiny_model_dir, vae, tmp_path_factory):
    from sparse_context.export.vae import export_vae_decoder, export_vae_encoder

    out = tmp_path_factory.mktemp("vae-onnx")
    stages = []
    encoder = export_vae_encoder(tiny_model_dir, out, RESOLUTIONS, progress=lambda *a: stages.append(a), vae=vae)
    decoder = export_vae_decoder(tiny_model_dir, out, RESOLUTIONS)  # loads the VAE itself
    return SimpleNamespace(out=out, encoder=encoder, decoder=decoder, stages=stages)


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _photo(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _diffusers_encode(vae, pixels: np.ndarray) -> np.ndarray:
    """Flux2KleinPipeline._encode_vae_image (argmax latents, patchify, BN normalisation) on the tiny VAE."""
    import torch
    from diffusers import Flux2KleinPipeline

    pipe = SimpleNamespace(vae=vae, _patchify_latents=Flux2KleinPipeline._patchify_latents)
    with torch.no_grad():
        return Flux2KleinPipeline._encode_vae_image(pipe, torch.from_numpy(pixels), generator=None).numpy()


def _diffusers_decode(vae, packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The end of Flux2KleinPipeline.__call__: unpack by ids, un-normalise, unpatchify, vae.decode."""
    import torch
    from diffusers import Flux2KleinPipeline

    ids = torch.from_numpy(grid_position_ids(rows, cols))[None]
    with torch.no_grad():
        latents = Flux2KleinPipeline._unpack_latents_with_ids(torch.from_numpy(packed), ids)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        latents = Flux2KleinPipeline._unpatchify_latents(latents * std + mean)
        return vae.decode(latents, return_dict=False)[0].numpy()


def test_reference_pixels_equal_the_pipeline_preprocessing():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    image = _photo(96, 48)
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    expected = processor.preprocess(image, height=48, width=96, resize_mode="crop").numpy()
    np.testing.assert_array_equal(reference_pixels(image), expected)


@pytest.mark.parametrize("width,height", CHECKED)
def test_encoder_equals_diffusers(exports, vae, width, height):
    pixels = reference_pixels(_photo(width, height, seed=width))
    (ours,) = _session(exports.encoder.path).run(None, {"image": pixels})
    theirs = _diffusers_encode(vae, pixels)
    assert ours.shape == theirs.shape == (1, 128, height // 16, width // 16)
    assert np.abs(ours - theirs).max() <= TOLERANCE


@pytest.mark.parametrize("width,height", CHECKED)
def test_decoder_equals_diffusers(exports, vae, width, height):
    rows, cols = height // 16, width // 16
    packed = np.random.default_rng(rows * 7 + cols).standard_normal((1, rows * cols, 128)).astype(np.float32)
    (ours,) = _session(exports.decoder.path).run(None, {"latents": target_latent_grid(packed, (rows, cols))})
    theirs = _diffusers_decode(vae, packed, rows, cols)
    assert ours.shape == theirs.shape == (1, 3, height, width)
    assert np.abs(ours - theirs).max() <= TOLERANCE
    image = postprocess_image(ours)
    assert image.shape == (height, width, 3) and image.dtype == np.uint8


def test_postprocess_equals_diffusers():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    decoded = np.random.default_rng(0).uniform(-1.3, 1.3, (1, 3, 32, 48)).astype(np.float32)
    (expected,) = VaeImageProcessor().postprocess(torch.from_numpy(decoded), output_type="pil")
    np.testing.assert_array_equal(postprocess_image(decoded), np.asarray(expected))


def test_export_contract_manifest_and_cache(exports, tiny_model_dir):
    from sparse_context.export.part_exporter import is_part_cached
    from sparse_context.export.vae import export_vae_encoder
    from sparse_context.runtime.fingerprints import file_sha256

    assert [s[0] for s in exports.stages] == ["hash", "load", "trace", "save", "check", "manifest"]
    for result, spec in ((exports.encoder, vae_encoder_spec(RESOLUTIONS)), (exports.decoder,
                                                                            vae_decoder_spec(RESOLUTIONS))):
        manifest = result.manifest
        assert manifest["graph"] == spec.graph and manifest["opset"] == 19 and manifest["for_tensorrt"]
        assert manifest["onnx_sha256"] == file_sha256(result.path)
        assert json.loads((result.path.parent / "manifest.json").read_text())["cache_key"] == manifest["cache_key"]
        assert manifest["dynamic_axes"] == json.loads(json.dumps(spec.dynamic_axes()))  # JSON keys: strings
        assert is_part_cached(spec, tiny_model_dir, exports.out)
    again = export_vae_encoder(tiny_model_dir, exports.out, RESOLUTIONS)
    assert again.reused and again.path == exports.encoder.path
    assert not list(exports.out.glob(".staging-*"))


def test_graph_axes_are_symbolic(exports):
    import onnx

    model = onnx.load(str(exports.encoder.path), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims == {"image": [1, 3, "16*latent_rows", "16*latent_cols"],
                    "latents": [1, 128, "latent_rows", "latent_cols"]}


def test_spec_profiles_and_sizes():
    spec = vae_encoder_spec(((1024, 1024), (1440, 720), (256, 256)))
    (low, opt, high), = spec.profile().values()
    assert low == (1, 3, 256, 256) and opt == (1, 3, 1024, 1024) and high == (1, 3, 1024, 1440)
    assert spec.resolve({LATENT_ROWS: 3})[IMAGE_HEIGHT] == 48
    decoder = vae_decoder_spec(((512, 512), (1024, 768)), opt=(512, 512))
    assert decoder.profile()["latents"] == ((1, 128, 32, 32), (1, 128, 32, 32), (1, 128, 48, 64))
    assert example_sizes(spec) == {LATENT_ROWS: 4, LATENT_COLS: 5}
    assert example_sizes(spec) not in check_sizes(spec) and len(check_sizes(spec)) == 2
    assert TRACED == (16 * example_sizes(spec)[LATENT_COLS], 16 * example_sizes(spec)[LATENT_ROWS])


def test_bad_options_are_config_errors(tiny_model_dir, tmp_path):
    from sparse_context.export.vae import export_vae_decoder, export_vae_encoder

    with pytest.raises(ExportConfigError, match="multiples of 16"):
        vae_encoder_spec(((100, 64),))
    with pytest.raises(ExportConfigError, match="at least one"):
        resolution_bounds(())
    with pytest.raises(ExportConfigError, match="opt resolution"):
        vae_decoder_spec(((512, 512),), opt=(1024, 1024))
    with pytest.raises(ExportConfigError, match="precision"):
        vae_encoder_spec(precision="int3")
    with pytest.raises(ExportConfigError, match="opset"):
        export_vae_encoder(tiny_model_dir, tmp_path, RESOLUTIONS, opset=23)
    with pytest.raises(ExportConfigError, match="vae/"):
        export_vae_decoder(tmp_path, tmp_path / "out", RESOLUTIONS)


def test_numpy_ends_reject_wrong_shapes():
    with pytest.raises(InputError, match="packed latents"):
        target_latent_grid(np.zeros((1, 10, 128), np.float32), (3, 4))
    with pytest.raises(InputError, match="decoded image"):
        postprocess_image(np.zeros((3, 16, 16), np.float32))
    with pytest.raises(InputError, match="RGB"):
        reference_pixels(np.zeros((16, 16), np.uint8))


def test_ort_parts_encode_and_decode(exports, vae, tiny_model_dir):
    """The torch-free wrapper: prepared reference -> (128, rows, cols); packed tokens -> the pipeline's uint8."""
    import torch
    from diffusers.image_processor import VaeImageProcessor

    from sparse_context.engines.ort.parts import OrtTextAndVae

    parts = OrtTextAndVae(tiny_model_dir, vae_encoder=exports.encoder.path.parent, vae_decoder=exports.decoder.path)
    image = _photo(96, 48, seed=3)
    latents = parts.encode_reference(image)
    assert latents.shape == (128, 3, 6)
    assert np.abs(latents - _diffusers_encode(vae, reference_pixels(image))[0]).max() <= TOLERANCE
    packed = np.random.default_rng(5).standard_normal((1, 3 * 6, 128)).astype(np.float32)
    decoded = torch.from_numpy(_diffusers_decode(vae, packed, 3, 6))
    (expected,) = VaeImageProcessor().postprocess(decoded, output_type="pil")
    ours = parts.decode(packed, (3, 6))
    # uint8 rounding can flip where the fp32 images differ by ~1e-6 right at a .5 boundary
    assert np.abs(ours.astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_ort_parts_reject_wrong_shapes(exports, tiny_model_dir):
    from sparse_context.engines.ort.parts import OrtPartSession, OrtTextAndVae

    encoder = OrtPartSession(exports.encoder.path)
    with pytest.raises(InputError, match="multiple of 16"):
        encoder.run({"image": np.zeros((1, 3, 40, 64), np.float32)})
    with pytest.raises(InputError, match="axis 1 is 4"):
        encoder.run({"image": np.zeros((1, 4, 32, 64), np.float32)})
    with pytest.raises(InputError, match="inputs"):
        encoder.run({"pixels": np.zeros((1, 3, 32, 64), np.float32)})
    decoder = OrtPartSession(exports.decoder.path)
    with pytest.raises(InputError, match="shape"):
        decoder.run({"latents": np.zeros((128, 3, 6), np.float32)})
    with pytest.raises(InputError, match="text_encoder export"):
        OrtTextAndVae(tiny_model_dir, vae_decoder=exports.decoder.path).encode_prompt("a cat")


@pytest.mark.slow  # two more traces (~8 s each on 2 cores)
def test_quant_conv_vae_equals_diffusers(tmp_path):
    """The part of FLUX.2's VAE layout the tiny model leaves out: quant and post-quant convolutions. (The real
    84M-parameter configuration, random weights, measured once the same way: 1.6e-6 encoder, 4.5e-6 decoder.)"""
    import torch
    from diffusers import AutoencoderKLFlux2

    from sparse_context.export.vae import export_vae_decoder, export_vae_encoder

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
                             use_quant_conv=True, use_post_quant_conv=True).eval()
    generator = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    vae.save_pretrained(tmp_path / "vae")
    encoder = _session(export_vae_encoder(tmp_path, tmp_path / "onnx", RESOLUTIONS, vae=vae).path)
    decoder = _session(export_vae_decoder(tmp_path, tmp_path / "onnx", RESOLUTIONS, vae=vae).path)
    for width, height in CHECKED[:1]:
        pixels = reference_pixels(_photo(width, height, seed=height))
        assert np.abs(encoder.run(None, {"image": pixels})[0] - _diffusers_encode(vae, pixels)).max() <= TOLERANCE
        rows, cols = height // 16, width // 16
        packed = np.random.default_rng(rows).standard_normal((1, rows * cols, 128)).astype(np.float32)
        (ours,) = decoder.run(None, {"latents": target_latent_grid(packed, (rows, cols))})
        assert np.abs(ours - _diffusers_decode(vae, packed, rows, cols)).max() <= TOLERANCE


def test_validate_part_export(exports, vae):
    """The validator compares at the profile's corners (not the traced size) and reports every failure at once."""
    from sparse_context.export.errors import ValidationError
    from sparse_context.reference.validate_parts import validate_part_export
    from sparse_context.export.vae import VaeDecoderGraph, VaeEncoderGraph

    report = validate_part_export(exports.encoder.path, module=VaeEncoderGraph(vae))
    assert len(report.records) == 2 and not report.failures
    assert max(r.max_abs for r in report.records) <= TOLERANCE
    assert "latent_rows=3 latent_cols=8" in [r.sizes for r in report.records]  # 48 x 128 px
    report = validate_part_export(exports.decoder.path.parent)  # loads the VAE from the recorded folder
    assert not report.failures
    with pytest.raises(ValidationError, match="2 of 2") as error:
        validate_part_export(exports.decoder.path, module=VaeDecoderGraph(vae), atol=0.0, rtol=0.0)
    assert len(error.value.report.failures) == 2


def test_export_parts_reuses_and_checks_names(exports, tiny_model_dir, monkeypatch):
    import sparse_context.export.vae as vae_module
    from sparse_context.export.part_exporter import export_parts

    def no_loading(*args, **kwargs):
        raise AssertionError("a cached export must not load the VAE")

    monkeypatch.setattr(vae_module, "load_vae", no_loading)
    results = export_parts(tiny_model_dir, exports.out, RESOLUTIONS, RESOLUTIONS, parts=("vae_encoder", "vae_decoder"))
    assert results["vae_encoder"].reused and results["vae_encoder"].path == exports.encoder.path
    assert results["vae_decoder"].reused and results["vae_decoder"].path == exports.decoder.path
    with pytest.raises(ExportConfigError, match="parts"):
        export_parts(tiny_model_dir, exports.out, parts=("unet",))
