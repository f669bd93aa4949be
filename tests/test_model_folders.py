"""A model folder whose weights do not match its configs is refused when it loads, naming the keys, on every path
that loads one (the PyTorch generator, the transformer export, the CLI): diffusers would load missing keys as meta
tensors ("Cannot copy out of meta tensor" later) and extra keys with a warning (a model with blocks dropped)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sparse_context.runtime.errors import ModelLoadError

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture
def folder(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    return copy


def _edit_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / WEIGHTS))
    edit(weights)
    save_file(weights, str(folder / WEIGHTS))


def _edit_config(folder, **changes):
    path = folder / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_a_missing_weight_is_named(folder):
    from sparse_context.export.loading import load_generator_parts

    _edit_weights(folder, lambda w: w.pop("proj_out.weight"))
    with pytest.raises(ModelLoadError, match=r"transformer weights in .*model/transformer: 1 missing e.g. "
                                             r"\['proj_out.weight'\].*check --model"):
        load_generator_parts(folder)


def test_renamed_keys_are_missing_ones(folder):
    from sparse_context.export.loading import load_generator_parts

    _edit_weights(folder, lambda w: w.update({f"model.diffusion_model.{k}": w.pop(k) for k in list(w)}))
    with pytest.raises(ModelLoadError, match=r"transformer weights in .*: \d+ missing e.g."):
        load_generator_parts(folder)


def test_a_config_of_fewer_blocks_than_the_weights_is_refused(folder):
    """The weights hold a single block the config does not: diffusers would drop it with a warning."""
    from sparse_context.export.exporter import ExportOptions, load_transformer
    from sparse_context.export.loading import load_generator_parts

    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["num_single_layers"] >= 1
    _edit_config(folder, num_single_layers=config["num_single_layers"] - 1)
    last = config["num_single_layers"] - 1
    with pytest.raises(ModelLoadError, match=rf"transformer weights in .*: \d+ of blocks the model does not have "
                                             rf"e.g. \['single_transformer_blocks.{last}\..*smaller model"):
        load_generator_parts(folder)
    with pytest.raises(ModelLoadError, match="of blocks the model does not have"):  # the export's own load
        load_transformer(ExportOptions(model_dir=folder, out_dir=folder.parent / "onnx"))


def test_a_config_of_more_blocks_than_the_weights_is_refused(folder):
    from sparse_context.export.exporter import ExportOptions, load_transformer

    config = json.loads((folder / "transformer" / "config.json").read_text())
    _edit_config(folder, num_layers=config["num_layers"] + 1)
    with pytest.raises(ModelLoadError, match=rf"missing e.g. \['transformer_blocks.{config['num_layers']}\."):
        load_transformer(ExportOptions(model_dir=folder, out_dir=folder.parent / "onnx"))


def test_a_folder_without_its_tokenizer_is_refused_before_loading(folder, capsys):
    from sparse_context.cli import main

    (folder / "tokenizer" / "tokenizer.json").unlink()
    code = main(["generate", "--prompt", "a cat", "--model", str(folder), "--width", "64", "--height", "64",
                 "--out", str(folder.parent / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "(missing: tokenizer/tokenizer.json) (change it with --model)" in err
    assert not (folder.parent / "x.png").exists()


def test_a_whole_folder_still_loads(folder):
    from sparse_context.export.loading import load_generator_parts

    parts = load_generator_parts(folder)
    assert not any(p.is_meta for p in parts["transformer"].parameters())
    assert isinstance(parts["transformer"], torch.nn.Module)


def test_a_stray_key_outside_the_blocks_is_said_not_refused(folder):
    """diffusers ignores it too; only whole blocks the config lacks change what the model computes."""
    from sparse_context.export.loading import load_generator_parts

    _edit_weights(folder, lambda w: w.update({"extra.scale": torch.ones(2)}))
    with pytest.warns(UserWarning, match=r"1 the model does not use, e.g. \['extra.scale'\]"):
        parts = load_generator_parts(folder)
    assert not any(p.is_meta for p in parts["transformer"].parameters())
