"""Loading users' weights: a local diffusers folder of FLUX.2-klein (base, distilled or KV), an optional
single-file transformer checkpoint (diffusers or original BFL key names) and an optional LoRA merged in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparse_context.export.model_folder import (  # noqa: F401  (re-exported: the loaders' names for them)
    SETTINGS_FILE, SUPPORTED_PIPELINES, check_safetensors, read_model_index, read_settings,
)
from sparse_context.runtime.errors import ModelLoadError, bad_value

def load_pipeline(model_dir: str | Path, dtype: torch.dtype = torch.float32, with_transformer: bool = True) -> Any:
    """``Flux2KleinPipeline`` or ``Flux2KleinKVPipeline`` from a local folder, never touching a hub.

    ``with_transformer=False`` loads only the text encoder and VAE (an engine runs the transformer)."""
    import diffusers

    index = read_model_index(model_dir)
    pipeline_class = getattr(diffusers, index["_class_name"])
    skip = {} if with_transformer else {"transformer": None}
    try:
        # safetensors only: a folder holding pickled .bin weights is refused instead of unpickled
        return pipeline_class.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True,
                                              use_safetensors=True, **skip)
    except (OSError, ValueError, KeyError) as error:
        raise ModelLoadError(f"could not load {index['_class_name']} from {model_dir}: {error} (check --model)") \
            from error


@torch.no_grad()
def load_transformer_file(transformer: torch.nn.Module, path: str | Path) -> None:
    """Replace ``transformer``'s weights with a single ``.safetensors`` checkpoint (diffusers or BFL names)."""
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
    if not set(checkpoint) <= set(expected):
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
