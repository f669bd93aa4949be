"""Bad input and faults, as a hostile but realistic user would try them, against the CLI, the builder and the API.

Every row must exit 2 (CLI) or raise our error (API) with a one-line message naming what was given, what is
allowed and the flag to change; leave nothing written; and fail in under a second, before any heavy work.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_context.runtime.errors import SparseContextError

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "runtime" / "samples" / "astronaut.jpg"
FAST_S = 1.0


@pytest.fixture
def ws(tmp_path):
    """A workspace of good and bad inputs; ``out/`` is where outputs would go."""
    (tmp_path / "ref.jpg").write_bytes(SAMPLE.read_bytes())
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("x")
    (tmp_path / "lora.bin").write_bytes(b"\x80\x04\x95pickle")
    (tmp_path / "fake.safetensors").write_text("not a safetensors file at all")
    for name, index in (("model-list", []), ("model-sd", {"_class_name": "StableDiffusionPipeline"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "model-badjson").mkdir()
    (tmp_path / "model-badjson" / "model_index.json").write_text("{nope")
    (tmp_path / "model-settings").mkdir()
    (tmp_path / "model-settings" / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    (tmp_path / "model-settings" / "sparse_context.json").write_text("[1, 2]")
    for name, data in (("engines-list", []), ("engines-empty", {}), ("engines-nographs", _index(graphs=None)),
                       ("engines-abs", _index(onnx="/etc/model.onnx")),
                       ("engines-up", _index(onnx="../other/model.onnx")), ("engines-ok", _index())):
        (tmp_path / name).mkdir()
        (tmp_path / name / "engines.json").write_text(json.dumps(data))
    return tmp_path


def _index(onnx: str = "onnx/kv/model.onnx", graphs: object = "kv") -> dict:
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.index import EnginesIndex, GraphEntry

    plan = BucketPlan(keep_fractions=(1.0,), max_refs=1, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(256, 256),), text_tokens=64).validate()
    index = EnginesIndex(backend="ort-cpu", model_dir="/models/klein", precision="fp32", attention="matmul",
                         plan=plan, graphs={"kv": GraphEntry("onnx/kv/model.onnx", "0" * 64, ())}).to_json()
    index["graphs"]["kv"]["onnx"] = onnx
    if graphs is None:
        del index["graphs"]
    return index


G = ["generate", "--prompt", "a cat", "--out", "{ws}/out/x.png"]
S = ["select", "--ref", "{ws}/ref.jpg", "--out", "{ws}/out"]
B = ["--model", "{ws}/model-sd", "--out", "{ws}/out"]

# (id, program, argv, given, flag): the message must contain `given` and name `flag`
CLI_ROWS = [
    ("width-0", "cli", G + ["--width", "0"], "got 0", "--width"),
    ("width-not-whole-tokens", "cli", G + ["--width", "100"], "got 100", "--width"),
    ("width-huge", "cli", G + ["--width", "100000"], "got 100000", "--width"),
    ("area-huge", "cli", G + ["--width", "4096", "--height", "4096"], "4096x4096", "--width/--height"),
    ("height-under-a-token", "cli", G + ["--height", "8"], "got 8", "--height"),
    ("steps-0", "cli", G + ["--steps", "0"], "got 0", "--steps"),
    ("steps-huge", "cli", G + ["--steps", "100000"], "got 100000", "--steps"),
    ("guidance-nan", "cli", G + ["--guidance", "nan"], "got nan", "--guidance"),
    ("guidance-negative", "cli", G + ["--guidance", "-1"], "got -1", "--guidance"),
    ("seed-2**64", "cli", G + ["--seed", str(2**64)], str(2**64), "--seed"),
    ("seed-negative", "cli", G + ["--seed", "-1"], "got -1", "--seed"),
    ("lora-scale-without-lora", "cli", G + ["--lora-scale", "0.5"], "LoRA scale: got 0.5", "--lora"),
    ("engines-empty-path", "cli", G + ["--engines", ""], "got ''", "--engines"),
    ("model-empty-path", "cli", G + ["--model", " "], "got ' '", "--model"),
    ("out-not-creatable-generate", "cli", ["generate", "--prompt", "a cat", "--out", "/proc/nope/x.png"],
     "/proc/nope", "--out"),
    ("out-not-creatable-select", "cli", ["select", "--out", "/proc/nope"], "/proc/nope", "--out"),
    ("out-not-creatable-demo", "cli", ["demo", "--out", "/proc/nope/demo"], "/proc/nope/demo", "--out"),
    ("out-not-creatable-export", "cli", ["export", "--model", "{ws}/model-sd", "--out", "/proc/nope"], "/proc/nope",
     "--out"),
    ("export-target-size-not-whole-tokens", "cli", ["export", "--model", "{ws}/model-sd", "--target-size",
                                                    "100x100", "--out", "{ws}/out"], "100x100", "--target-size"),
    ("selection-seed-negative", "cli", G + ["--selection-seed", "-1"], "selection seed: got -1", "--selection-seed"),
    ("lora-scale-nan", "cli", G + ["--lora-scale", "nan"], "got nan", "--lora-scale"),
    ("prompt-too-long", "cli", ["generate", "--prompt", "x" * 5000, "--out", "{ws}/out/x.png"], "5000 characters",
     "--prompt"),
    ("keep-0", "cli", G + ["--keep", "0"], "got 0.0", "--keep"),
    ("keep-above-1", "cli", G + ["--keep", "1.5"], "got 1.5", "--keep"),
    ("keep-nan", "cli", G + ["--keep", "nan"], "got nan", "--keep"),
    ("tokens-0", "cli", G + ["--tokens", "0"], "got 0", "--tokens"),
    ("ref-missing", "cli", G + ["--ref", "{ws}/missing.jpg"], "missing.jpg", "--ref"),
    ("ref-folder", "cli", G + ["--ref", "{ws}/folder"], "folder", "--ref"),
    ("eleven-refs", "cli", G + ["--ref", "{ws}/ref.jpg"] * 11, "got 11", "fewer --ref"),
    ("mask-strategy-without-mask", "cli", G + ["--ref", "{ws}/ref.jpg", "--strategy", "mask"], "no --mask",
     "--mask"),
    ("mask-with-other-strategy", "cli", G + ["--ref", "{ws}/ref.jpg", "--mask", "{ws}/ref.jpg"], "'edge'",
     "--strategy"),
    ("mask-missing", "cli", G + ["--ref", "{ws}/ref.jpg", "--strategy", "mask", "--mask", "{ws}/nomask.png"],
     "nomask.png", "--mask"),
    ("out-gif", "cli", ["generate", "--prompt", "x", "--out", "{ws}/out/x.gif"], "'.gif'", "--out"),
    ("out-is-folder", "cli", ["generate", "--prompt", "x", "--out", "{ws}/folder"], "folder", "--out"),
    ("out-under-a-file", "cli", ["generate", "--prompt", "x", "--out", "{ws}/afile/x.png"], "afile", "--out"),
    ("device-unknown", "cli", G + ["--device", "tpu"], "got 'tpu'", "--device"),
    ("model-missing", "cli", G + ["--model", "{ws}/nomodel"], "nomodel", "--model"),
    ("model-index-list", "cli", G + ["--model", "{ws}/model-list"], "a JSON list", "--model"),
    ("model-index-bad-json", "cli", G + ["--model", "{ws}/model-badjson"], "not valid JSON", "--model"),
    ("model-foreign-pipeline", "cli", G + ["--model", "{ws}/model-sd"], "StableDiffusionPipeline", "--model"),
    ("model-settings-list", "cli", G + ["--model", "{ws}/model-settings"], "a JSON list", "--model"),
    ("transformer-missing", "cli", G + ["--transformer", "{ws}/t.safetensors"], "t.safetensors", "--transformer"),
    ("lora-pickle", "cli", G + ["--lora", "{ws}/lora.bin"], "lora.bin", "--lora"),
    ("lora-not-safetensors", "cli", G + ["--lora", "{ws}/fake.safetensors"], "fake.safetensors", "--lora"),
    ("engines-missing", "cli", G + ["--engines", "{ws}/noengines"], "noengines", "--engines"),
    ("engines-json-list", "cli", G + ["--engines", "{ws}/engines-list"], "got 'list'", "--engines"),
    ("engines-json-empty", "cli", G + ["--engines", "{ws}/engines-empty"], "format None", "build_engines.py"),
    ("engines-no-graphs", "cli", G + ["--engines", "{ws}/engines-nographs"], "missing graphs", "build_engines.py"),
    ("engines-absolute-path", "cli", G + ["--engines", "{ws}/engines-abs"], "/etc/model.onnx", "--engines"),
    ("engines-path-escapes", "cli", G + ["--engines", "{ws}/engines-up"], "../other", "--engines"),
    ("engines-wrong-device", "cli", G + ["--engines", "{ws}/engines-ok", "--device", "cuda"], "got 'cuda'",
     "--device"),
    ("select-mask-without-mask", "cli", S + ["--strategy", "mask"], "no --mask", "--mask"),
    ("select-mask-other-strategy", "cli", S + ["--strategy", "edge", "--mask", "{ws}/ref.jpg"], "'edge'",
     "--strategy"),
    ("select-unreadable-mask", "cli", S + ["--strategy", "mask", "--mask", "{ws}/broken.png"], "broken.png",
     "--mask"),
    ("select-out-is-file", "cli", ["select", "--ref", "{ws}/ref.jpg", "--out", "{ws}/afile"], "afile", "--out"),
    ("select-keep-2", "cli", S + ["--keep", "2"], "got 2.0", "--keep"),
    ("select-tokens-0", "cli", S + ["--tokens", "0"], "got 0", "--tokens"),
    ("select-broken-ref", "cli", ["select", "--ref", "{ws}/broken.png", "--out", "{ws}/out", "--strategy", "edge"],
     "broken.png", "--ref"),
    ("demo-keep-0", "cli", ["demo", "--keep", "0", "--out", "{ws}/out"], "got 0", "--keep"),
    ("demo-steps-0", "cli", ["demo", "--steps", "0", "--out", "{ws}/out"], "got 0", "--steps"),
    ("build-no-model", "build", ["--out", "{ws}/out"], "None", "--model"),
    ("build-foreign-model", "build", B, "StableDiffusionPipeline", "--model"),
    ("build-target-size", "build", ["--demo", "--target-resolutions", "1000x1000", "--out", "{ws}/out"],
     "1000x1000", "--target-resolutions"),
    ("build-ref-size", "build", ["--demo", "--ref-resolution", "2048x2048", "--out", "{ws}/out"], "2048x2048",
     "--ref-resolution"),
    ("build-lora-pickle", "build", ["--demo", "--lora", "{ws}/lora.bin", "--out", "{ws}/out"], "lora.bin",
     "--lora"),
    ("build-lora-scale-nan", "build", ["--demo", "--lora-scale", "nan", "--out", "{ws}/out"], "got nan",
     "--lora-scale"),
    ("build-out-is-file", "build", ["--demo", "--out", "{ws}/afile"], "afile", "--out"),
    ("build-bf16-on-cpu", "build", ["--demo", "--precision", "bf16", "--out", "{ws}/out"], "bf16", "--precision"),
]


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Import the command-line modules once, so each row times the checks, not Python's first import."""
    import sparse_context.build_engines  # noqa: F401
    import sparse_context.cli  # noqa: F401
    import sparse_context.engines.build  # noqa: F401
    import sparse_context.export.model_folder  # noqa: F401
    import sparse_context.runtime.selection  # noqa: F401


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _run(program: str, argv: list[str]) -> int:
    if program == "cli":
        from sparse_context.cli import main
    else:
        from sparse_context.build_engines import main
    return main(argv)


