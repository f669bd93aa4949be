"""The text encoder and VAE exports on onnxruntime, torch-free: one session per part, and
:class:`OrtTextAndVae`, the three of them from export folders. With
:class:`~sparse_context.engines.runtime.EngineRuntime` this is the whole generation path without torch
(:class:`~sparse_context.engines.pipeline.EnginePipeline` puts them together from an engines folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sparse_context.engines.ort.loader import session_from_onnx, with_default_options
from sparse_context.engines.parts import TextAndVae, check_part_feeds
from sparse_context.export.manifest import onnx_path, read_export_manifest
from sparse_context.runtime.errors import ModelLoadError, bad_value

FEED_DTYPES = {"input_ids": np.int64, "attention_mask": np.int64}  # every other input: the export precision
PRECISION_NUMPY = {"fp32": np.float32, "fp16": np.float16}


class OrtPartSession:
    """One exported part (``vae_encoder``, ``vae_decoder`` or ``text_encoder``) in an onnxruntime session."""

    def __init__(self, path: str | Path, providers: Sequence[Any] = ("CPUExecutionProvider",), device_id: int = 0):
        self.path = onnx_path(path)
        self.manifest = read_export_manifest(self.path)
        self.graph = self.manifest["graph"]
        self.inputs: dict[str, list[Any]] = self.manifest["spec"]["inputs"]
        precision = self.manifest["precision"]
        if precision not in PRECISION_NUMPY:
            raise ModelLoadError(bad_value(f"{self.graph} export precision", precision, "fp32 or fp16 for "
                                           "onnxruntime (numpy has no bfloat16)", "--precision"))
        self.float_dtype = PRECISION_NUMPY[precision]
        self.session = session_from_onnx(self.path, with_default_options(list(providers), device_id))

    def check(self, feeds: Mapping[str, np.ndarray]) -> None:
        check_part_feeds(self.graph, self.inputs, feeds)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        cast = {name: np.ascontiguousarray(value, dtype=FEED_DTYPES.get(name, self.float_dtype))
                for name, value in feeds.items()}
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, cast)))


class OrtTextAndVae(TextAndVae):
    """Prompt embeddings, reference latents and decoded images from the part exports, with numpy only.

    ``model_dir`` gives the tokenizer files and text settings; each export path may be None where that step is
    not needed (a precomputed prompt, no references)."""

    def __init__(self, model_dir: str | Path, text_encoder: str | Path | None = None,
                 vae_encoder: str | Path | None = None, vae_decoder: str | Path | None = None,
                 providers: Sequence[Any] = ("CPUExecutionProvider",), max_sequence_length: int | None = None,
                 device_id: int = 0):
        from sparse_context.runtime.tokenizer import PromptTokenizer

        def session(path: str | Path | None) -> OrtPartSession | None:
            return OrtPartSession(path, providers, device_id) if path else None

        tokenizer = PromptTokenizer.from_model_dir(model_dir, max_sequence_length) if text_encoder else None
        super().__init__(tokenizer, session(text_encoder), session(vae_encoder), session(vae_decoder))
