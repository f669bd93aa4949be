"""Reading an export's ``manifest.json``: no numpy, no torch, so engine backends read it without the exporter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_context.export.errors import ExportError
from sparse_context.runtime.errors import bad_value

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"


def onnx_path(path: str | Path) -> Path:
    """The ``model.onnx`` of an export given as the file or its folder."""
    path = Path(path)
    return path / ONNX_FILE if path.is_dir() else path


def read_export_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export: ``path`` is its ``model.onnx`` or its folder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ExportError(bad_value("ONNX export", str(path), f"a {ONNX_FILE} with its {MANIFEST} (written by "
                                    "sparse_context.export)")) from error
