"""Post-export checks on deliberately broken graphs, interrupted exports, LoRA exports and every error path."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from sparse_context.export import exporter  # noqa: E402
from sparse_context.export.checks import check_graph  # noqa: E402
from sparse_context.export.errors import (  # noqa: E402
    ExportConfigError, ExportError, GraphCheckError, ValidationError,
)
from sparse_context.export.exporter import ExportOptions, export_onnx  # noqa: E402
from sparse_context.runtime.errors import LoraError, ModelLoadError  # noqa: E402


def _options(model_dir, out_dir, **changes):
    settings = dict(model_dir=Path(model_dir), graph="full", precision="fp32", max_ref_tokens=20,
                    target_sizes=((64, 48),), out_dir=Path(out_dir))
    settings.update(changes)
    return ExportOptions(**settings)


@pytest.fixture(scope="module")
def full_export(tiny_model_dir, tmp_path_factory):
    return export_onnx(_options(tiny_model_dir, tmp_path_factory.mktemp("onnx")))


def _broken_copy(export, tmp_path, edit):
    model = onnx.load(str(export.path))
    edit(model)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def test_clean_export_passes_checks(full_export):
    summary = check_graph(full_export.path, full_export.spec, for_tensorrt=True)
    assert summary["opset"] == 19 and "Softmax" in summary["ops"]


def test_fixed_dynamic_axis_is_reported(full_export, tmp_path):
    def bake(model):
        dim = next(i for i in model.graph.input if i.name == "refs").type.tensor_type.shape.dim[1]
        dim.dim_value = 4  # what the TorchScript exporter does with the example length
    with pytest.raises(GraphCheckError, match="refs: axis 1 should be symbolic 'ref_tokens'") as caught:
        check_graph(_broken_copy(full_export, tmp_path, bake), full_export.spec)
    assert len(caught.value.problems) == 1


def test_undeclared_dynamic_axis_and_extra_input_are_reported(full_export, tmp_path):
    def loosen(model):
        dim = next(i for i in model.graph.input if i.name == "target").type.tensor_type.shape.dim[2]
        dim.dim_param = "channels"
        model.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, [1]))
    with pytest.raises(GraphCheckError) as caught:
        check_graph(_broken_copy(full_export, tmp_path, loosen), full_export.spec)
    text = str(caught.value)
    assert "target: axis 2 is 'channels', spec fixes it to 128" in text and "extra: graph input" in text


def test_float64_node_and_initializer_are_reported(full_export, tmp_path):
    def add_double(model):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(2, np.float64), "double_weight"))
        model.graph.node.append(onnx.helper.make_node("Cast", ["timestep"], ["timestep_f64"], name="to_double",
                                                      to=onnx.TensorProto.DOUBLE))
    with pytest.raises(GraphCheckError) as caught:
        check_graph(_broken_copy(full_export, tmp_path, add_double), full_export.spec)
    assert any("to_double casts to float64" in p for p in caught.value.problems)
    assert any("double_weight is float64" in p for p in caught.value.problems)


def test_tensorrt_check_rejects_opset23_ops(full_export, tmp_path):
    def modernise(model):
        model.opset_import[0].version = 23
        model.graph.node.append(onnx.helper.make_node("RMSNormalization", ["target", "target"], ["n"], name="rms"))
        model.graph.node.append(onnx.helper.make_node("Foo", ["target"], ["f"], domain="com.example"))
        model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = _broken_copy(full_export, tmp_path, modernise)
    with pytest.raises(GraphCheckError) as caught:
        check_graph(path, full_export.spec, for_tensorrt=True)
    text = str(caught.value)
    assert "opset 23 > 20" in text and "RMSNormalization" in text and "com.example::Foo" in text


def test_invalid_onnx_file_is_reported(full_export, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(GraphCheckError, match="not a valid ONNX model"):
        check_graph(path, full_export.spec)


def test_interrupted_export_leaves_nothing_a_rerun_takes_as_complete(tiny_model_dir, full_export, tmp_path,
                                                                      monkeypatch):
    copies = []

    def fast_trace(transformer, spec, options, path):  # reuse the fixture's graph: the point is the publishing
        copies.append(path)
        path.write_bytes(full_export.path.read_bytes())
    monkeypatch.setattr(exporter, "_trace", fast_trace)
    monkeypatch.setattr(exporter, "load_transformer", lambda options: (None, {"lora": None}))

    def stop_at_manifest(stage, step, total):
        if stage == "manifest":
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        export_onnx(_options(tiny_model_dir, tmp_path), progress=stop_at_manifest)
    assert copies and not copies[0].exists() and list(tmp_path.iterdir()) == []
    result = export_onnx(_options(tiny_model_dir, tmp_path))
    assert not result.reused and len(copies) == 2 and (result.path.parent / "manifest.json").is_file()
    # A damaged final folder (e.g. a deleted file) is not reused but rebuilt.
    result.path.write_bytes(b"")
    assert not export_onnx(_options(tiny_model_dir, tmp_path)).reused and len(copies) == 3


def _make_lora(model_dir: Path, path: Path, rank: int = 4) -> None:
    """A real diffusers LoRA: peft adapter on the tiny transformer, random lora_B, saved by the Klein pipeline."""
    from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = Flux2Transformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0",
                                                                                "to_qkv_mlp_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    Flux2KleinPipeline.save_lora_weights(str(path.parent), transformer_lora_layers=get_peft_model_state_dict(
        transformer), weight_name=path.name)
    return transformer


def test_lora_merged_export_equals_pytorch_with_lora(tiny_model_dir, tmp_path):
    from sparse_context.reference.validate import validate_export

    lora = tmp_path / "lora" / "style.safetensors"
    lora.parent.mkdir()
    adapted = _make_lora(Path(tiny_model_dir), lora).eval()  # peft layers, not merged
    result = export_onnx(_options(tiny_model_dir, tmp_path / "out", lora=lora))
    assert result.manifest["lora"]["sha256"] and result.manifest["lora"]["modules"] > 0
    report = validate_export(result.path, adapted, ref_token_counts=[0, 5])
    assert not report.failures, "\n".join(report.lines())
    base = exporter.load_transformer(_options(tiny_model_dir, tmp_path))[0]
    with pytest.raises(ValidationError, match="exceed"):  # the LoRA really changed the graph
        validate_export(result.path, base, ref_token_counts=[5])


def test_mismatched_lora_is_refused_before_writing(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "other.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 96),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(96, 4)}, str(lora))
    with pytest.raises(LoraError, match="do not fit"):
        export_onnx(_options(tiny_model_dir, tmp_path / "out", lora=lora))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("changes,match", [
    (dict(graph="both"), "--graph"), (dict(precision="fp8"), "--precision"), (dict(attention="flash"), "--attention"),
    (dict(opset=23), "--opset"), (dict(attention="fused", opset=19), "--opset"),
    (dict(lora=Path("/nonexistent.safetensors")), "--lora"),
])
def test_bad_options_are_refused(tiny_model_dir, tmp_path, changes, match):
    with pytest.raises(ExportConfigError, match=match):
        export_onnx(_options(tiny_model_dir, tmp_path, **changes))


def test_bad_model_folder_and_exporter_failure(tiny_model_dir, tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="--model"):
        export_onnx(_options(tmp_path / "missing", tmp_path))

    def failing_export(*args, **kwargs):
        raise RuntimeError("unsupported op")
    monkeypatch.setattr(torch.onnx, "export", failing_export)
    with pytest.raises(ExportError, match="torch.onnx.export failed for the full graph.*unsupported op"):
        export_onnx(_options(tiny_model_dir, tmp_path / "out"))
    assert [p for p in (tmp_path / "out").iterdir()] == []


def test_ort_backend_and_manifest_errors(full_export, tmp_path):
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.export.exporter import load_manifest

    with pytest.raises(BackendOptionError, match="a full graph, a KV graph or both"):
        OrtTransformerBackend()
    with pytest.raises(BackendOptionError, match="an export of the kv graph"):
        OrtTransformerBackend(kv=full_export.path)
    with pytest.raises(ExportError, match="manifest.json"):
        OrtTransformerBackend(full=tmp_path / "model.onnx")
    with pytest.raises(ExportError, match="manifest.json"):
        load_manifest(tmp_path)
    backend = OrtTransformerBackend(full=full_export.path.parent)
    with pytest.raises(BackendOptionError, match="--graph kv"):
        backend.kv_cached(None, None, None, None, None, np.float32(0.5))


def test_exports_of_another_format_are_refused(full_export, tmp_path):
    """An export written by another exporter version (format 5 stacked the kv graph's K/V in one tensor per
    family) binds tensors this runtime no longer feeds: the backend refuses it, naming both formats and the fix,
    before onnxruntime loads anything."""
    import json
    import shutil

    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.export.manifest import FORMAT_VERSION, MANIFEST

    old = tmp_path / "old"
    shutil.copytree(full_export.path.parent, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["versions"]["format"] = str(FORMAT_VERSION - 1)
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=rf"export format of .*old.*: got .{FORMAT_VERSION - 1}.; allowed: "
                                          rf"{FORMAT_VERSION}, this exporter's \(export it again: rerun "
                                          "build_engines.py"):
        OrtTransformerBackend(full=old)
    del manifest["versions"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="export format of .*: got None"):
        OrtTransformerBackend(full=old)


def test_cli_exports_and_reports_errors(tiny_model_dir, full_export, capsys, tmp_path):
    from sparse_context.export.cli import add_export_arguments, parse_size, run_export

    parser = argparse.ArgumentParser()
    add_export_arguments(parser)
    out = full_export.path.parent.parent
    args = parser.parse_args(["--model", str(tiny_model_dir), "--graph", "full", "--precision", "fp32",
                              "--max-ref-tokens", "20", "--target-size", "64x48", "--out", str(out)])
    assert run_export(args) == 0
    captured = capsys.readouterr()
    assert "full graph reused" in captured.out and "[export 1/6] hash" in captured.err
    bad = parser.parse_args(["--model", str(tiny_model_dir), "--max-ref-tokens", "1", "--out", str(tmp_path)])
    assert run_export(bad) == 2 and "--max-ref-tokens" in capsys.readouterr().err
    with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT"):
        parse_size("big")
