"""Klein prompt tokenization without torch or transformers: the ``tokenizers`` library on the model folder's files.

What the Klein pipelines' ``_get_qwen3_prompt_embeds`` does before the text encoder, step for step:

1. the chat template on one user message, with ``add_generation_prompt=True`` and ``enable_thinking=False``;
2. the tokenizer on that text with ``padding="max_length"``, ``truncation=True``, ``max_length`` (512 for Klein),
   on the padding and truncation sides the folder's ``tokenizer_config.json`` names.

The template comes from ``tokenizer/chat_template.jinja`` or ``tokenizer_config.json`` (transformers' order). A
template we know renders with plain string formatting; any other renders with jinja2 in the sandbox settings
transformers uses, and without jinja2 we refuse rather than guess.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from sparse_context.runtime.errors import InputError, ModelLoadError, bad_value
from sparse_context.runtime.limits import warn_if_prompt_cut

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SETTINGS_FILE = "sparse_context.json"  # optional, in the model folder: max_sequence_length
DEFAULT_MAX_LENGTH = 512  # Klein's max_sequence_length
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
SIDES = ("right", "left")

# One user message, add_generation_prompt=True, enable_thinking=False, for templates we have checked.
KLEIN_PROMPT_FORMAT = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
KNOWN_TEMPLATES = {
    # reference/tiny.py's reduced Qwen3 template (a test renders it with jinja2 and compares).
    "45d718d9b2b6b7b8bd61c8cabdca68c057b62e8e18d955d67e8adb48f2e40c7e": "tiny-qwen3",
}


MIN_JINJA2 = (3, 1, 6)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelLoadError(bad_value(what, str(path), "a readable JSON file (the model folder's tokenizer/)",
                                       "--model")) from error


def read_chat_template(folder: Path, config: dict[str, Any]) -> str:
    """The default chat template: ``chat_template.jinja`` first, then ``tokenizer_config.json``'s entry."""
    path = folder / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {entry.get("name"): entry.get("template") for entry in template}.get("default")
    if not isinstance(template, str):
        raise ModelLoadError(bad_value("chat template", f"none in {folder}", f"{TEMPLATE_FILE} or a 'chat_template' "
                                       f"(default) entry in {CONFIG_FILE}", "--model"))
    return template


def render_with_jinja(template: str, prompt: str, special_tokens: dict[str, str]) -> str:
    """Render like transformers' ``apply_chat_template(..., tokenize=False)``: its sandboxed environment
    (trim_blocks, lstrip_blocks, loop controls, ``tojson`` without HTML escaping, ``raise_exception``,
    ``strftime_now``)."""
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as error:
        raise ModelLoadError(bad_value("chat template", f"an unknown template (sha256 {template_sha256(template)})",
                                       "a known Klein template, or jinja2 installed to render it (pip install "
                                       "jinja2)")) from error

    if _version(jinja2.__version__) < MIN_JINJA2:
        # Older releases have known sandbox escapes, and a chat template is code from the model's publisher.
        raise ModelLoadError(bad_value("jinja2 version", jinja2.__version__, ">= 3.1.6 to render chat templates "
                                       "(pip install -U jinja2)"))

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        compiled = environment.from_string(template)
        return compiled.render(messages=[{"role": "user", "content": prompt}], tools=None, documents=None,
                               add_generation_prompt=True, **special_tokens, enable_thinking=False)
    except jinja2.exceptions.TemplateError as error:
        raise ModelLoadError(f"the chat template could not render a prompt: {error} (check --model)") from error


@dataclass
class TokenizedPrompt:
    input_ids: np.ndarray  # (1, max_length) int64
    attention_mask: np.ndarray  # (1, max_length) int64: 1 for prompt tokens, 0 for padding
    text: str  # the prompt after the chat template
    length: int = 0  # tokens of ``text`` before the cut to max_length


