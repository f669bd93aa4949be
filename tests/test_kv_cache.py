"""The persistent reference K/V cache: keys, LRU eviction under a byte cap, and exact reuse in generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("strategy", ["uniform", "random", "edge"])
def test_a_new_noise_seed_keeps_the_selection_and_hits_the_cache(tiny_model_dir, reference_photos, strategy):
    """"Another sample of the same request" (a new seed) is what a persistent reference cache is for: the noise
    seed does not reach the selection (its random parts have their own ``selection_seed``), so the kept tokens and
    the cached K/V stay; a new selection seed is a new selection, and a miss."""
    from sparse_context.reference.generator import SparseContextGenerator

    generator = SparseContextGenerator.from_pretrained(tiny_model_dir)
    generator.kv_cache = ReferenceKVCache(max_bytes=64 << 20)
    kwargs = dict(keep_fraction=0.2, strategy=strategy, use_kv=True, num_steps=1, output_type="latent")
    first = generator.generate("a boat", reference_photos, seed=4, **kwargs)
    again = generator.generate("a boat", reference_photos, seed=5, **kwargs)
    assert not first.cache_hit and again.cache_hit
    assert [s.tolist() for s in again.selections] == [s.tolist() for s in first.selections]
    assert not torch.equal(again.image, first.image)  # another noise, another image
    reseeded = generator.generate("a boat", reference_photos, seed=4, selection_seed=1, **kwargs)
    assert not reseeded.cache_hit
    if strategy != "edge":  # edge ranks by image content: its seed only orders ties and the floor lattice
        assert [s.tolist() for s in reseeded.selections] != [s.tolist() for s in first.selections]


def test_array_digests_equal_one_by_one_and_the_bytes_they_hash():
    """array_digests (threads) gives array_digest of each; array_digest hashes dtype, shape and the bytes, also of
    non-contiguous views, booleans, empty and 0-d arrays and PIL images, without copying contiguous ones."""
    import hashlib

    from PIL import Image

    from sparse_context.runtime.fingerprints import array_digests

    base = np.arange(2 * 6 * 5, dtype=np.float32).reshape(2, 6, 5)
    arrays = [base, base[:, ::2], base > 7, np.zeros((0, 3), np.uint8), np.float16(2.5),
              np.asarray(Image.new("RGB", (5, 4), (9, 8, 7)))]
    for array in arrays:
        values = np.ascontiguousarray(np.asarray(array))
        expected = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
        expected.update(values.tobytes())
        assert array_digest(array) == expected.hexdigest()
    assert array_digest(Image.new("RGB", (5, 4), (9, 8, 7))) == array_digest(arrays[-1])
    assert array_digests(arrays) == tuple(array_digest(a) for a in arrays)
    assert array_digests(arrays[:1]) == (array_digest(arrays[0]),) and array_digests([]) == ()


def test_selection_memo_keeps_read_only_copies_and_evicts_the_oldest(monkeypatch):
    from sparse_context.runtime.fingerprints import selection_key

    monkeypatch.setattr(ReferenceKVCache, "SELECTION_BYTES", 24)  # room for three int64 indices
    cache = ReferenceKVCache(max_bytes=1)
    given = [np.array([3, 1], np.int32)]
    kept = cache.remember_selections("a", given)
    given[0][0] = 99  # the caller's array changes: the memo does not
    assert kept[0].dtype == np.int64 and kept[0].tolist() == [3, 1] and not kept[0].flags.writeable
    assert cache.recall_selections("a")[0].tolist() == [3, 1] and cache.recall_selections("b") is None
    cache.remember_selections("b", [np.array([2])])
    cache.remember_selections("c", [np.array([4])])  # "a" is the least recently used: evicted
    assert cache.recall_selections("a") is None and cache.recall_selections("c")[0].tolist() == [4]
    stats = cache.selection_stats
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (2, 2, 1, 2)
    assert len(cache) == 0 and cache.stats.bytes == 0  # outside the K/V entries and their byte cap
    cache.clear()
    assert cache.recall_selections("c") is None and cache.selection_stats.entries == 0
    settings = {"strategy": "edge", "keep_fraction": 0.1, "seed": 0}
    assert selection_key(["x", "y"], settings) == selection_key(["x", "y"], dict(settings))
    assert selection_key(["x", "y"], settings) != selection_key(["y", "x"], settings)
    assert selection_key(["x", "y"], settings) != selection_key(["x", "y"], {**settings, "seed": 1})


def test_generator_cache_hit_skips_selection_and_digests_only_with_a_cache(tiny_model_dir, reference_photos,
                                                                           monkeypatch):
    """With a K/V cache, a repeated request takes its kept tokens from the cache instead of scoring the references
    again (same tokens, same image); other settings select anew. Without a cache nothing is hashed."""
    from sparse_context.reference import generator as generator_module
    from sparse_context.reference.generator import SparseContextGenerator

    hashed = []
    real = generator_module.array_digests
    monkeypatch.setattr(generator_module, "array_digests", lambda arrays: hashed.append(len(arrays)) or real(arrays))
    generator = SparseContextGenerator.from_pretrained(tiny_model_dir)
    kwargs = dict(keep_fraction=0.2, strategy="saliency", use_kv=True, num_steps=2, seed=4, output_type="np")
    plain = generator.generate("a boat", reference_photos, **kwargs)
    assert hashed == []  # no cache: no digests
    generator.kv_cache = cache = ReferenceKVCache(max_bytes=64 << 20)
    first = generator.generate("a boat", reference_photos, **kwargs)
    assert hashed == [len(reference_photos)] and cache.selection_stats.misses == 1
    selects = []
    real_select = SparseContextGenerator._select
    monkeypatch.setattr(SparseContextGenerator, "_select", lambda self, *a: selects.append(1) or real_select(self, *a))
    second = generator.generate("a boat", reference_photos, **kwargs)
    assert selects == [] and second.cache_hit and cache.selection_stats.hits == 1
    assert [s.tolist() for s in second.selections] == [s.tolist() for s in first.selections] == \
        [s.tolist() for s in plain.selections]
    np.testing.assert_array_equal(second.image, first.image)
    np.testing.assert_array_equal(first.image, plain.image)
    generator.generate("a boat", reference_photos, **{**kwargs, "seed": 5})
    assert selects == []  # the noise seed is not a selection setting
    for changed in (dict(selection_seed=5), dict(keep_fraction=0.3), dict(strategy="edge"),
                    dict(allocation="global")):
        generator.generate("a boat", reference_photos, **{**kwargs, **changed})
    assert len(selects) == 4  # each change is another selection
    generator.generate("a boat", reference_photos, **{**kwargs, "use_kv": False})
    assert len(selects) == 5  # without KV the cache is not consulted: selection runs


def test_remembered_selections_only_where_the_cache_is_consulted():
    """The selection memo is used only with KV and a cache; masked selections are not remembered (hashing the
    masks costs more than scoring them); what comes back is the caller's own copy."""
    from sparse_context.runtime.core import References, remembered_selections, selection_settings

    calls = []

    def select():
        calls.append(1)
        return [np.array([1, 2]), np.array([0])]

    digested = []
    references = References(((2, 2), (1, 2)), lambda: digested.append(1) or ("a", "b"), lambda: [])
    cache = ReferenceKVCache(0)
    settings = selection_settings("edge", 0.1, None, "per_reference", 0, None, 16)
    first = remembered_selections(cache, True, references, settings, select)
    again = remembered_selections(cache, True, references, settings, select)
    assert len(calls) == 1 and [s.tolist() for s in again] == [[1, 2], [0]] and digested == [1]
    again[0][0] = 7  # the caller's copy: the memo keeps [1, 2]
    assert remembered_selections(cache, True, references, settings, select)[0].tolist() == [1, 2]
    assert first[0].flags.writeable and len(calls) == 1
    remembered_selections(cache, False, references, settings, select)  # no KV: the cache is not consulted
    remembered_selections(None, True, references, settings, select)  # no cache
    assert len(calls) == 3
    masked = selection_settings("mask", 0.1, None, "per_reference", 0, [np.ones((32, 32), np.float32)] * 2, 16)
    assert masked is None
    remembered_selections(cache, True, references, masked, select)
    remembered_selections(cache, True, references, masked, select)
    assert len(calls) == 5
    other = selection_settings("edge", 0.1, None, "per_reference", 1, None, 16)  # another seed
    remembered_selections(cache, True, references, other, select)
    assert len(calls) == 6 and cache.selection_stats.entries == 2
