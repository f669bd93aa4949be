"""Error paths no other test reaches: each test is one mistake a user (or a library caller) makes, or one
environment condition, and checks the error class and the distinctive part of its message; the command-line ones
also check exit code 2 and that no traceback is printed.

Real objects throughout: the tiny seeded FLUX.2-klein, its saved folder, the onnxruntime engines built from it
(``engines_dir``) and real files under ``tmp_path``. ``monkeypatch`` only simulates what cannot be arranged for
real here: a missing optional package, a GPU torch sees, or an unwritable path for a root user (who writes
through any mode bits).
"""

from __future__ import annotations

import errno
import json
import re
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "runtime" / "samples" / "astronaut.jpg"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- helpers ------------------------------------------------------------------------------------------------------

def _cli(argv: list[str], capsys, program: str = "cli") -> str:
    """Run a command line that must be refused: exit code 2, one ``error:`` line, no traceback; its stderr."""
    if program == "cli":
        from sparse_context.cli import main
    else:
        from sparse_context.build_engines import main
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    assert err.startswith("error: "), err
    return err


def _deny_writes(monkeypatch, path: Path) -> None:
    """Make ``path`` unwritable: by its mode bits, and for root (whom they do not stop) as ``os.access`` says it."""
    os.chmod(path, 0o500 if path.is_dir() else 0o400)
    if IS_ROOT:
        real_access, denied = os.access, os.path.realpath(path)

        def access(target, mode, *args, **kwargs):
            if mode & os.W_OK and os.path.realpath(target) == denied:
                return False
            return real_access(target, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", access)


def _photo(path: Path, size: tuple[int, int] = (64, 64), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _index_json(**changes) -> dict:
    """A valid ``engines.json`` (onnxruntime CPU, kv graph and the three parts) as build_engines.py writes it."""
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.index import EnginesIndex, GraphEntry

    plan = BucketPlan(keep_fractions=(1.0,), max_refs=1, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256),), text_tokens=64).validate()
    parts = {p: GraphEntry(f"onnx/{p}/model.onnx", "0" * 64, ()) for p in ("text_encoder", "vae_encoder",
                                                                            "vae_decoder")}
    index = EnginesIndex(backend="ort-cpu", model_dir="/models/klein", precision="fp32", attention="matmul",
                         plan=plan, graphs={"kv": GraphEntry("onnx/kv/model.onnx", "0" * 64, ())}, parts=parts,
                         files={"model/model_index.json": "0" * 64}).to_json()
    index.update(changes)
    return index


def _engines_folder(tmp_path: Path, data: dict, name: str = "engines") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "engines.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def fresh_transformer(tiny_model_dir):
    """A transformer of its own (the session's generator keeps its weights untouched by these tests)."""
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


@pytest.fixture(scope="module")
def exports(engines_dir):
    """{graph or part: export folder} of the session's onnxruntime engines."""
    data = json.loads((engines_dir / "engines.json").read_text())
    entries = {**data["graphs"], **data["parts"]}
    return {name: (engines_dir / entry["onnx"]).parent for name, entry in entries.items()}


def _edited_export(source: Path, target: Path, **manifest_changes) -> Path:
    """A copy of an export folder whose manifest records other values (the graph files stay as they are)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(manifest_changes)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


# -- cli.py: output paths -----------------------------------------------------------------------------------------

def test_select_out_below_a_file_is_refused(tmp_path, capsys):
    """`select --out` names a folder inside something that is a file: nothing can be created there."""
    (tmp_path / "notes.txt").write_text("x")
    err = _cli(["select", "--ref", SAMPLE, "--out", tmp_path / "notes.txt" / "overlays"], capsys)
    assert "output folder: got" in err and "notes.txt is a file)" in err and "--out" in err
    assert not (tmp_path / "notes.txt").is_dir()


def test_generate_out_in_an_unwritable_folder_is_refused(tmp_path, capsys, monkeypatch):
    """`generate --out` into a read-only folder is refused before any model loads."""
    locked = tmp_path / "locked"
    locked.mkdir()
    _deny_writes(monkeypatch, locked)
    err = _cli(["generate", "--prompt", "a cat", "--out", locked / "x.png"], capsys)
    assert f"({locked} is not writable)" in err and "--out" in err
    assert list(locked.iterdir()) == []


def test_generate_out_over_a_read_only_file_is_refused(tmp_path, capsys, monkeypatch):
    """`generate --out` names an existing image the user may not overwrite."""
    existing = tmp_path / "keep.png"
    _photo(existing)
    before = existing.read_bytes()
    _deny_writes(monkeypatch, existing)
    err = _cli(["generate", "--prompt", "a cat", "--out", existing], capsys)
    assert f"output file: got '{existing}'; allowed: a file you can write" in err and "--out" in err
    assert existing.read_bytes() == before


# -- engines/build.py ---------------------------------------------------------------------------------------------

def _plan():
    from sparse_context.engines.buckets import BucketPlan, Resolution

    return BucketPlan(keep_fractions=(1.0,), max_refs=1, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256),), text_tokens=64)


def test_unknown_backend_is_refused(tiny_model_dir, tmp_path):
    """A library caller spells the backend TensorRT's product name instead of one of ours."""
    from sparse_context.engines.build import BuildRequest
    from sparse_context.engines.errors import BuildOptionError

    with pytest.raises(BuildOptionError, match=r"backend: got 'tensorrt'; allowed: trt, ort-cuda, ort-trt, ort-cpu "
                                               r"\(change it with --backend\)"):
        BuildRequest(model_dir=tiny_model_dir, backend="tensorrt", plan=_plan(), out_dir=tmp_path / "e").validate()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no folder can be created")
