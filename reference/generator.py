"""The PyTorch reference generator: FLUX.2-klein with Sparse Context references, with or without the KV cache.

Every later backend (ONNX, TensorRT) is checked against this path, and this path is checked against diffusers:
with every token kept it equals ``Flux2KleinPipeline`` (dense) and ``Flux2KleinKVPipeline`` (KV) for the same seed.
A shell around the generation core (:func:`~sparse_context.runtime.core.generate_latents`, which the engine
runtime runs too): it encodes the prompt and the references with diffusers' components and decodes the result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from sparse_context.reference.torch_backend import TorchTransformerBackend
from sparse_context.runtime.core import (
    References, cached_prompt, engine_fingerprint, generate_latents, remembered_selections, selection_settings,
)
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.fingerprints import array_digests, weights_fingerprint
from sparse_context.runtime.images import load_image, prepare_reference
from sparse_context.runtime.kv_cache import ReferenceKVCache
from sparse_context.runtime.limits import (
    check_guidance, check_output_size, check_prompt, check_seed, check_selection_seed, check_steps,
    warn_if_prompt_cut,
)
from sparse_context.runtime.packing import pack_grid, unpack_grid
from sparse_context.runtime.prompt_cache import PromptEmbeddingCache
from sparse_context.runtime.sampler import Conditioning
from sparse_context.runtime.tokens import (
    MAX_REFERENCE_AREA,
    TOKEN_PIXELS,
    check_budget,
    check_reference_count,
    text_position_ids,
)

KLEIN_TEXT_LAYERS = (9, 18, 27)
KLEIN_MAX_SEQUENCE_LENGTH = 512
DEFAULT_SIZE = 1024  # diffusers: default_sample_size (128) x vae_scale_factor (8)


@dataclass
class GenerationResult:
    image: Any  # PIL image, (H, W, 3) float array in [0, 1], or (1, 128, h, w) latents, by output_type
    latents: torch.Tensor  # (1, N_target, 128) final packed latents
    ref_tokens: int  # reference tokens fed to the transformer
    ref_tokens_available: int  # reference tokens before selection
    selections: list[np.ndarray]  # kept flat indices per reference
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase
    kv_state: Any = None  # the reference K/V (KV mode), reusable for the same references
    cache_hit: bool = False  # the reference K/V came from the persistent cache


class SparseContextGenerator:
    """FLUX.2-klein generation with a sparse subset of reference tokens, on diffusers components."""

    def __init__(
        self,
        transformer: Any,
        vae: Any = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
        scheduler_config: dict | None = None,
        is_distilled: bool = True,
        text_encoder_out_layers: Sequence[int] = KLEIN_TEXT_LAYERS,
        max_sequence_length: int = KLEIN_MAX_SEQUENCE_LENGTH,
        prefers_kv: bool = False,
        kv_cache: ReferenceKVCache | None = None,
        backend: Any = None,
        prompt_cache: PromptEmbeddingCache | None = None,
    ):
        self.transformer = transformer
        # Any TransformerBackend: the PyTorch one by default; onnxruntime/TensorRT ones work on numpy arrays.
        self.backend = backend if backend is not None else TorchTransformerBackend(transformer)
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config or {})
        self.is_distilled = is_distilled
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        self.max_sequence_length = int(max_sequence_length)
        self.prefers_kv = prefers_kv  # a Klein KV checkpoint was trained for the KV path
        self.kv_cache = kv_cache  # persistent reference K/V across calls (KV mode only)
        self.prompt_cache = prompt_cache  # prompt embeddings across calls
        self.engines_index = None  # what the engines were built with (from_engines only)
        self._fingerprint = LiveFingerprint(transformer) if transformer is not None else None
        self._text_fingerprint = LiveFingerprint(text_encoder) if text_encoder is not None else None

    @classmethod
    def from_pipeline(cls, pipe: Any, **overrides: Any) -> "SparseContextGenerator":
        """Wrap the components of a loaded ``Flux2KleinPipeline`` or ``Flux2KleinKVPipeline``."""
        settings = dict(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            scheduler_config=dict(pipe.scheduler.config),
            is_distilled=bool(pipe.config.get("is_distilled", True)),
            prefers_kv=type(pipe).__name__ == "Flux2KleinKVPipeline",
            # the caller's pipeline stays as it was: KV processors only for the duration of each call
            backend=TorchTransformerBackend(pipe.transformer, keep_processors=False),
        )
        settings.update(overrides)
        return cls(pipe.transformer, **settings)

    @classmethod
    def from_pretrained(cls, model_dir: Any, lora: Any = None, lora_scale: float = 1.0, transformer_file: Any = None,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> "SparseContextGenerator":
        """Load a local diffusers folder (optionally a single-file transformer and a LoRA to merge)."""
        from sparse_context.export.loading import load_generator_parts

        return cls(**load_generator_parts(model_dir, lora=lora, lora_scale=lora_scale,
                                          transformer_file=transformer_file, dtype=dtype, device=device))

    @classmethod
    def from_engines(cls, engines_dir: Any, device: str | None = None, kv_cache: ReferenceKVCache | None = None,
                     memory: Any = None, sync: str | None = None, cuda_graphs: bool = False
                     ) -> "SparseContextGenerator":
        """The transformer runs in the engines ``build_engines.py`` wrote (TensorRT or onnxruntime); the text
        encoder and VAE come from the model folder recorded there and run on the CPU. Every request maps to
        exactly one bucket of the recorded plan, or fails with the build option that would cover it.
        ``device``: where the engines run (``cpu``, ``cuda``, ``cuda:N``), checked against the engines.
        ``memory``: the TensorRT runner's device-memory object (default: torch CUDA, else cuda-python).
        ``sync``: when onnxruntime waits for the device; ``cuda_graphs``: replay cached KV calls as CUDA graphs
        (both: :func:`~sparse_context.engines.index.open_backend`)."""
        from sparse_context.engines.index import EnginesIndex, open_backend
        from sparse_context.export.loading import load_generator_parts

        index = EnginesIndex.read(engines_dir)
        backend = open_backend(index, memory=memory, device=device, sync=sync, cuda_graphs=cuda_graphs)
        parts = load_generator_parts(index.model_dir, device="cpu", with_transformer=False)
        generator = cls(backend=backend, kv_cache=kv_cache, **parts)
        generator.engines_index = index
        return generator

    # -- components ------------------------------------------------------------------------------------------

    @property
    def _numpy_backend(self) -> bool:
        return not isinstance(self.backend, TorchTransformerBackend)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self._numpy_backend else self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        if self._numpy_backend:
            return self.transformer.dtype if self.transformer is not None else torch.float32
        return self.backend.dtype

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return TOKEN_PIXELS // 2
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def token_pixels(self) -> int:
        return self.vae_scale_factor * 2

    @property
    def model_fingerprint(self) -> str:
        """Identifies the transformer weights for the reference cache: config + the content of every parameter,
        recomputed after any weight changed (a LoRA merged, a state dict loaded), so cached K/V never outlive
        the weights that computed them."""
        if self._fingerprint is None:
            return engine_fingerprint(self.backend)
        return self._fingerprint()

    def weights_changed(self) -> None:
        """Say that weights changed in a way torch does not count (writes through ``parameter.data``): the next
        cache lookup rehashes them. Changes through the parameters themselves are seen without this."""
        for fingerprint in (self._fingerprint, self._text_fingerprint):
            if fingerprint is not None:
                fingerprint.invalidate()

    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, np.ndarray]:
        """(1, L, D) prompt embeddings as diffusers' Klein pipelines compute them, and their (L, 4) ids."""
        from diffusers import Flux2KleinPipeline

        if self.text_encoder is None or self.tokenizer is None:
            raise InputError(bad_value("prompt", prompt, "prompt_embeds when the model has no text encoder"))

        def encode() -> torch.Tensor:
            return Flux2KleinPipeline._get_qwen3_prompt_embeds(
                text_encoder=self.text_encoder, tokenizer=self.tokenizer, prompt=[prompt], dtype=self.dtype,
                device=self.device, max_sequence_length=self.max_sequence_length,
                hidden_states_layers=self.text_encoder_out_layers,
            )

        # Counted as diffusers renders it, so a cut prompt is said even when its embeddings come from the cache.
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True, enable_thinking=False)
        warn_if_prompt_cut(len(self.tokenizer(text, truncation=False)["input_ids"]), self.max_sequence_length)
        settings = {"max_sequence_length": self.max_sequence_length, "layers": self.text_encoder_out_layers,
                    "dtype": str(self.dtype), "device": str(self.device)}
        encoder = self._text_fingerprint() if self.prompt_cache is not None else ""
        embeds = cached_prompt(self.prompt_cache, encoder, prompt, settings, encode)
        return embeds, text_position_ids(embeds.shape[1])

    def prepare_references(self, references: Sequence[Any]) -> list[Image.Image]:
        """Load and resize/crop each reference exactly as the Klein pipelines do before VAE encoding."""
        check_reference_count(len(references))
        return [prepare_reference(load_image(ref), max_area=MAX_REFERENCE_AREA, multiple_of=self.token_pixels)
                for ref in references]

    @torch.no_grad()
    def encode_reference(self, image: Image.Image) -> torch.Tensor:
        """(128, rows, cols) normalised, patchified VAE latents of a prepared reference (argmax of the posterior)."""
        # Same memory layout as diffusers' pil_to_numpy/numpy_to_pt: the conv kernels (and so the last bits of
        # the latents) depend on it.
        pixels = np.asarray(image, dtype=np.float32)[None] / 255.0  # (1, H, W, 3)
        pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2))  # (1, 3, H, W)
        pixels = (2.0 * pixels - 1.0).to(self.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()  # (1, 32, H/8, W/8)
        latents = _patchify(latents)  # (1, 128, H/16, W/16)
        mean, std = self._bn_stats(latents)
        return ((latents - mean) / std)[0]

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """(1, rows*cols, 128) packed target latents -> (1, 3, H, W) image in [-1, 1]."""
        latents = unpack_grid(packed[0], rows, cols)[None]  # (1, 128, rows, cols)
        mean, std = self._bn_stats(latents)
        latents = _unpatchify(latents * std + mean)  # (1, 32, 2*rows, 2*cols)
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    # -- generation ------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
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
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        reference_latents: Sequence[torch.Tensor] | None = None,
        kv_state: Any = None,
        output_type: str = "pil",
        key_tile: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GenerationResult:
        """Generate one image.

        ``keep_fraction`` (or ``token_count``) and ``strategy`` choose which reference tokens are kept; pass
        ``selections`` (flat indices per reference) to fix them instead. ``reference_latents`` (each (128, rows,
        cols)) skip the VAE; ``prompt_embeds`` skip the text encoder; ``kv_state`` reuses reference K/V from an
        earlier KV call with the same references, selection and model. ``seed`` draws the noise;
        ``selection_seed`` the selection's random parts (apart, so a new ``seed`` keeps the selection and the
        reference K/V cache hits). ``key_tile``: round the kept tokens up so the attention's keys fill whole tiles
        of that many (``runtime.selection.allocate_budget``; 0: not; None:
        as engines from :meth:`from_engines` were built, else not).
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        # 1. Check inputs
        check_budget(keep_fraction, token_count)
        from sparse_context.engines.runtime import engines_key_tile

        key_tile = engines_key_tile(key_tile, self.engines_index)  # None: as engines were built (--key-tile), else off
        if output_type not in ("pil", "np", "latent"):
            raise InputError(bad_value("output_type", output_type, "'pil', 'np' or 'latent'"))
        if (prompt is None) == (prompt_embeds is None):
            raise InputError(bad_value("prompt / prompt_embeds", "both" if prompt is not None else "neither",
                                       "exactly one of them", "--prompt"))
        if reference_latents is not None and len(references):
            raise InputError(bad_value("references", "images and reference_latents", "one of them"))
        if kv_state is not None and not use_kv:
            raise InputError(bad_value("kv_state", "given with use_kv=False", "use_kv=True", "--kv"))
        check_steps(num_steps)
        check_guidance(guidance_scale)
        check_seed(seed)
        check_selection_seed(selection_seed)
        if prompt is not None:
            check_prompt(prompt)
        if height is not None or width is not None:  # a side not given is the default one
            check_output_size(DEFAULT_SIZE if width is None else width, DEFAULT_SIZE if height is None else height,
                              self.token_pixels)

        # 2. Prompt embeddings (and the empty negative prompt for guidance on non-distilled models)
        if prompt_embeds is None:
            prompt_embeds, text_ids = self.encode_prompt(prompt)
        else:
            prompt_embeds = prompt_embeds.to(self.device, self.dtype)
            text_ids = text_position_ids(prompt_embeds.shape[1])
        negative = negative_ids = None
        if guidance_scale > 1.0 and not self.is_distilled:
            negative, negative_ids = self.encode_prompt("")
        conditioning = Conditioning(prompt_embeds, text_ids, negative, negative_ids, guidance_scale)
        timings["text"] = time.perf_counter() - clock

        # 3. References: prepare as the VAE sees them, choose tokens (the core encodes them when it needs to)
        clock = time.perf_counter()
        prepared = self.prepare_references(references) if len(references) else []
        grids = [(im.height // self.token_pixels, im.width // self.token_pixels) for im in prepared]
        if reference_latents is not None:
            check_reference_count(len(reference_latents))
            grids = [(int(g.shape[-2]), int(g.shape[-1])) for g in reference_latents]
        references_in = None  # digests only if the K/V cache is consulted
        if reference_latents is not None and len(reference_latents):
            given = list(reference_latents)
            references_in = References(tuple(grids), lambda: array_digests([_np(g) for g in given]), lambda: given)
        elif prepared:
            references_in = References(tuple(grids), lambda: array_digests(prepared),
                                       lambda: [self.encode_reference(im) for im in prepared])
        if prepared and height is None and width is None:  # the output takes the first reference's size
            height, width = prepared[0].height, prepared[0].width
        height = height or DEFAULT_SIZE
        width = width or DEFAULT_SIZE
        rows, cols = int(height) // self.token_pixels, int(width) // self.token_pixels
        if rows < 1 or cols < 1:
            raise InputError(bad_value("output size", f"{width}x{height} px",
                                       f"at least {self.token_pixels} px per side", "--width/--height"))
        if selections is None and grids and (token_count is not None or keep_fraction < 1.0):
            # A request the K/V cache has seen finds its selection there. Scored images other than the ones the
            # digests are of (latents given beside the images) are part of the settings.
            other_keys = prompt_embeds.shape[1] + rows * cols  # the text and target keys beside the kept tokens
            settings = selection_settings(strategy, keep_fraction, token_count, allocation, selection_seed, masks,
                                          self.token_pixels, images=prepared if reference_latents is not None
                                          else None, key_tile=key_tile, other_keys=other_keys)
            selections = remembered_selections(
                self.kv_cache if kv_state is None else None, use_kv, references_in, settings,
                lambda: self._select(prepared, grids, keep_fraction, token_count, strategy, allocation, masks,
                                     selection_seed, key_tile, other_keys))
        timings["selection"] = time.perf_counter() - clock

        # 4. Target latents (seeded on the CPU, as diffusers' randn_tensor does with a CPU generator)
        channels = self.transformer.config.in_channels if self.transformer is not None else self.backend.dims.in_channels
        if latents is None:
            generator = torch.Generator("cpu").manual_seed(int(seed))
            latents = torch.randn((1, channels, rows, cols), generator=generator, dtype=prompt_embeds.dtype)
            latents = pack_grid(latents[0])[None]  # (1, rows*cols, C)
        latents = latents.to(self.device, prompt_embeds.dtype)

        # 5. The generation core: reference cache, VAE encoding on a miss, packing, schedule, denoise
        if self._numpy_backend:  # the text encoder and VAE stay in torch; the transformer backend takes numpy
            latents, conditioning, to_backend = _np(latents), _np_conditioning(conditioning), _np
        else:
            ref_dtype = self.vae.dtype if self.vae is not None else self.dtype
            to_backend = lambda tokens: tokens.to(self.device, ref_dtype)  # noqa: E731
        core = generate_latents(
            self.backend, latents, (rows, cols), conditioning, num_steps=num_steps,
            scheduler_config=self.scheduler_config, references=references_in, selections=selections, use_kv=use_kv,
            kv_state=kv_state, kv_cache=self.kv_cache, model_fingerprint=lambda: self.model_fingerprint,
            to_backend=to_backend, synchronize=lambda: _synchronize(self.device), on_step=on_step)
        timings.update(core.timings)
        latents = core.latents
        if self._numpy_backend:
            latents = torch.from_numpy(np.asarray(latents, dtype=np.float32))

        # 7. Decode
        clock = time.perf_counter()
        if output_type == "latent" or self.vae is None:
            image: Any = latents
        else:
            pixels = self.decode(latents, rows, cols)
            image = (pixels / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().cpu().numpy()  # (H, W, 3)
            if output_type == "pil":
                image = Image.fromarray((image * 255).round().astype("uint8"))
        timings["vae_decode"] = time.perf_counter() - clock

        return GenerationResult(image=image, latents=latents, ref_tokens=core.ref_tokens,
                                ref_tokens_available=core.ref_tokens_available, selections=core.selections,
                                timings=timings, kv_state=core.kv_state, cache_hit=core.cache_hit)

    def _select(self, prepared, grids, keep_fraction, token_count, strategy, allocation, masks, seed, key_tile=None,
                other_keys=0):
        from sparse_context.runtime.selection import select_references

        if not prepared:
            raise InputError(bad_value("token selection", "reference_latents without images",
                                       "images to score, or explicit selections"))
        chosen = select_references(prepared, strategy=strategy, keep_fraction=None if token_count else keep_fraction,
                                   token_count=token_count, allocation=allocation, seed=seed, masks=masks,
                                   multiple_of=self.token_pixels, key_tile=key_tile, other_keys=other_keys)
        return [s.indices for s in chosen]


def _patchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return latents.reshape(b, c * 4, h // 2, w // 2)


def _unpatchify(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    latents = latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return latents.reshape(b, c // 4, h * 2, w * 2)


def _np(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().float().cpu().numpy()


def _np_conditioning(conditioning: Conditioning) -> Conditioning:
    return Conditioning(_np(conditioning.text), conditioning.text_ids, _np(conditioning.negative_text),
                        conditioning.negative_text_ids, conditioning.guidance_scale)


class LiveFingerprint:
    """A module's weights fingerprint that follows the live weights.

    Hashing every weight costs seconds at 9B, so the digest is kept while no parameter changed: each parameter's
    storage address and version counter (torch bumps it on every in-place write through the parameter, as
    ``copy_``, ``load_state_dict`` and our LoRA merge do) are compared on each call and the digest recomputed
    when any differs. Writes that bypass the counter (``parameter.data.add_(...)``) are not seen: call
    :meth:`invalidate` after them."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self._state: tuple | None = None
        self._value = ""

    def state(self) -> tuple:
        return tuple((name, p.data_ptr(), p._version, tuple(p.shape), p.dtype)
                     for name, p in self.module.named_parameters())

    def invalidate(self) -> None:
        self._state = None

    def __call__(self) -> str:
        state = self.state()
        if state != self._state:
            self._value = _weights_fingerprint(self.module)
            self._state = state
        return self._value


def _weights_fingerprint(model: torch.nn.Module) -> str:
    with torch.no_grad():
        contents = ((name, _content(parameter)) for name, parameter in model.named_parameters())
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)  # transformers
        return weights_fingerprint(config, contents)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 24  # elements per device reduction (an int64 copy of 16M values: 128 MB)


