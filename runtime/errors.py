"""One small exception hierarchy. Messages say what was given, what is allowed, and which flag changes it."""

from __future__ import annotations


class SparseContextError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(SparseContextError, ValueError):
    """A user-supplied value is out of range or of the wrong kind."""


class ImageError(InputError):
    """An image file or array cannot be used as a reference."""


class SelectionError(InputError):
    """A token-selection request cannot be satisfied (budget, strategy, mask)."""


class ModelLoadError(SparseContextError):
    """Model weights, configs or a LoRA file cannot be loaded as asked."""


class LoraError(ModelLoadError):
    """A LoRA file does not fit the model it is applied to."""


class GenerationError(SparseContextError):
    """A generation ran but its result cannot be used (non-finite latents): nothing is written or cached."""


class PromptTruncatedWarning(UserWarning):
    """The prompt has more tokens than the text encoder reads; the rest was dropped, as diffusers drops it. An app
    that must not generate from a cut prompt turns this into an error with
    ``warnings.simplefilter("error", PromptTruncatedWarning)``."""


def bad_value(what: str, given: object, allowed: str, flag: str | None = None) -> str:
    """Format the standard message: ``<what>: got <given>; allowed: <allowed> (change it with <flag>)``."""
    message = f"{what}: got {given!r}; allowed: {allowed}"
    if flag:
        message += f" (change it with {flag})"
    return message