def defined_flags() -> set[str]:
    """Every option string some parser of this package defines."""
    from sparse_context.build_engines import build_parser as build_engines_parser
    from sparse_context.cli import build_parser
    from sparse_context.reference.attention_kernels import build_parser as attention_kernels_parser

    flags, parsers = set(), [build_parser(), build_engines_parser(), attention_kernels_parser()]
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            flags.update(action.option_strings)
            if action.choices and isinstance(action.choices, dict):
                parsers.extend(action.choices.values())
    return flags


def _check_message(message: str, given: str, flag: str) -> None:
    assert message.startswith("error: ") or not message.startswith("Traceback"), message
    assert "\n" not in message.strip(), f"not one line:\n{message}"
    assert "Traceback" not in message
    assert given in message, f"{given!r} not in {message!r}"
    assert "allowed" in message or "rebuild it" in message, message
    assert flag in message, f"{flag!r} not in {message!r}"
    for named in re.findall(r"--[a-z][a-z0-9-]*", message):
        assert named in defined_flags(), f"{named} in {message!r} is no flag of any parser"


@pytest.mark.parametrize("row", CLI_ROWS, ids=[row[0] for row in CLI_ROWS])
def test_cli_bad_input(row, ws, capsys):
    name, program, argv, given, flag = row
    if name == "engines-wrong-device" and os.environ.get("CUDA_VISIBLE_DEVICES") is None and _has_cuda():
        pytest.skip("a CUDA device is present: --device cuda is valid for these engines' check")
    argv = [a.replace("{ws}", str(ws)) for a in argv]
    before = _files(ws)
    start = time.perf_counter()
    code = _run(program, argv)
    elapsed = time.perf_counter() - start
    captured = capsys.readouterr()
    assert code == 2, captured
    _check_message(captured.err.strip(), given, flag)
    assert _files(ws) == before, "something was written"
    assert elapsed < FAST_S, f"{elapsed:.2f}s before failing"


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def test_cuda_without_a_gpu_is_refused_before_loading(ws, capsys):
    if _has_cuda():
        pytest.skip("a CUDA device is present here")
    from sparse_context.cli import main

    assert main([a.replace("{ws}", str(ws)) for a in G] + ["--device", "cuda"]) == 2
    _check_message(capsys.readouterr().err.strip(), "got 'cuda'", "--device")


