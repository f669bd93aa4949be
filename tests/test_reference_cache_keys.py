"""The reference K/V cache never serves K/V of other weights, and engine folders are checked and relocatable.

Three routes used to hit the cache with stale K/V: a LoRA merged into the generator's transformer after the first
call, a changed ONNX export (the key came from the manifest, and over 2 GiB only from ``model.onnx``), and a
change beyond the first 1024 values of a weight (only those were hashed).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from sparse_context.runtime.fingerprints import engines_fingerprint, file_sha256_memo

KV = dict(keep_fraction=0.25, strategy="uniform", use_kv=True, num_steps=2, seed=1, output_type="latent",
          height=64, width=64)


@pytest.fixture
def cached_generator(tiny_model_dir):
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    generator = SparseContextGenerator.from_pretrained(tiny_model_dir)
    generator.kv_cache = ReferenceKVCache(64 << 20)
    return generator


def _fresh(generator, photos):
    """The same generator's weights without any cache: what a correct cached call must equal."""
    cache, generator.kv_cache = generator.kv_cache, None
    try:
        return generator.generate("a harbour", photos, **KV).image
    finally:
        generator.kv_cache = cache


def test_lora_merged_after_the_first_call_misses(cached_generator, reference_photos, tmp_path):
    from safetensors.torch import save_file

    from sparse_context.export.lora import merge_lora

    first = cached_generator.generate("a harbour", reference_photos[:2], **KV)
    assert not first.cache_hit
    assert cached_generator.generate("a harbour", reference_photos[:2], **KV).cache_hit
    module = cached_generator.transformer.transformer_blocks[0].attn.to_k
    generator = torch.Generator().manual_seed(0)
    lora = {"transformer.transformer_blocks.0.attn.to_k.lora_A.weight":
            torch.randn(2, module.in_features, generator=generator),
            "transformer.transformer_blocks.0.attn.to_k.lora_B.weight":
            torch.randn(module.out_features, 2, generator=generator)}
    save_file(lora, str(tmp_path / "lora.safetensors"))
    merge_lora(cached_generator.transformer, tmp_path / "lora.safetensors", 0.5)
    after = cached_generator.generate("a harbour", reference_photos[:2], **KV)
    assert not after.cache_hit
    np.testing.assert_array_equal(after.image.numpy(), _fresh(cached_generator, reference_photos[:2]).numpy())
    assert np.abs(after.image.numpy() - first.image.numpy()).max() > 1e-4  # the LoRA changed the image


def test_change_beyond_the_first_values_of_a_weight_misses(cached_generator, reference_photos):
    cached_generator.generate("a harbour", reference_photos[:1], **KV)
    before = cached_generator.model_fingerprint
    weight = cached_generator.transformer.single_transformer_blocks[0].attn.to_qkv_mlp_proj.weight
    assert weight.numel() > 1024
    with torch.no_grad():
        weight.view(-1)[-1] += 0.5  # the last value only
    assert cached_generator.model_fingerprint != before
    after = cached_generator.generate("a harbour", reference_photos[:1], **KV)
    assert not after.cache_hit


def test_fingerprint_is_reused_while_weights_are_unchanged(cached_generator, monkeypatch):
    from sparse_context.reference import generator as module

    calls = []
    real = module._weights_fingerprint
    monkeypatch.setattr(module, "_weights_fingerprint", lambda model: calls.append(1) or real(model))
    first = cached_generator.model_fingerprint
    assert cached_generator.model_fingerprint == first and len(calls) == 1
    cached_generator.weights_changed()  # e.g. after writing through parameter.data
    assert cached_generator.model_fingerprint == first and len(calls) == 2


