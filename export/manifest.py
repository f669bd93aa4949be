"""Reading an export's ``manifest.json``: no numpy, no torch, so engine backends read it without the exporter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_context.export.errors import ExportCorruptError, ExportError
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.fingerprints import file_sha256_memo

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"
# The exporter's format: bump when the graphs (semantics, inputs, outputs) or the folder layout change. Caches of
# other formats are exported again; backends refuse a transformer export of another format (:func:`check_format`).
# 6: the kv graph's reference K/V are one input and one output per layer (``cached_keys_0`` ...), not stacked;
#    the references' fixed-timestep modulation is held split, each scale as 1 + scale.
FORMAT_VERSION = 6


def onnx_path(path: str | Path) -> Path:
    """The ``model.onnx`` of an export given as the file or its folder."""
    path = Path(path)
    return path / ONNX_FILE if path.is_dir() else path


def read_export_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export: ``path`` is its ``model.onnx`` or its folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(bad_value("ONNX export", str(path), f"a {ONNX_FILE} with its {MANIFEST} (written by "
                                    "sparse_context.export)")) from error
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ExportCorruptError(bad_value(f"{folder / MANIFEST}", type(manifest).__name__,
                                           "the JSON object sparse_context.export writes"))
    return manifest


def export_format(manifest: dict[str, Any]) -> str | None:
    return (manifest.get("versions") or {}).get("format")


def check_format(manifest: dict[str, Any], path: str | Path) -> None:
    """Refuses an export written by another version of the exporter, whose inputs and outputs may differ from what
    this runtime binds."""
    found = export_format(manifest)
    if found != str(FORMAT_VERSION):
        raise ExportError(bad_value(f"export format of {path}", found, f"{FORMAT_VERSION}, this exporter's (export it "
                                    "again: rerun build_engines.py or sparse-context export)"))


def verify_export(path: str | Path, expected_onnx_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of an export after checking that every file it lists (graph and external weights) exists
    with the recorded size and sha256, so a truncated, zeroed or swapped file is refused before onnxruntime or
    TensorRT reads it. Digests are remembered per file identity, so an unchanged 18 GB export is hashed once.
    ``expected_onnx_sha256``: the checksum the caller recorded (``engines.json``) must be this export's too."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    manifest = read_export_manifest(folder)
    files = manifest.get("files") or {}
    if ONNX_FILE not in files:
        raise ExportCorruptError(bad_value(f"{folder / MANIFEST}", sorted(files), f"a files entry for {ONNX_FILE} "
                                           "with its bytes and sha256"))
    problems = []
    for name, info in sorted(files.items()):
        file = folder / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not isinstance(info, dict):
            problems.append(f"{name}: not a file of this folder")
        elif not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != info.get("bytes"):
            problems.append(f"{name}: {file.stat().st_size} bytes, the manifest records {info.get('bytes')}")
        elif file_sha256_memo(file) != info.get("sha256"):
            problems.append(f"{name}: sha256 {file_sha256_memo(file)[:16]}..., the manifest records "
                            f"{str(info.get('sha256'))[:16]}...")
    if expected_onnx_sha256 is not None and manifest.get("onnx_sha256") != expected_onnx_sha256:
        problems.append(f"{ONNX_FILE}: sha256 {str(manifest.get('onnx_sha256'))[:16]}... is not the "
                        f"{expected_onnx_sha256[:16]}... recorded when the engines were built")
    if problems:
        raise ExportCorruptError(f"ONNX export {folder} does not match its {MANIFEST} (damaged, truncated or "
                                 "replaced files are not loaded; export it again, e.g. rerun build_engines.py):\n  "
                                 + "\n  ".join(problems))
    return manifest