def test_unwritable_out_is_refused_before_generating(ws, capsys):
    if os.geteuid() == 0:
        pytest.skip("root can write into a read-only folder, so there is nothing to refuse")
    from sparse_context.cli import main

    locked = ws / "locked"
    locked.mkdir(mode=0o500)
    assert main(["generate", "--prompt", "x", "--out", str(locked / "x.png")]) == 2
    _check_message(capsys.readouterr().err.strip(), "locked", "--out")


# -- the Python API ----------------------------------------------------------------------------------------------
def _select_a_string(ws):
    from sparse_context.runtime.selection import select_references

    select_references(str(ws / "ref.jpg"), strategy="uniform", keep_fraction=0.1)


def _second_build_into_a_locked_folder(ws):
    from sparse_context.engines.buckets import BucketPlan
    from sparse_context.engines.build import BuildRequest, build_engines, folder_lock
    from sparse_context.reference.tiny import tiny_model_dir

    model = tiny_model_dir(ws / "cache")
    (ws / "busy").mkdir()
    request = BuildRequest(model_dir=model, backend="ort-cpu", plan=BucketPlan(), out_dir=ws / "busy",
                           precision="fp32")
    import multiprocessing

    # The lock is per open file: another process holds it as a concurrent build would.
    ready, done = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold_lock, args=(ws / "busy", ready, done))
    holder.start()
    try:
        ready.wait(10)
        build_engines(request)
    finally:
        done.set()
        holder.join(10)
    del folder_lock


