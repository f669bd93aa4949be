"""The thin runtime: prompt embeddings + reference latents in, target latents out, with numpy and an engine.

No torch anywhere on this path: an embedded application (or a Jetson) brings its own text encoder and VAE, or
precomputed prompt embeddings and reference latents, and runs the transformer through the TensorRT or onnxruntime
engines ``build_engines.py`` wrote. Token selection (OpenCV) and the generation core
(:func:`~sparse_context.runtime.core.generate_latents`: packing, the flow-match schedule identical to diffusers',
the denoising loop, the reference K/V reuse across steps and the persistent reference cache) are the same code
the PyTorch reference generator runs.

Noise: with ``latents`` not given, the initial noise comes from numpy's generator for ``seed`` (diffusers draws
with torch, so the same seed gives a different image than the pipelines; pass ``latents`` to match them).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from sparse_context.engines.index import EnginesIndex, open_backend
from sparse_context.runtime.core import (
    References, engine_fingerprint, generate_latents, remembered_selections, selection_settings,
)
from sparse_context.runtime.errors import InputError, ModelLoadError, bad_value
from sparse_context.runtime.fingerprints import array_digests
from sparse_context.runtime.kv_cache import ReferenceKVCache
from sparse_context.runtime.limits import (
    check_guidance, check_output_size, check_seed, check_selection_seed, check_steps,
)
from sparse_context.runtime.sampler import Conditioning
from sparse_context.runtime.tokens import (
    TOKEN_PIXELS, check_budget, check_key_tile, check_reference_count, text_position_ids, token_grid,
)


@dataclass
class RuntimeResult:
    latents: np.ndarray  # (1, rows*cols, C) float32 packed target latents (decode with the VAE of your choice)
    grid: tuple[int, int]  # (rows, cols) of the target latents
    ref_tokens: int  # reference tokens the transformer saw
    ref_tokens_available: int
    selections: list[np.ndarray]  # kept flat indices per reference
    timings: dict[str, float] = field(default_factory=dict)
    kv_state: Any = None
    cache_hit: bool = False


def initial_noise(seed: int, tokens: int, channels: int) -> np.ndarray:
    """(1, tokens, channels) float32 unit-normal noise from numpy's generator for ``seed`` (not torch's: the
    same seed gives other noise than the PyTorch generator)."""
    return np.random.default_rng(int(seed)).standard_normal((1, tokens, channels)).astype(np.float32)


def starting_latents(latents: Any, seed: int, grid: tuple[int, int], channels: int, size: tuple[int, int]
                     ) -> np.ndarray:
    """``latents`` as float32, checked to be (1, rows*cols, channels) for the ``size`` (width, height) asked for,
    or :func:`initial_noise` for ``seed`` when none are given."""
    rows, cols = grid
    if latents is None:
        return initial_noise(seed, rows * cols, channels)
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != (1, rows * cols, channels):
        raise InputError(bad_value("latents shape", latents.shape, f"(1, {rows * cols}, {channels}) for "
                                   f"{size[0]}x{size[1]} px", "--width/--height"))
    return latents


def read_model_settings(model_dir: str | Path) -> tuple[dict[str, Any], bool]:
    """(scheduler config, is_distilled) of a diffusers folder, read as JSON (no diffusers import)."""
    folder = Path(model_dir)
    try:
        index = json.loads((folder / "model_index.json").read_text())
        scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        if not isinstance(index, dict) or not isinstance(scheduler, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ModelLoadError(bad_value("model folder", str(folder), "a diffusers folder with model_index.json and "
                                       "scheduler/scheduler_config.json", "--model")) from error
    return scheduler, bool(index.get("is_distilled", True))


def engines_key_tile(key_tile: int | None, index: EnginesIndex | None) -> int | None:
    """The key tile a generation tops its kept tokens up to: ``key_tile`` as asked (0: none), or for None the one
    the engines of ``index`` were built with (``build_engines.py --key-tile``; none without an index)."""
    if key_tile is None:
        return (index.plan.key_tile or None) if index is not None else None
    return check_key_tile(key_tile)


class EngineRuntime:
    """Target latents from prompt embeddings and reference latents through any TransformerBackend with numpy
    tensors (:func:`~sparse_context.engines.index.open_backend`: TensorRT or onnxruntime)."""

    def __init__(self, backend: Any, scheduler_config: dict[str, Any] | None = None,
                 kv_cache: ReferenceKVCache | None = None, index: EnginesIndex | None = None):
        self.backend = backend
        self.scheduler_config = dict(scheduler_config or {})
        self.kv_cache = kv_cache
        self.index = index  # what the engines were built with, when they came from an engines folder
        self.model_fingerprint = engine_fingerprint(backend)

    @classmethod
    def from_engines(cls, engines_dir: str | Path, kv_cache: ReferenceKVCache | None = None,
                     memory: Any = None, device: str | None = None, sync: str | None = None,
                     cuda_graphs: bool = False) -> EngineRuntime:
        """``device``: ``cpu``, ``cuda`` or ``cuda:N``, checked against where the engines run. ``sync``,
        ``cuda_graphs``: see :func:`~sparse_context.engines.index.open_backend`."""
        from sparse_context.engines.build import build_command
        from sparse_context.engines.model_files import checked_model_folder

        index = EnginesIndex.read(engines_dir)
        model_folder = checked_model_folder(engines_dir, index.files, build_command(index, engines_dir))
        scheduler, _ = read_model_settings(model_folder)
        return cls(open_backend(index, memory=memory, device=device, sync=sync, cuda_graphs=cuda_graphs), scheduler,
                   kv_cache, index)

    def key_tile_for(self, key_tile: int | None) -> int | None:
        """:func:`engines_key_tile` for these engines."""
        return engines_key_tile(key_tile, self.index)

    def check_built_size(self, width: int, height: int) -> None:
        """Raise ProfileError for an output the engines were not built for (``ProfileSelector.check_target``),
        before any engine runs; backends without a plan take any size."""
        selector = getattr(self.backend, "selector", None)
        if selector is not None:
            rows, cols = token_grid(width, height, TOKEN_PIXELS)
            selector.check_target(rows * cols, (width, height))

    def generate_latents(
        self,
        prompt_embeds: np.ndarray,
        reference_latents: Sequence[np.ndarray] = (),
        *,
        reference_images: Sequence[Any] | None = None,
        keep_fraction: float = 1.0,
        token_count: int | None = None,
        strategy: str = "uniform",
        allocation: str = "per_reference",
        selections: Sequence[np.ndarray] | None = None,
        use_kv: bool = False,
        height: int = 1024,
        width: int = 1024,
        num_steps: int = 4,
        seed: int = 0,
        selection_seed: int = 0,
        latents: np.ndarray | None = None,
        negative_prompt_embeds: np.ndarray | None = None,
        guidance_scale: float = 1.0,
        key_tile: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> RuntimeResult:
        """Denoise ``num_steps`` steps. ``reference_latents``: per reference (C, rows, cols), normalised and
        patchified as the Klein VAE path produces them. Tokens are kept by ``selections`` (flat indices per
        reference), or scored on ``reference_images`` (the images those latents came from) with ``strategy`` (its
        random parts seeded by ``selection_seed``; ``seed`` draws the noise).
        ``key_tile``: round the kept tokens up so the attention's keys fill whole tiles of that many
        (``runtime.selection.allocate_budget``); None: as the engines were built (:meth:`key_tile_for`), 0: not."""
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        check_budget(keep_fraction, token_count)
        check_steps(num_steps)
        check_guidance(guidance_scale)
        check_seed(seed)
        check_selection_seed(selection_seed)
        key_tile = self.key_tile_for(key_tile)
        width, height = check_output_size(width, height)
        dims = self.backend.dims
        embeds = np.asarray(prompt_embeds, dtype=np.float32)
        if embeds.ndim != 3 or embeds.shape[0] != 1 or embeds.shape[2] != dims.text_dim:
            raise InputError(bad_value("prompt_embeds shape", embeds.shape, f"(1, text tokens, {dims.text_dim}): "
                                       "the text width these engines were built for"))
        if isinstance(reference_latents, np.ndarray) and reference_latents.ndim == 3:
            raise InputError(bad_value("reference_latents", f"one array of shape {reference_latents.shape}",
                                       "a list with one (C, rows, cols) array per reference"))
        grids = [np.asarray(g, dtype=np.float32) for g in reference_latents]
        check_reference_count(len(grids))
        if any(g.ndim != 3 or g.shape[0] != dims.in_channels or min(g.shape) < 1 for g in grids):
            raise InputError(bad_value("reference latent shapes", [g.shape for g in grids],
                                       f"({dims.in_channels}, rows, cols) each: the latent channels of the model"))
        if reference_images is not None and len(reference_images) != len(grids):
            raise InputError(bad_value("reference_images", f"{len(reference_images)} images",
                                       f"one per reference latent ({len(grids)}), the images they were encoded from"))
        rows, cols = token_grid(width, height, TOKEN_PIXELS)
        self.check_built_size(width, height)

        # 1. Which reference tokens to keep (a request the K/V cache has seen finds its selection there)
        references = None
        if grids:  # digests only if the K/V cache is consulted
            references = References(tuple((g.shape[1], g.shape[2]) for g in grids), lambda: array_digests(grids),
                                    lambda: grids)
        if selections is None and grids and (token_count is not None or keep_fraction < 1.0):
            other_keys = embeds.shape[1] + rows * cols  # the text and target keys beside the kept tokens
            settings = selection_settings(strategy, keep_fraction, token_count, allocation, selection_seed, None,
                                          TOKEN_PIXELS, images=reference_images, key_tile=key_tile,
                                          other_keys=other_keys)
            selections = remembered_selections(
                self.kv_cache, use_kv, references, settings,
                lambda: self._select(reference_images, grids, keep_fraction, token_count, strategy, allocation,
                                     selection_seed, key_tile, other_keys))
        timings["selection"] = time.perf_counter() - clock

        # 2. Noise and prompt
        latents = starting_latents(latents, seed, (rows, cols), self.backend.dims.in_channels, (width, height))
        negative = None if negative_prompt_embeds is None else np.asarray(negative_prompt_embeds, np.float32)
        conditioning = Conditioning(embeds, text_position_ids(embeds.shape[1]), negative,
                                    None if negative is None else text_position_ids(negative.shape[1]),
                                    float(guidance_scale))

        # 3. The generation core: cache, packing, schedule, denoise
        core = generate_latents(self.backend, latents, (rows, cols), conditioning, num_steps=num_steps,
                                scheduler_config=self.scheduler_config, references=references,
                                selections=selections, use_kv=use_kv, kv_cache=self.kv_cache,
                                model_fingerprint=self.model_fingerprint, on_step=on_step)
        timings.update(core.timings)
        timings.pop("vae_encode", None)  # the latents were given: nothing was encoded
        return RuntimeResult(np.asarray(core.latents, np.float32), (rows, cols), core.ref_tokens,
                             core.ref_tokens_available, core.selections, timings, core.kv_state, core.cache_hit)

    @staticmethod
    def _select(images, grids, keep_fraction, token_count, strategy, allocation, seed, key_tile=None,
                other_keys=0) -> list[np.ndarray]:
        from sparse_context.runtime.selection import Strategy, parse_strategy, select_references

        if images is None:
            if parse_strategy(strategy) is not Strategy.RANDOM and parse_strategy(strategy) is not Strategy.UNIFORM:
                raise InputError(bad_value("token selection", f"strategy {strategy!r} without reference_images",
                                           "reference_images to score, explicit selections, or strategy "
                                           "'uniform'/'random'", "--strategy"))
            images = [np.zeros((g.shape[1] * TOKEN_PIXELS, g.shape[2] * TOKEN_PIXELS, 3), np.uint8) for g in grids]
        chosen = select_references(images, strategy=strategy, keep_fraction=None if token_count else keep_fraction,
                                   token_count=token_count, allocation=allocation, seed=seed, key_tile=key_tile,
                                   other_keys=other_keys)
        for index, (selection, grid) in enumerate(zip(chosen, grids, strict=True)):
            if tuple(selection.grid) != (grid.shape[1], grid.shape[2]):
                raise InputError(bad_value(f"reference image {index}", f"a {selection.grid} token grid",
                                           f"the grid of its latents {grid.shape[1:]} (prepare the image as the "
                                           "VAE did)"))
        return [s.indices for s in chosen]
