"""Text-encoder ONNX graph: our tokenizer + the graph on onnxruntime equal diffusers' _get_qwen3_prompt_embeds (fp32)
at prompt lengths other than the traced one; export contract, cache and error paths."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.export.errors import ExportConfigError
from sparse_context.export.part_specs import (
    KLEIN_TEXT_LAYERS, MAX_TEXT_TOKENS, TEXT_TOKENS, check_sizes, example_sizes, text_encoder_spec, text_settings,
)
from sparse_context.runtime.errors import ModelLoadError

pytest.importorskip("torch", reason="the export needs torch (pip install .[torch,onnx])")
pytest.importorskip("onnxruntime", reason="the graph runs on onnxruntime (pip install .[onnx])")

TOLERANCE = 1e-5  # max |onnxruntime - diffusers|, fp32
PROMPTS = ["a photo of a cat", "", "Ünïcödé ✨🚀 猫が好きです", "word " * 100]


@pytest.fixture(scope="module")
def text_encoder(tiny_model_dir):
    from sparse_context.export.text_encoder import load_text_encoder

    return load_text_encoder(tiny_model_dir)


@pytest.fixture(scope="module")
def export(tiny_model_dir, text_encoder, tmp_path_factory):
    from sparse_context.export.text_encoder import export_text_encoder

    out = tmp_path_factory.mktemp("text-onnx")
    return export_text_encoder(tiny_model_dir, out, text_encoder=text_encoder), out


@pytest.fixture(scope="module")
def session(export):
    import onnxruntime as ort

    return ort.InferenceSession(str(export[0].path), providers=["CPUExecutionProvider"])


def _diffusers_embeds(text_encoder, tokenizer, prompt: str, max_length: int, layers) -> np.ndarray:
    import torch
    from diffusers import Flux2KleinPipeline

    with torch.no_grad():
        return Flux2KleinPipeline._get_qwen3_prompt_embeds(
            text_encoder=text_encoder, tokenizer=tokenizer, prompt=[prompt], dtype=torch.float32,
            device=torch.device("cpu"), max_sequence_length=max_length, hidden_states_layers=layers).numpy()


@pytest.mark.parametrize("max_length", [1, 13, None])  # None: the folder's maximum (64 for the tiny model)
def test_tokenizer_and_graph_equal_diffusers(tiny_model_dir, text_encoder, session, max_length):
    from transformers import AutoTokenizer

    from sparse_context.runtime.tokenizer import PromptTokenizer

    layers, folder_max = text_settings(tiny_model_dir)
    length = max_length or folder_max
    assert length != example_sizes(text_encoder_spec(32, layers, folder_max))[TEXT_TOKENS]
    theirs = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    ours = PromptTokenizer.from_model_dir(tiny_model_dir, length)
    for prompt in PROMPTS:
        tokens = ours(prompt)
        (embeds,) = session.run(None, {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        expected = _diffusers_embeds(text_encoder, theirs, prompt, length, layers)
        assert embeds.shape == expected.shape == (1, length, len(layers) * 32)
        assert np.abs(embeds - expected).max() <= TOLERANCE, prompt


def test_graph_equals_transformers_with_padding(text_encoder, session):
    """Random ids with every padding length at a length the tokenizer tests do not use."""
    import torch

    rng = np.random.default_rng(0)
    length = 21
    for valid in (1, 7, length):
        ids = rng.integers(0, text_encoder.config.vocab_size, (1, length), dtype=np.int64)
        mask = (np.arange(length) < valid).astype(np.int64)[None]
        (ours,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
        with torch.no_grad():
            out = text_encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                               output_hidden_states=True, use_cache=False)
        theirs = torch.cat([out.hidden_states[k] for k in (1, 2, 3)], dim=-1).numpy()  # per-token side by side
        assert np.abs(ours - theirs).max() <= TOLERANCE


def _weights(path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).size for t in model.graph.initializer)


def test_unused_layers_are_cut_exactly(tiny_model_dir, text_encoder, export, tmp_path):
    """Layers after the last one read are left out of the graph; the result still equals diffusers' (the
    embedding output and a raw layer output, neither the final-normed state)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    from sparse_context.export.text_encoder import export_text_encoder
    from sparse_context.runtime.tokenizer import PromptTokenizer

    layers = (0, 2)  # of 3 decoder layers: layer 2 and the final norm are not needed
    result = export_text_encoder(tiny_model_dir, tmp_path, layers=layers, text_encoder=text_encoder)
    # The exporter renames folded weights (and merges equal ones, like fresh all-ones norm weights), so count
    # the projection matrices: one decoder layer's fewer than in the full graph.
    layer = sum(p.numel() for p in text_encoder.model.layers[2].parameters() if p.ndim == 2)
    assert _weights(export[0].path) - _weights(result.path) >= layer
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    theirs = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    tokens = PromptTokenizer.from_model_dir(tiny_model_dir, 13)(PROMPTS[2])
    (embeds,) = session.run(None, {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
    expected = _diffusers_embeds(text_encoder, theirs, PROMPTS[2], 13, layers)
    assert np.abs(embeds - expected).max() <= TOLERANCE
    assert text_encoder.model.norm.__class__.__name__ != "Identity" and len(text_encoder.model.layers) == 3


def test_cut_models_share_a_fresh_encoder_safely(tiny_model_dir):
    """Cuts made from a model that never ran, then the model itself: every one gives the reference hidden states
    (transformers installs its recording hooks per model; shared layers must not record twice)."""
    import torch

    from sparse_context.export.text_encoder import TextEncoderGraph, load_text_encoder

    ids = torch.arange(3, 12)[None]
    mask = (torch.arange(9) < 6).long()[None]
    with torch.no_grad():
        states = load_text_encoder(tiny_model_dir)(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                                   use_cache=False).hidden_states
        expected = torch.cat([states[0], states[2]], dim=-1)
        fresh = load_text_encoder(tiny_model_dir)
        first, second = TextEncoderGraph(fresh, (0, 2)), TextEncoderGraph(fresh, (0, 2))
        again = fresh(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        assert torch.equal(first(ids, mask), expected) and torch.equal(second(ids, mask), expected)
        assert all(torch.equal(a, b) for a, b in zip(again, states)) and len(again) == len(states)


def test_export_contract_and_cache(export, tiny_model_dir):
    import onnx

    from sparse_context.export.part_exporter import is_part_cached
    from sparse_context.export.text_encoder import export_text_encoder

    result, out = export
    layers, max_tokens = text_settings(tiny_model_dir)
    assert result.manifest["text_encoder_out_layers"] == list(layers) == [1, 2, 3]
    assert result.manifest["profile"]["input_ids"] == [[1, 1], [1, max_tokens], [1, max_tokens]]
    model = onnx.load(str(result.path), load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims == {"input_ids": [1, "text_tokens"], "attention_mask": [1, "text_tokens"],
                    "prompt_embeds": [1, "text_tokens", 96]}
    assert not [t.name for t in model.graph.initializer if "lm_head" in t.name]  # logits are not computed
    assert export_text_encoder(tiny_model_dir, out).reused
    # Other layers or another prompt length are another graph: not taken from the cache.
    assert is_part_cached(text_encoder_spec(32, layers, max_tokens), tiny_model_dir, out)
    assert not is_part_cached(text_encoder_spec(32, (1, 3), max_tokens), tiny_model_dir, out)
    assert not is_part_cached(text_encoder_spec(32, layers, 2 * max_tokens), tiny_model_dir, out)


def test_spec_defaults_and_sizes():
    from sparse_context.reference.generator import KLEIN_MAX_SEQUENCE_LENGTH
    from sparse_context.reference.generator import KLEIN_TEXT_LAYERS as GENERATOR_LAYERS

    assert KLEIN_TEXT_LAYERS == GENERATOR_LAYERS and MAX_TEXT_TOKENS == KLEIN_MAX_SEQUENCE_LENGTH
    spec = text_encoder_spec(4096, KLEIN_TEXT_LAYERS)
    assert spec.profile()["input_ids"] == ((1, 1), (1, 512), (1, 512))
    assert spec.outputs[0].shape == (1, TEXT_TOKENS, 3 * 4096)
    assert [s[TEXT_TOKENS] for s in check_sizes(spec)] == [1, 13, 512]


def test_bad_options(tiny_model_dir, text_encoder, tmp_path):
    from sparse_context.export.text_encoder import TextEncoderGraph, export_text_encoder

    with pytest.raises(ExportConfigError, match="text token range"):
        text_encoder_spec(32, (1,), max_tokens=0)
    with pytest.raises(ExportConfigError, match="layers"):
        text_encoder_spec(32, ())
    with pytest.raises(ExportConfigError, match="opt text tokens"):
        text_encoder_spec(32, (1,), max_tokens=16, opt_tokens=32)
    with pytest.raises(ModelLoadError, match="0..3"):
        TextEncoderGraph(text_encoder, (1, 4))
    with pytest.raises(ModelLoadError, match="text encoder config"):
        export_text_encoder(tmp_path, tmp_path / "out")


def test_ort_parts_encode_prompt(export, tiny_model_dir, text_encoder):
    """The torch-free prompt path (our tokenizer + the graph) equals the generator's diffusers call."""
    from transformers import AutoTokenizer

    from sparse_context.engines.ort.parts import OrtPartSession, OrtTextAndVae
    from sparse_context.runtime.errors import InputError

    layers, max_tokens = text_settings(tiny_model_dir)
    parts = OrtTextAndVae(tiny_model_dir, text_encoder=export[0].path)
    theirs = AutoTokenizer.from_pretrained(str(tiny_model_dir / "tokenizer"))
    embeds = parts.encode_prompt(PROMPTS[0])
    assert embeds.dtype == np.float32 and embeds.shape == (1, max_tokens, 96)
    assert np.abs(embeds - _diffusers_embeds(text_encoder, theirs, PROMPTS[0], max_tokens, layers)).max() <= TOLERANCE
    session = OrtPartSession(export[0].path)
    with pytest.raises(InputError, match="another input has 5"):
        session.run({"input_ids": np.zeros((1, 5), np.int64), "attention_mask": np.ones((1, 6), np.int64)})
    with pytest.raises(InputError, match="empty"):
        session.run({"input_ids": np.zeros((1, 0), np.int64), "attention_mask": np.ones((1, 0), np.int64)})


def test_validate_part_export(export, tiny_model_dir):
    from sparse_context.reference.validate_parts import validate_part_export

    report = validate_part_export(export[0].path, tiny_model_dir)
    assert [r.sizes for r in report.records] == ["text_tokens=1", "text_tokens=13", "text_tokens=64"]
    assert not report.failures and max(r.max_abs for r in report.records) <= TOLERANCE


def test_external_data_export(tiny_model_dir, text_encoder, session, tmp_path, monkeypatch):
    """Over the 2 GB protobuf limit (Qwen3-8B is ~32 GB fp32) the weights go to an external data file: it is
    hashed into the manifest, and the graph runs the same."""
    import onnxruntime as ort

    import sparse_context.export.part_exporter as part_exporter
    from sparse_context.export.text_encoder import export_text_encoder

    monkeypatch.setattr(part_exporter, "EXTERNAL_DATA_LIMIT", 0)
    result = export_text_encoder(tiny_model_dir, tmp_path, text_encoder=text_encoder)
    files = result.manifest["files"]
    assert len(files) == 2 and all(info["bytes"] > 0 for info in files.values())
    assert sum(info["bytes"] for info in files.values()) > result.path.stat().st_size
    external = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    tokens = {"input_ids": np.arange(5, dtype=np.int64)[None], "attention_mask": np.ones((1, 5), np.int64)}
    np.testing.assert_array_equal(external.run(None, tokens)[0], session.run(None, tokens)[0])
