"""Loading users' weights: a local diffusers folder of FLUX.2-klein (base, distilled or KV), an optional
single-file transformer checkpoint (diffusers or original BFL key names) and an optional LoRA merged in."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from sparse_context.export.model_folder import (  # noqa: F401  (re-exported: the loaders' names for them)
    SETTINGS_FILE, SUPPORTED_PIPELINES, check_required_files, check_safetensors, read_model_index, read_settings,
)
from sparse_context.runtime.errors import ModelLoadError, bad_value

def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32, with_transformer: bool = True) -> Any:
    """``Flux2KleinPipeline`` or ``Flux2KleinKVPipeline`` from a local folder, never touching a hub.

    ``with_transformer=False`` loads only the text encoder and VAE (an engine runs the transformer)."""
    import diffusers

    index = read_model_index(model_dir)
    check_required_files(model_dir)  # diffusers would load without them and fail at the first prompt
    pipeline_class = getattr(diffusers, index["_class_name"])
    skip = {} if with_transformer else {"transformer": None}
    try:
        # safetensors only: a folder holding pickled .bin weights is refused instead of unpickled
        pipe = pipeline_class.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True,
                                              use_safetensors=True, **skip)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load {index['_class_name']} from {model_dir}: {error} (check --model)") \
            from error
    check_loaded_weights(pipe, model_dir)
    return pipe


BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")  # Flux2Transformer2DModel's blocks


def check_loaded_weights(pipe: Any, model_dir: str | Path) -> None:
    """:func:`check_module_weights` for each component the pipeline loaded."""
    for name in ("transformer", "vae", "text_encoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            check_module_weights(module, name, model_dir)


def check_module_weights(module: Any, name: str, model_dir: str | Path) -> None:
    """ModelLoadError unless every weight of ``module`` (the folder's ``name`` component) came from its files, and,
    for the transformer, its files hold no weight the model lacks. diffusers and transformers load missing keys as
    meta tensors (which fail later: "Cannot copy out of meta tensor") and extra keys (a config of fewer blocks
    than the weights) with a warning, which would generate with the rest silently dropped."""
    folder = Path(model_dir) / name
    empty = sorted(key for key, value in module.state_dict().items() if value.is_meta)
    if empty:
        raise ModelLoadError(
            f"{name} weights in {folder}: {len(empty)} missing e.g. {empty[:3]} (a partial copy, renamed keys, or a "
            f"config.json that does not match the weights; check --model)")
    if name == "transformer":
        unused = sorted(safetensors_keys(folder) - set(module.state_dict()))
        blocks = [key for key in unused if key.startswith(BLOCK_PREFIXES)]
        if blocks:  # whole blocks the config does not build: the model would run without them
            raise ModelLoadError(
                f"{name} weights in {folder}: {len(blocks)} of blocks the model does not have e.g. {blocks[:3]} "
                f"(its config.json describes a smaller model; check --model)")
        if unused:  # anything else is not used by diffusers either: say so, do not refuse a folder it loads
            warnings.warn(f"{name} weights in {folder}: {len(unused)} the model does not use, e.g. {unused[:3]}",
                          stacklevel=2)


def safetensors_keys(folder: Path) -> set[str]:
    """Every tensor name in the ``.safetensors`` files of ``folder`` (headers only)."""
    from safetensors import safe_open

    keys: set[str] = set()
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@torch.no_grad()
def load_transformer_file(transformer: torch.nn.Module, path: str | Path) -> None:
    """Replace ``transformer``'s weights with a single ``.safetensors`` checkpoint: diffusers names, or the original
    BFL names (also under a ``model.diffusion_model.`` prefix, as ComfyUI saves them)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(bad_value("transformer checkpoint", str(path), "an existing .safetensors file",
                                       "--transformer"))
    check_safetensors(path, "transformer checkpoint", "--transformer")
    try:
        checkpoint = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ModelLoadError(f"{path} is not a readable safetensors file: {error} (check --transformer)") from error
    expected = transformer.state_dict()
    for prefix in CHECKPOINT_PREFIXES:  # ComfyUI-style files wrap the BFL names in a prefix
        if checkpoint and all(key.startswith(prefix) for key in checkpoint):
            checkpoint = {key[len(prefix):]: value for key, value in checkpoint.items()}
            break
    # Mostly diffusers names already: compare as they are (the BFL converter would mangle them and report keys
    # the file has as missing); otherwise convert from BFL names.
    diffusers_names = len(set(checkpoint) & set(expected)) * 2 >= len(checkpoint)
    if not diffusers_names:
        try:
            checkpoint = convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
        except Exception as error:  # the converter fails with KeyError/IndexError on foreign layouts
            raise ModelLoadError(f"{path}: keys are neither diffusers nor BFL FLUX.2 names ({error}); "
                                 "check --transformer") from error
    missing = sorted(set(expected) - set(checkpoint))
    unexpected = sorted(set(checkpoint) - set(expected))
    wrong = sorted(k for k in set(expected) & set(checkpoint) if tuple(checkpoint[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ModelLoadError(
            f"{path} does not fit the transformer of the model folder (a different FLUX.2 size?): "
            f"{len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}, "
            f"{len(wrong)} with other shapes e.g. {wrong[:3]} (check --transformer / --model)")
    transformer.load_state_dict({k: v.to(expected[k].dtype) for k, v in checkpoint.items()})


def load_generator_parts(model_dir: str | Path, lora: str | Path | None = None, lora_scale: float = 1.0,
                         transformer_file: str | Path | None = None, dtype: torch.dtype = torch.float32,
                         device: str = "cpu", with_transformer: bool = True) -> dict[str, Any]:
    """Keyword arguments for ``SparseContextGenerator`` from a local folder (+ transformer file, + LoRA)."""
    from sparse_context.export.lora import merge_lora

    pipe = load_pipeline(model_dir, dtype, with_transformer=with_transformer)
    if transformer_file is not None:
        load_transformer_file(pipe.transformer, transformer_file)
    if lora is not None:
        merge_lora(pipe.transformer, lora, lora_scale)
    pipe.to(device)
    settings = read_settings(model_dir)
    parts = dict(
        transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        scheduler_config=dict(pipe.scheduler.config), is_distilled=bool(pipe.config.get("is_distilled", True)),
        prefers_kv=type(pipe).__name__ == "Flux2KleinKVPipeline",
    )
    if "text_encoder_out_layers" in settings:
        parts["text_encoder_out_layers"] = tuple(settings["text_encoder_out_layers"])
    if "max_sequence_length" in settings:
        parts["max_sequence_length"] = int(settings["max_sequence_length"])
    return parts
