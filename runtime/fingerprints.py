"""Every digest the caches key on, in one place: files, arrays, model weights, engine sets, reference sets, prompts.

Two callers that compute a key for the same thing must get the same key, so nothing else in the package hashes.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from sparse_context.runtime.files import atomic_write_bytes

CACHE_ENV = "SPARSE_CONTEXT_CACHE"  # the package's cache folder (tiny model, file digests)
DIGEST_MEMO_FILE = "sha256-memo.json"
DIGEST_MEMO_ENTRIES = 4096
_DIGEST_MEMO: dict[str, dict[str, Any]] = {}
_DIGEST_LOCK = threading.Lock()


def cache_dir() -> Path:
    """The package's cache folder: ``$SPARSE_CONTEXT_CACHE``, else ``~/.cache/sparse_context``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparse_context")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_identity(path: Path) -> tuple[str, dict[str, int]]:
    """(key, identity): keyed on the file itself (device, inode), so a renamed folder (an export published from
    its staging name, a moved engines folder) keeps its digests; a copy is a new file and is hashed again."""
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}", {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def file_sha256_memo(path: str | Path) -> str:
    """``file_sha256``, remembered per file identity (device, inode, size, mtime): a 9B export holds 18 GB,
    which takes about a minute to hash, so it is hashed once and the digest is reused while the file is the same
    file, unmodified. The memo persists in the cache folder (best effort: an unwritable folder only costs a
    re-hash in the next process). A file rewritten in place keeping its size and mtime (``touch -d``) would
    still match; every write through the filesystem changes the mtime."""
    path = Path(path)
    key, identity = _file_identity(path)
    with _DIGEST_LOCK:
        if not _DIGEST_MEMO:
            _DIGEST_MEMO.update(_read_memo())
        entry = _DIGEST_MEMO.get(key)
    if entry is not None and entry.get("identity") == identity:
        return str(entry["sha256"])
    digest = file_sha256(path)
    if _file_identity(path)[1] != identity:  # changed while being hashed: do not remember a torn digest
        return digest
    with _DIGEST_LOCK:
        _DIGEST_MEMO.pop(key, None)
        _DIGEST_MEMO[key] = {"identity": identity, "sha256": digest}
        for stale in list(_DIGEST_MEMO)[:-DIGEST_MEMO_ENTRIES]:  # oldest first: files long gone
            del _DIGEST_MEMO[stale]
        _write_memo(dict(_DIGEST_MEMO))
    return digest


def _read_memo() -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((cache_dir() / DIGEST_MEMO_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}


def _write_memo(memo: Mapping[str, Any]) -> None:
    try:
        atomic_write_bytes(cache_dir() / DIGEST_MEMO_FILE, json.dumps(memo).encode())
    except OSError:
        pass  # best effort, see file_sha256_memo


def array_digest(array: Any) -> str:
    """sha256 of an array's dtype, shape and bytes (numpy, PIL images via np.asarray, or CPU torch tensors)."""
    values = np.ascontiguousarray(np.asarray(array))
    digest = hashlib.sha256(f"{values.dtype.str}{values.shape}".encode())
    digest.update(memoryview(values.reshape(-1)).cast("B"))  # the array's own bytes, not a copy of them
    return digest.hexdigest()


_DIGEST_POOL: list[Any] = []  # one thread pool for array_digests, created on first use


def array_digests(arrays: Sequence[Any]) -> tuple[str, ...]:
    """:func:`array_digest` of each array, several at once: hashlib releases the GIL while it hashes a large
    buffer, so six 1024^2 references hash in about the time of one on a machine with six free cores."""
    arrays = list(arrays)
    cores = os.cpu_count() or 1
    if min(len(arrays), cores) <= 1:
        return tuple(array_digest(array) for array in arrays)
    with _DIGEST_LOCK:
        if not _DIGEST_POOL:
            from concurrent.futures import ThreadPoolExecutor

            _DIGEST_POOL.append(ThreadPoolExecutor(cores, "sparse-context-digest"))
    return tuple(_DIGEST_POOL[0].map(array_digest, arrays))


def weights_fingerprint(config: Mapping[str, Any], parameters: Iterable[tuple[str, Any]]) -> str:
    """A model's identity for the caches: its config and the whole content of every parameter, so any change of
    any weight changes it. ``parameters``: (name, content) pairs, content being the parameter's bytes (anything
    ``hashlib`` takes: bytes, a contiguous numpy array) or a digest of them computed where the weights live."""
    digest = hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode())
    for name, content in parameters:
        digest.update(name.encode())
        digest.update(memoryview(np.ascontiguousarray(content)).cast("B") if isinstance(content, np.ndarray)
                      else content)
    return digest.hexdigest()


def export_files_digest(export_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """{file name: sha256} of every file of an export (graph and external weights), as its manifest records."""
    files = export_manifest.get("files")
    if isinstance(files, Mapping) and files:
        return {name: (info or {}).get("sha256") for name, info in sorted(files.items())}
    return {"model.onnx": export_manifest.get("onnx_sha256")}


def engines_fingerprint(export_manifests: Mapping[str, Mapping[str, Any]]) -> str:
    """The identity of a set of engines: the checksum of every file of each graph's ONNX export, external weights
    included (an export over 2 GiB keeps all its weights outside ``model.onnx``). The files are checked against
    these checksums before they load (:func:`sparse_context.export.manifest.verify_export`)."""
    blob = json.dumps({graph: export_files_digest(manifest) for graph, manifest in export_manifests.items()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def text_digest(blob: Any) -> str:
    """sha256 of a JSON-able value, keys sorted."""
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def selection_key(reference_digests: Sequence[str], settings: Mapping[str, Any]) -> str:
    """Key of one token selection: the references it scored (digests, in order; their shapes give the token
    grids) and every other setting it depends on (strategy, keep fraction or count, allocation, seed, ...)."""
    blob = json.dumps({"references": list(reference_digests), "settings": dict(settings)}, sort_keys=True,
                      default=str)
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
