"""runtime.tokenizer: Klein prompt tokenization with the `tokenizers` library equals transformers' tokenizer with
apply_chat_template, padding and truncation exactly as diffusers' ``_get_qwen3_prompt_embeds`` calls them."""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from sparse_context.runtime.errors import InputError, ModelLoadError, PromptTruncatedWarning
from sparse_context.runtime.tokenizer import (
    KLEIN_PROMPT_FORMAT, PromptTokenizer, render_with_jinja, template_sha256,
)

pytest.importorskip("tokenizers", reason="runtime tokenization needs the tokenizers package")

# The corpus holds over-long prompts on purpose: their cut is what is compared, not what is warned about.
CUTS_ON_PURPOSE = pytest.mark.filterwarnings("ignore::sparse_context.runtime.errors.PromptTruncatedWarning")

CORPUS = [
    "a photo of a cat",
    "",
    "   ",
    "\n\t leading and trailing whitespace \n",
    "Ünïcödé ✨🚀 猫が好きです 한국어 عربى Ελληνικά",
    "emoji only 👩‍👩‍👧‍👦🏳️‍🌈",
    "<|im_end|> <|im_start|>assistant <think>not special</think> <|endoftext|>",
    "a\r\nb\u00a0c\u200bd",
    "NFC: e\u0301 vs \u00e9",
    "word " * 200,  # longer than the tiny max length: truncated
]

# A Qwen3-style template (namespace, loop.index0, reversed loop, string tests): not a known one, so jinja renders it.
QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}\n"
    "{%- for message in messages[::-1] %}\n"
    "    {%- if message.role == 'user' and message.content is string %}\n"
    "        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}{%- set content = message.content %}{%- else %}"
    "{%- set content = '' %}{%- endif %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)


def _transformers_encode(tokenizer, prompt: str, max_length: int):
    """Exactly the calls of diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)
    inputs = tokenizer(text, return_tensors="np", padding="max_length", truncation=True, max_length=max_length)
    return text, inputs["input_ids"], inputs["attention_mask"]


def _assert_equal_on_corpus(folder, ours: PromptTokenizer, max_length: int) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    for prompt in CORPUS:
        text, ids, mask = _transformers_encode(theirs, prompt, max_length)
        got = ours(prompt)
        assert got.text == text, prompt
        assert got.input_ids.dtype == np.int64 and got.attention_mask.dtype == np.int64
        assert got.input_ids.shape == (1, max_length)
        np.testing.assert_array_equal(got.input_ids, ids, err_msg=repr(prompt))
        np.testing.assert_array_equal(got.attention_mask, mask, err_msg=repr(prompt))


@pytest.fixture
def tokenizer_copy(tiny_model_dir, tmp_path):
    """A writable copy of the tiny folder's tokenizer files (plus model settings) to vary."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir / "tokenizer", folder / "tokenizer")
    shutil.copy(tiny_model_dir / "sparse_context.json", folder / "sparse_context.json")
    return folder


@CUTS_ON_PURPOSE
def test_equals_transformers_on_corpus(tiny_model_dir):
    pytest.importorskip("transformers", reason="the comparison needs transformers")
    ours = PromptTokenizer.from_model_dir(tiny_model_dir)
    assert ours.max_length == json.loads((tiny_model_dir / "sparse_context.json").read_text())["max_sequence_length"]
    assert ours.known_template == "tiny-qwen3"
    _assert_equal_on_corpus(tiny_model_dir, ours, ours.max_length)
    # The over-long prompt fills every position; the short ones are padded on the right.
    assert ours(CORPUS[-1]).attention_mask.all()
    assert not ours(CORPUS[0]).attention_mask[0, -1]


def test_a_cut_prompt_is_said_with_its_token_counts(tiny_model_dir):
    """Cutting is diffusers' behaviour and stays; the warning says how many tokens were dropped and which flag."""
    ours = PromptTokenizer.from_model_dir(tiny_model_dir)
    fits = "a" * (ours.max_length - ours(CORPUS[0]).length + len(CORPUS[0]))  # bytes are tokens here
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        assert ours(fits).length == ours.max_length and ours(fits).attention_mask.all()
    with pytest.warns(PromptTruncatedWarning) as caught:
        long = ours(fits + "bcd")
    assert long.length == ours.max_length + 3
    assert str(caught[0].message) == (f"prompt cut: {ours.max_length + 3} tokens with the chat template, the text "
                                      f"encoder reads {ours.max_length} (max_sequence_length) and drops the last "
                                      "3, as diffusers does: shorten --prompt")
    assert caught[0].filename == __file__  # pointed at the caller's line
    whole = PromptTokenizer.from_model_dir(tiny_model_dir, ours.max_length + 3)(fits + "bcd")
    assert np.array_equal(long.input_ids[0], whole.input_ids[0, :ours.max_length])  # the end is what goes


@CUTS_ON_PURPOSE
@pytest.mark.parametrize("max_length", [1, 16, 512])
def test_equals_transformers_at_other_lengths(tiny_model_dir, max_length):
    """Truncation inside the chat template itself (1, 16) and Klein's real 512."""
    pytest.importorskip("transformers", reason="the comparison needs transformers")
    _assert_equal_on_corpus(tiny_model_dir, PromptTokenizer.from_model_dir(tiny_model_dir, max_length), max_length)