def test_engines_folder_that_cannot_be_created(tiny_model_dir):
    """`--out` is inside a folder nobody can create folders in (/proc here: refused even for root)."""
    from sparse_context.engines.build import BuildRequest, build_engines
    from sparse_context.engines.errors import BuildOptionError

    request = BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=_plan(),
                           out_dir=Path("/proc/sparse-context-engines"), precision="fp32")
    with pytest.raises(BuildOptionError, match=r"engines folder: got '/proc/sparse-context-engines'; allowed: a "
                                               r"folder that can be created and written \(.+\) \(change it with --out\)"):
        build_engines(request)


@pytest.mark.parametrize("program, argv", [
    ("cli", ["select", "--out", "{long}"]),
    ("cli", ["generate", "--prompt", "a cat", "--out", "{long}/x.png"]),
    ("cli", ["generate", "--prompt", "a cat", "--out", "{long}.png"]),
    ("build_engines", ["--demo", "--out", "{long}"]),
], ids=["select", "generate-folder", "generate-file", "build"])
def test_an_output_name_longer_than_the_file_system_takes(tmp_path, capsys, program, argv):
    """A 300-character name in --out (a path pasted twice, a generated name): refused with the flag, where the
    existence check raised OSError: File name too long."""
    long = str(tmp_path / ("n" * 300))
    err = _cli([a.replace("{long}", long) for a in argv], capsys, program=program)
    assert "allowed: names of at most 255 bytes each (change it with --out)" in err and re.search(r"\(30[04] bytes\)", err)
    assert sorted(tmp_path.iterdir()) == []


def test_engines_folder_whose_lock_file_cannot_be_opened(tiny_model_dir, tmp_path):
    """The engines folder holds a folder where the build's lock file belongs: the build cannot lock it."""
    from sparse_context.engines.build import LOCK_FILE, BuildRequest, build_engines
    from sparse_context.engines.errors import BuildOptionError

    out = tmp_path / "engines"
    (out / LOCK_FILE).mkdir(parents=True)
    request = BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=_plan(), out_dir=out, precision="fp32")
    with pytest.raises(BuildOptionError, match=r"engines folder: got '.*engines'; allowed: a folder where the build "
                                               r"can write its lock file \.build\.lock \(.*engines/\.build\.lock: Is a "
                                               r"directory\) \(change it with --out\)"):
        build_engines(request)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing exported


# -- engines/index.py ---------------------------------------------------------------------------------------------

def test_engines_json_with_provider_options_not_an_object(tmp_path, capsys):
    """A hand-edited engines.json gives the TensorRT EP options as a string."""
    data = _index_json()
    data["graphs"]["kv"]["provider_options"] = "trt_fp16_enable=1"
    folder = _engines_folder(tmp_path, data)
    err = _cli(["generate", "--prompt", "a cat", "--engines", folder, "--out", tmp_path / "x.png"], capsys)
    assert "engines.json graph 'kv' provider_options: got 'str'; allowed: an object; rebuild it on this machine " \
           "with: python build_engines.py --model " in err
    assert " --keeps 1 --max-refs 1 " in err and f"--out {folder}" in err  # the command runs as printed


@pytest.mark.parametrize("plan", [[], "256x256", {"keep_fractions": [1.0]}], ids=["list", "string", "incomplete"])
def test_engines_json_with_a_plan_of_the_wrong_shape(tmp_path, plan):
    """engines.json records a bucket plan that is not the object build_engines.py writes."""
    from sparse_context.engines.errors import EnginesIndexError
    from sparse_context.engines.index import EnginesIndex

    folder = _engines_folder(tmp_path, _index_json(plan=plan))
    with pytest.raises(EnginesIndexError, match=r"engines\.json: .*plan.*build_engines\.py"):
        EnginesIndex.read(folder)


@pytest.mark.parametrize("change, said", [
    ({"max_refs": float("inf")}, "recorded bucket plan: got"),  # json writes Infinity; int() of it overflowed
    ({"max_refs": 0}, "recorded bucket plan: maximum references: got 0; allowed: an integer >= 1"),
    ({"text_tokens": 1}, "recorded bucket plan: text tokens: got 1; allowed: an integer >= 2"),
], ids=["infinite-refs", "no-refs", "one-text-token"])
def test_engines_json_with_a_plan_out_of_range(tmp_path, capsys, change, said):
    """engines.json edited by hand: the plan parses but a value is out of range (or not finite). ``generate``
    refuses it with the value's own reason and the rebuild hint, not a traceback."""
    data = _index_json()
    data["plan"].update(change)
    folder = _engines_folder(tmp_path, data)
    err = _cli(["generate", "--prompt", "a cat", "--engines", folder, "--out", tmp_path / "x.png"], capsys)
    assert said in err and "build_engines.py" in err, err
    assert not (tmp_path / "x.png").exists()


