"""Merge a LoRA ``.safetensors`` into a ``Flux2Transformer2DModel``'s weights (W += scale * alpha/r * B @ A).

Key formats are normalised by diffusers' ``Flux2LoraLoaderMixin.lora_state_dict`` (diffusers, peft, kohya,
ai-toolkit/BFL names); the merge itself is ours, so the exported graph carries plain weights and no adapter code.
Keys or shapes that match nothing in the model are refused with the list of offenders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparse_context.runtime.errors import LoraError, ModelLoadError, bad_value
from sparse_context.runtime.fingerprints import file_sha256

_PREFIX = "transformer."


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The LoRA's tensors in diffusers key format and its adapter metadata (``{}`` if it has none)."""
    from diffusers import Flux2KleinPipeline

    from sparse_context.export.model_folder import check_safetensors

    path = Path(path)
    if not path.is_file():
        raise LoraError(bad_value("LoRA file", str(path), "an existing .safetensors file", "--lora"))
    try:
        check_safetensors(path, "LoRA file", "--lora")
    except ModelLoadError as error:
        raise LoraError(str(error)) from None
    try:
        state_dict, metadata = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except Exception as error:  # diffusers raises several types for unreadable or foreign files
        raise LoraError(f"LoRA file {path} could not be read as a FLUX.2 LoRA: {error} (check --lora)") from error
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    # diffusers stores the peft adapter config with a "transformer." prefix on each field.
    metadata = {key[len(_PREFIX):] if key.startswith(_PREFIX) else key: value for key, value in (metadata or {}).items()}
    if metadata.get("use_dora"):
        raise LoraError(bad_value("LoRA type", "DoRA (use_dora=True)", "plain LoRA (DoRA cannot be merged as B @ A)",
                                  "--lora"))
    return dict(state_dict), metadata


def _group_by_module(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{module name: {"A": ..., "B": ..., "alpha": ...}} and the keys that are not LoRA weights at all."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, tensor in state_dict.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".alpha", "alpha")):
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = tensor
                break
        else:
            foreign.append(key)
    return modules, foreign


def _scaling(module: str, parts: dict[str, torch.Tensor], metadata: dict[str, Any], rank: int) -> float:
    """peft's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); alpha defaults to r (scale 1) as in diffusers."""
    alpha = float(metadata.get("lora_alpha") or rank)
    for pattern, value in (metadata.get("alpha_pattern") or {}).items():
        if module == pattern or module.endswith("." + pattern):
            alpha = float(value)
    if "alpha" in parts:  # kohya-style files carry alpha per module
        alpha = float(parts["alpha"])
    return alpha / (rank ** 0.5 if metadata.get("use_rslora") else rank)


@torch.no_grad()
def merge_lora(transformer: torch.nn.Module, path: str | Path, scale: float = 1.0) -> dict[str, Any]:
    """Merge the LoRA at ``path`` into ``transformer`` in place; return a summary (modules, rank, sha256).

    Raises LoraError, before changing any weight, if a key names no module of the model, a module is not a
    Linear, a shape does not fit, or the file holds tensors that are not LoRA weights.
    """
    state_dict, metadata = read_lora(path)
    modules, foreign = _group_by_module(state_dict)
    named = dict(transformer.named_modules())
    problems = [f"{key} (not a lora_A/lora_B/alpha tensor)" for key in foreign]
    updates = []
    for module, parts in sorted(modules.items()):
        target = named.get(module)
        if target is None:
            problems.append(f"{module} (no such module in the transformer)")
            continue
        if not isinstance(target, torch.nn.Linear):
            problems.append(f"{module} (a {type(target).__name__}, not a Linear)")
            continue
        if "A" not in parts or "B" not in parts:
            problems.append(f"{module} (needs both lora_A and lora_B)")
            continue
        down, up = parts["A"], parts["B"]  # (r, in), (out, r)
        rank = down.shape[0]
        if down.shape[1] != target.in_features or up.shape != (target.out_features, rank):
            problems.append(f"{module} (lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)} do not fit "
                            f"weight {tuple(target.weight.shape)})")
            continue
        factor = scale * _scaling(module, parts, metadata, rank)
        updates.append((target, factor, up, down))
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise LoraError(f"LoRA {path}: {len(problems)} entries match nothing in this model "
                        f"(is it a LoRA for a different FLUX.2 size? check --lora / --model):\n  {shown}")
    if not updates:
        raise LoraError(bad_value("LoRA file", str(path), "a file with at least one lora_A/lora_B pair", "--lora"))
    for target, factor, up, down in updates:
        delta = factor * (up.to(torch.float32) @ down.to(torch.float32))  # (out, in)
        target.weight.copy_((target.weight.to(torch.float32) + delta.to(target.weight.device)).to(target.weight.dtype))
    return {"path": str(path), "sha256": file_sha256(path), "modules": len(updates), "scale": scale}