class PromptTokenizer:
    """The Klein prompt -> (ids, mask) step, equal to transformers' tokenizer + chat template for the folder."""

    def __init__(self, tokenizer: Any, chat_template: str, special_tokens: dict[str, str], max_length: int,
                 padding_side: str = "right", truncation_side: str = "right"):
        if int(max_length) < 1:
            raise InputError(bad_value("max_sequence_length", max_length, "an integer >= 1"))
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in SIDES:
                raise ModelLoadError(bad_value(f"tokenizer {name}", side, " or ".join(SIDES), "--model"))
        pad = special_tokens.get("pad_token")
        pad_id = tokenizer.token_to_id(pad) if pad is not None else None
        if pad_id is None:
            raise ModelLoadError(bad_value("tokenizer pad_token", pad, "a token of the vocabulary (padding to "
                                           "max_sequence_length needs one)", "--model"))
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens)
        self.max_length = int(max_length)
        self.known_template = KNOWN_TEMPLATES.get(template_sha256(chat_template))
        # The settings transformers' fast tokenizer sets for padding="max_length", truncation=True.
        tokenizer.enable_truncation(self.max_length, stride=0, strategy="longest_first", direction=truncation_side)
        tokenizer.enable_padding(direction=padding_side, pad_id=pad_id, pad_type_id=0, pad_token=pad,
                                 length=self.max_length)
        # A copy without truncation or padding counts a prompt's tokens, to say when the cut drops some.
        self._counter = type(tokenizer).from_str(tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, max_length: int | None = None) -> "PromptTokenizer":
        """Load ``<model_dir>/tokenizer``; ``max_length`` defaults to ``sparse_context.json``'s
        max_sequence_length, else Klein's 512."""
        try:
            from tokenizers import Tokenizer
        except ImportError as error:
            raise ModelLoadError("tokenization needs the 'tokenizers' package (pip install tokenizers)") from error

        folder = Path(model_dir) / "tokenizer"
        if not (folder / TOKENIZER_FILE).is_file():
            raise ModelLoadError(bad_value("model folder", str(model_dir), f"a diffusers folder with tokenizer/"
                                           f"{TOKENIZER_FILE} (a fast tokenizer)", "--model"))
        config = _read_json(folder / CONFIG_FILE, "tokenizer config") if (folder / CONFIG_FILE).is_file() else {}
        try:
            tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
        except Exception as error:  # tokenizers raises a bare Exception for malformed files
            raise ModelLoadError(f"could not read {folder / TOKENIZER_FILE}: {error} (check --model)") from error
        special = {key: _token_text(config.get(key)) for key in SPECIAL_TOKEN_KEYS}
        special = {key: value for key, value in special.items() if value is not None}
        if max_length is None:
            settings_path = Path(model_dir) / SETTINGS_FILE
            settings = _read_json(settings_path, "model settings") if settings_path.is_file() else {}
            max_length = int(settings.get("max_sequence_length", DEFAULT_MAX_LENGTH))
        return cls(tokenizer, read_chat_template(folder, config), special, max_length,
                   config.get("padding_side", "right"), config.get("truncation_side", "right"))

    def render(self, prompt: str) -> str:
        """The prompt inside the chat template, as the pipeline passes it to the tokenizer."""
        if not isinstance(prompt, str):
            raise InputError(bad_value("prompt", type(prompt).__name__, "a string", "--prompt"))
        if self.known_template is not None:
            return KLEIN_PROMPT_FORMAT.format(prompt=prompt)
        return render_with_jinja(self.chat_template, prompt, self.special_tokens)

    def __call__(self, prompt: str) -> TokenizedPrompt:
        """Ids and mask at max_length; a prompt with more tokens is cut there (as diffusers cuts it), with a
        :class:`~sparse_context.runtime.errors.PromptTruncatedWarning`."""
        text = self.render(prompt)
        encoding = self.tokenizer.encode(text, add_special_tokens=True)
        ids = np.asarray(encoding.ids, dtype=np.int64)[None]  # (1, max_length)
        mask = np.asarray(encoding.attention_mask, dtype=np.int64)[None]  # (1, max_length)
        length = len(self._counter.encode(text, add_special_tokens=True).ids)
        warn_if_prompt_cut(length, self.max_length)
        return TokenizedPrompt(ids, mask, text, length)
