"""The model folder's small files an engines folder carries, so an application ships that folder alone: the
tokenizer (vocabulary, its config, the chat template), the scheduler config and the pipeline's settings.

They are copied under ``<engines>/model/`` in the diffusers layout (so the readers of a model folder read them
unchanged) and recorded with their sha256 in ``engines.json``; :func:`checked_model_folder` verifies every one
before it is used, so a tokenizer edited after the build cannot silently change the prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from sparse_context.engines.errors import EngineCorruptError, EnginesIndexError
from sparse_context.engines.manifest import atomic_write_bytes, sha256_file
from sparse_context.export.model_folder import REQUIRED_FILES, check_required_files

MODEL_FOLDER = "model"
# Paths inside a diffusers folder; REQUIRED_FILES must be there, the others are copied where they exist.
OPTIONAL_FILES = ("tokenizer/tokenizer_config.json", "tokenizer/chat_template.jinja", "sparse_context.json")


BUILD_FILES = ("transformer/config.json", "vae/config.json", "text_encoder/config.json")  # what the exports read


def check_build_folder(model_dir: str | Path) -> None:
    """Refuse, before anything is exported, a model folder without a file the build reads: the transformer's, the
    VAE's and the text encoder's configs (the exports) and :data:`REQUIRED_FILES` (copied beside the engines)."""
    check_required_files(model_dir, REQUIRED_FILES + BUILD_FILES)


def copy_model_files(model_dir: str | Path, engines_dir: str | Path) -> dict[str, str]:
    """Copy the files into ``<engines_dir>/model/`` (each written whole, then renamed); return
    ``{path relative to engines_dir: sha256}``."""
    source, target = Path(model_dir), Path(engines_dir) / MODEL_FOLDER
    check_required_files(source)
    recorded = {}
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if (source / name).is_file():
            path = atomic_write_bytes(target / name, (source / name).read_bytes())
            recorded[f"{MODEL_FOLDER}/{name}"] = sha256_file(path)
    return recorded


def checked_model_folder(engines_dir: str | Path, files: Mapping[str, str], rebuild: str) -> Path:
    """``<engines_dir>/model`` after checking every recorded file is there with its recorded sha256.
    ``rebuild``: the command that rebuilds the folder, quoted in every error."""
    folder = Path(engines_dir)
    if not files:
        raise EnginesIndexError(f"{folder}: engines.json records no model files (tokenizer, scheduler); "
                                f"rebuild it with: {rebuild}")
    for name, expected in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise EngineCorruptError(f"{path} is missing (engines.json records it); rebuild it with: {rebuild}")
        if sha256_file(path) != expected:
            raise EngineCorruptError(f"{path} changed after the build (sha256 differs from engines.json); "
                                     f"rebuild it with: {rebuild}")
    return folder / MODEL_FOLDER
