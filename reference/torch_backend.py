"""The PyTorch reference backend: diffusers' ``Flux2Transformer2DModel`` behind :class:`TransformerBackend`.

Dense and sparse steps call the model as ``Flux2KleinPipeline`` does; KV steps use diffusers' own
``kv_cache_mode="extract"`` / ``"cached"`` with the KV attention processors, as ``Flux2KleinKVPipeline`` does.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import numpy as np
import torch

from sparse_context.runtime.memo import IdentityMemo


def set_kv_processors(transformer: Any) -> None:
    """Install diffusers' KV-aware processors; without KV arguments they compute what the default ones do."""
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2KVAttnProcessor,
        Flux2KVParallelSelfAttnProcessor,
    )

    for block in transformer.transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVAttnProcessor):
            block.attn.set_processor(Flux2KVAttnProcessor())
    for block in transformer.single_transformer_blocks:
        if not isinstance(block.attn.processor, Flux2KVParallelSelfAttnProcessor):
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())


@contextmanager
def kv_processors(transformer: Any) -> Iterator[None]:
    """The KV-aware processors while the block runs, the transformer's own ones again afterwards."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    originals = [(block.attn, block.attn.processor) for block in blocks]
    set_kv_processors(transformer)
    try:
        yield
    finally:
        for attention, processor in originals:
            if attention.processor is not processor:
                attention.set_processor(processor)


class TorchTransformerBackend:
    """Runs a ``Flux2Transformer2DModel``; tensors stay torch tensors on the model's device.

    ``keep_processors=False`` leaves a caller's transformer as it was: the KV processors are installed for each
    call only (a pipeline the caller keeps using must not change under it).

    Position ids go to the device once per generation, not on every call: the loop passes the same arrays at every
    step, and a blocking host-to-device copy in PyTorch waits for the whole stream, so per-call uploads (which
    diffusers' pipelines do not make: they build their ids on the device) would stall the GPU twice per step."""

    name = "torch"

    def __init__(self, transformer: Any, keep_processors: bool = True):
        self.transformer = transformer
        self.keep_processors = keep_processors
        self._ids_on_device = IdentityMemo(4)  # positive and negative prompt, with room to spare
        if keep_processors:
            set_kv_processors(transformer)

    def _processors(self) -> Any:
        return nullcontext() if self.keep_processors else kv_processors(self.transformer)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def _ids(self, role: str, *parts: np.ndarray) -> torch.Tensor:
        """The concatenated ``parts`` on the device, (1, N, 4); uploaded once while the same arrays come back."""
        def upload() -> torch.Tensor:
            joined = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
            return torch.from_numpy(np.ascontiguousarray(joined)).to(self.device).unsqueeze(0)

        return self._ids_on_device.get(role, parts, upload)

    def _timestep(self, timestep: np.float32, batch: int) -> torch.Tensor:
        return torch.full((batch,), float(timestep), dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        hidden, ids = target, (target_ids,)
        if refs is not None and ref_ids is not None and ref_ids.shape[0] > 0:
            hidden = torch.cat([target, refs], dim=1)  # (1, N_t + N_r, C)
            ids = (target_ids, ref_ids)
        with self._processors():
            output = self.transformer(
                hidden_states=hidden.to(self.dtype),
                timestep=self._timestep(timestep, target.shape[0]).to(target.dtype),
                guidance=None,
                encoder_hidden_states=text,
                txt_ids=self._ids("txt", text_ids),
                img_ids=self._ids("img", *ids),
                return_dict=False,
            )[0]
        return output[:, : target.shape[1]]  # (1, N_t, C)

    @torch.no_grad()
    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        hidden = torch.cat([refs, target], dim=1).to(self.dtype)  # (1, N_r + N_t, C)
        with self._processors():
            output, kv_cache = self.transformer(
                hidden_states=hidden,
                timestep=self._timestep(timestep, target.shape[0]).to(target.dtype),
                guidance=None,
                encoder_hidden_states=text,
                txt_ids=self._ids("txt", text_ids),
                img_ids=self._ids("img", ref_ids, target_ids),
                return_dict=False,
                kv_cache_mode="extract",
                num_ref_tokens=refs.shape[1],
            )
        return output, kv_cache

    @torch.no_grad()
    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        with self._processors():
            return self.transformer(
                hidden_states=target.to(self.dtype),
                timestep=self._timestep(timestep, target.shape[0]).to(target.dtype),
                guidance=None,
                encoder_hidden_states=text,
                txt_ids=self._ids("txt", text_ids),
                img_ids=self._ids("img", target_ids),
                return_dict=False,
                kv_cache=kv_state,
                kv_cache_mode="cached",
            )[0]

    def euler_step(self, latents, velocity, delta):
        # FlowMatchEulerDiscreteScheduler.step: upcast to float32, add, cast back to the velocity's dtype.
        stepped = latents.to(torch.float32) + torch.tensor(delta, dtype=torch.float32) * velocity
        return stepped.to(velocity.dtype)
