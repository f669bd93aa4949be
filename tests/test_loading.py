"""Loading users' weights: diffusers folders, single-file transformers and LoRA merging, on tiny saved checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sparse_context.runtime.errors import LoraError, ModelLoadError

pytest.importorskip("peft", reason="making a test LoRA needs peft (pip install .[dev])")


def _make_lora(transformer, path, rank=4, alpha=8.0, seed=0, targets=("to_q", "to_k", "to_v", "to_out.0",
                                                                       "to_qkv_mlp_proj", "linear_in")):
    """A real LoRA: peft adapter on the tiny transformer with random (non-zero) B, saved as diffusers does."""
    from diffusers import Flux2KleinPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    transformer.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    layers = get_peft_model_state_dict(transformer)
    Flux2KleinPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=layers,
                                         transformer_lora_adapter_metadata=config.to_dict(),
                                         weight_name=path.name)
    return path


def _velocity(transformer, seed=0):
    """One transformer call on fixed random inputs (target + references), as the pipelines make it."""
    from sparse_context.reference.torch_backend import TorchTransformerBackend
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(1, 20, 128, generator=generator)
    refs = torch.randn(1, 12, 128, generator=generator)
    text = torch.randn(1, 8, transformer.config.joint_attention_dim, generator=generator)
    backend = TorchTransformerBackend(transformer)
    return backend.full(target, grid_position_ids(4, 5), refs, grid_position_ids(3, 4, time=10), text,
                        text_position_ids(8), np.float32(0.6))


@pytest.fixture
def lora_file(tiny_model_dir, tmp_path):
    from diffusers import Flux2Transformer2DModel

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    return _make_lora(transformer, tmp_path / "lora.safetensors")


def test_merged_lora_equals_diffusers_lora(tiny_model_dir, lora_file):
    """Our merge (W + alpha/r * B A) equals diffusers' peft-backed LoRA at scale 1 and at scale 0.5."""
    from diffusers import Flux2KleinPipeline

    from sparse_context.export.loading import load_pipeline
    from sparse_context.export.lora import merge_lora

    base = _velocity(load_pipeline(tiny_model_dir).transformer)
    for scale in (1.0, 0.5):
        ours = load_pipeline(tiny_model_dir).transformer
        summary = merge_lora(ours, lora_file, scale=scale)
        theirs = Flux2KleinPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
        theirs.load_lora_weights(str(lora_file), adapter_name="test")
        theirs.set_adapters(["test"], adapter_weights=[scale])
        expected = _velocity(theirs.transformer)
        merged = _velocity(ours)
        assert summary["modules"] > 0
        assert (merged - base).abs().max() > 1e-3  # the LoRA changes the output ...
        torch.testing.assert_close(merged, expected, atol=2e-5, rtol=1e-4)  # ... exactly as diffusers applies it


def test_generator_from_pretrained_with_lora(tiny_model_dir, lora_file):
    from sparse_context.reference.generator import SparseContextGenerator

    plain = SparseContextGenerator.from_pretrained(tiny_model_dir)
    with_lora = SparseContextGenerator.from_pretrained(tiny_model_dir, lora=lora_file)
    a = plain.generate("a cat", num_steps=1, height=64, width=64, output_type="latent").image
    b = with_lora.generate("a cat", num_steps=1, height=64, width=64, output_type="latent").image
    assert (a - b).abs().max() > 1e-3


def test_lora_with_unknown_modules_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from sparse_context.export.loading import load_pipeline
    from sparse_context.export.lora import merge_lora

    path = tmp_path / "foreign.safetensors"
    save_file({"transformer.blocks.99.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.blocks.99.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path))
    transformer = load_pipeline(tiny_model_dir).transformer
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(LoraError, match=r"blocks\.99\.attn\.to_q \(no such module"):
        merge_lora(transformer, path)
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())  # nothing half-merged


def test_lora_with_wrong_shapes_is_refused(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    from sparse_context.export.loading import load_pipeline
    from sparse_context.export.lora import merge_lora

    path = tmp_path / "wrong.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 99),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path))
    with pytest.raises(LoraError, match=r"do not fit weight \(64, 64\)"):
        merge_lora(load_pipeline(tiny_model_dir).transformer, path)


def test_missing_lora_file(tiny_model_dir, tmp_path):
    from sparse_context.export.loading import load_pipeline
    from sparse_context.export.lora import merge_lora

    with pytest.raises(LoraError, match="--lora"):
        merge_lora(load_pipeline(tiny_model_dir).transformer, tmp_path / "nope.safetensors")


def test_missing_model_folder(tmp_path):
    from sparse_context.export.loading import load_pipeline

    with pytest.raises(ModelLoadError, match=r"model folder: got .*nope.*--model"):
        load_pipeline(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_pipeline(tmp_path / "empty")


def test_unsupported_pipeline_class(tiny_model_dir, tmp_path):
    from sparse_context.export.loading import load_pipeline

    folder = tmp_path / "other"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="Flux2KleinPipeline or Flux2KleinKVPipeline"):
        load_pipeline(folder)


def test_kv_folder_loads_as_kv_model(tiny_model_dir, tmp_path):
    from sparse_context.reference.generator import SparseContextGenerator

    folder = tmp_path / "kv"
    shutil.copytree(tiny_model_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "Flux2KleinKVPipeline"
    index.pop("is_distilled", None)
    (folder / "model_index.json").write_text(json.dumps(index))
    assert SparseContextGenerator.from_pretrained(folder).prefers_kv


def test_single_file_transformer(tiny_model_dir, tmp_path):
    """A single .safetensors transformer replaces the folder's one; a foreign file is refused."""
    from safetensors.torch import save_file

    from sparse_context.export.loading import load_pipeline, load_transformer_file

    other = load_pipeline(tiny_model_dir).transformer
    with torch.no_grad():
        for parameter in other.parameters():
            parameter.mul_(0.5)
    path = tmp_path / "transformer.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    target = load_pipeline(tiny_model_dir).transformer
    load_transformer_file(target, path)
    torch.testing.assert_close(_velocity(target), _velocity(other), atol=0, rtol=0)

    bad = tmp_path / "bad.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(bad))
    with pytest.raises(ModelLoadError, match="--transformer"):
        load_transformer_file(target, bad)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_transformer_file(target, truncated)
    with pytest.raises(ModelLoadError, match="--transformer"):
        load_transformer_file(target, tmp_path / "missing.safetensors")


def test_single_file_key_reports_name_what_is_wrong_and_prefixes_are_taken(tiny_model_dir, tmp_path):
    """A diffusers-named file with one key too many is reported as exactly that (the BFL converter used to run
    over diffusers names and report keys the file holds as missing, mangled); a ComfyUI-style prefix is taken."""
    from safetensors.torch import save_file

    from sparse_context.export.loading import load_pipeline, load_transformer_file

    source = load_pipeline(tiny_model_dir).transformer
    weights = {k: (v * 0.5).contiguous() for k, v in source.state_dict().items()}
    extra = tmp_path / "extra.safetensors"
    save_file({**weights, "extra.weight": torch.zeros(2)}, str(extra))
    target = load_pipeline(tiny_model_dir).transformer
    with pytest.raises(ModelLoadError, match=r"0 missing e.g. \[\], 1 unexpected e.g. \['extra.weight'\], 0 with "
                                             r"other shapes"):
        load_transformer_file(target, extra)
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in weights.items()}, str(prefixed))
    load_transformer_file(target, prefixed)
    for name, value in target.state_dict().items():
        torch.testing.assert_close(value, weights[name], atol=0, rtol=0)
