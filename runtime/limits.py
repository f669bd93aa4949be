"""What a request may ask for, checked before any work: output size, steps, guidance, seed, prompt, LoRA scale.

Each limit comes from what the model and the code support, so an out-of-range value fails in microseconds with
the flag to change instead of allocating 22 GB, hanging, or quietly producing a black image.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from sparse_context.runtime.errors import InputError, PromptTruncatedWarning, bad_value
from sparse_context.runtime.tokens import TOKEN_PIXELS

# FLUX.2 generates up to 4 megapixels; its positions and our buffers are sized for that.
MAX_OUTPUT_PIXELS = 4 * 1024 * 1024
DEFAULT_SIDE_PIXELS = 1024  # a side not given
MAX_SIDE_PIXELS = 4096  # 4096 x 1024 at most: wider strips are outside what the model was trained on
MAX_STEPS = 200  # the flow-match schedule is well defined beyond; 200 steps of a 9B model take minutes already
MAX_GUIDANCE = 100.0
MAX_LORA_SCALE = 16.0  # in absolute value; a merged delta beyond this swamps the base weights
MAX_SEED = 2**63 - 1  # torch and numpy generators both take it
# The Klein text encoder reads at most 512 tokens (a token is 3 to 4 characters of English): a prompt over 2048
# characters is refused; a shorter one that still has more tokens is cut with a PromptTruncatedWarning.
MAX_PROMPT_CHARS = 2048

FLAG_WIDTH = "--width"
FLAG_HEIGHT = "--height"
FLAG_STEPS = "--steps"
FLAG_GUIDANCE = "--guidance"
FLAG_SEED = "--seed"
FLAG_SELECTION_SEED = "--selection-seed"
FLAG_PROMPT = "--prompt"
FLAG_LORA_SCALE = "--lora-scale"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or type(value).__name__ in ("int64", "int32")


def check_output_size(width: Any, height: Any, token_pixels: int = TOKEN_PIXELS) -> tuple[int, int]:
    """(width, height) if each is a whole number of tokens within the limits; no rounding happens silently."""
    for name, value, flag in (("output width", width, FLAG_WIDTH), ("output height", height, FLAG_HEIGHT)):
        if not _is_int(value) or not token_pixels <= value <= MAX_SIDE_PIXELS:
            raise InputError(bad_value(name, value, f"an integer from {token_pixels} to {MAX_SIDE_PIXELS} px", flag))
        if value % token_pixels:
            lower, upper = value - value % token_pixels, value - value % token_pixels + token_pixels
            nearest = ", ".join(str(v) for v in (lower, upper) if token_pixels <= v <= MAX_SIDE_PIXELS)
            raise InputError(bad_value(name, value, f"a multiple of {token_pixels} px (whole tokens), e.g. {nearest}",
                                       flag))
    if width * height > MAX_OUTPUT_PIXELS:
        raise InputError(bad_value("output size", f"{width}x{height} px", f"at most {MAX_OUTPUT_PIXELS // 2**20} "
                                   f"megapixels (e.g. 2048x2048)", f"{FLAG_WIDTH}/{FLAG_HEIGHT}"))
    return int(width), int(height)


def check_steps(steps: Any) -> int:
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InputError(bad_value("denoising steps", steps, f"an integer from 1 to {MAX_STEPS}", FLAG_STEPS))
    return int(steps)


def check_finite(what: str, value: Any, low: float, high: float, flag: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(bad_value(what, value, f"a number from {low:g} to {high:g}", flag)) from None
    if not math.isfinite(number) or not low <= number <= high:  # NaN fails both comparisons
        raise InputError(bad_value(what, value, f"a finite number from {low:g} to {high:g}", flag))
    return number


def check_guidance(guidance: Any) -> float:
    return check_finite("guidance scale", guidance, 0.0, MAX_GUIDANCE, FLAG_GUIDANCE)


def check_lora_scale(scale: Any) -> float:
    return check_finite("LoRA scale", scale, -MAX_LORA_SCALE, MAX_LORA_SCALE, FLAG_LORA_SCALE)


def check_seed(seed: Any, what: str = "seed", flag: str = FLAG_SEED) -> int:
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InputError(bad_value(what, seed, "an integer from 0 to 2**63 - 1", flag))
    return int(seed)


def check_selection_seed(seed: Any) -> int:
    """The seed of the token selection's random parts (``random``, the ``uniform`` lattice's shift, ties), apart
    from the noise seed: a new noise seed keeps the selection, so the reference K/V cache still hits."""
    return check_seed(seed, "selection seed", FLAG_SELECTION_SEED)


def warn_if_prompt_cut(tokens: int, limit: int) -> None:
    """Warn (:class:`PromptTruncatedWarning`) when a prompt of ``tokens`` tokens, chat template included, is cut to
    the ``limit`` the text encoder reads."""
    if tokens > limit:
        warnings.warn(f"prompt cut: {tokens} tokens with the chat template, the text encoder reads {limit} "
                      f"(max_sequence_length) and drops the last {tokens - limit}, as diffusers does: shorten "
                      f"{FLAG_PROMPT}", PromptTruncatedWarning, stacklevel=3)


def check_prompt(prompt: Any) -> str:
    if not isinstance(prompt, str):
        raise InputError(bad_value("prompt", type(prompt).__name__, "a string", FLAG_PROMPT))
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InputError(bad_value("prompt length", f"{len(prompt)} characters", f"at most {MAX_PROMPT_CHARS} "
                                   "(Klein's text encoder reads 512 tokens; the rest would be cut off)", FLAG_PROMPT))
    return prompt
