"""The parts around the transformer on any engine backend, numpy only: prompt -> embeddings, prepared reference ->
latent grid, packed target latents -> uint8 image.

A part session is anything with ``graph``, ``manifest`` (the export's) and ``run(feeds) -> {output: array}``:
:class:`~sparse_context.engines.ort.parts.OrtPartSession` or :class:`~sparse_context.engines.trt.parts.TrtPartSession`.
Feeds are checked against the export's manifest before a backend sees them (:func:`check_part_feeds`), so a wrong
shape is reported with what the graph takes instead of a backend's shape-inference message.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from sparse_context.export.part_specs import PIXEL_AXES
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.tokens import TOKEN_PIXELS

PART_NAMES = ("text_encoder", "vae_encoder", "vae_decoder")


def check_part_feeds(graph: str, inputs: Mapping[str, list[Any]], feeds: Mapping[str, np.ndarray]) -> None:
    """InputError naming every input that does not fit the graph (names, rank, fixed dims, shared symbols,
    whole-token pixel sizes). ``inputs``: the export manifest's ``spec["inputs"]``."""
    if set(feeds) != set(inputs):
        raise InputError(bad_value(f"{graph} inputs", sorted(feeds), ", ".join(sorted(inputs))))
    problems, values = [], {}
    for name, dims in inputs.items():
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
        raise InputError(f"{graph} inputs do not fit the exported graph: " + "; ".join(problems))


class TextAndVae:
    """Prompt embeddings, reference latents and decoded images from part sessions of any backend.

    ``tokenizer``: a :class:`~sparse_context.runtime.tokenizer.PromptTokenizer` (needed with a text encoder).
    Each session may be None where that step is not needed (a precomputed prompt, no references)."""

    def __init__(self, tokenizer: Any = None, text_encoder: Any = None, vae_encoder: Any = None,
                 vae_decoder: Any = None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae_encoder = vae_encoder
        self.vae_decoder = vae_decoder

    def _need(self, part: str) -> Any:
        session = getattr(self, part)
        if session is None:
            raise InputError(bad_value(f"{part} export", None, f"the {part} ONNX export folder or engine"))
        return session

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """(1, max_sequence_length, layers x hidden) float32 prompt embeddings, as ``_get_qwen3_prompt_embeds``."""
        session = self._need("text_encoder")
        tokens = self.tokenizer(prompt)
        outputs = session.run({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        return np.asarray(outputs["prompt_embeds"], dtype=np.float32)

    def encode_reference(self, image: Any) -> np.ndarray:
        """(128, rows, cols) normalised latents of a prepared reference (``runtime.images.prepare_reference``)."""
        from sparse_context.runtime.vae_io import reference_pixels

        outputs = self._need("vae_encoder").run({"image": reference_pixels(image)})
        return np.asarray(outputs["latents"][0], dtype=np.float32)

    def decode(self, packed: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
        """(H, W, 3) uint8 image from (1, rows*cols, 128) packed target latents and their (rows, cols)."""
        from sparse_context.runtime.vae_io import postprocess_image, target_latent_grid

        outputs = self._need("vae_decoder").run({"latents": target_latent_grid(packed, grid)})
        return postprocess_image(outputs["image"])

    def close(self) -> None:
        for part in PART_NAMES:
            session = getattr(self, part)
            if session is not None and hasattr(session, "close"):
                session.close()
