"""ONNX graphs of the FLUX.2 VAE as the Klein pipeline uses it, with dynamic height and width.

- :class:`VaeEncoderGraph`: the pipeline's ``_encode_vae_image``: ``vae.encode`` -> mode of the latent distribution
  (``retrieve_latents(..., sample_mode="argmax")``) -> 2x2 patchify -> BatchNorm-statistics normalisation.
- :class:`VaeDecoderGraph`: the end of the pipeline's ``__call__``: un-normalise with the same statistics ->
  unpatchify -> ``vae.decode``. Its input is the target latent grid; the runtime's packed tokens become that grid
  with ``runtime.packing.unpack_grid`` (numpy), and the image becomes uint8 with
  ``runtime.vae_io.postprocess_image``.

:func:`export_vae_encoder` / :func:`export_vae_decoder` write them like the transformer export (staging, checks,
manifest, cache). Both compute exactly what ``reference.generator`` (``encode_reference`` / ``decode``) computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from sparse_context.export.exporter import ExportResult, Progress
from sparse_context.export.part_exporter import DEFAULT_PART_OPSET, export_part
from sparse_context.export.part_specs import (
    DEFAULT_REFERENCE_RESOLUTIONS, DEFAULT_TARGET_RESOLUTIONS, vae_decoder_spec, vae_encoder_spec,
)

PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bn_stats(vae: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 128, 1, 1) mean and std of the VAE's BatchNorm running statistics, as the pipeline computes them."""
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean, std


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), the pipeline's ``_patchify_latents``."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(latents: torch.Tensor) -> torch.Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), the pipeline's ``_unpatchify_latents``."""
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c // 4, h * 2, w * 2)


class VaeEncoderGraph(torch.nn.Module):
    """(1, 3, H, W) image in [-1, 1] -> (1, 128, H/16, W/16) normalised, patchified latents."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(image).latent_dist.mode()  # (1, 32, H/8, W/8)
        latents = patchify(latents)  # (1, 128, H/16, W/16)
        mean, std = _bn_stats(self.vae)
        return (latents - mean.to(latents.dtype)) / std.to(latents.dtype)


class VaeDecoderGraph(torch.nn.Module):
    """(1, 128, rows, cols) target latents -> (1, 3, 16 rows, 16 cols) image in [-1, 1] (not clamped)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = _bn_stats(self.vae)
        latents = latents * std.to(latents.dtype) + mean.to(latents.dtype)  # (1, 128, rows, cols)
        latents = unpatchify(latents)  # (1, 32, 2 rows, 2 cols)
        return self.vae.decode(latents, return_dict=False)[0]  # (1, 3, 16 rows, 16 cols)


def load_vae(model_dir: str | Path, precision: str = "fp32") -> Any:
    """The folder's ``AutoencoderKLFlux2`` in eval mode at the export precision."""
    from diffusers import AutoencoderKLFlux2

    from sparse_context.export.loading import check_module_weights, read_model_index
    from sparse_context.runtime.errors import ModelLoadError

    read_model_index(model_dir)
    try:
        vae = AutoencoderKLFlux2.from_pretrained(str(model_dir), subfolder="vae",
                                                 torch_dtype=PRECISION_DTYPES[precision], local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load the VAE of {model_dir}: {error} (check --model)") from error
    check_module_weights(vae, "vae", model_dir)
    return vae.eval()


def _vae(vae: Any, model_dir: str | Path, precision: str) -> Any:
    if vae is None:
        return load_vae(model_dir, precision)
    dtype = PRECISION_DTYPES[precision]
    return (vae if vae.dtype == dtype else vae.to(dtype)).eval()  # diffusers warns on every .to(dtype)


def export_vae_encoder(model_dir: str | Path, out_dir: str | Path,
                       resolutions: Sequence[tuple[int, int]] = DEFAULT_REFERENCE_RESOLUTIONS,
                       precision: str = "fp32", opset: int = DEFAULT_PART_OPSET, opt: tuple[int, int] | None = None,
                       progress: Progress | None = None, vae: Any = None) -> ExportResult:
    """Export (or reuse) the encoder graph for references of ``resolutions`` ((width, height) px, multiples of 16).

    ``vae``: an already loaded VAE of the same folder, to skip loading (the cache key still hashes the files).
    """
    spec = vae_encoder_spec(resolutions, precision, opt)
    return export_part(spec, model_dir, out_dir, lambda: VaeEncoderGraph(_vae(vae, model_dir, precision)).eval(),
                       opset, progress)


def export_vae_decoder(model_dir: str | Path, out_dir: str | Path,
                       resolutions: Sequence[tuple[int, int]] = DEFAULT_TARGET_RESOLUTIONS,
                       precision: str = "fp32", opset: int = DEFAULT_PART_OPSET, opt: tuple[int, int] | None = None,
                       progress: Progress | None = None, vae: Any = None) -> ExportResult:
    """Export (or reuse) the decoder graph for targets of ``resolutions`` ((width, height) px, multiples of 16)."""
    spec = vae_decoder_spec(resolutions, precision, opt)
    return export_part(spec, model_dir, out_dir, lambda: VaeDecoderGraph(_vae(vae, model_dir, precision)).eval(),
                       opset, progress)

