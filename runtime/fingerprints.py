"""Every digest the caches key on, in one place: files, arrays, model weights, engine sets, reference sets, prompts.

Two callers that compute a key for the same thing must get the same key, so nothing else in the package hashes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

FINGERPRINT_SAMPLE = 1024  # values per parameter hashed for a weights fingerprint


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def array_digest(array: Any) -> str:
    """sha256 of an array's dtype, shape and bytes (numpy, PIL images via np.asarray, or CPU torch tensors)."""
    values = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    digest.update(values.tobytes())
    return digest.hexdigest()


def weights_fingerprint(config: Mapping[str, Any], parameters: Iterable[tuple[str, np.ndarray]]) -> str:
    """A model's identity for the caches: its config and the first values of every parameter (hashing all of a
    9B model's weights would cost seconds per load). ``parameters``: (name, flat float32 array) pairs."""
    digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, values in parameters:
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(values[:FINGERPRINT_SAMPLE], dtype=np.float32).tobytes())
    return digest.hexdigest()


def engines_fingerprint(export_manifests: Mapping[str, Mapping[str, Any]]) -> str:
    """The identity of a set of engines: the checksum of each graph's ONNX export (weights, LoRA and graph)."""
    blob = json.dumps({graph: manifest.get("onnx_sha256") for graph, manifest in export_manifests.items()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def reference_key(model_fingerprint: str, reference_digests: Sequence[str], selections: Sequence[np.ndarray]) -> str:
    """Cache key of one set of references: the model, each prepared reference, and the kept token indices."""
    digest = hashlib.sha256(model_fingerprint.encode())
    for index, (reference, kept) in enumerate(zip(reference_digests, selections, strict=True)):
        digest.update(f"|{index}:{reference}:".encode())
        digest.update(np.ascontiguousarray(np.asarray(kept, dtype=np.int64)).tobytes())
    return digest.hexdigest()


def prompt_key(encoder_fingerprint: str, prompt: str, settings: Mapping[str, Any]) -> str:
    """Cache key of one prompt's embeddings: the text encoder, the prompt and the encoding settings
    (sequence length, hidden layers taken, dtype)."""
    blob = json.dumps({"encoder": encoder_fingerprint, "prompt": prompt, "settings": dict(settings)},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