def _hold_lock(folder, ready, done):
    from sparse_context.engines.build import folder_lock

    with folder_lock(folder):
        ready.set()
        done.wait(20)


def _runtime_call(**overrides):
    def call(ws, runtime):
        dims = runtime.backend.dims
        kwargs = dict(prompt_embeds=np.zeros((1, 64, dims.text_dim), np.float32),
                      reference_latents=[np.zeros((dims.in_channels, 4, 4), np.float32)], height=64, width=64)
        kwargs.update({k: v(dims) if callable(v) else v for k, v in overrides.items()})
        runtime.generate_latents(**kwargs)
    return call


def _generator_call(**overrides):
    def call(ws, generator):
        generator.generate("a cat", [], output_type="latent", **{"num_steps": 1, **overrides})
    return call


def _merge_pickle(ws, generator):
    from sparse_context.export.lora import merge_lora

    merge_lora(generator.transformer, ws / "lora.bin")


def _transformer_pickle(ws, generator):
    from sparse_context.export.loading import load_transformer_file

    (ws / "t.pt").write_bytes(b"\x80\x04pickle")
    load_transformer_file(generator.transformer, ws / "t.pt")


def _unwritable_cache(ws):
    from sparse_context.reference.tiny import tiny_model_dir

    tiny_model_dir(ws / "afile" / "cache")  # a path under a file can never be created, even by root


