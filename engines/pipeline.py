"""Prompt + reference images in, image out, on an engines folder alone: no torch, no diffusers, no model folder.

    from sparse_context.engines.pipeline import EnginePipeline

    pipe = EnginePipeline.from_engines("engines_out")
    result = pipe.generate("a cat in a spacesuit", ["photo.jpg"], keep_fraction=0.1, strategy="saliency",
                           use_kv=True)
    result.image  # (H, W, 3) uint8

The steps are the PyTorch generator's (:class:`~sparse_context.reference.generator.SparseContextGenerator`), each
on an engine: the tokenizer (``tokenizers``) and the text-encoder engine, references prepared as the Klein
pipelines prepare them, token selection (OpenCV), the generation core (packing, schedule, denoising, reference
K/V reuse and cache) on the transformer engines, the VAE encoder engine only when the K/V cache misses, and the
VAE decoder engine. With the same initial latents the two give the same image (fp32: latents within 1e-4,
pixels within 2 levels; ``tests/test_engine_pipeline.py``).

Noise: without ``latents``, the initial noise comes from numpy's generator for ``seed``. The PyTorch generator
draws with ``torch.randn``, which numpy cannot reproduce, so the same seed gives a different (equally valid)
image there; pass ``latents`` to both to compare them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sparse_context.engines.errors import EnginesIndexError, ProfileError
from sparse_context.engines.index import EnginesIndex, check_device, open_backend
from sparse_context.engines.parts import PART_NAMES, TextAndVae
from sparse_context.engines.runtime import EngineRuntime, read_model_settings, starting_latents
from sparse_context.runtime.core import (
    References, cached_prompt, generate_latents, remembered_selections, selection_settings,
)
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.fingerprints import array_digests
from sparse_context.runtime.kv_cache import ReferenceKVCache
from sparse_context.runtime.limits import (
    check_guidance, check_output_size, check_prompt, check_seed, check_selection_seed, check_steps,
)
from sparse_context.runtime.prompt_cache import PromptEmbeddingCache
from sparse_context.runtime.sampler import Conditioning
from sparse_context.runtime.tokens import (
    MAX_REFERENCE_AREA, TOKEN_PIXELS, check_budget, check_reference_count, text_position_ids, token_grid,
)

DEFAULT_SIZE = 1024  # without references or a size: diffusers' default_sample_size x vae_scale_factor


@dataclass
class PipelineResult:
    image: np.ndarray  # (H, W, 3) uint8
    latents: np.ndarray  # (1, rows*cols, C) float32 final packed target latents
    grid: tuple[int, int]  # (rows, cols) of the target latents
    ref_tokens: int  # reference tokens the transformer saw
    ref_tokens_available: int  # reference tokens before selection
    selections: list[np.ndarray]  # kept flat indices per reference
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    kv_state: Any = None
    cache_hit: bool = False  # the reference K/V came from the persistent cache


def open_parts(index: EnginesIndex, tokenizer: Any, device_id: int = 0, memory: Any = None) -> TextAndVae:
    """The text encoder and VAE sessions an index describes, on its backend (TensorRT engines, or onnxruntime
    with the recorded providers)."""
    from sparse_context.export.manifest import verify_export

    sessions = {}
    for part in PART_NAMES:
        entry = index.parts[part]
        verify_export(index.path(entry.onnx), entry.onnx_sha256)  # sizes and checksums before anything loads
        if index.backend == "trt":
            from sparse_context.engines.trt.parts import TrtPartSession

            sessions[part] = TrtPartSession(index.path(entry.engine), index.path(entry.onnx), memory=memory,
                                            device=device_id)
        else:
            from sparse_context.engines.ort.parts import OrtPartSession

            providers: list[Any] = list(index.providers) or ["CPUExecutionProvider"]
            if entry.provider_options and providers[0] == "TensorrtExecutionProvider":
                providers[0] = (providers[0], dict(entry.provider_options))
            sessions[part] = OrtPartSession(index.path(entry.onnx), providers, device_id)
    return TextAndVae(tokenizer, **sessions)


class EnginePipeline:
    """Images from a prompt and reference images with the engines of one ``build_engines.py`` folder."""

    def __init__(self, runtime: EngineRuntime, parts: TextAndVae, is_distilled: bool = True,
                 prompt_cache: PromptEmbeddingCache | None = None, text_fingerprint: str = "",
                 prefers_kv: bool = False):
        self.runtime = runtime
        self.parts = parts
        self.is_distilled = is_distilled  # base (non-distilled) models take guidance with an empty prompt
        self.prefers_kv = prefers_kv  # a Klein KV checkpoint was trained for the KV path
        self.prompt_cache = prompt_cache
        self.text_fingerprint = text_fingerprint

    @classmethod
    def from_engines(cls, engines_dir: str | Path, device: str | None = None,
                     kv_cache: ReferenceKVCache | None = None, prompt_cache: PromptEmbeddingCache | None = None,
                     memory: Any = None, sync: str | None = None, cuda_graphs: bool = False) -> EnginePipeline:
        """Open every engine of ``engines_dir``. ``device``: ``cpu``, ``cuda`` or ``cuda:N``, checked against where
        the engines run. ``memory``: the TensorRT runners' device-memory object (default: cuda-python). ``sync``:
        when onnxruntime waits for the device; ``cuda_graphs``: replay cached KV calls as CUDA graphs (both:
        :func:`~sparse_context.engines.index.open_backend`)."""
        from sparse_context.engines.build import build_command
        from sparse_context.engines.model_files import checked_model_folder
        from sparse_context.runtime.tokenizer import PromptTokenizer

        # 1. What was built, and the model files it carries (checked against their recorded sha256)
        index = EnginesIndex.read(engines_dir)
        rebuild = build_command(index, engines_dir)
        missing = [part for part in PART_NAMES if part not in index.parts]
        if missing:
            held = "only the transformer" if len(missing) == len(PART_NAMES) else \
                "the transformer and " + ", ".join(part for part in PART_NAMES if part not in missing)
            raise EnginesIndexError(f"{engines_dir}: engines.json has no {', '.join(missing)} (the folder holds "
                                    f"{held}); rebuild it with: {rebuild}")
        model_folder = checked_model_folder(engines_dir, index.files, rebuild)
        scheduler, is_distilled = read_model_settings(model_folder)
        tokenizer = PromptTokenizer.from_model_dir(model_folder)
        if tokenizer.max_length > index.plan.text_tokens:
            import dataclasses

            wider = dataclasses.replace(index, plan=dataclasses.replace(index.plan, text_tokens=tokenizer.max_length))
            raise EnginesIndexError(bad_value("engines' text tokens", index.plan.text_tokens, f"at least the "
                                              f"model's prompt length {tokenizer.max_length} (prompts are padded to "
                                              f"it); rebuild with --text-tokens {tokenizer.max_length}: "
                                              f"{build_command(wider, engines_dir)}"))

        # 2. The transformer backend and the parts, on the same device
        device_id = check_device(index, device)
        backend = open_backend(index, memory=memory, device=device, sync=sync, cuda_graphs=cuda_graphs)
        parts = open_parts(index, tokenizer, device_id, getattr(backend, "memory", memory))
        runtime = EngineRuntime(backend, scheduler, kv_cache, index)
        text = index.parts["text_encoder"].onnx_sha256 + "".join(sorted(index.files.values()))
        pipeline_class = json.loads((model_folder / "model_index.json").read_text()).get("_class_name")
        return cls(runtime, parts, is_distilled, prompt_cache, text, pipeline_class == "Flux2KleinKVPipeline")

    @property
    def index(self) -> EnginesIndex | None:
        return self.runtime.index

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """(1, text tokens, text dim) float32 prompt embeddings, through the prompt cache when there is one."""
        if not isinstance(prompt, str):
            raise InputError(bad_value("prompt", type(prompt).__name__, "a string", "--prompt"))
        settings = {"max_sequence_length": self.parts.tokenizer.max_length}
        return cached_prompt(self.prompt_cache, self.text_fingerprint, prompt, settings,
                             lambda: self.parts.encode_prompt(prompt))

    def prepare_references(self, references: Sequence[Any]) -> list[Any]:
        """Load and resize/crop each reference exactly as the Klein pipelines do before VAE encoding."""
        from sparse_context.runtime.images import load_image, prepare_reference

        if isinstance(references, (str, bytes, os.PathLike, np.ndarray)) or hasattr(references, "getpixel"):
            # a path would otherwise be taken as a sequence of one-character "images", an array as rows
            given = references if isinstance(references, (str, bytes, os.PathLike)) else type(references).__name__
            raise InputError(bad_value("references", given, "a list of images, e.g. [\"ref.jpg\"]", "--ref"))
        check_reference_count(len(references))
        return [prepare_reference(load_image(ref), max_area=MAX_REFERENCE_AREA, multiple_of=TOKEN_PIXELS)
                for ref in references]

    def generate(
        self,
        prompt: str,
        references: Sequence[Any] = (),
        *,
        keep_fraction: float = 1.0,
        token_count: int | None = None,
        strategy: str = "uniform",
        allocation: str = "per_reference",
        masks: Sequence[Any] | None = None,
        selections: Sequence[np.ndarray] | None = None,
        use_kv: bool = False,
        height: int | None = None,
        width: int | None = None,
        num_steps: int = 4,
        guidance_scale: float = 4.0,
        seed: int = 0,
        selection_seed: int = 0,
        latents: np.ndarray | None = None,
        key_tile: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> PipelineResult:
        """Generate one image; the arguments mean what they mean for the PyTorch generator's ``generate``.

        ``references``: paths, PIL images or (H, W, 3) arrays. ``keep_fraction`` (or ``token_count``) and
        ``strategy`` choose the reference tokens kept; ``selections`` (flat indices per reference) fix them.
        ``latents``: (1, rows*cols, 128) initial noise (default: numpy's for ``seed``). ``selection_seed`` seeds
        the selection's random parts, apart from the noise: a new ``seed`` keeps the selection (and K/V cache hits)."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        # 1. Check inputs and prepare the references as the VAE sees them
        check_prompt(prompt)
        check_budget(keep_fraction, token_count)
        check_steps(num_steps)
        check_guidance(guidance_scale)
        check_seed(seed)
        check_selection_seed(selection_seed)
        key_tile = self.runtime.key_tile_for(key_tile)  # None: as the engines were built
        prepared = self.prepare_references(references) if len(references) else []
        from_reference = bool(prepared) and height is None and width is None
        if from_reference:
            height, width = prepared[0].height, prepared[0].width
        # No silent rounding: a side not given is the default one, a side given must be whole tokens.
        width, height = check_output_size(DEFAULT_SIZE if width is None else width,
                                          DEFAULT_SIZE if height is None else height)
        rows, cols = token_grid(width, height)
        try:  # before the text and VAE engines run
            self.runtime.check_built_size(width, height)
        except ProfileError as error:
            if not from_reference:
                raise
            raise ProfileError(f"{error} (no size was given, so the output takes the first reference's: "
                               f"pass a built one with --width/--height)") from None
        latents = starting_latents(latents, seed, (rows, cols), self.runtime.backend.dims.in_channels,
                                   (width, height))

        # 2. Prompt embeddings (and the empty negative prompt for guidance on non-distilled models)
        embeds = self.encode_prompt(prompt)
        negative = self.encode_prompt("") if guidance_scale > 1.0 and not self.is_distilled else None
        conditioning = Conditioning(embeds, text_position_ids(embeds.shape[1]), negative,
                                    None if negative is None else text_position_ids(negative.shape[1]),
                                    float(guidance_scale))
        timings["text"] = time.perf_counter() - clock

        # 3. Which reference tokens to keep (a request the K/V cache has seen finds its selection there)
        clock = time.perf_counter()
        grids = [(image.height // TOKEN_PIXELS, image.width // TOKEN_PIXELS) for image in prepared]
        references_in = None
        if prepared:  # digests only if the K/V cache is consulted
            references_in = References(tuple(grids), lambda: array_digests(prepared),
                                       lambda: [self.parts.encode_reference(image) for image in prepared])
        runtime = self.runtime
        if selections is None and grids and (token_count is not None or keep_fraction < 1.0):
            from sparse_context.runtime.selection import select_references

            other_keys = embeds.shape[1] + rows * cols  # the text and target keys beside the kept tokens
            settings = selection_settings(strategy, keep_fraction, token_count, allocation, selection_seed, masks,
                                          TOKEN_PIXELS, key_tile=key_tile, other_keys=other_keys)
            selections = remembered_selections(
                runtime.kv_cache, use_kv, references_in, settings,
                lambda: [s.indices for s in select_references(
                    prepared, strategy=strategy, token_count=token_count,
                    keep_fraction=None if token_count else keep_fraction, allocation=allocation,
                    seed=selection_seed, masks=masks, multiple_of=TOKEN_PIXELS, key_tile=key_tile,
                    other_keys=other_keys)])
        timings["selection"] = time.perf_counter() - clock

        # 4. The generation core: reference cache, VAE encoder engine on a miss, packing, schedule, denoise
        core = generate_latents(runtime.backend, latents, (rows, cols), conditioning, num_steps=num_steps,
                                scheduler_config=runtime.scheduler_config, references=references_in,
                                selections=selections, use_kv=use_kv, kv_cache=runtime.kv_cache,
                                model_fingerprint=runtime.model_fingerprint, on_step=on_step)
        timings.update(core.timings)
        final = np.asarray(core.latents, dtype=np.float32)

        # 5. Decode
        clock = time.perf_counter()
        image = self.parts.decode(final, (rows, cols))
        timings["vae_decode"] = time.perf_counter() - clock
        return PipelineResult(image, final, (rows, cols), core.ref_tokens, core.ref_tokens_available,
                              core.selections, timings, core.kv_state, core.cache_hit)

    def close(self) -> None:
        """Release the engines (TensorRT runners hold device memory until then)."""
        self.parts.close()
        if hasattr(self.runtime.backend, "close"):
            self.runtime.backend.close()