def test_build_refuses_one_text_token_as_the_export_would(tiny_model_dir, tmp_path, capsys):
    """``--text-tokens 1`` passed the build's own check and failed later in the export without naming the flag."""
    err = _cli(["--model", tiny_model_dir, "--text-tokens", "1", "--out", tmp_path / "e"], capsys,
               program="build_engines")
    assert "text tokens: got 1; allowed: an integer >= 2 (change it with --text-tokens)" in err
    assert not (tmp_path / "e").exists()


# -- engines/model_files.py ---------------------------------------------------------------------------------------

def test_model_folder_without_a_tokenizer_cannot_be_carried(tmp_path):
    """The model folder given to the build has no tokenizer/ (only the transformer was downloaded)."""
    from sparse_context.engines.model_files import copy_model_files
    from sparse_context.runtime.errors import ModelLoadError

    model = tmp_path / "model"
    (model / "scheduler").mkdir(parents=True)
    (model / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    (model / "scheduler" / "scheduler_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"model folder: got .*; allowed: a diffusers folder with .* \(missing: "
                                             r"tokenizer/tokenizer\.json\) \(change it with --model\)"):
        copy_model_files(model, tmp_path / "engines")
    assert not (tmp_path / "engines").exists()


@pytest.mark.parametrize("left_out", ["transformer", "vae", "tokenizer"])
def test_build_refuses_a_model_folder_missing_a_part_before_exporting(tiny_model_dir, tmp_path, capsys, left_out):
    """A model folder copied without one of its subfolders: refused before any export, with nothing left in --out
    (it failed with a FileNotFoundError traceback from the exporter when the transformer was missing)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model, ignore=lambda folder, names: [left_out] if Path(folder) == Path(
        tiny_model_dir) else [])
    out = tmp_path / "engines"
    err = _cli(["--model", model, "--out", out], capsys, program="build_engines")
    assert "(missing: " in err and f"{left_out}/" in err and "(change it with --model)" in err
    assert not out.exists()


def test_engines_json_recording_no_model_files(tmp_path, capsys):
    """An engines folder whose engines.json lists no tokenizer/scheduler files cannot run prompts."""
    folder = _engines_folder(tmp_path, _index_json(files={}))
    err = _cli(["generate", "--prompt", "a cat", "--engines", folder, "--out", tmp_path / "x.png"], capsys)
    assert "engines.json records no model files (tokenizer, scheduler); rebuild it with: python build_engines.py" \
        in err
    assert not (tmp_path / "x.png").exists()


# -- engines/ort: loader, parts, backend --------------------------------------------------------------------------

def test_onnxruntime_missing(tmp_path, monkeypatch):
    """The runtime-only install lacks onnxruntime, and ONNX engines are opened."""
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(BackendOptionError, match=r"onnxruntime is not installed; `pip install "
                                                 r"sparse-context\[onnxruntime\]`"):
        OrtTransformerBackend(kv=tmp_path / "kv")


def test_corrupt_part_export_is_refused(exports, tmp_path, tiny_model_dir):
    """A VAE decoder export whose model.onnx was cut short (a copy interrupted) is opened from its folder."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.errors import EngineCorruptError
    from sparse_context.engines.ort.parts import OrtTextAndVae

    copy = _edited_export(exports["vae_decoder"], tmp_path / "vae_decoder")
    onnx = copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    with pytest.raises(EngineCorruptError, match=r"onnxruntime could not load .*model\.onnx: .* \(export it again, "
                                                 r"e\.g\. rerun build_engines\.py\)"):
        OrtTextAndVae(tiny_model_dir, vae_decoder=copy)


def test_bf16_part_export_on_onnxruntime(exports, tmp_path, tiny_model_dir):
    """A bf16 VAE decoder export (made for TensorRT) is opened on onnxruntime, whose host side has no bfloat16."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.ort.parts import OrtTextAndVae
    from sparse_context.runtime.errors import ModelLoadError

    copy = _edited_export(exports["vae_decoder"], tmp_path / "vae_decoder", precision="bf16")
    with pytest.raises(ModelLoadError, match=r"vae_decoder export precision: got 'bf16'; allowed: fp32 or fp16 "
                                             r"for onnxruntime .* \(change it with --precision\)"):
        OrtTextAndVae(tiny_model_dir, vae_decoder=copy)


def test_full_and_kv_graphs_of_different_weights(exports, tmp_path):
    """The full graph of one model is paired with a KV graph exported from other weights."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    kv = _edited_export(exports["kv"], tmp_path / "kv", base_weights_sha256="f" * 64)
    with pytest.raises(BackendOptionError, match=r"full and KV graphs: got \[.*'ffffffffffff'.*\]; allowed: exports "
                                                 r"of the same weights and LoRA"):
        OrtTransformerBackend(full=exports["full"], kv=kv)


def test_full_and_kv_graphs_of_different_precisions(exports, tmp_path):
    """The full graph is paired with a KV graph exported at another precision."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    kv = _edited_export(exports["kv"], tmp_path / "kv", precision="fp16")
    with pytest.raises(BackendOptionError, match=r"full and KV graphs: got 'different precisions'; allowed: one "
                                                 r"precision"):
        OrtTransformerBackend(full=exports["full"], kv=kv)


def test_bf16_transformer_export_on_onnxruntime(exports, tmp_path):
    """A bf16 transformer export is opened on onnxruntime, whose numpy feeds have no bfloat16."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    kv = _edited_export(exports["kv"], tmp_path / "kv", precision="bf16")
    with pytest.raises(BackendOptionError, match=r"precision of the ONNX export: got 'bf16'; allowed: fp32 or fp16 "
                                                 r".* \(change it with --precision\)"):
        OrtTransformerBackend(kv=kv)


def test_run_kv_with_new_references_but_no_buffers(exports):
    """A library caller runs the KV graph on new references without buffers for their K/V."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.runtime.tokens import grid_position_ids, reference_time, text_position_ids

    backend = OrtTransformerBackend(kv=exports["kv"])
    d, rng = backend.dims, np.random.default_rng(0)
    target = rng.standard_normal((1, 16, d.in_channels)).astype(np.float32)
    refs = rng.standard_normal((1, 16, d.in_channels)).astype(np.float32)
    text = rng.standard_normal((1, 8, d.text_dim)).astype(np.float32)
    with pytest.raises(BackendOptionError, match=r"run_kv: \d+ new reference tokens but no buffers for their K/V; call "
                                                 r"kv_extract \(it takes buffers from kv_pool\), or pass into="):
        backend.run_kv(target, grid_position_ids(4, 4), refs, grid_position_ids(4, 4, reference_time(0)), text,
                       text_position_ids(8), np.float32(0.5))


# -- export/ ------------------------------------------------------------------------------------------------------

def _model_copy(tiny_model_dir: Path, target: Path, *removed: str) -> Path:
    shutil.copytree(tiny_model_dir, target)
    for name in removed:
        for path in (target / name).glob("*.safetensors"):
            path.unlink()
    return target


def test_weights_digest_of_a_folder_without_transformer(tmp_path):
    """The model folder has model_index.json but no transformer/ (a text-encoder-only download)."""
    pytest.importorskip("torch", reason="the exporter needs torch (pip install .[torch])")
    from sparse_context.export.errors import ExportConfigError
    from sparse_context.export.exporter import weights_sha256

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    with pytest.raises(ExportConfigError, match=r"model folder: got '.*model'; allowed: a diffusers folder with "
                                                r"transformer/ \(change it with --model\)"):
        weights_sha256(tmp_path / "model", None)


def test_export_of_a_folder_whose_transformer_weights_are_missing(tiny_model_dir, tmp_path):
    """transformer/ has its config but its weights never finished downloading."""
    from sparse_context.export.exporter import ExportOptions, load_transformer
    from sparse_context.runtime.errors import ModelLoadError

    model = _model_copy(tiny_model_dir, tmp_path / "model", "transformer")
    with pytest.raises(ModelLoadError, match=r"could not load the transformer of .*model: .* \(check --model\)"):
        load_transformer(ExportOptions(model_dir=model, precision="fp32", out_dir=tmp_path / "onnx"))


def test_text_encoder_weights_missing(tiny_model_dir, tmp_path):
    """text_encoder/ has its config but no weights."""
    from sparse_context.export.text_encoder import load_text_encoder
    from sparse_context.runtime.errors import ModelLoadError

    model = _model_copy(tiny_model_dir, tmp_path / "model", "text_encoder")
    with pytest.raises(ModelLoadError, match=r"could not load the text encoder of .*model: .* \(check --model\)"):
        load_text_encoder(model)


def test_vae_weights_missing(tiny_model_dir, tmp_path):
    """vae/ has its config but no weights."""
    from sparse_context.export.vae import load_vae
    from sparse_context.runtime.errors import ModelLoadError

    model = _model_copy(tiny_model_dir, tmp_path / "model", "vae")
    with pytest.raises(ModelLoadError, match=r"could not load the VAE of .*model: .* \(check --model\)"):
        load_vae(model)


def test_transformer_checkpoint_with_foreign_keys(fresh_transformer, tmp_path):
    """--transformer is a safetensors file in BFL layout but with a block part FLUX.2 does not have."""
    import torch
    from safetensors.torch import save_file

    from sparse_context.export.loading import load_transformer_file
    from sparse_context.runtime.errors import ModelLoadError

    path = tmp_path / "other.safetensors"
    save_file({"single_blocks.0.modulation.lin.weight": torch.zeros(4, 4)}, str(path))
    before = {k: v.clone() for k, v in fresh_transformer.state_dict().items()}
    with pytest.raises(ModelLoadError, match=r"other\.safetensors: keys are neither diffusers nor BFL FLUX\.2 names "
                                             r".*check --transformer"):
        load_transformer_file(fresh_transformer, path)
    assert all(torch.equal(before[k], v) for k, v in fresh_transformer.state_dict().items())


def test_kohya_lora_missing_its_up_weights(fresh_transformer, tmp_path):
    """A Kohya-format LoRA with a lora_down but not the matching lora_up (a damaged or partial file)."""
    import torch
    from safetensors.torch import save_file

    from sparse_context.export.lora import merge_lora
    from sparse_context.runtime.errors import LoraError

    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(LoraError, match=r"LoRA file .*kohya\.safetensors could not be read as a FLUX\.2 LoRA: .* "
                                        r"\(check --lora\)"):
        merge_lora(fresh_transformer, path)


def test_dora_is_refused(fresh_transformer, tmp_path):
    """A DoRA adapter (peft use_dora=True) cannot be merged as B @ A."""
    import torch
    from safetensors.torch import save_file

    from sparse_context.export.lora import merge_lora
    from sparse_context.runtime.errors import LoraError

    path = tmp_path / "dora.safetensors"
    metadata = {"transformer.r": 4, "transformer.lora_alpha": 4, "transformer.use_dora": True}
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}, str(path),
              metadata={"lora_adapter_metadata": json.dumps(metadata)})
    with pytest.raises(LoraError, match=r"LoRA type: got 'DoRA \(use_dora=True\)'; allowed: plain LoRA .* \(change "
                                        r"it with --lora\)"):
        merge_lora(fresh_transformer, path)


@pytest.mark.parametrize("tensors", ["empty", "text-encoder-only"])
def test_lora_without_transformer_pairs(fresh_transformer, tmp_path, tensors):
    """The LoRA file holds no lora_A/lora_B pair for the transformer (empty, or a text-encoder LoRA)."""
    import torch
    from safetensors.torch import save_file

    from sparse_context.export.lora import merge_lora
    from sparse_context.runtime.errors import LoraError

    path = tmp_path / "lora.safetensors"
    save_file({} if tensors == "empty" else
              {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 64)}, str(path))
    with pytest.raises(LoraError, match=r"LoRA file: got '.*lora\.safetensors'; allowed: a file with at least one "
                                        r"lora_A/lora_B pair \(change it with --lora\)"):
        merge_lora(fresh_transformer, path)


def test_unreadable_lora_file(fresh_transformer, tmp_path, monkeypatch):
    """--lora names a file the user has no permission to read."""
    import builtins

    from sparse_context.export import model_folder
    from sparse_context.export.lora import merge_lora
    from sparse_context.runtime.errors import LoraError

    path = tmp_path / "private.safetensors"
    path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    os.chmod(path, 0)
    if IS_ROOT:  # root reads through mode 000: refuse the open as the kernel would for anyone else
        def guarded_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(model_folder, "open", guarded_open, raising=False)
    try:
        with pytest.raises(LoraError, match=r"LoRA file: got '.*private\.safetensors'; allowed: a readable "
                                            r"\.safetensors file \(Permission denied\) \(change it with --lora\)"):
            merge_lora(fresh_transformer, path)
    finally:
        os.chmod(path, 0o600)


def test_export_manifest_that_is_not_an_object(tmp_path):
    """An export folder's manifest.json was overwritten with a JSON list."""
    from sparse_context.export.errors import ExportCorruptError
    from sparse_context.export.manifest import read_export_manifest

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text("[]")
    with pytest.raises(ExportCorruptError, match=r"manifest\.json: got 'list'; allowed: the JSON object "
                                                 r"sparse_context\.export writes"):
        read_export_manifest(tmp_path / "export" / "model.onnx")


def test_export_manifest_without_the_graph_file(exports, tmp_path):
    """An export's manifest lists its files but not model.onnx (edited, or from another tool)."""
    pytest.importorskip("onnxruntime")
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.export.errors import ExportCorruptError

    kv = _edited_export(exports["kv"], tmp_path / "kv", files={})
    with pytest.raises(ExportCorruptError, match=r"manifest\.json: got \[\]; allowed: a files entry for model\.onnx "
                                                 r"with its bytes and sha256"):
        OrtTransformerBackend(kv=kv)


# -- runtime/ -----------------------------------------------------------------------------------------------------

def test_max_area_below_one_minimum_reference(tmp_path):
    """A library caller prepares references for an area smaller than one 64 x 64 px image."""
    from sparse_context.runtime.errors import InputError
    from sparse_context.runtime.selection import select_references

    with pytest.raises(InputError, match=r"max_area: got 1000; allowed: an integer of at least 4096 px"):
        select_references([_photo(tmp_path / "ref.png")], strategy="uniform", keep_fraction=0.5, max_area=1000)


def test_guidance_that_is_not_a_number(tiny_generator):
    """A library caller passes the guidance scale as a word."""
    from sparse_context.runtime.errors import InputError

    with pytest.raises(InputError, match=r"guidance scale: got 'strong'; allowed: a number from 0 to 100 "
                                         r"\(change it with --guidance\)"):
        tiny_generator.generate("a cat", guidance_scale="strong", output_type="latent")


def test_select_tokens_on_a_flat_importance():
    """A library caller scores tokens itself and passes a flat vector instead of a (rows, cols) grid."""
    from sparse_context.runtime.errors import SelectionError
    from sparse_context.runtime.selection import select_tokens

    with pytest.raises(SelectionError, match=r"importance shape: got \(16,\); allowed: \(rows, cols\)"):
        select_tokens(np.ones(16), 4, "edge", seed=0)


def test_floor_fraction_out_of_range(tmp_path):
    """A library caller asks for more than all tokens as the spread floor."""
    from sparse_context.runtime.errors import SelectionError
    from sparse_context.runtime.selection import select_references

    with pytest.raises(SelectionError, match=r"floor fraction: got 1\.5; allowed: a number in \[0, 1\]"):
        select_references([_photo(tmp_path / "ref.png")], strategy="edge", keep_fraction=0.5, floor_fraction=1.5)


def test_select_tokens_with_negative_importance():
    """A library caller's own importance map has negative scores."""
    from sparse_context.runtime.errors import SelectionError
    from sparse_context.runtime.selection import select_tokens

    importance = np.ones((4, 4))
    importance[0, 0] = -1.0
    with pytest.raises(SelectionError, match=r"importance values: got 'min -1\.0'; allowed: finite, non-negative"):
        select_tokens(importance, 4, "saliency", seed=0)


def test_global_budget_below_one_token_per_reference(tmp_path, capsys):
    """`select --allocation global` with a keep fraction that leaves fewer tokens than references."""
    refs = [_photo(tmp_path / f"ref{i}.png", seed=i) for i in range(3)]
    argv = ["select", *(a for ref in refs for a in ("--ref", ref)), "--allocation", "global", "--keep", "0.01",
            "--strategy", "edge", "--out", tmp_path / "out"]
    err = _cli(argv, capsys)
    assert "kept tokens in total: got 1; allowed: at least 3 (one per reference) (change it with --keep or --tokens)" \
        in err
    assert not (tmp_path / "out").exists()


def test_tokenizers_missing(tiny_model_dir, monkeypatch):
    """The runtime-only install lacks the tokenizers package."""
    from sparse_context.runtime.errors import ModelLoadError
    from sparse_context.runtime.tokenizer import PromptTokenizer

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ModelLoadError, match=r"tokenization needs the 'tokenizers' package \(pip install "
                                             r"tokenizers\)"):
        PromptTokenizer.from_model_dir(tiny_model_dir)


# -- calibration/ -------------------------------------------------------------------------------------------------

def test_interrupted_capture_given_as_calibration(exports, tmp_path, tiny_model_dir):
    """--calibration names a capture folder whose shards never finished writing."""
    pytest.importorskip("onnxruntime")
    from sparse_context.calibration.build import CalibrationOptions, quantize_for_build
    from sparse_context.calibration.capture import CAPTURE_FORMAT, CAPTURE_MANIFEST
    from sparse_context.calibration.errors import CalibrationError
    from sparse_context.engines.build import BuildRequest
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.export.exporter import ExportResult
    from sparse_context.export.manifest import read_export_manifest

    capture = tmp_path / "capture"
    capture.mkdir()
    (capture / CAPTURE_MANIFEST).write_text(json.dumps({"format": CAPTURE_FORMAT, "shards": {"kv-0000.npz": 4096}}))
    plan = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256),), text_tokens=64).validate()
    request = BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=plan, out_dir=tmp_path / "engines",
                           precision="int8", calibration=CalibrationOptions(
                               calibration=capture, generator_factory=lambda *a: pytest.fail("loaded a generator")))
    results = [ExportResult(exports[g] / "model.onnx", read_export_manifest(exports[g]), reused=True)
               for g in ("full", "kv")]
    with pytest.raises(CalibrationError, match=r"capture folder: got '.*capture'; allowed: a complete capture .* "
                                               r"\(change it with --calibration\)"):
        quantize_for_build(request, results, lambda paths, quantized: OrtTransformerBackend(**paths))
    assert not (tmp_path / "engines").exists()