def test_device_checksum_sees_any_single_change_and_swaps():
    from sparse_context.reference.generator import device_checksum

    values = torch.randn(5000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    base = device_checksum(values)
    changed = values.clone()
    changed[4321] = changed[4321] + 1
    swapped = values.clone()
    swapped[[10, 4000]] = values[[4000, 10]]
    assert len({base, device_checksum(changed), device_checksum(swapped)}) == 3
    assert device_checksum(values.clone()) == base


def test_engine_fingerprint_covers_external_weights():
    """An export over 2 GiB keeps every weight in its external-data file: the key must follow that file."""
    manifest = {"onnx_sha256": "a" * 64, "files": {"model.onnx": {"sha256": "a" * 64},
                                                   "model.onnx.data": {"sha256": "b" * 64}}}
    other_lora = json.loads(json.dumps(manifest))
    other_lora["files"]["model.onnx.data"]["sha256"] = "c" * 64
    assert engines_fingerprint({"kv": manifest}) != engines_fingerprint({"kv": other_lora})


def test_file_digest_is_remembered_per_file_identity(tmp_path, monkeypatch):
    from sparse_context.runtime import fingerprints

    monkeypatch.setenv("SPARSE_CONTEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprints, "_DIGEST_MEMO", {})
    calls = []
    real = fingerprints.file_sha256
    monkeypatch.setattr(fingerprints, "file_sha256", lambda path: calls.append(path) or real(path))
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\1" * 1000)
    first = file_sha256_memo(path)
    assert file_sha256_memo(path) == first and len(calls) == 1
    fingerprints._DIGEST_MEMO.clear()  # a new process reads the persisted memo
    assert file_sha256_memo(path) == first and len(calls) == 1
    path.write_bytes(b"\2" * 1000)  # same size, new mtime
    os.utime(path, ns=(0, 10**9))
    assert file_sha256_memo(path) != first and len(calls) == 2


def _copy(engines_dir, tmp_path):
    copy = tmp_path / "moved" / "engines"
    shutil.copytree(engines_dir, copy)
    return copy


def test_moved_engines_folder_loads_with_the_same_key(engines_dir, tmp_path, reference_photos):
    from sparse_context.engines.runtime import EngineRuntime

    copy = _copy(engines_dir, tmp_path)
    original, moved = EngineRuntime.from_engines(engines_dir), EngineRuntime.from_engines(copy)
    assert moved.model_fingerprint == original.model_fingerprint
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 64, moved.backend.dims.text_dim)).astype(np.float32)
    grids = [rng.standard_normal((moved.backend.dims.in_channels, 4, 4)).astype(np.float32)]
    kwargs = dict(height=64, width=64, num_steps=2, strategy="uniform", keep_fraction=1.0)
    np.testing.assert_array_equal(moved.generate_latents(embeds, grids, **kwargs).latents,
                                  original.generate_latents(embeds, grids, **kwargs).latents)


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "foreign-manifest-sha"])
def test_damaged_export_is_refused_before_loading(engines_dir, tmp_path, damage):
    from sparse_context.engines.runtime import EngineRuntime
    from sparse_context.export.errors import ExportCorruptError

    copy = _copy(engines_dir, tmp_path)
    index = json.loads((copy / "engines.json").read_text())
    onnx = copy / index["graphs"]["kv"]["onnx"]
    if damage == "zeroed":
        onnx.write_bytes(bytes(onnx.stat().st_size))
    elif damage == "truncated":
        onnx.write_bytes(onnx.read_bytes()[:1000])
    else:  # engines.json names another export's checksum
        index["graphs"]["kv"]["onnx_sha256"] = "0" * 64
        (copy / "engines.json").write_text(json.dumps(index))
    with pytest.raises(ExportCorruptError, match="does not match its manifest.json"):
        EngineRuntime.from_engines(copy)


def test_from_pipeline_leaves_the_callers_processors(tiny_pipelines, reference_photos):
    from sparse_context.reference.generator import SparseContextGenerator

    pipe = tiny_pipelines[0]
    processors = [block.attn.processor for block in pipe.transformer.transformer_blocks]
    generator = SparseContextGenerator.from_pipeline(pipe, text_encoder_out_layers=(1, 2, 3), max_sequence_length=64)
    generator.generate("a harbour", reference_photos[:1], **KV)
    assert [block.attn.processor for block in pipe.transformer.transformer_blocks] == processors
