"""The embedded default: a tiny FLUX.2-klein with seeded random weights, built offline from configs.

Real diffusers/transformers classes at tiny sizes (no mocks): ``Flux2Transformer2DModel``,
``AutoencoderKLFlux2``, ``Qwen3ForCausalLM`` and a byte-level ``Qwen2Tokenizer`` built locally with the Qwen
chat template. The token geometry is the real one (VAE 8x, 2x2 patches, 128-channel tokens, 16 px per token),
so token selection on real photos means the same thing as on the 4B/9B models.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sparse_context.runtime.files import publish_mode

TINY_SEED = 0
TINY_TEXT_LAYERS = (1, 2, 3)  # which text-encoder hidden states are stacked (real Klein: 9, 18, 27)
TINY_MAX_SEQUENCE_LENGTH = 64  # real Klein: 512

TINY_TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=3 * 32,  # 3 stacked text layers x hidden 32
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(8, 8, 8, 8),
    rope_theta=2000,
    guidance_embeds=False,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),  # 4 blocks -> 8x downsampling, like the real VAE
    layers_per_block=1,
    latent_channels=32,  # x 2x2 patch = 128 token channels
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TINY_TEXT_ENCODER = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=512,
)
TINY_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")

# Qwen3's chat template, reduced to what `apply_chat_template(..., add_generation_prompt=True,
# enable_thinking=False)` produces for a single user message.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")


def _byte_level_vocab() -> dict[str, int]:
    """GPT-2 byte-to-unicode alphabet: every byte has a printable stand-in, so any text tokenizes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    mapped = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            mapped.append(256 + extra)
            extra += 1
    return {chr(code): index for index, code in enumerate(mapped)}


def build_tokenizer() -> Any:
    from transformers import Qwen2TokenizerFast

    vocab = _byte_level_vocab()
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[], unk_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_tiny_components(seed: int = TINY_SEED) -> dict[str, Any]:
    """Fresh tiny components with weights drawn from ``seed`` (same seed, same weights)."""
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(**TINY_TRANSFORMER)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(**TINY_VAE)
    # Random BatchNorm statistics, so latent normalisation is exercised (fresh ones are mean 0, var 1).
    generator = torch.Generator().manual_seed(seed + 2)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    torch.manual_seed(seed + 3)
    text_config = Qwen3Config(vocab_size=len(tokenizer), **TINY_TEXT_ENCODER)
    text_encoder = Qwen3ForCausalLM(text_config)
    scheduler = FlowMatchEulerDiscreteScheduler(**TINY_SCHEDULER)
    for module in (transformer, vae, text_encoder):
        module.eval()
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_fingerprint(seed: int = TINY_SEED) -> str:
    import diffusers
    import transformers

    blob = json.dumps([TINY_TRANSFORMER, TINY_VAE, TINY_TEXT_ENCODER, TINY_SCHEDULER, QWEN_CHAT_TEMPLATE, seed,
                       diffusers.__version__, transformers.__version__], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def save_tiny_model(folder: str | Path, seed: int = TINY_SEED) -> Path:
    """Write the tiny model as a diffusers folder (``Flux2KleinPipeline.save_pretrained`` layout) plus
    ``sparse_context.json`` with the tiny text settings. Written to a temporary folder, renamed when complete."""
    from diffusers import Flux2KleinPipeline

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe = Flux2KleinPipeline(**build_tiny_components(seed), is_distilled=True)
        pipe.save_pretrained(staging)
        files = {p.relative_to(staging).as_posix(): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / "sparse_context.json").write_text(json.dumps({
            "text_encoder_out_layers": list(TINY_TEXT_LAYERS),
            "max_sequence_length": TINY_MAX_SEQUENCE_LENGTH,
            "fingerprint": tiny_fingerprint(seed),
            "files": files,  # what a complete folder holds: a damaged one is rebuilt, not reported as --model
        }, indent=2))
        publish_mode(staging)  # mkdtemp made it 0700
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def default_cache_dir() -> Path:
    from sparse_context.runtime.fingerprints import cache_dir

    return cache_dir()


def _is_complete(folder: Path) -> bool:
    """Every file the folder was written with is there at its size (a cache can be damaged after the fact)."""
    try:
        files = json.loads((folder / "sparse_context.json").read_text()).get("files")
        return isinstance(files, dict) and bool(files) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, AttributeError):
        return False


def tiny_model_dir(cache_dir: str | Path | None = None, seed: int = TINY_SEED) -> Path:
    """The tiny model's diffusers folder, created on first use, reused while complete, rebuilt when damaged."""
    from sparse_context.runtime.errors import ModelLoadError
    from sparse_context.runtime.fingerprints import CACHE_ENV

    folder = Path(cache_dir or default_cache_dir()) / f"tiny-klein-{tiny_fingerprint(seed)}"
    if not _is_complete(folder):
        try:
            save_tiny_model(folder, seed)
        except OSError as error:
            raise ModelLoadError(f"cache folder for the embedded tiny model: got {str(folder.parent)!r}, which "
                                 f"cannot be written ({error.strerror or error}); allowed: a writable folder (set "
                                 f"{CACHE_ENV} to one, or give --model)") from error
    return folder