# (id, needs, call, given, flag); needs: None, "runtime" (engines on onnxruntime CPU) or "generator" (tiny)
API_ROWS = [
    ("select-references-string", None, _select_a_string, "ref.jpg", "--ref"),
    ("second-build-same-folder", None, _second_build_into_a_locked_folder, "busy", "--out"),
    ("tiny-cache-unwritable", None, _unwritable_cache, "afile", "SPARSE_CONTEXT_CACHE"),
    ("runtime-latent-channels", "runtime", _runtime_call(reference_latents=lambda d: [np.zeros((4, 4, 4))]),
     "(4, 4, 4)", "latent channels"),
    ("runtime-text-width", "runtime", _runtime_call(prompt_embeds=lambda d: np.zeros((1, 64, 7))), "(1, 64, 7)",
     "text width"),
    ("runtime-one-array-for-all-refs", "runtime",
     _runtime_call(reference_latents=lambda d: np.zeros((d.in_channels, 4, 4), np.float32)), "one array",
     "a list"),
    ("runtime-width-100", "runtime", _runtime_call(width=100), "got 100", "--width"),
    ("runtime-steps-0", "runtime", _runtime_call(num_steps=0), "got 0", "--steps"),
    ("runtime-keep-as-text", "runtime", _runtime_call(keep_fraction="0.1"), "keep fraction: got '0.1'", "--keep"),
    ("runtime-keep-true", "runtime", _runtime_call(keep_fraction=True), "keep fraction: got True", "--keep"),
    ("runtime-token-count-as-text", "runtime", _runtime_call(keep_fraction=None, token_count="5"),
     "reference token count: got '5'", "--tokens"),
    ("runtime-fractional-selection", "runtime", _runtime_call(keep_fraction=0.5, selections=[np.array([1.5])]),
     "float64 indices", "integer token indices"),
    ("runtime-images-per-latent", "runtime", _runtime_call(keep_fraction=0.5, reference_images=lambda d: []),
     "0 images", "one per reference latent (1)"),
    ("runtime-guidance-nan", "runtime", _runtime_call(guidance_scale=math.nan), "got nan", "--guidance"),
    ("generator-width-100", "generator", _generator_call(width=100), "got 100", "--width"),
    ("generator-width-0", "generator", _generator_call(width=0), "got 0", "--width"),
    ("generator-seed-2**64", "generator", _generator_call(seed=2**64), str(2**64), "--seed"),
    ("generator-selection-seed-float", "generator", _generator_call(selection_seed=0.5), "selection seed: got 0.5",
     "--selection-seed"),
    ("runtime-selection-seed-negative", "runtime", _runtime_call(selection_seed=-3), "selection seed: got -3",
     "--selection-seed"),
    ("generator-guidance-nan", "generator", _generator_call(guidance_scale=math.nan), "got nan", "--guidance"),
    ("generator-steps-huge", "generator", _generator_call(num_steps=10**6), "got 1000000", "--steps"),
    ("merge-pickled-lora", "generator", _merge_pickle, "lora.bin", "--lora"),
    ("load-pickled-transformer", "generator", _transformer_pickle, "t.pt", "--transformer"),
]


