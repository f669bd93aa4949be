"""The torch-free pipeline on an engines folder equals the PyTorch generator, and runs without torch.

Parity (tiny model, fp32, onnxruntime CPU): same prompt, same references, same selections, same initial latents
(numpy cannot reproduce ``torch.randn``, so the noise is given to both). Final latents within 1e-4 (different fp32
kernels on both sides, accumulated over the steps; measured ~1e-6), decoded pixels within 2 levels (uint8
rounding where the fp32 images differ right at a .5 boundary; measured at most 1).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the engines need onnxruntime (pip install .[onnxruntime])")

ROOT = Path(__file__).resolve().parent.parent
ATOL = 1e-4
PIXEL_LEVELS = 2
PROMPT = "a red bicycle"
# Imports that make a run not torch-free; the subprocess turns each into an ImportError.
BLOCKED = ("torch", "diffusers", "transformers", "safetensors", "onnx", "onnxscript")


@pytest.fixture(scope="module")
def pipeline(engines_dir):
    from sparse_context.engines.pipeline import EnginePipeline

    return EnginePipeline.from_engines(engines_dir)


def _noise(tokens: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, tokens, 128)).astype(np.float32)


@pytest.mark.parametrize("settings", [dict(keep_fraction=1.0), dict(keep_fraction=0.1, strategy="edge"),
                                      dict(keep_fraction=0.1, strategy="saliency", use_kv=True)],
                         ids=["dense", "sparse", "sparse_kv"])
def test_pipeline_equals_pytorch_generator(pipeline, tiny_generator, reference_photos, settings):
    import torch

    latents = _noise(6 * 6)
    kwargs = dict(num_steps=3, seed=2, height=96, width=96, **settings)
    ours = pipeline.generate(PROMPT, reference_photos, latents=latents, **kwargs)
    theirs = tiny_generator.generate(PROMPT, reference_photos, latents=torch.from_numpy(latents), **kwargs)
    assert ours.ref_tokens == theirs.ref_tokens and ours.ref_tokens_available == theirs.ref_tokens_available
    for mine, reference in zip(ours.selections, theirs.selections, strict=True):
        np.testing.assert_array_equal(mine, reference)
    np.testing.assert_allclose(ours.latents, theirs.latents.numpy(), atol=ATOL, rtol=0)
    assert ours.image.dtype == np.uint8 and ours.image.shape == (96, 96, 3)
    assert np.abs(ours.image.astype(int) - np.asarray(theirs.image).astype(int)).max() <= PIXEL_LEVELS


def test_cache_hit_skips_the_vae_encoder(engines_dir, reference_photos, monkeypatch):
    """With the reference K/V cached, the second call never runs the VAE encoder engine or the token selection, and
    gives the same image; a prompt-embedding cache serves the repeated prompt."""
    from sparse_context.engines.pipeline import EnginePipeline
    from sparse_context.runtime.kv_cache import ReferenceKVCache
    from sparse_context.runtime.prompt_cache import PromptEmbeddingCache

    pipe = EnginePipeline.from_engines(engines_dir, kv_cache=ReferenceKVCache(64 << 20),
                                       prompt_cache=PromptEmbeddingCache(16 << 20))
    kwargs = dict(keep_fraction=0.1, strategy="edge", use_kv=True, num_steps=2, height=64, width=64, seed=3)
    first = pipe.generate("a harbour", reference_photos, **kwargs)
    pipe.parts.vae_encoder = None  # any use would raise InputError("vae_encoder export ...")
    import sparse_context.runtime.selection as selection

    def no_scoring(*args, **kwargs):
        raise AssertionError("the cache hit scored the references again")

    monkeypatch.setattr(selection, "select_references", no_scoring)
    second = pipe.generate("a harbour", reference_photos, **kwargs)
    assert not first.cache_hit and second.cache_hit and pipe.runtime.kv_cache.selection_stats.hits == 1
    assert [s.tolist() for s in second.selections] == [s.tolist() for s in first.selections]
    np.testing.assert_array_equal(second.latents, first.latents)
    np.testing.assert_array_equal(second.image, first.image)
    assert pipe.prompt_cache.stats.hits >= 1


def test_a_new_noise_seed_is_a_cache_hit_on_the_engines(engines_dir, reference_photos):
    """The torch-free pipeline keeps the selection across noise seeds (``selection_seed`` apart), so a new sample
    of the same request reuses the references' K/V; bad seeds are refused naming their flag."""
    from sparse_context.engines.pipeline import EnginePipeline
    from sparse_context.runtime.errors import InputError
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    pipe = EnginePipeline.from_engines(engines_dir, kv_cache=ReferenceKVCache(64 << 20))
    kwargs = dict(keep_fraction=0.1, strategy="uniform", use_kv=True, num_steps=1, height=64, width=64)
    first = pipe.generate("a harbour", reference_photos, seed=1, **kwargs)
    second = pipe.generate("a harbour", reference_photos, seed=2, **kwargs)
    assert not first.cache_hit and second.cache_hit
    assert [s.tolist() for s in second.selections] == [s.tolist() for s in first.selections]
    assert not np.array_equal(second.latents, first.latents)
    assert not pipe.generate("a harbour", reference_photos, seed=1, selection_seed=9, **kwargs).cache_hit
    for bad, message in ((dict(seed=-1), "seed: got -1.*--seed"), (dict(selection_seed=2**63),
                         "selection seed: got 9223372036854775808.*--selection-seed"),
                         (dict(num_steps=0), "got 0.*--steps"), (dict(guidance_scale=float("nan")),
                                                                  "got nan.*--guidance"),
                         (dict(height=100), "output height: got 100.*e.g. 96, 112.*--height"),
                         (dict(height=0), "output height: got 0"), (dict(width="64"), "output width: got '64'")):
        with pytest.raises(InputError, match=message):
            pipe.generate("a harbour", reference_photos, **{**kwargs, **bad})
    with pytest.raises(InputError, match=r"references: got 'ref.jpg'; allowed: a list of images.*--ref"):
        pipe.generate("a harbour", "ref.jpg", **kwargs)
    with pytest.raises(InputError, match="prompt length: got '2049 characters'"):
        pipe.generate("a" * 2049, reference_photos, **kwargs)