def _content(parameter: torch.Tensor) -> Any:
    """What identifies a parameter's values: its bytes on the CPU; on a GPU, a checksum computed there (copying
    18 GB to the host to hash it would take longer than generating)."""
    flat = parameter.detach().reshape(-1)
    if flat.device.type == "cpu":
        return flat.contiguous().view(torch.uint8).numpy()
    return device_checksum(flat)


def device_checksum(flat: torch.Tensor) -> bytes:
    """16 bytes that change when any value of ``flat`` changes: the sum of its bit patterns and their sum
    weighted by odd position-dependent factors (int64, wrapping), both reduced where the tensor lives. A single
    changed value always changes the weighted sum (an odd factor times a non-zero difference is non-zero mod
    2^64); swapped values change it too."""
    bits = flat.contiguous().view(_BITS[flat.element_size()])
    plain = weighted = torch.zeros((), dtype=torch.int64, device=flat.device)
    for start in range(0, bits.numel(), _CHUNK):
        chunk = bits[start:start + _CHUNK].to(torch.int64)
        positions = torch.arange(start, start + chunk.numel(), dtype=torch.int64, device=flat.device)
        factors = positions * 2654435761 * 2 + 1  # odd, and different per position
        plain = plain + chunk.sum()
        weighted = weighted + (chunk * factors).sum()
    return np.array([plain.item(), weighted.item(), bits.numel()], dtype=np.int64).tobytes()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