def test_calibration_folder_with_an_empty_prompts_file(tmp_path):
    """A calibration folder has images, but prompts.txt holds only blank lines."""
    from sparse_context.calibration.dataset import load_set
    from sparse_context.calibration.errors import CalibrationConfigError

    _photo(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_text("\n   \n\n")
    with pytest.raises(CalibrationConfigError, match=r"prompts\.txt: got 'no prompts'; allowed: one prompt a line "
                                                     r"\(change it with --calibration\)"):
        load_set(tmp_path)


def test_a_calibration_set_is_read_when_the_options_are_checked(tmp_path):
    """The same empty prompts.txt is refused by the build's option check, before anything is exported (it was
    refused only after the export, when the capture read the set)."""
    from sparse_context.calibration.build import CalibrationOptions
    from sparse_context.calibration.errors import CalibrationConfigError

    _photo(tmp_path / "a.png")
    (tmp_path / "prompts.txt").write_text("\n")
    with pytest.raises(CalibrationConfigError, match=r"prompts\.txt: got 'no prompts'"):
        CalibrationOptions(calibration=tmp_path).validate()


def test_recipe_with_a_bf16_high_precision_dtype():
    """A library caller keeps the sensitive layers in bf16, which the Q/DQ graphs do not support."""
    from sparse_context.calibration.errors import CalibrationConfigError
    from sparse_context.calibration.recipe import QuantRecipe

    with pytest.raises(CalibrationConfigError, match=r"high-precision dtype: got 'bf16'; allowed: fp32, fp16"):
        QuantRecipe(mode="int8", high_precision_dtype="bf16").validate()


# -- reference/engine_benchmark.py --------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--refs", "0"], "reference counts: got [0]; allowed: integers in 1..10 (change it with --refs)"),
    (["--steps", "0"], "steps: got 0; allowed: an integer >= 1 (change it with --steps)"),
    (["--text-tokens", "1"], "text tokens: got 1; allowed: an integer >= 2 (change it with --text-tokens)"),
    (["--dtype", "bf16"], "precision: got 'bf16'; allowed: fp32 or fp16 (change it with --dtype)"),
], ids=["refs-0", "steps-0", "text-tokens-1", "bf16"])
def test_bench_engines_bad_option(argv, message, tmp_path, capsys):
    """`bench engines` with an option out of range is refused before any model is built."""
    pytest.importorskip("torch", reason="bench engines imports torch before it checks its options")
    err = _cli(["bench", "engines", *argv, "--out", tmp_path / "out", "--work-dir", tmp_path / "work"], capsys)
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_bench_engines_unknown_backend():
    """A library caller asks the engine benchmark for a backend it does not time."""
    from sparse_context.reference.engine_benchmark import EngineBenchOptions
    from sparse_context.runtime.errors import InputError

    with pytest.raises(InputError, match=r"backend: got 'ort-trt'; allowed: ort-cuda, ort-cpu \(change it with "
                                         r"--backend\)"):
        EngineBenchOptions(backend="ort-trt").validate()


