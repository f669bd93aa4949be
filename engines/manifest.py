"""Engine manifests (JSON beside each engine), the engine cache layout, and checks before deserializing.

An engine only loads in the TensorRT version and on the GPU compute capability that built it, and it is
executable code (plugins can carry kernels), so :func:`verify_engine` checks version, compute capability and
sha256 before TensorRT ever sees the bytes, and returns the very bytes it hashed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping, Sequence

from sparse_context.engines.errors import EngineCorruptError, EngineMismatchError, rebuild_hint
from sparse_context.engines.profiles import Profile
from sparse_context.runtime.files import atomic_write_bytes  # noqa: F401  (re-exported: engines write with it)

MANIFEST_FORMAT = 1
MANIFEST_SUFFIX = ".json"  # kv.engine -> kv.engine.json
# Outputs of a build, not inputs: they are recorded but do not choose the cache folder.
_NOT_KEYED = ("engine_sha256", "created", "build_args")


@dataclass(frozen=True)
class EngineManifest:
    """What an engine was built from and for. Every field but the outputs keys the cache folder."""

    graph: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    onnx_sha256: str
    precision_recipe_sha256: str
    profiles: tuple[Profile, ...]
    build_flags: tuple[str, ...] = ()  # TensorRT BuilderFlag names, e.g. ("REFIT",)
    build_options: tuple[tuple[str, str], ...] = ()  # e.g. (("optimization_level", "3"),)
    lora_sha256: str | None = None
    build_args: tuple[str, ...] = ()  # build_engines.py options that rebuild it (rebuild hints quote them)
    engine_sha256: str = ""
    created: str = ""  # ISO 8601, UTC

    def to_json(self) -> dict:
        data = asdict(self)
        data["profiles"] = [profile.to_json() for profile in self.profiles]
        data["build_options"] = dict(self.build_options)
        return {"format": MANIFEST_FORMAT, **data}

    @classmethod
    def from_json(cls, data: Mapping) -> EngineManifest:
        values = dict(data)
        if values.pop("format", None) != MANIFEST_FORMAT:
            raise ValueError(f"manifest format {data.get('format')!r}, this package reads {MANIFEST_FORMAT}")
        values["profiles"] = tuple(Profile.from_json(p) for p in values["profiles"])
        values["build_flags"] = tuple(values.get("build_flags", ()))
        values["build_options"] = tuple(sorted((str(k), str(v)) for k, v in values.get("build_options", {}).items()))
        values["build_args"] = tuple(values.get("build_args", ()))
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown manifest fields {sorted(unknown)}")
        return cls(**values)

    def cache_key(self) -> str:
        """sha256 of the canonical JSON of every input field: the same inputs give the same key on any host."""
        keyed = {k: v for k, v in self.to_json().items() if k not in _NOT_KEYED}
        keyed["build_flags"] = sorted(keyed["build_flags"])  # flag order does not change the engine
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def cache_folder_name(self) -> str:
        """``kv-trt10.3.0-sm87-<16 hex>``: readable prefix for people, hash for uniqueness."""
        cc = self.compute_capability.replace(".", "")
        return f"{self.graph}-trt{release(self.tensorrt_version)}-sm{cc}-{self.cache_key()[:16]}"

    def rebuild(self) -> str:
        return rebuild_hint(self.build_args or ("--graph", self.graph))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> str:
    """sha256 of a file read in chunks (ONNX and engines reach tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def recipe_sha256(recipe: Mapping) -> str:
    """Hash of a precision recipe (dtype, quantization config ...) as canonical JSON."""
    return sha256_bytes(json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str).encode())


def release(version: str) -> str:
    """``"10.3.0.26"`` -> ``"10.3.0"``: the fourth component is a build number that does not change engines."""
    return ".".join(str(version).split(".")[:3])


def normalize_cc(compute_capability: str | Sequence[int]) -> str:
    """``(8, 7)``, ``"8.7"`` or ``"sm_87"`` -> ``"8.7"``."""
    if isinstance(compute_capability, str):
        text = compute_capability.strip().lower().removeprefix("sm_").removeprefix("sm")
        return text if "." in text else f"{text[:-1]}.{text[-1:]}"
    major, minor = compute_capability
    return f"{int(major)}.{int(minor)}"


