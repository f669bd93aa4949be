"""The generation core every path runs: kept tokens -> reference cache -> packing -> schedule -> denoise.

The PyTorch generator and the engine runtime are shells around :func:`generate_latents`: they encode the prompt
and the references (torch, or precomputed arrays), draw the noise, and decode. Everything between — which tokens
were kept, the reference K/V cache key and lookup, packing, the flow-match schedule, the loop, releasing the
backend's per-image inputs, storing new K/V — happens here once, so the paths cannot drift. Arrays the core
computes are numpy; tensors it passes through (latents, prompt, packed references) are the backend's own type,
numpy for the engine backends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from sparse_context.runtime.errors import GenerationError, InputError, bad_value
from sparse_context.runtime.fingerprints import (
    array_digests, engines_fingerprint, prompt_key, reference_key, selection_key,
)
from sparse_context.runtime.kv_cache import ReferenceKVCache
from sparse_context.runtime.packing import pack_references
from sparse_context.runtime.prompt_cache import PromptEmbeddingCache
from sparse_context.runtime.sampler import Conditioning, TransformerBackend, denoise
from sparse_context.runtime.schedule import flow_match_schedule
from sparse_context.runtime.tokens import grid_position_ids


@dataclass(frozen=True)
class References:
    """The references of one request as the core needs them.

    ``digests`` identify each reference for the K/V cache (of the prepared image or of its latents: whatever the
    shell has before encoding), or compute them when first needed (:meth:`digest`): a generation that never looks
    at the cache never hashes its references (~12 ms for six 1024^2 images on one core). ``encode`` returns each
    reference's (C, rows, cols) latents in the backend's type; it runs only when the K/V cache misses, so a cache
    hit skips the VAE.
    """

    grids: tuple[tuple[int, int], ...]  # (rows, cols) per reference
    digests: tuple[str, ...] | Callable[[], Sequence[str]]
    encode: Callable[[], Sequence[Any]]

    @property
    def available(self) -> int:
        return sum(rows * cols for rows, cols in self.grids)

    def digest(self) -> tuple[str, ...]:
        """Each reference's digest, computed once, on first use."""
        if callable(self.digests):
            object.__setattr__(self, "digests", tuple(self.digests()))
        return tuple(self.digests)


def selection_settings(strategy: Any, keep_fraction: float, token_count: int | None, allocation: str, seed: Any,
                       masks: Sequence[Any] | None, multiple_of: int, images: Sequence[Any] | None = None,
                       key_tile: int | None = None, other_keys: int = 0) -> Callable[[], dict[str, Any]] | None:
    """Everything a token selection depends on besides the references' content, for :func:`remembered_selections`
    (computed only when it is used: separately scored ``images`` are hashed then). None with ``masks``: hashing
    the masks costs more than the mask strategy's scoring (20 against 16 ms for six 1024^2 references on 2 cores),
    so such a selection is not remembered."""
    if masks is not None:
        return None

    def settings() -> dict[str, Any]:
        return {"strategy": str(getattr(strategy, "value", strategy)), "token_count": token_count,
                "keep_fraction": None if token_count else keep_fraction, "allocation": str(allocation),
                "seed": seed, "multiple_of": multiple_of,
                "images": None if images is None else list(array_digests(images)),
                **({"key_tile": key_tile, "other_keys": other_keys} if key_tile else {})}
    return settings


def remembered_selections(kv_cache: ReferenceKVCache | None, use_kv: bool, references: References | None,
                          settings: Callable[[], Mapping[str, Any]] | None,
                          select: Callable[[], Sequence[np.ndarray]]) -> list[np.ndarray]:
    """The kept indices per reference: ``select()``, or, when this generation will look its reference K/V up in
    ``kv_cache``, the selection that cache remembers for the same references and ``settings()`` (everything
    ``select`` depends on besides the references' content, :func:`selection_settings`). Selection is deterministic,
    so a remembered one is the one ``select()`` would return: a persistent-cache hit then skips the scoring as well
    as the VAE and the references' K/V."""
    if not use_kv or kv_cache is None or references is None or not references.grids or settings is None:
        return [np.asarray(s) for s in select()]
    key = selection_key(references.digest(), settings())
    remembered = kv_cache.recall_selections(key)
    if remembered is None:
        remembered = kv_cache.remember_selections(key, select())
    return [np.array(s) for s in remembered]  # copies: the caller may change them


@dataclass
class CoreResult:
    latents: Any  # (1, rows*cols, C) final packed target latents, the backend's type
    ref_tokens: int  # reference tokens the transformer saw
    ref_tokens_available: int
    selections: list[np.ndarray]  # kept flat indices per reference (int64)
    kv_state: Any = None
    cache_hit: bool = False
    timings: dict[str, float] = field(default_factory=dict)


def kept_tokens(grids: Sequence[tuple[int, int]], selections: Sequence[np.ndarray] | None) -> list[np.ndarray]:
    """The flat indices kept per reference: the selections given, or every token of each grid."""
    if selections is None:
        return [np.arange(rows * cols, dtype=np.int64) for rows, cols in grids]
    if len(selections) != len(grids):
        raise InputError(bad_value("selections", f"{len(selections)} index arrays",
                                   f"one per reference ({len(grids)})"))
    kept = []
    for index, selection in enumerate(selections):
        values = np.asarray(selection)
        if values.size and values.dtype.kind not in "iu":  # 1.5 would silently become token 1
            raise InputError(bad_value(f"selection of reference {index}", f"{values.dtype} indices",
                                       "integer token indices (flat, row-major)"))
        kept.append(values.astype(np.int64))
    return kept