def test_bench_engines_without_onnxruntime(tmp_path, capsys, monkeypatch):
    """`bench engines` on an install without onnxruntime."""
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    err = _cli(["bench", "engines", "--out", tmp_path / "out", "--work-dir", tmp_path / "work"], capsys)
    assert "onnxruntime is not installed" in err and "pip install .[onnx] for --backend ort-cpu" in err
    assert list(tmp_path.iterdir()) == []


def test_bench_engines_cuda_without_the_cuda_provider(tmp_path, capsys, monkeypatch):
    """`bench engines --device cuda` where torch sees a GPU but onnxruntime is the CPU-only build."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider, so there is nothing to refuse")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU half of the condition
    err = _cli(["bench", "engines", "--device", "cuda", "--out", tmp_path / "out", "--work-dir", tmp_path / "work"],
               capsys)
    assert "backend: got 'ort-cuda'; allowed: one whose provider this onnxruntime has" in err and "--backend" in err


# -- reference/generator.py ---------------------------------------------------------------------------------------

def test_prompt_for_a_generator_without_text_encoder(fresh_transformer):
    """A generator built from a transformer alone is given a prompt instead of prompt embeddings."""
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.errors import InputError

    generator = SparseContextGenerator(fresh_transformer)
    with pytest.raises(InputError, match=r"prompt: got 'a cat'; allowed: prompt_embeds when the model has no text "
                                         r"encoder"):
        generator.generate("a cat", output_type="latent")


def test_reference_images_and_latents_together(tiny_generator):
    """A library caller passes the reference images and also their latents."""
    import torch

    from sparse_context.runtime.errors import InputError

    latents = [torch.zeros(128, 4, 4)]
    with pytest.raises(InputError, match=r"references: got 'images and reference_latents'; allowed: one of them"):
        tiny_generator.generate("a cat", [SAMPLE], reference_latents=latents, output_type="latent")


def test_keep_fraction_with_latents_but_no_images(tiny_generator):
    """Reference latents alone cannot be scored: a keep fraction needs the images (or explicit selections)."""
    import torch

    from sparse_context.runtime.errors import InputError

    latents = [torch.zeros(128, 4, 4)]
    with pytest.raises(InputError, match=r"token selection: got 'reference_latents without images'; allowed: images "
                                         r"to score, or explicit selections"):
        tiny_generator.generate("a cat", reference_latents=latents, keep_fraction=0.5, num_steps=1,
                                output_type="latent")


# -- reference/gpu_check.py, gpu_plan.py --------------------------------------------------------------------------

def test_bench_gpu_bad_text_tokens(tmp_path, capsys):
    """`bench gpu --text-tokens 1` is refused before the plan is made."""
    err = _cli(["bench", "gpu", "--text-tokens", "1", "--dry-run", "--out", tmp_path / "out"], capsys)
    assert "text tokens: got 1; allowed: an integer >= 2 (change it with --text-tokens)" in err


def test_bench_gpu_on_cuda_without_a_usable_gpu(tmp_path, capsys):
    """`bench gpu --device cuda` where there is no GPU, or onnxruntime has no CUDA provider."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("a GPU and onnxruntime's CUDA provider are both here: the check would run")
    err = _cli(["bench", "gpu", "--config", "tiny", "--device", "cuda", "--out", tmp_path / "out",
                "--work-dir", tmp_path / "work"], capsys)
    if torch.cuda.is_available():
        assert "onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu" in err
        assert "--device cpu" in err
    else:
        assert "device: got 'cuda'; allowed: cpu (torch sees no CUDA GPU here) (change it with --device)" in err