def manifest_path(engine_path: str | os.PathLike) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + MANIFEST_SUFFIX)


def write_manifest(engine_path: str | os.PathLike, manifest: EngineManifest) -> Path:
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(manifest_path(engine_path), text.encode())


def read_manifest(engine_path: str | os.PathLike) -> EngineManifest:
    """The manifest beside ``engine_path``; EngineCorruptError if it is missing or unreadable."""
    path = manifest_path(engine_path)
    try:
        return EngineManifest.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise EngineCorruptError(f"no manifest {path} beside engine {engine_path}; an engine without one is "
                                 f"not loaded (its TensorRT version and checksum are unknown); "
                                 f"{rebuild_hint()}") from None
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise EngineCorruptError(f"manifest {path} is unreadable ({error}); {rebuild_hint()}") from None


def stamp_manifest(manifest: EngineManifest, engine_bytes: bytes) -> EngineManifest:
    """The manifest with the engine's checksum and creation time filled in."""
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return replace(manifest, engine_sha256=sha256_bytes(engine_bytes), created=created)


def engine_cache_path(cache_root: str | os.PathLike, manifest: EngineManifest) -> Path:
    """Where the engine for these inputs lives: ``<root>/<folder from cache key>/<graph>.engine``."""
    return Path(cache_root) / manifest.cache_folder_name() / f"{manifest.graph}.engine"


def find_cached_engine(cache_root: str | os.PathLike, wanted: EngineManifest) -> Path | None:
    """The cached engine built from exactly ``wanted``'s inputs, or None. Load it through verify_engine."""
    path = engine_cache_path(cache_root, wanted)
    if not (path.is_file() and manifest_path(path).is_file()):
        return None
    try:
        stored = read_manifest(path)
    except EngineCorruptError:
        return None  # a broken entry is a cache miss: the build overwrites it
    return path if stored.cache_key() == wanted.cache_key() else None


def _version_ok(built: str, running: str, flags: Sequence[str]) -> bool:
    if release(built) == release(running):
        return True
    if "VERSION_COMPATIBLE" not in flags:
        return False
    # Version-compatible engines run on the same or a later TensorRT of the same major version.
    as_ints = [tuple(int(p) for p in release(v).split(".") if p.isdigit()) for v in (built, running)]
    return as_ints[0][:1] == as_ints[1][:1] and as_ints[1] >= as_ints[0]


def verify_engine(path: str | os.PathLike, manifest: EngineManifest, runtime_trt_version: str,
                  runtime_cc: str | Sequence[int]) -> bytes:
    """Check version, compute capability and checksum, then return the engine bytes (the bytes that were hashed,
    so nothing can swap the file between the check and deserialization)."""
    path = Path(path)
    if not _version_ok(manifest.tensorrt_version, runtime_trt_version, manifest.build_flags):
        raise EngineMismatchError(
            f"engine {path} was built with TensorRT {manifest.tensorrt_version}, but this machine runs TensorRT "
            f"{runtime_trt_version}; engines load only in the TensorRT release that built them; {manifest.rebuild()}")
    built_cc, running_cc = normalize_cc(manifest.compute_capability), normalize_cc(runtime_cc)
    if built_cc != running_cc:
        raise EngineMismatchError(
            f"engine {path} was built for GPU compute capability {built_cc} ({manifest.gpu_name}), but this GPU "
            f"has compute capability {running_cc}; engines are bound to the GPU architecture; {manifest.rebuild()}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise EngineCorruptError(f"engine file {path} not found; {manifest.rebuild()}") from None
    actual = sha256_bytes(data)
    if actual != manifest.engine_sha256:
        raise EngineCorruptError(
            f"engine {path} has sha256 {actual[:16]}..., but its manifest records "
            f"{manifest.engine_sha256[:16] or '(none)'}...; the file was modified or truncated and is not loaded "
            f"(engines are executable code); {manifest.rebuild()}")
    return data