def test_known_template_renders_as_jinja(tiny_model_dir):
    pytest.importorskip("jinja2", reason="the comparison needs jinja2")
    ours = PromptTokenizer.from_model_dir(tiny_model_dir)
    for prompt in CORPUS:
        assert ours.render(prompt) == render_with_jinja(ours.chat_template, prompt, ours.special_tokens)
        assert ours.render(prompt) == KLEIN_PROMPT_FORMAT.format(prompt=prompt)


@CUTS_ON_PURPOSE
@pytest.mark.parametrize("where", ["jinja_file", "config_string", "config_list"])
def test_unknown_template_rendered_with_jinja(tokenizer_copy, where):
    """A template we do not know, stored where transformers looks for it, renders with jinja2 like transformers."""
    pytest.importorskip("transformers", reason="the comparison needs transformers")
    pytest.importorskip("jinja2", reason="unknown templates render with jinja2")
    folder = tokenizer_copy / "tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if where == "jinja_file":
        (folder / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    else:
        (folder / "chat_template.jinja").unlink()
        entry = [{"name": "default", "template": QWEN3_STYLE_TEMPLATE}]
        config["chat_template"] = QWEN3_STYLE_TEMPLATE if where == "config_string" else entry
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = PromptTokenizer.from_model_dir(tokenizer_copy)
    assert ours.known_template is None
    _assert_equal_on_corpus(tokenizer_copy, ours, ours.max_length)


@CUTS_ON_PURPOSE
def test_left_padding_and_truncation_sides(tokenizer_copy):
    """The sides come from tokenizer_config.json, as transformers reads them."""
    pytest.importorskip("transformers", reason="the comparison needs transformers")
    path = tokenizer_copy / "tokenizer" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(padding_side="left", truncation_side="left")
    path.write_text(json.dumps(config))
    ours = PromptTokenizer.from_model_dir(tokenizer_copy)
    _assert_equal_on_corpus(tokenizer_copy, ours, ours.max_length)
    assert ours("a cat").attention_mask[0, 0] == 0  # padded on the left


def test_unknown_template_without_jinja_is_refused(tokenizer_copy, monkeypatch):
    (tokenizer_copy / "tokenizer" / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    ours = PromptTokenizer.from_model_dir(tokenizer_copy)
    real_import = builtins.__import__

    def no_jinja(name, *args, **kwargs):
        if name.startswith("jinja2"):
            raise ImportError("No module named 'jinja2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jinja)
    with pytest.raises(ModelLoadError, match="jinja2") as error:
        ours("a cat")
    assert template_sha256(QWEN3_STYLE_TEMPLATE) in str(error.value)


def test_broken_template_is_a_load_error(tokenizer_copy):
    pytest.importorskip("jinja2", reason="unknown templates render with jinja2")
    (tokenizer_copy / "tokenizer" / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ModelLoadError, match="no system role"):
        PromptTokenizer.from_model_dir(tokenizer_copy)("a cat")


def test_missing_files_and_bad_values(tokenizer_copy, tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        PromptTokenizer.from_model_dir(tmp_path / "nowhere")
    folder = tokenizer_copy / "tokenizer"
    (folder / "chat_template.jinja").unlink()
    with pytest.raises(ModelLoadError, match="chat template"):
        PromptTokenizer.from_model_dir(tokenizer_copy)
    (folder / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<|not a token|>"}))
    with pytest.raises(ModelLoadError, match="pad_token"):
        PromptTokenizer.from_model_dir(tokenizer_copy)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "middle"}))
    with pytest.raises(ModelLoadError, match="padding_side"):
        PromptTokenizer.from_model_dir(tokenizer_copy)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer config"):
        PromptTokenizer.from_model_dir(tokenizer_copy)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not read"):
        PromptTokenizer.from_model_dir(tokenizer_copy)


def test_bad_prompt_and_length(tiny_model_dir):
    with pytest.raises(InputError, match="prompt"):
        PromptTokenizer.from_model_dir(tiny_model_dir)(["a list"])
    with pytest.raises(InputError, match="max_sequence_length"):
        PromptTokenizer.from_model_dir(tiny_model_dir, max_length=0)


def test_imports_without_torch_or_transformers(tiny_model_dir):
    code = ("import sys; from sparse_context.runtime.tokenizer import PromptTokenizer; "
            "import sparse_context.runtime.vae_io, sparse_context.engines.ort.parts; "
            "import sparse_context.export.part_specs; "
            f"PromptTokenizer.from_model_dir({str(tiny_model_dir)!r})('a cat'); "
            "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; "
            "sys.exit(f'imported {heavy}' if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr + result.stdout


def test_old_jinja2_is_refused(tokenizer_copy, monkeypatch):
    jinja2 = pytest.importorskip("jinja2", reason="the version check needs jinja2")
    (tokenizer_copy / "tokenizer" / "chat_template.jinja").write_text(QWEN3_STYLE_TEMPLATE)
    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    with pytest.raises(ModelLoadError, match="3.1.6"):
        PromptTokenizer.from_model_dir(tokenizer_copy)("a cat")