@pytest.mark.parametrize("argv", [["bench", "engines", "--refs", "1"], ["bench", "speed"],
                                  ["bench", "gpu", "--config", "tiny", "--device", "cpu"]],
                         ids=["engines", "speed", "gpu"])
def test_benchmarks_without_torch_say_what_to_install(tmp_path, capsys, monkeypatch, argv):
    """The runtime-only install (no torch) runs a benchmark that measures against PyTorch: one error line naming
    the extra to install, where `bench engines` raised ModuleNotFoundError."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    err = _cli(argv + ["--out", tmp_path / "out"], capsys)
    assert f"{' '.join(argv[:2])} runs PyTorch" in err and "sparse-context[torch,onnx]" in err
    assert not (tmp_path / "out").exists()


def test_an_empty_image_is_refused_before_encoding(tmp_path):
    """``save_png`` of a 0x0 image (a crop that came out empty): an InputError, where OpenCV raised cv2.error."""
    from sparse_context.runtime.errors import InputError
    from sparse_context.runtime.overlay import save_png

    with pytest.raises(InputError, match=r"image to save: got 'ndarray \(0, 0, 3\) uint8'; allowed: an \(H, W, 3\) "
                                         r"uint8 RGB array, at least 1x1"):
        save_png(tmp_path / "x.png", np.zeros((0, 0, 3), np.uint8))
    assert not list(tmp_path.iterdir())


def test_an_image_mode_pillow_cannot_convert_is_an_image_error():
    """A premultiplied-alpha ("La") PIL image handed to the API: ImageError naming the mode, where Pillow's
    ValueError ("conversion from La to L not supported") escaped."""
    from PIL import Image

    from sparse_context.runtime.errors import ImageError
    from sparse_context.runtime.images import load_image

    with pytest.raises(ImageError, match=r"image mode: got 'La'; allowed: a mode Pillow can convert to RGB"):
        load_image(Image.new("La", (8, 8)))


# -- calibration/quantize.py ----------------------------------------------------------------------------------------

def test_a_capture_without_the_graph_says_what_it_holds(tmp_path):
    """Quantizing the kv graph from a capture made with --graphs full only."""
    from sparse_context.calibration.capture import Capture
    from sparse_context.calibration.errors import CalibrationError
    from sparse_context.calibration.quantize import CaptureReader

    records = [{"graph": "full", "split": "calibration", "record": 0, "shard": "shard-000.npz"},
               {"graph": "full", "split": "holdout", "record": 1, "shard": "shard-000.npz"}]
    capture = Capture(tmp_path, {"key": "k", "records": records})
    with pytest.raises(CalibrationError, match=r"no calibration records of the kv graph \(it holds: full\); capture "
                                               r"it with that graph in --graphs"):
        CaptureReader(capture, "kv")


def test_a_graph_quantized_to_nothing_names_the_exclusions(tmp_path):
    """ModelOpt wrote a graph without one Q/DQ pair (every layer excluded): a calibration error naming the flag
    whose patterns to check, not an export error."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from sparse_context.calibration.errors import CalibrationError
    from sparse_context.calibration.quantize import check_quantized

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CalibrationError, match=r"model\.onnx has no QuantizeLinear/DequantizeLinear nodes: ModelOpt "
                                               r"quantized nothing; check that --calibration-exclude leaves"):
        check_quantized(path)