def test_an_output_larger_than_the_built_sizes_is_refused_before_any_engine_runs(engines_dir, tmp_path, capsys):
    """The engines were built for outputs up to 512x512 px: 1024x1024 asked for, or taken from a large first
    reference, is refused before the text, VAE or transformer engines run (on onnxruntime it would run, with
    activations nobody sized: 2048^2 on 1024^2 engines ran a 24 GB host out of memory). Smaller outputs run."""
    from sparse_context.cli import main
    from sparse_context.engines.errors import ProfileError
    from sparse_context.engines.pipeline import EnginePipeline

    from conftest import photo

    out = tmp_path / "big.png"
    code = main(["generate", "--engines", str(engines_dir), "--prompt", "a cat", "--width", "1024", "--height",
                 "1024", "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert "output of 1024x1024 px (4096 target tokens) is more than the engines' largest built output (1024 " \
           "tokens) (built for 256x256 (256 tokens), 512x512 (1024 tokens)); rebuild with --target-resolutions " \
           "256x256 512x512 1024x1024" in err
    pipe = EnginePipeline.from_engines(engines_dir)
    pipe.parts.text_encoder = pipe.parts.vae_encoder = pipe.parts.vae_decoder = None  # any use raises InputError
    before = pipe.runtime.backend.session_seconds
    with pytest.raises(ProfileError, match=r"output of 1024x768 px \(3072 target tokens\) is more than.*no size was "
                                           r"given, so the output takes the first reference's: pass a built one with "
                                           r"--width/--height"):
        pipe.generate("a cat", [photo(1, 1024, 768)], keep_fraction=0.1, num_steps=1)
    with pytest.raises(ProfileError, match="more than the engines' largest built output"):
        pipe.runtime.generate_latents(np.zeros((1, 64, pipe.runtime.backend.dims.text_dim), np.float32),
                                      width=1024, height=1024, num_steps=1)
    assert pipe.runtime.backend.session_seconds == before


def test_default_noise_is_numpy_for_the_seed(pipeline):
    """Without latents the noise is numpy's for the seed (documented: not torch's), so a seed repeats."""
    from sparse_context.engines.runtime import initial_noise

    first = pipeline.generate("x", num_steps=1, height=32, width=48, seed=5)
    given = pipeline.generate("x", num_steps=1, height=32, width=48, latents=initial_noise(5, 2 * 3, 128))
    np.testing.assert_array_equal(first.latents, given.latents)
    assert first.image.shape == (32, 48, 3) and first.ref_tokens == 0


def test_pipeline_input_errors(pipeline):
    from sparse_context.runtime.errors import InputError

    with pytest.raises(InputError, match="latents shape.*--width/--height"):
        pipeline.generate("x", num_steps=1, height=32, width=32, latents=np.zeros((1, 5, 128), np.float32))
    with pytest.raises(InputError, match="keep fraction"):
        pipeline.generate("x", keep_fraction=0.0)
    with pytest.raises(InputError, match="prompt: got 'int'"):
        pipeline.generate(3, num_steps=1, height=32, width=32)
    with pytest.raises(InputError, match="output height: got 8; allowed: an integer from 16"):
        pipeline.generate("x", num_steps=1, height=8, width=32)


def _blocked_run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter where importing torch (and the rest of the PyTorch stack) fails."""
    prelude = ("import sys\n"
               f"for name in {BLOCKED!r}:\n"
               "    sys.modules[name] = None  # `import name` now raises ImportError\n")
    import sparse_context

    # Only the folder this package is imported from: the test folders on sys.path would shadow modules.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(sparse_context.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_parent, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_generate_cli_without_torch_writes_the_pipelines_png(engines_dir, pipeline, tmp_path):
    """`sparse-context generate --engines` in a process that cannot import torch: a PNG, the same image the
    pipeline gives in this process (which waits after every run; the CLI waits once per image), and none of the
    blocked modules loaded."""
    from PIL import Image

    photo = ROOT / "runtime" / "samples" / "chelsea.jpg"
    out = tmp_path / "torchfree.png"
    args = ["generate", "--engines", str(engines_dir), "--prompt", "a cat in a spacesuit", "--ref", str(photo),
            "--keep", "0.1", "--strategy", "saliency", "--kv", "--steps", "2", "--sync", "image", "--out", str(out)]
    code = (f"from sparse_context.cli import main\n"
            f"status = main({args!r})\n"
            f"loaded = [m for m in sys.modules if m.split('.')[0] in {BLOCKED!r} and sys.modules[m] is not None]\n"
            f"print('loaded:', loaded)\n"
            f"sys.exit(status or (3 if loaded else 0))\n")
    run = _blocked_run(code, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loaded: []" in run.stdout and "image:" in run.stdout
    written = np.asarray(Image.open(out).convert("RGB"))
    expected = pipeline.generate("a cat in a spacesuit", [photo], keep_fraction=0.1, strategy="saliency",
                                 use_kv=True, num_steps=2, seed=0)
    np.testing.assert_array_equal(written, expected.image)


def test_readme_example_runs(engines_dir, tmp_path):
    """The README's embedding example, as printed, against the test engines (without torch)."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- torch-free example -->\s*```python\n(.*?)```", readme, re.S)
    assert match, "README: the torch-free example block is missing"
    example = match.group(1)
    assert 'EnginePipeline.from_engines("engines_out"' in example
    (tmp_path / "runtime" / "samples").mkdir(parents=True)
    shutil.copy(ROOT / "runtime" / "samples" / "chelsea.jpg", tmp_path / "runtime" / "samples")
    (tmp_path / "engines_out").symlink_to(engines_dir)
    run = _blocked_run(example, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    outputs = list((tmp_path / "out").glob("*.png"))
    assert outputs and all(p.stat().st_size > 0 for p in outputs)


# -- engines folders that cannot run --------------------------------------------------------------------------

@pytest.fixture
def engines_copy(engines_dir, tmp_path):
    copy = tmp_path / "engines"
    shutil.copytree(engines_dir, copy, symlinks=True)
    return copy


def test_old_folder_without_parts_is_refused_with_the_rebuild_command(engines_copy):
    from sparse_context.engines.errors import EnginesIndexError
    from sparse_context.engines.index import FORMAT_VERSION, EnginesIndex
    from sparse_context.engines.pipeline import EnginePipeline

    index = EnginesIndex.read(engines_copy)
    dataclasses.replace(index, parts={k: v for k, v in index.parts.items() if k != "vae_decoder"}).write(engines_copy)
    with pytest.raises(EnginesIndexError, match=r"no vae_decoder .*rebuild it with: python build_engines.py "
                                                r"--model .* --backend ort-cpu"):
        EnginePipeline.from_engines(engines_copy)
    data = json.loads((engines_copy / "engines.json").read_text())
    data.update(format=2)
    data.pop("parts")
    (engines_copy / "engines.json").write_text(json.dumps(data))
    with pytest.raises(EnginesIndexError, match=f"format 2; this version reads format {FORMAT_VERSION}; rebuild it") \
            as refused:
        EnginePipeline.from_engines(engines_copy)
    # The command runs as printed: model, backend, precision, the plan and the folder (a reviewer ran one without).
    command = str(refused.value).split("rebuild it on this machine with: ")[1]
    assert f"--model {data['model_dir']} --backend ort-cpu --precision fp32 --keeps" in command
    assert command.endswith(f"--out {engines_copy}")
    # Format 3: engines of stacked-K/V exports (export format 5), whose kv engine this runtime cannot feed.
    data.update(format=FORMAT_VERSION - 1, parts={})
    (engines_copy / "engines.json").write_text(json.dumps(data))
    with pytest.raises(EnginesIndexError, match=f"format {FORMAT_VERSION - 1}; this version reads format "
                                                f"{FORMAT_VERSION}; rebuild it"):
        EnginePipeline.from_engines(engines_copy)


def test_tampered_or_missing_model_files_are_refused(engines_copy):
    from sparse_context.engines.errors import EngineCorruptError
    from sparse_context.engines.pipeline import EnginePipeline
    from sparse_context.engines.runtime import EngineRuntime

    tokenizer = engines_copy / "model" / "tokenizer" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")  # one byte more: still a valid tokenizer
    with pytest.raises(EngineCorruptError, match=r"tokenizer.json changed after the build .*python build_engines"):
        EnginePipeline.from_engines(engines_copy)
    (engines_copy / "model" / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(EngineCorruptError, match=r"scheduler_config.json is missing .*python build_engines"):
        EngineRuntime.from_engines(engines_copy)


def test_text_tokens_below_the_prompt_length_are_refused(engines_copy):
    from sparse_context.engines.errors import EnginesIndexError
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.pipeline import EnginePipeline

    index = EnginesIndex.read(engines_copy)
    dataclasses.replace(index, plan=dataclasses.replace(index.plan, text_tokens=32)).write(engines_copy)
    with pytest.raises(EnginesIndexError, match="text tokens: got 32.*prompt length 64.*--text-tokens 64") as refused:
        EnginePipeline.from_engines(engines_copy)
    command = str(refused.value).split(": python ")[1]
    assert "--text-tokens 64" in command and "--text-tokens 32" not in command  # the command says what it asks


def test_build_records_parts_profiles_and_model_files(engines_dir):
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.manifest import sha256_file

    index = EnginesIndex.read(engines_dir)
    assert set(index.parts) == {"text_encoder", "vae_encoder", "vae_decoder"}
    shapes = {part: entry.profiles[0]["shapes"] for part, entry in index.parts.items()}
    assert all(len(entry.profiles) == 1 for entry in index.parts.values())
    # text: prompts of 1..text tokens; VAE encoder: 256x256 px references at 1:2 .. 2:1 (176x352 px), down to
    # one token; VAE decoder: the 256x256 and 512x512 px targets (opt: the largest)
    assert shapes["text_encoder"]["input_ids"] == [[1, 1], [1, 64], [1, 64]]
    assert shapes["vae_encoder"]["image"] == [[1, 3, 16, 16], [1, 3, 256, 256], [1, 3, 352, 352]]
    assert shapes["vae_decoder"]["latents"] == [[1, 128, 16, 16], [1, 128, 32, 32], [1, 128, 32, 32]]
    assert {"model/tokenizer/tokenizer.json", "model/scheduler/scheduler_config.json"} <= set(index.files)
    for name, digest in index.files.items():
        assert sha256_file(engines_dir / name) == digest


def test_a_mask_drawn_on_the_reference_as_given_works_in_generate_as_in_select(engines_dir):
    """``select`` maps a mask of the original image's size through the reference's resize and crop; the
    generation paths prepare the reference first, and used to refuse that mask as the wrong shape."""
    from sparse_context.engines.pipeline import EnginePipeline
    from sparse_context.runtime.errors import SelectionError
    from sparse_context.runtime.selection import select_references

    rng = np.random.default_rng(5)
    reference = (rng.random((300, 451, 3)) * 255).astype(np.uint8)  # crops to 288 x 448
    mask = np.zeros((300, 451), np.float32)
    mask[40:160, 200:420] = 1.0
    expected = select_references([reference], strategy="mask", keep_fraction=0.1, masks=[mask])[0].indices
    pipe = EnginePipeline.from_engines(engines_dir)
    result = pipe.generate("a cat", [reference], strategy="mask", masks=[mask], keep_fraction=0.1, num_steps=1,
                           height=64, width=64)
    np.testing.assert_array_equal(result.selections[0], expected)
    with pytest.raises(SelectionError, match=r"mask shape for reference 0: got \(10, 10\); allowed: the "
                                             r"reference's size as given, \(288, 448\)"):
        pipe.generate("a cat", [reference], strategy="mask", masks=[np.ones((10, 10))], keep_fraction=0.1,
                      num_steps=1, height=64, width=64)
