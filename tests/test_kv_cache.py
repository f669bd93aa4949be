"""The persistent reference K/V cache: keys, LRU eviction under a byte cap, and exact reuse in generation."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.runtime.errors import InputError
from sparse_context.runtime.fingerprints import array_digest, reference_key
from sparse_context.runtime.kv_cache import ReferenceKVCache


def test_key_depends_on_model_references_and_selection():
    a, b = array_digest(np.zeros((4, 4, 3), np.uint8)), array_digest(np.ones((4, 4, 3), np.uint8))
    base = reference_key("model", [a, b], [np.array([1, 2]), np.array([3])])
    assert base == reference_key("model", [a, b], [np.array([1, 2]), np.array([3])])
    assert base != reference_key("other", [a, b], [np.array([1, 2]), np.array([3])])
    assert base != reference_key("model", [b, a], [np.array([1, 2]), np.array([3])])
    assert base != reference_key("model", [a, b], [np.array([1, 3]), np.array([3])])
    assert array_digest(np.zeros((2, 8))) != array_digest(np.zeros((4, 4)))  # shape is part of the digest


def test_lru_eviction_under_byte_cap():
    cache = ReferenceKVCache(max_bytes=100)
    assert cache.put("a", "A", 40) and cache.put("b", "B", 40)
    assert cache.get("a") == "A"  # a becomes most recently used
    assert cache.put("c", "C", 40)  # evicts b, the least recently used
    assert "b" not in cache and cache.get("b") is None
    assert cache.get("a") == "A" and cache.get("c") == "C"
    assert cache.stats.evictions == 1 and cache.stats.bytes == 80 and cache.stats.entries == 2
    assert not cache.put("huge", "H", 101) and "huge" not in cache  # larger than the cap: not kept
    assert cache.put("a", "A2", 10) and cache.stats.bytes == 50  # replacing an entry frees its old size
    cache.clear()
    assert len(cache) == 0 and cache.stats.bytes == 0


def test_bad_cap():
    with pytest.raises(InputError, match="reference K/V cache size"):
        ReferenceKVCache(-1)


def test_generator_second_call_served_from_cache(tiny_model_dir, reference_photos):
    """A second KV call with the same references skips the VAE and extraction and gives the same image."""
    from sparse_context.reference.generator import SparseContextGenerator

    cache = ReferenceKVCache(max_bytes=64 << 20)
    generator = SparseContextGenerator.from_pretrained(tiny_model_dir)
    generator.kv_cache = cache
    first = generator.generate("a boat", reference_photos, keep_fraction=0.2, strategy="edge", use_kv=True,
                               num_steps=2, seed=4, output_type="np")
    assert cache.stats.misses == 1 and len(cache) == 1
    second = generator.generate("a boat", reference_photos, keep_fraction=0.2, strategy="edge", use_kv=True,
                                num_steps=2, seed=4, output_type="np")
    assert cache.stats.hits == 1 and second.cache_hit and second.timings["vae_encode"] < 1e-3
    np.testing.assert_allclose(second.image, first.image, atol=1e-6, rtol=0)
    other = generator.generate("a boat", reference_photos, keep_fraction=0.2, strategy="saliency", use_kv=True,
                               num_steps=2, seed=4, output_type="np")
    assert not other.cache_hit and len(cache) == 2  # another selection is another entry