# -- engines/trt (no TensorRT needed: the runner's own checks) -------------------------------------------------------

def test_engine_tensor_types_the_runner_cannot_hold():
    """An engine with a tensor type the runner has no size for, and a BF16 tensor asked for as a numpy buffer
    (no torch to hold it): each error lists the types that work and what to do."""
    from sparse_context.engines.errors import RunnerError
    from sparse_context.engines.trt.memory import _numpy_dtype
    from sparse_context.engines.trt.runner import _itemsize

    with pytest.raises(RunnerError, match=r"engine tensor type: got 'INT4'; allowed: FLOAT, HALF, BF16, .* rebuild it"):
        _itemsize("INT4")
    with pytest.raises(RunnerError, match=r"engine tensor type for numpy buffers: got 'BF16'; allowed: .*FLOAT.* "
                                          r"install torch with CUDA"):
        _numpy_dtype("BF16")


def test_an_output_path_longer_than_the_file_system_takes(tmp_path, capsys):
    """Every name fits but the path as a whole does not (over PATH_MAX): refused with the flag and the file
    system's reason, where ``exists()`` raised OSError: File name too long."""
    long = tmp_path.joinpath(*["d" * 250] * 20)  # ~5,000 bytes
    err = _cli(["select", "--out", long], capsys)
    assert "allowed: a path the file system takes (File name too long) (change it with --out)" in err
    assert sorted(tmp_path.iterdir()) == []
