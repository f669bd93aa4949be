"""Engine manifests: JSON round trip, cache keys, atomic writes, verify_engine's refusals and their messages."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from sparse_context.engines.buckets import BucketPlan
from sparse_context.engines.errors import EngineCorruptError, EngineMismatchError
from sparse_context.engines.manifest import (
    EngineManifest, atomic_write_bytes, engine_cache_path, find_cached_engine, manifest_path, normalize_cc,
    read_manifest, recipe_sha256, release, sha256_file, verify_engine,
)
from sparse_context.engines.profiles import engine_profiles
from sparse_context.engines.trt.loader import save_engine

PLAN = BucketPlan(keep_fractions=(0.10, 1.0), max_refs=2)
PROFILES = engine_profiles(PLAN, "kv", {"refs": (1, "ref_tokens", 128), "cached_keys": (2, 1, "cached_tokens", 64)})
ENGINE = b"\x00serialized engine bytes\x01" * 64


def make_manifest(**changes) -> EngineManifest:
    base = EngineManifest(
        graph="kv", tensorrt_version="10.3.0.26", gpu_name="Orin", compute_capability="8.7",
        onnx_sha256="a" * 64, precision_recipe_sha256=recipe_sha256({"dtype": "fp16"}), profiles=PROFILES,
        build_flags=("REFIT",), build_options=(("optimization_level", "3"),), lora_sha256=None,
        build_args=("--graph", "kv", *PLAN.build_args()),
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "kv.engine"
    return path, save_engine(ENGINE, path, make_manifest())


def test_save_writes_engine_then_stamped_manifest(saved):
    path, manifest = saved
    assert path.read_bytes() == ENGINE
    assert manifest_path(path).name == "kv.engine.json"
    assert manifest.engine_sha256 == sha256_file(path) and manifest.created.endswith("+00:00")
    assert read_manifest(path) == manifest
    data = json.loads(manifest_path(path).read_text())
    assert data["build_flags"] == ["REFIT"] and data["build_options"] == {"optimization_level": "3"}
    assert data["profiles"][0]["bucket"] == "keep0.10" and data["format"] == 1
    assert sorted(os.listdir(path.parent)) == ["kv.engine", "kv.engine.json"]  # no temp files left


def test_verify_returns_the_checked_bytes(saved):
    path, manifest = saved
    assert verify_engine(path, manifest, "10.3.0.30", (8, 7)) == ENGINE  # build number may differ


def test_verify_rejects_flipped_byte(saved):
    path, manifest = saved
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(EngineCorruptError) as error:
        verify_engine(path, manifest, "10.3.0", "8.7")
    message = str(error.value)
    assert f"but its manifest records {manifest.engine_sha256[:16]}" in message
    assert "modified or truncated and is not loaded" in message
    assert "rebuild it on this machine with: python build_engines.py --graph kv --keeps 0.1 1 --max-refs 2" in message


def test_verify_rejects_other_compute_capability(saved):
    path, manifest = saved
    with pytest.raises(EngineMismatchError) as error:
        verify_engine(path, manifest, "10.3.0", "9.0")
    assert ("built for GPU compute capability 8.7 (Orin), but this GPU has compute capability 9.0" in
            str(error.value))
    assert "python build_engines.py --graph kv" in str(error.value)


def test_verify_rejects_other_tensorrt(saved):
    path, manifest = saved
    with pytest.raises(EngineMismatchError) as error:
        verify_engine(path, manifest, "11.4.1", "8.7")
    assert "built with TensorRT 10.3.0.26, but this machine runs TensorRT 11.4.1" in str(error.value)
    assert "rebuild it on this machine with: python build_engines.py" in str(error.value)
    with pytest.raises(EngineMismatchError):
        verify_engine(path, manifest, "10.4.0", "8.7")


def test_version_compatible_engines_run_on_later_same_major(tmp_path):
    path = tmp_path / "full.engine"
    manifest = save_engine(ENGINE, path, make_manifest(build_flags=("VERSION_COMPATIBLE",)))
    assert verify_engine(path, manifest, "10.7.0", "8.7") == ENGINE
    for running in ("10.2.0", "11.0.0"):
        with pytest.raises(EngineMismatchError):
            verify_engine(path, manifest, running, "8.7")


def test_checks_run_before_reading_the_file(tmp_path):
    # A mismatch is reported even when the file is gone: nothing is read from an engine that cannot load.
    with pytest.raises(EngineMismatchError):
        verify_engine(tmp_path / "missing.engine", make_manifest(), "11.0.0", "8.7")
    with pytest.raises(EngineCorruptError, match="missing.engine not found; rebuild it"):
        verify_engine(tmp_path / "missing.engine", make_manifest(), "10.3.0", "8.7")


def test_unstamped_manifest_is_refused(tmp_path):
    path = tmp_path / "kv.engine"
    path.write_bytes(ENGINE)
    with pytest.raises(EngineCorruptError, match=r"manifest records \(none\)"):
        verify_engine(path, make_manifest(), "10.3.0", "8.7")


def test_read_manifest_errors(tmp_path):
    path = tmp_path / "kv.engine"
    with pytest.raises(EngineCorruptError, match="no manifest .*kv.engine.json beside engine"):
        read_manifest(path)
    manifest_path(path).write_text("{not json")
    with pytest.raises(EngineCorruptError, match="kv.engine.json is unreadable"):
        read_manifest(path)
    data = make_manifest().to_json()
    manifest_path(path).write_text(json.dumps({**data, "format": 99}))
    with pytest.raises(EngineCorruptError, match="manifest format 99, this package reads 1"):
        read_manifest(path)
    manifest_path(path).write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(EngineCorruptError, match=r"unknown manifest fields \['surprise'\]"):
        read_manifest(path)
    del data["onnx_sha256"]
    manifest_path(path).write_text(json.dumps(data))
    with pytest.raises(EngineCorruptError, match="is unreadable"):
        read_manifest(path)


def test_cache_key_is_stable_and_ignores_outputs():
    manifest = make_manifest()
    assert manifest.cache_key() == make_manifest().cache_key()
    assert len(manifest.cache_key()) == 64
    stamped = dataclasses.replace(manifest, engine_sha256="f" * 64, created="2026-01-01T00:00:00+00:00",
                                  build_args=("--other",))
    assert stamped.cache_key() == manifest.cache_key()
    assert make_manifest(build_flags=("REFIT", "STRIP_PLAN")).cache_key() == \
        make_manifest(build_flags=("STRIP_PLAN", "REFIT")).cache_key()
    assert EngineManifest.from_json(json.loads(json.dumps(manifest.to_json()))).cache_key() == manifest.cache_key()
    assert manifest.cache_folder_name() == f"kv-trt10.3.0-sm87-{manifest.cache_key()[:16]}"


@pytest.mark.parametrize("field, value", [
    ("graph", "full"), ("tensorrt_version", "10.4.0"), ("gpu_name", "H100"), ("compute_capability", "9.0"),
    ("onnx_sha256", "b" * 64), ("precision_recipe_sha256", recipe_sha256({"dtype": "bf16"})),
    ("profiles", PROFILES[:2]), ("build_flags", ()), ("build_options", (("optimization_level", "5"),)),
    ("lora_sha256", "c" * 64),
])
def test_cache_key_changes_with_each_input(field, value):
    assert make_manifest(**{field: value}).cache_key() != make_manifest().cache_key()


def test_engine_cache_lookup(tmp_path):
    wanted = make_manifest()
    assert find_cached_engine(tmp_path, wanted) is None
    path = engine_cache_path(tmp_path, wanted)
    assert path.parent.name == wanted.cache_folder_name() and path.name == "kv.engine"
    save_engine(ENGINE, path, wanted)
    assert find_cached_engine(tmp_path, wanted) == path
    assert find_cached_engine(tmp_path, make_manifest(onnx_sha256="d" * 64)) is None
    manifest_path(path).write_text("broken")  # a broken entry is a miss, not a crash
    assert find_cached_engine(tmp_path, wanted) is None


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"old")

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(path.parent) == ["file.bin"]  # the temp file was removed


def test_manifest_written_after_engine(tmp_path, monkeypatch):
    # If the engine write fails, no manifest may claim an engine exists.
    import sparse_context.engines.trt.loader as trt_build

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(trt_build, "atomic_write_bytes", fail)
    with pytest.raises(OSError):
        save_engine(ENGINE, tmp_path / "kv.engine", make_manifest())
    assert not manifest_path(tmp_path / "kv.engine").exists()


def test_small_helpers():
    assert release("10.3.0.26") == "10.3.0" and release("11.0") == "11.0"
    assert normalize_cc((8, 7)) == normalize_cc("sm_87") == normalize_cc("8.7") == "8.7"
    assert normalize_cc("120") == "12.0"
    assert recipe_sha256({"a": 1, "b": 2}) == recipe_sha256({"b": 2, "a": 1})