def engine_fingerprint(backend: Any) -> str:
    """The reference-cache identity of an engine backend: the checksums of the files it loaded (checked against
    them when it loaded), else those its exports' manifests record."""
    fingerprint = getattr(backend, "fingerprint", None)
    return fingerprint if isinstance(fingerprint, str) else engines_fingerprint(getattr(backend, "manifests", {}))


def kv_nbytes(kv_state: Any) -> int:
    """Bytes a K/V state holds: engine states know it; diffusers' KV cache is summed over its layers."""
    if hasattr(kv_state, "nbytes"):
        return int(kv_state.nbytes)
    layers = list(kv_state.double_block_caches) + list(kv_state.single_block_caches)
    return sum(t.numel() * t.element_size() for layer in layers for t in (layer.k_ref, layer.v_ref) if t is not None)


def cached_prompt(cache: PromptEmbeddingCache | None, encoder_fingerprint: str, prompt: str,
                  settings: Mapping[str, Any], encode: Callable[[], Any]) -> Any:
    """``encode()``'s embeddings for ``prompt``, through ``cache`` when one is given."""
    if cache is None:
        return encode()
    return cache.get_or_encode(prompt_key(encoder_fingerprint, prompt, settings), encode)


def check_finite_latents(latents: Any) -> None:
    """GenerationError unless every value of the final ``latents`` (numpy or torch) is finite. NaN or Inf there
    would decode to a black or garbage image written with exit code 0; ~0.2 ms for a 1024^2 target."""
    if type(latents).__module__.startswith("torch"):
        import torch

        bad = int((~torch.isfinite(latents)).sum().item())
        total = int(latents.numel())
    else:
        values = np.asarray(latents)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        total = int(values.size)
    if bad:
        raise GenerationError(
            f"the generation produced non-finite latents ({bad} of {total} values NaN or Inf), so no image was "
            "written and nothing was cached; usual causes: NaN or Inf in the weights (check --model, --transformer, "
            "--lora and --lora-scale), in the inputs given (latents, prompt_embeds, reference_latents), or a float16 "
            "overflow (try --dtype bf16 or fp32)")


def generate_latents(
    backend: TransformerBackend,
    latents: Any,
    grid: tuple[int, int],
    conditioning: Conditioning,
    *,
    num_steps: int,
    scheduler_config: Mapping[str, Any] | None = None,
    references: References | None = None,
    selections: Sequence[np.ndarray] | None = None,
    use_kv: bool = False,
    kv_state: Any = None,
    kv_cache: ReferenceKVCache | None = None,
    model_fingerprint: str | Callable[[], str] = "",
    to_backend: Callable[[Any], Any] | None = None,
    synchronize: Callable[[], None] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> CoreResult:
    """Denoise ``latents`` (1, rows*cols, C) on the target ``grid`` (rows, cols) for ``num_steps`` steps.

    ``selections``: kept flat indices per reference (None keeps every token). ``kv_state``: reference K/V from an
    earlier KV call with the same references, selection and model. ``model_fingerprint`` (or a callable computing
    it, called only on a cache lookup) keys ``kv_cache``. ``to_backend`` moves packed reference tokens where the
    backend wants them (device, dtype); ``synchronize`` waits for queued device work before the clock stops.
    """
    timings: dict[str, float] = {}
    grids = references.grids if references is not None else ()
    kept = kept_tokens(grids, selections)
    if kv_state is not None and not use_kv:
        raise InputError(bad_value("kv_state", "given with use_kv=False", "use_kv=True", "--kv"))

    # 1. Reference K/V from the persistent cache (exact: they depend only on references, selection and model)
    cache_key, cache_hit = None, False
    if use_kv and kv_cache is not None and kv_state is None and references is not None and grids:
        fingerprint = model_fingerprint() if callable(model_fingerprint) else model_fingerprint
        cache_key = reference_key(fingerprint, references.digest(), kept)
        kv_state = kv_cache.get(cache_key)
        cache_hit = kv_state is not None

    # 2. Encode and pack the kept reference tokens at their original positions (skipped when K/V are at hand)
    clock = time.perf_counter()
    refs = ref_ids = None
    ref_tokens = 0
    timings["vae_encode"] = 0.0
    if kv_state is None and references is not None and grids:
        grid_latents = list(references.encode())  # each (C, rows, cols)
        timings["vae_encode"] = time.perf_counter() - clock
        clock = time.perf_counter()
        packed = pack_references(grid_latents, selections)
        refs = packed.tokens[None]  # (1, N_kept, C)
        refs = to_backend(refs) if to_backend is not None else refs
        ref_ids, ref_tokens = packed.position_ids, packed.num_tokens
    elif kv_state is not None:
        ref_tokens = int(kv_state.num_ref_tokens)
    timings["packing"] = time.perf_counter() - clock

    # 3. Schedule and denoise
    rows, cols = grid
    schedule = flow_match_schedule(num_steps, rows * cols, scheduler_config)
    clock = time.perf_counter()
    try:
        latents, kv_state = denoise(backend, latents, grid_position_ids(rows, cols), conditioning, schedule, refs,
                                    ref_ids, use_kv=use_kv, kv_state=kv_state, on_step=on_step)
        if synchronize is not None:
            synchronize()
    finally:
        if hasattr(backend, "release_static"):  # device copies of this image's prompt, references, RoPE
            backend.release_static()
    timings["transformer"] = time.perf_counter() - clock
    check_finite_latents(latents)  # before anything is cached or decoded: a NaN image is not an image

    # 4. Keep new reference K/V for the next call with the same references
    if cache_key is not None and not cache_hit and kv_state is not None:
        kv_cache.put(cache_key, kv_state, kv_nbytes(kv_state))
    return CoreResult(latents, ref_tokens, references.available if references is not None else 0, kept, kv_state,
                      cache_hit, timings)
