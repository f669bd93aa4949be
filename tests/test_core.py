"""The generation core's pieces that need no model: the numpy Euler step against diffusers' scheduler, kept-token
lists, K/V byte counts and the prompt-embedding cache."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.runtime.core import References, cached_prompt, kept_tokens, kv_nbytes
from sparse_context.runtime.errors import InputError
from sparse_context.runtime.prompt_cache import PromptEmbeddingCache, embedding_nbytes
from sparse_context.runtime.schedule import euler_step, flow_match_schedule


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_euler_step_is_bit_equal_to_diffusers(dtype):
    """diffusers rounds the product dt * velocity to the velocity's dtype before the float32 sum: so must we."""
    torch = pytest.importorskip("torch", reason="the comparison runs diffusers' scheduler (pip install .[torch])")
    diffusers = pytest.importorskip("diffusers", reason="the comparison runs diffusers' scheduler")

    config = {"use_dynamic_shifting": True, "shift": 3.0, "time_shift_type": "exponential"}
    schedule = flow_match_schedule(4, 256, config)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(sigmas=list(schedule.sigmas[:-1]), mu=1.0)
    scheduler.sigmas = torch.from_numpy(schedule.sigmas)
    rng = np.random.default_rng(0)
    latents = (rng.standard_normal((1, 256, 128)) * 2).astype(dtype)
    for step in range(schedule.num_steps):
        velocity = (rng.standard_normal((1, 256, 128)) * 2).astype(dtype)
        expected = scheduler.step(torch.from_numpy(velocity), scheduler.timesteps[step], torch.from_numpy(latents),
                                  return_dict=False)[0].numpy()
        ours = euler_step(latents, velocity, schedule.step_delta(step))
        assert ours.dtype == expected.dtype == dtype
        np.testing.assert_array_equal(ours, expected)
        latents = ours


def test_euler_step_float32_latents_fp16_velocity():
    """The result takes the velocity's dtype, whatever the latents are (the engine backends feed fp32 noise)."""
    latents = np.full((1, 2, 3), 0.1, np.float32)
    velocity = np.full((1, 2, 3), 1.0, np.float16)
    stepped = euler_step(latents, velocity, np.float32(-0.25))
    assert stepped.dtype == np.float16
    np.testing.assert_array_equal(stepped, np.float16(np.float32(0.1) - np.float32(0.25)))


def test_kept_tokens():
    grids = [(2, 3), (1, 2)]
    full = kept_tokens(grids, None)
    assert [k.tolist() for k in full] == [[0, 1, 2, 3, 4, 5], [0, 1]]
    chosen = kept_tokens(grids, [np.array([4, 1], np.int32), [0]])
    assert chosen[0].dtype == np.int64 and chosen[0].tolist() == [4, 1]
    with pytest.raises(InputError, match=r"selections: got '1 index arrays'; allowed: one per reference \(2\)"):
        kept_tokens(grids, [np.array([0])])
    assert References(tuple(grids), ("a", "b"), lambda: []).available == 8


def test_kv_nbytes_of_engine_and_diffusers_states():
    class EngineState:
        nbytes = 1234

    assert kv_nbytes(EngineState()) == 1234
    torch = pytest.importorskip("torch", reason="diffusers' K/V cache holds torch tensors")

    class Layer:
        def __init__(self, k, v):
            self.k_ref, self.v_ref = k, v

    class DiffusersCache:
        double_block_caches = [Layer(torch.zeros(2, 3), torch.zeros(2, 3))]
        single_block_caches = [Layer(torch.zeros(4, dtype=torch.float16), None)]

    assert kv_nbytes(DiffusersCache()) == 2 * 6 * 4 + 4 * 2


def test_prompt_cache_lru_and_byte_cap():
    cache = PromptEmbeddingCache(max_bytes=2 * 4 * 8)  # two (1, 2, 4) float32 embeddings
    calls = []

    def encoder(value):
        def encode():
            calls.append(value)
            return np.full((1, 2, 4), value, np.float32)
        return encode

    settings = {"max_sequence_length": 2}
    first = cached_prompt(cache, "enc", "a cat", settings, encoder(1.0))
    again = cached_prompt(cache, "enc", "a cat", settings, encoder(9.0))
    assert again is first and calls == [1.0] and cache.stats.hits == 1
    cached_prompt(cache, "other-encoder", "a cat", settings, encoder(2.0))  # the encoder is part of the key
    cached_prompt(cache, "enc", "a cat", {"max_sequence_length": 3}, encoder(3.0))  # so are the settings
    assert calls == [1.0, 2.0, 3.0] and len(cache) == 2 and cache.stats.evictions == 1
    cached_prompt(cache, "enc", "a cat", settings, encoder(4.0))  # evicted first (least recently used)
    assert calls[-1] == 4.0
    assert cached_prompt(None, "enc", "a cat", settings, encoder(5.0))[0, 0, 0] == 5.0  # no cache: always encodes
    with pytest.raises(InputError, match="prompt-embedding cache size: got -1"):
        PromptEmbeddingCache(-1)


def test_prompt_cache_keeps_nothing_over_the_cap():
    cache = PromptEmbeddingCache(max_bytes=8)
    big = cache.get_or_encode("k", lambda: np.zeros((1, 4, 4), np.float32))
    assert big.shape == (1, 4, 4) and len(cache) == 0
    assert embedding_nbytes(big) == 64
