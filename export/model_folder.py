"""A diffusers model folder's JSON (``model_index.json``, our optional ``sparse_context.json``), read and checked
without torch, so a wrong ``--model`` is refused before anything heavy is imported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparse_context.runtime.errors import ModelLoadError, bad_value

SUPPORTED_PIPELINES = ("Flux2KleinPipeline", "Flux2KleinKVPipeline")
SETTINGS_FILE = "sparse_context.json"  # optional: text_encoder_out_layers, max_sequence_length
# Files a model folder must hold besides the weights: the pipeline, the scheduler and the tokenizer (diffusers loads
# a folder without them and fails at the first prompt). An engines folder carries copies of them.
REQUIRED_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer.json")


def check_required_files(model_dir: str | Path, needed: tuple[str, ...] = REQUIRED_FILES) -> None:
    """ModelLoadError naming every file of ``needed`` the folder lacks (paths inside it)."""
    missing = [name for name in needed if not (Path(model_dir) / name).is_file()]
    if missing:
        raise ModelLoadError(bad_value("model folder", str(model_dir), "a diffusers folder with " + ", ".join(needed)
                                       + f" (missing: {', '.join(missing)})", "--model"))


def read_model_index(model_dir: str | Path) -> dict[str, Any]:
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelLoadError(bad_value("model folder", str(folder), "an existing local diffusers folder", "--model"))
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(bad_value("model folder", str(folder),
                                       "a diffusers folder with model_index.json (save_pretrained layout)", "--model"))
    try:
        data = json.loads(index.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(bad_value(f"{index}", f"not valid JSON ({error})", "the model_index.json diffusers "
                                       "writes", "--model")) from error
    if not isinstance(data, dict):
        raise ModelLoadError(bad_value(f"{index}", f"a JSON {type(data).__name__}", "a JSON object naming the "
                                       "pipeline class (_class_name)", "--model"))
    if data.get("_class_name") not in SUPPORTED_PIPELINES:
        raise ModelLoadError(bad_value("pipeline class in model_index.json", data.get("_class_name"),
                                       " or ".join(SUPPORTED_PIPELINES), "--model"))
    return data


def read_settings(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(bad_value(f"{path}", f"not valid JSON ({error})", "a JSON object", "--model")) from error
    if not isinstance(data, dict):
        raise ModelLoadError(bad_value(f"{path}", f"a JSON {type(data).__name__}", "a JSON object", "--model"))
    return data


SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors format caps its JSON header at 100 MB


def check_safetensors(path: Path, what: str, flag: str) -> None:
    """Weights are read only from safetensors files (plain tensors, no code): a pickle or anything else is refused
    here, by content, before any loader sees it (torch.load of a pickle can run code)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as error:
        raise ModelLoadError(bad_value(what, str(path), f"a readable .safetensors file ({error.strerror})", flag)) \
            from error
    length = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if path.suffix != ".safetensors" or not 2 <= length <= SAFETENSORS_HEADER_LIMIT or head[8:9] != b"{":
        raise ModelLoadError(bad_value(what, str(path), "a .safetensors file (other formats, such as pickled .bin "
                                       "or .pt files, are not loaded: convert them with safetensors first)", flag))