@pytest.fixture(scope="module")
def engine_runtime(engines_dir):
    from sparse_context.engines.runtime import EngineRuntime

    return EngineRuntime.from_engines(engines_dir)


@pytest.mark.parametrize("row", API_ROWS, ids=[row[0] for row in API_ROWS])
def test_api_bad_input(row, ws, request):
    name, needs, call, given, flag = row
    args = [ws]
    if needs == "runtime":
        args.append(request.getfixturevalue("engine_runtime"))
    elif needs == "generator":
        args.append(request.getfixturevalue("tiny_generator"))
    before = _files(ws)
    start = time.perf_counter()
    with pytest.raises(SparseContextError) as error:
        call(*args)
    elapsed = time.perf_counter() - start
    message = str(error.value)
    assert "\n" not in message and given in message and flag in message, message
    assert "allowed" in message, message
    created = _files(ws) - before
    assert not {c for c in created if not c.startswith(("cache", "busy", "t.pt"))}, created
    if name != "second-build-same-folder":  # that row starts a process and builds the tiny model first
        assert elapsed < FAST_S, f"{elapsed:.2f}s before failing"


def test_generator_is_unchanged_by_refused_calls(tiny_generator):
    """A refused LoRA leaves the weights as they were (checked before any weight changes)."""
    before = tiny_generator.model_fingerprint
    with pytest.raises(SparseContextError):
        _generator_call(width=100)(None, tiny_generator)
    assert tiny_generator.model_fingerprint == before


# -- hints name real flags -----------------------------------------------------------------------------------------
def _string_constants(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def test_every_flag_named_in_the_package_is_defined_by_a_parser():
    """Messages and help name flags; each must be one a parser of this package defines (no `--kv-cache-mb`)."""
    flags = defined_flags()
    # trtexec's own flags (a profile is printed for users who reproduce a build with it), argparse's --help, and
    # the GPU check's internal worker entry (its module parses argv itself)
    extra = {"--help", "--minShapes", "--optShapes", "--maxShapes", "--export-worker"}
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in ("tests", ".venv", ".git") or any(p.startswith(".") for p in parts):
            continue
        for line, text in _string_constants(path):
            for named in re.findall(r"(?<![\w-])--[a-zA-Z][a-zA-Z0-9-]*[a-zA-Z0-9]", text):
                if named not in flags | extra:
                    problems.append(f"{path.relative_to(ROOT)}:{line}: {named}")
    assert not problems, "flags no parser defines:\n" + "\n".join(problems)


def test_no_staging_left_behind_by_a_killed_export(tmp_path):
    """A staging folder of a process that is gone (kill -9) is removed by the next export into that folder; one
    of a live process stays."""
    from sparse_context.export.exporter import remove_abandoned_staging

    dead = tmp_path / f".staging-{2**22 + 12345}-kv-fp16-abc"
    live = tmp_path / f".staging-{os.getpid()}-kv-fp16-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    assert remove_abandoned_staging(tmp_path) == [dead]
    assert not dead.exists() and live.exists()
    shutil.rmtree(live)


def test_a_published_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path, monkeypatch):
    """``replace_folder``: the old folder is renamed aside (never half removed) and goes once the new one is in
    place; when the rename of the new one fails, the old one is back where it was and nothing is left aside."""
    from sparse_context.runtime import files

    final = tmp_path / "export"
    final.mkdir()
    (final / "model.onnx").write_bytes(b"old")
    staging = tmp_path / ".staging-new"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"new")
    files.replace_folder(staging, final)
    assert (final / "model.onnx").read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]

    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"newer")
    real_replace = os.replace

    def failing(source, target):
        if Path(source) == staging:
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(files.os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        files.replace_folder(staging, final)
    assert (final / "model.onnx").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".staging-new", "export"]  # the caller removes staging


