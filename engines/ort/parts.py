"""The text encoder and VAE exports on onnxruntime, torch-free: prompt -> embeddings, prepared reference ->
latent grid, packed target latents -> uint8 image. With :class:`~sparse_context.runtime.engine_runtime.EngineRuntime`
this is the whole generation path without torch.

Feeds are checked against the export's manifest before onnxruntime sees them, so a wrong shape is reported with
what the graph takes instead of an onnxruntime shape-inference message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparse_context.export.ort_backend import read_export_manifest, with_default_options
from sparse_context.export.part_specs import PIXEL_AXES
from sparse_context.runtime.errors import InputError, ModelLoadError, bad_value
from sparse_context.runtime.tokens import TOKEN_PIXELS

FEED_DTYPES = {"input_ids": np.int64, "attention_mask": np.int64}  # every other input: the export precision
PRECISION_NUMPY = {"fp32": np.float32, "fp16": np.float16}


class OrtPartSession:
    """One exported part (``vae_encoder``, ``vae_decoder`` or ``text_encoder``) in an onnxruntime session."""

    def __init__(self, path: str | Path, providers: Sequence[Any] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        path = Path(path)
        self.path = path / "model.onnx" if path.is_dir() else path
        self.manifest = read_export_manifest(self.path)
        self.graph = self.manifest["graph"]
        self.inputs: dict[str, list[Any]] = self.manifest["spec"]["inputs"]
        precision = self.manifest["precision"]
        if precision not in PRECISION_NUMPY:
            raise ModelLoadError(bad_value(f"{self.graph} export precision", precision, "fp32 or fp16 for "
                                           "onnxruntime (numpy has no bfloat16)", "--precision"))
        self.float_dtype = PRECISION_NUMPY[precision]
        self.session = ort.InferenceSession(str(self.path), providers=with_default_options(list(providers)))

    def check(self, feeds: Mapping[str, np.ndarray]) -> None:
        """InputError naming every input that does not fit the graph (names, rank, fixed dims, shared symbols,
        whole-token pixel sizes)."""
        if set(feeds) != set(self.inputs):
            raise InputError(bad_value(f"{self.graph} inputs", sorted(feeds), ", ".join(sorted(self.inputs))))
        problems, values = [], {}
        for name, dims in self.inputs.items():
            shape = np.shape(feeds[name])
            if len(shape) != len(dims):
                problems.append(f"{name}: shape {shape}, the graph takes {tuple(dims)}")
                continue
            for axis, (got, want) in enumerate(zip(shape, dims)):
                if isinstance(want, int) and got != want:
                    problems.append(f"{name}: axis {axis} is {got}, the graph takes {want} ({tuple(dims)})")
                elif isinstance(want, str) and values.setdefault(want, got) != got:
                    problems.append(f"{name}: axis {axis} ({want}) is {got}, another input has {values[want]}")
                elif isinstance(want, str) and want in PIXEL_AXES and (got % TOKEN_PIXELS or got == 0):
                    problems.append(f"{name}: axis {axis} ({want}) is {got} px, not a positive multiple of "
                                    f"{TOKEN_PIXELS} (prepare the image as runtime.images.prepare_reference does)")
                elif isinstance(want, str) and got == 0:
                    problems.append(f"{name}: axis {axis} ({want}) is empty")
        if problems:
            raise InputError(f"{self.graph} inputs do not fit the exported graph: " + "; ".join(problems))

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        cast = {name: np.ascontiguousarray(value, dtype=FEED_DTYPES.get(name, self.float_dtype))
                for name, value in feeds.items()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, cast)))


class OrtTextAndVae:
    """Prompt embeddings, reference latents and decoded images from the part exports, with numpy only.

    ``model_dir`` gives the tokenizer files and text settings; each export path may be None where that step is
    not needed (a precomputed prompt, no references)."""

    def __init__(self, model_dir: str | Path, text_encoder: str | Path | None = None,
                 vae_encoder: str | Path | None = None, vae_decoder: str | Path | None = None,
                 providers: Sequence[Any] = ("CPUExecutionProvider",), max_sequence_length: int | None = None):
        from sparse_context.runtime.tokenizer import PromptTokenizer

        self.tokenizer = PromptTokenizer.from_model_dir(model_dir, max_sequence_length) if text_encoder else None
        self.text_encoder = OrtPartSession(text_encoder, providers) if text_encoder else None
        self.vae_encoder = OrtPartSession(vae_encoder, providers) if vae_encoder else None
        self.vae_decoder = OrtPartSession(vae_decoder, providers) if vae_decoder else None

    def _need(self, part: str) -> OrtPartSession:
        session = getattr(self, part)
        if session is None:
            raise InputError(bad_value(f"{part} export", None, f"the {part} ONNX export folder"))
        return session

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """(1, max_sequence_length, layers x hidden) float32 prompt embeddings, as ``_get_qwen3_prompt_embeds``."""
        session = self._need("text_encoder")
        tokens = self.tokenizer(prompt)
        outputs = session.run({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        return outputs["prompt_embeds"].astype(np.float32)

    def encode_reference(self, image: Any) -> np.ndarray:
        """(128, rows, cols) normalised latents of a prepared reference (``runtime.images.prepare_reference``)."""
        from sparse_context.runtime.vae_io import reference_pixels

        outputs = self._need("vae_encoder").run({"image": reference_pixels(image)})
        return outputs["latents"][0].astype(np.float32)

    def decode(self, packed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 image from (1, rows*cols, 128) packed target latents and their (rows, cols)."""
        from sparse_context.runtime.vae_io import postprocess_image, target_latent_grid

        outputs = self._need("vae_decoder").run({"latents": target_latent_grid(packed, grid)})
        return postprocess_image(outputs["image"])