def test_outputs_follow_the_umask(tmp_path, monkeypatch):
    """Files and folders published from temporary names get the modes an ordinary write would (not 0600/0700)."""
    from sparse_context.runtime import files
    from sparse_context.runtime.overlay import save_png

    monkeypatch.setattr(files, "_UMASK", [0o022])
    path = save_png(tmp_path / "x.png", np.zeros((16, 16, 3), np.uint8))
    assert path.stat().st_mode & 0o777 == 0o644
    folder = tmp_path / "published"
    folder.mkdir(mode=0o700)
    (folder / "f").write_bytes(b"")
    os.chmod(folder / "f", 0o600)
    files.publish_mode(folder)
    assert folder.stat().st_mode & 0o777 == 0o755 and (folder / "f").stat().st_mode & 0o777 == 0o644


def test_a_cut_prompt_is_said_on_both_paths_and_the_image_is_still_written(tiny_generator, tmp_path, capsys):
    """Prompts over the text encoder's tokens are cut as diffusers cuts them (parity), never silently: the PyTorch
    generator warns (counted as diffusers renders the prompt, even from the prompt cache), and the CLI prints one
    warning line and still writes the image."""
    from sparse_context.cli import main
    from sparse_context.runtime.errors import PromptTruncatedWarning

    long = "a cat " * 20  # the tiny tokenizer spells bytes: 145 tokens with the template, it reads 64
    for _ in range(2):  # the second call comes from the prompt cache
        with pytest.warns(PromptTruncatedWarning, match=r"prompt cut: 145 tokens .* reads 64 .* drops the last 81"):
            tiny_generator.encode_prompt(long)
    out = tmp_path / "cut.png"
    assert main(["generate", "--prompt", long, "--steps", "1", "--width", "32", "--height", "32",
                 "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "prompt cut" in line]
    assert lines == ["warning: prompt cut: 145 tokens with the chat template, the text encoder reads 64 "
                     "(max_sequence_length) and drops the last 81, as diffusers does: shorten --prompt"]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_out_jpg_is_written_as_jpeg(tmp_path, capsys):
    from sparse_context.cli import main

    out = tmp_path / "x.jpg"
    assert main(["generate", "--prompt", "a cat", "--steps", "1", "--width", "32", "--height", "32",
                 "--out", str(out)]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name


def test_damaged_tiny_cache_repairs_itself(tmp_path):
    from sparse_context.reference.tiny import tiny_model_dir

    folder = tiny_model_dir(tmp_path)
    (folder / "model_index.json").write_text("[]")
    weights = next(folder.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert tiny_model_dir(tmp_path) == folder
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "Flux2KleinPipeline"
    assert weights.stat().st_size > 100


def test_select_all_without_a_mask_says_mask_is_skipped(tmp_path, capsys):
    from sparse_context.cli import main

    assert main(["select", "--ref", str(SAMPLE), "--out", str(tmp_path / "out")]) == 0
    assert "strategy mask skipped (it needs --mask)" in capsys.readouterr().err


def test_sigterm_during_a_build_leaves_no_staging(tmp_path):
    """A build stopped with SIGTERM mid-export removes its staging folder and releases the folder lock."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "engines"
    env = dict(os.environ, SPARSE_CONTEXT_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.environ.get("PYTHONPATH", str(ROOT.parent)))
    process = subprocess.Popen([sys.executable, "-m", "sparse_context.build_engines", "--demo", "--out", str(out)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None and not list((out / "onnx").glob(".staging-*")):
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip(f"the build ended before a staging folder was seen: {process.stderr.read()[-300:]!r}")
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 128 + signal.SIGTERM
    assert not list((out / "onnx").glob(".staging-*"))
    assert not (out / "engines.json").exists()
    from sparse_context.engines.build import folder_lock

    with folder_lock(out):  # free again
        pass


def test_model_folder_with_pickled_weights_is_refused(tiny_model_dir, tmp_path):
    """diffusers would unpickle a .bin when no .safetensors is there; we load safetensors only."""
    import torch
    from safetensors.torch import load_file

    from sparse_context.export.loading import load_pipeline
    from sparse_context.runtime.errors import ModelLoadError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    weights = next((folder / "transformer").glob("*.safetensors"))
    torch.save(load_file(str(weights)), folder / "transformer" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="--model"):
        load_pipeline(folder)


def test_every_folder_and_file_of_an_engines_folder_has_the_umasks_modes(engines_dir):
    """A service user must be able to read an engines folder someone else built: nothing in it keeps the 0700 /
    0600 of ``mkdtemp`` / ``mkstemp`` (the part exports did, before ``replace_folder`` published its folder)."""
    from sparse_context.runtime.files import current_umask

    mask = current_umask()
    wrong = [(str(p.relative_to(engines_dir)), oct(p.stat().st_mode & 0o777)) for p in engines_dir.rglob("*")
             if not p.name.startswith(".") and p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~mask]
    assert wrong == []
    assert any(p.name.startswith("text_encoder") for p in (engines_dir / "onnx").iterdir())


@pytest.mark.parametrize("program", ["cli", "build", "export"])
def test_ctrl_c_is_one_line_and_exit_code_130(program, monkeypatch, capsys, tmp_path):
    """Ctrl-C prints one line, not a traceback, and exits 130 as a shell expects; what was being written was in a
    staging folder or a temporary file, which the unwinding removed."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    if program == "cli":
        from sparse_context import cli

        monkeypatch.setattr(cli, "cmd_select", interrupted)
        code = cli.main(["select", "--out", str(tmp_path / "out")])
    elif program == "build":
        import sparse_context.build_engines as build
        import sparse_context.engines.build as engines_build

        monkeypatch.setattr(engines_build, "build_engines", interrupted)
        code = build.main(["--demo", "--out", str(tmp_path / "out")])
    else:
        from sparse_context.export import cli as export_cli

        monkeypatch.setattr(export_cli, "export_graphs", interrupted)
        code = export_cli.main(["--model", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 130 and "interrupted: stopped before anything was published" in err and "Traceback" not in err


def test_a_tensorrt_build_without_tensorrt_stops_before_the_export(tmp_path, capsys):
    """The TensorRT import (and a GPU) are checked before minutes of ONNX export, not after them."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the build would run")
    import sparse_context.build_engines as build

    start = time.perf_counter()
    code = build.main(["--demo", "--backend", "trt", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "TensorRT is not installed" in err and "pip install .[tensorrt]" in err
    assert "[build] export" not in err and not (tmp_path / "out" / "onnx").exists()
    assert time.perf_counter() - start < 30


def test_guidance_on_a_distilled_model_is_said_to_do_nothing(tmp_path, capsys):
    from sparse_context.cli import main

    common = ["generate", "--prompt", "a cat", "--width", "64", "--height", "64", "--steps", "1"]
    assert main([*common, "--guidance", "7", "--out", str(tmp_path / "a.png")]) == 0
    assert "warning: --guidance 7 has no effect: this model is guidance-distilled" in capsys.readouterr().err
    assert main([*common, "--out", str(tmp_path / "b.png")]) == 0
    assert "--guidance" not in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # what the warning says
