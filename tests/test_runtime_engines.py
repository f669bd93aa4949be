"""build_engines + the thin runtime on onnxruntime CPU equal the PyTorch reference generator (tiny model, fp32).

Tolerance 1e-4 absolute on latents: onnxruntime and PyTorch run different fp32 kernels (measured ~1e-6 per call),
accumulated over the denoising steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the engines runtime test needs onnxruntime (pip install .[onnx])")

ATOL = 1e-4


def test_engines_manifest(engines_dir):
    engines = json.loads((engines_dir / "engines.json").read_text())
    assert engines["backend"] == "ort-cpu" and set(engines["graphs"]) == {"full", "kv"}
    steps = {(p["bucket"], p["step"]) for p in engines["graphs"]["kv"]["profiles"]}
    assert {step for _, step in steps} == {"extract", "cached"}  # both KV steps in one engine


@pytest.mark.parametrize("settings", [dict(keep_fraction=1.0), dict(keep_fraction=0.1, strategy="edge"),
                                      dict(keep_fraction=0.1, strategy="saliency", use_kv=True)],
                         ids=["dense", "sparse", "sparse_kv"])
def test_ort_generation_equals_pytorch(engines_dir, tiny_generator, reference_photos, settings):
    from sparse_context.reference.generator import SparseContextGenerator

    runtime = SparseContextGenerator.from_engines(engines_dir)
    kwargs = dict(num_steps=3, seed=2, output_type="latent", height=96, width=96, **settings)
    ours = runtime.generate("a red bicycle", reference_photos, **kwargs)
    reference = tiny_generator.generate("a red bicycle", reference_photos, **kwargs)
    assert ours.ref_tokens == reference.ref_tokens
    np.testing.assert_allclose(ours.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)


def test_persistent_cache_second_call(engines_dir, tiny_generator, reference_photos):
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    runtime = SparseContextGenerator.from_engines(engines_dir)
    runtime.kv_cache = ReferenceKVCache(64 << 20)
    kwargs = dict(keep_fraction=0.1, strategy="edge", use_kv=True, num_steps=2, seed=1, output_type="latent",
                  height=64, width=64)
    first = runtime.generate("a harbour", reference_photos, **kwargs)
    second = runtime.generate("a harbour", reference_photos, **kwargs)
    assert not first.cache_hit and second.cache_hit
    np.testing.assert_allclose(second.image.numpy(), first.image.numpy(), atol=1e-6, rtol=0)
    reference = tiny_generator.generate("a harbour", reference_photos, **kwargs)
    np.testing.assert_allclose(second.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)


def test_split_projection_engines_generate_what_pytorch_does(tiny_model_dir, tiny_generator, reference_photos,
                                                            tmp_path):
    """build_engines.py --projections split (one product per slice of each fused projection): the engines folder
    records it, its rebuild command repeats it, and sparse + KV generation equals the PyTorch reference."""
    from sparse_context.engines.build import BuildRequest, build_command, build_engines
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.reference.generator import SparseContextGenerator

    plan = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(64, 64),), text_tokens=64).validate()
    out = tmp_path / "engines"
    build_engines(BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=plan, out_dir=out,
                               precision="fp32", projections="split"))
    index = EnginesIndex.read(out)
    assert index.projections == "split"
    assert all(json.loads(index.path(e.onnx).with_name("manifest.json").read_text())["projections"] == "split"
               for e in index.graphs.values())
    assert "--projections split" in build_command(index, "/o")
    runtime = SparseContextGenerator.from_engines(out)
    kwargs = dict(keep_fraction=0.1, strategy="saliency", use_kv=True, num_steps=3, seed=4, output_type="latent",
                  height=64, width=64)
    ours = runtime.generate("a red bicycle", reference_photos, **kwargs)
    reference = tiny_generator.generate("a red bicycle", reference_photos, **kwargs)
    np.testing.assert_allclose(ours.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)


def test_projection_default_is_split_on_onnxruntime_cuda_only(tiny_model_dir, tmp_path):
    """Unless --projections is given, ort-cuda builds split the projections (measured faster on an H200), every
    other backend and the quantized precisions keep them fused; a rebuild command names the form only when it is
    not the default of the backend and precision it rebuilds for."""
    from dataclasses import replace

    from sparse_context.engines.buckets import BucketPlan
    from sparse_context.engines.build import BuildRequest, build_command, default_projections
    from sparse_context.engines.index import EnginesIndex

    assert [default_projections(b, p) for b, p in (("ort-cuda", "fp16"), ("ort-cuda", "bf16"), ("ort-cuda", "int8"),
                                                   ("ort-cuda", "fp8"), ("trt", "fp16"), ("ort-trt", "fp16"),
                                                   ("ort-cpu", "fp32"))] == \
        ["split", "split", "fused", "fused", "fused", "fused", "fused"]
    request = dict(model_dir=tiny_model_dir, plan=BucketPlan(), out_dir=tmp_path / "e")
    assert BuildRequest(backend="ort-cuda", **request).projections == "split"
    assert BuildRequest(backend="ort-cuda", precision="int8", **request).projections == "fused"
    assert BuildRequest(backend="ort-cuda", projections="fused", **request).projections == "fused"
    assert BuildRequest(backend="trt", **request).projections == "fused"
    index = EnginesIndex(backend="ort-cuda", model_dir="/m", precision="fp16", attention="mha", plan=BucketPlan(),
                         graphs={}, providers=("CUDAExecutionProvider",), projections="split")
    assert "--projections" not in build_command(index, "/o")  # split is ort-cuda's default
    assert "--projections fused" in build_command(replace(index, projections="fused"), "/o")
    assert "--projections split" in build_command(index, "/o", backend="trt")  # not TensorRT's default
    assert "--projections" not in build_command(index, "/o", precision="int8")  # quantized: fused only


def test_projection_flag_errors(tiny_model_dir, tmp_path, capsys):
    from sparse_context.build_engines import main
    from sparse_context.engines.build import PROJECTIONS
    from sparse_context.export.graphs import PROJECTION_FORMS

    assert PROJECTIONS == PROJECTION_FORMS  # the build's choices are the exporter's forms
    assert main(["--model", str(tiny_model_dir), "--backend", "ort-cpu", "--precision", "int8", "--projections",
                 "split", "--out", str(tmp_path / "e")]) == 2
    error = capsys.readouterr().err
    assert "projection form for int8: got 'split'" in error and "--projections" in error
    assert not (tmp_path / "e").exists()
    with pytest.raises(SystemExit):
        main(["--demo", "--projections", "diagonal"])
    from sparse_context.engines.buckets import BucketPlan
    from sparse_context.engines.build import BuildRequest
    from sparse_context.engines.errors import BuildOptionError

    request = BuildRequest(model_dir=tiny_model_dir, backend="ort-cpu", plan=BucketPlan(), out_dir=tmp_path / "e",
                           projections="diagonal")
    with pytest.raises(BuildOptionError, match="projection form: got 'diagonal'; allowed: fused or split.*"
                                               "--projections"):
        request.validate()


def test_build_engines_cli_demo_and_errors(tmp_path, capsys, monkeypatch):
    from sparse_context.build_engines import main

    assert main(["--backend", "ort-cpu"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--backend", "ort-cpu", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--demo", "--backend", "tensorflow"])


def test_engines_json_errors_name_the_fix(tmp_path):
    from sparse_context.engines.errors import BuildOptionError, EnginesIndexError
    from sparse_context.engines.index import FORMAT_VERSION
    from sparse_context.reference.generator import SparseContextGenerator

    (tmp_path / "engines.json").write_text(json.dumps({"format": FORMAT_VERSION, "backend": "tpu", "model_dir": "m",
                                                       "precision": "fp32", "attention": "matmul", "plan": {},
                                                       "graphs": {"kv": {}}}))
    with pytest.raises(BuildOptionError, match="'tpu'.*--backend"):
        SparseContextGenerator.from_engines(tmp_path)
    with pytest.raises(EnginesIndexError, match="engines.json written by build_engines.py.*--engines"):
        SparseContextGenerator.from_engines(tmp_path / "missing")


def test_trt_progress_events_become_build_progress():
    from sparse_context.engines.build import _trt_progress
    from sparse_context.engines.trt.loader import BuildProgress

    seen = []
    report = _trt_progress("kv", lambda stage, done, total: seen.append((stage, done, total)))
    for event in (BuildProgress("start", "Building", None, 0, 3), BuildProgress("step", "Building", None, 2, 3),
                  BuildProgress("finish", "Building")):
        report(event)
    assert seen == [("trt kv: Building", 2, 3)]


def test_ort_kv_in_place_pooled_and_uploaded_once(engines_dir, reference_photos):
    """The extract step writes K/V into a pooled buffer of the bucket maximum (no copy: the state's arrays are
    views of it); the second image reuses the buffer; prompt and references go to the device once per image, RoPE
    tables once for both."""
    from sparse_context.reference.generator import SparseContextGenerator

    ours = SparseContextGenerator.from_engines(engines_dir)
    backend = ours.backend
    kwargs = dict(keep_fraction=0.1, use_kv=True, num_steps=4, output_type="latent", height=64, width=64)
    first = ours.generate("a harbour", reference_photos, **kwargs)
    state = first.kv_state
    assert state.buffers.capacity_tokens == backend.selector.plan.bucket_for(state.num_ref_tokens).max_ref_tokens
    assert np.shares_memory(state.keys, state.buffers.keys) and np.abs(state.keys).max() > 0
    # 3 cached steps re-use the prompt (this image's) and the RoPE tables (kept for later images too)
    assert backend.static.hits >= 3 and backend.lasting.hits >= 2 * 3
    # The per-layer K/V tensors are bound twice (the extract's outputs, the cached steps' inputs), not per call.
    assert backend.kv_binds == 2
    first_latents = np.array(first.image, copy=True)
    del first, state
    uploads = backend.lasting.misses
    second = ours.generate("a harbour", reference_photos, **kwargs)
    assert backend.kv_pool.stats.allocations == 1 and backend.kv_pool.stats.reuses == 1
    assert backend.kv_binds == 2  # the same buffer and token count: the same bindings
    np.testing.assert_array_equal(np.asarray(second.image), first_latents)  # reused bindings, the same latents
    # The second image at the same size and selection: every RoPE table from the first (host and device copies).
    assert backend.lasting.misses == uploads and backend.feeds.lasting.hits >= 2


def test_ort_request_outside_the_plan(engines_dir):
    from conftest import photo

    from sparse_context.engines.errors import ProfileError
    from sparse_context.reference.generator import SparseContextGenerator

    ours = SparseContextGenerator.from_engines(engines_dir)
    large = [photo(seed, 512, 512) for seed in range(3)]
    with pytest.raises(ProfileError, match="3072 reference tokens .*nearest profile keep1.00"):
        ours.generate("x", large, num_steps=1, output_type="latent", height=64, width=64)


def test_kv_buffer_pool():
    from sparse_context.runtime.errors import InputError
    from sparse_context.runtime.kv_buffers import EngineKVState, KVBufferPool

    freed = []
    pool = KVBufferPool(lambda n: np.zeros(n, np.uint8), token_bytes=8, free=freed.append, max_idle=1)
    small, large = pool.acquire(10), pool.acquire(100)
    assert small.nbytes == 2 * 80 and large.capacity_tokens == 100
    pool.release(small)
    pool.release(large)  # only one idle buffer pair is kept: the smaller one is freed
    assert len(freed) == 2 and pool.stats.idle == 1
    again = pool.acquire(50)  # served by the 100-token buffers
    assert again is large and pool.stats.reuses == 1
    state = EngineKVState(again, (1, 1, 7, 1, 2), np.float32, lambda b, s: np.frombuffer(b, np.float32,
                                                                                          int(np.prod(s))).reshape(s))
    pool.track(state, again)
    del state
    assert pool.acquire(100) is large  # back in the pool once its state was dropped
    with pytest.raises(InputError, match="at most 100"):
        EngineKVState(large, (1, 1, 101, 1, 2), np.float32, None)
    with pytest.raises(InputError, match="bytes per K/V token"):
        KVBufferPool(lambda n: None, token_bytes=0)


def test_kv_buffer_pool_with_buffers_of_different_sizes_idle():
    from sparse_context.runtime.kv_buffers import KVBufferPool

    pool = KVBufferPool(lambda n: np.zeros(n, np.uint8), token_bytes=4, max_idle=3)
    buffers = [pool.acquire(n) for n in (10, 40, 20)]
    for b in buffers:
        pool.release(b)
    assert pool.acquire(15) is buffers[2] and pool.acquire(5) is buffers[0] and pool.acquire(30) is buffers[1]


def test_host_io_mode_gives_the_same_result(engines_dir, reference_photos):
    """Host buffers (what a plain session.run does) and device buffers run the same graph: identical latents."""
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.reference.generator import SparseContextGenerator

    ours = SparseContextGenerator.from_engines(engines_dir)
    kwargs = dict(keep_fraction=0.1, use_kv=True, num_steps=2, output_type="latent", height=64, width=64)
    device = ours.generate("a harbour", reference_photos, **kwargs).image.numpy()
    ours.backend.set_io_device("cpu")
    host = ours.generate("a harbour", reference_photos, **kwargs).image.numpy()
    np.testing.assert_array_equal(device, host)
    with pytest.raises(BackendOptionError, match="I/O device: got 'cuda'; allowed: cpu or cpu"):
        ours.backend.set_io_device("cuda")


def test_ort_backend_argument_errors(engines_dir):
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    index = EnginesIndex.read(engines_dir)
    kv = index.path(index.graphs["kv"].onnx)
    with pytest.raises(BackendOptionError, match=r"execution providers: got \[\]; allowed: at least one"):
        OrtTransformerBackend(kv=kv, providers=())
    with pytest.raises(BackendOptionError, match="execution provider: got 'ROCMExecutionProvider'"):
        OrtTransformerBackend(kv=kv, providers=("ROCMExecutionProvider",))
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # refused up front, not a CPU fallback
        with pytest.raises(BackendOptionError, match=r"execution provider: got 'CUDAExecutionProvider'; allowed: "
                                                     r"one this onnxruntime has.*onnxruntime-gpu.*--backend"):
            OrtTransformerBackend(kv=kv, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    backend = OrtTransformerBackend(kv=kv)
    with pytest.raises(BackendOptionError, match="kv_state: got 'tuple'.*EngineKVState"):
        backend.kv_cached(np.zeros((1, 4, 128), np.float32), np.zeros((4, 4), np.int64), (None, None),
                          np.zeros((1, 64, backend.dims.text_dim), np.float32), np.zeros((64, 4), np.int64),
                          np.float32(0.5))


def _build_flags() -> set[str]:
    from sparse_context.build_engines import build_parser

    return {flag for action in build_parser()._actions for flag in action.option_strings}


def test_generate_with_engines_refuses_options_fixed_at_build_time(engines_dir, tmp_path, capsys):
    """Every option the engines fixed is refused when it differs, in one error listing each with the
    build_engines.py command that would build engines for it (and those commands name only real flags)."""
    from sparse_context.cli import main

    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"not read: the engines were built without a LoRA")
    other_model = tmp_path / "other-model"
    base = ["generate", "--engines", str(engines_dir), "--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert main(base + ["--lora", str(lora), "--dtype", "fp16", "--model", str(other_model),
                        "--transformer", str(tmp_path / "t.safetensors")]) == 2
    error = capsys.readouterr().err
    assert f"--engines {engines_dir} fixes these options at build time" in error
    for expected in ("--lora", "built without a LoRA", "--dtype fp16: the engines were built in fp32",
                     f"--model {other_model}: the engines were built from", "--transformer",
                     "without a transformer checkpoint"):
        assert expected in error
    commands = [line.split("build: ", 1)[1] for line in error.splitlines() if "build: " in line]
    assert len(commands) == 4 and all(c.startswith("python build_engines.py ") for c in commands)
    assert f"--lora {lora}" in commands[2] and "--precision fp16" in commands[3]
    flags = _build_flags()
    for command in commands:
        assert {word for word in command.split() if word.startswith("--")} <= flags, command
    assert main(base + ["--lora-scale", "0.5"]) == 2
    assert "--lora-scale 0.5: the engines were built without a LoRA, so there is nothing to scale" in \
        capsys.readouterr().err
    assert main(base + ["--device", "cuda"]) == 2
    assert "device: got 'cuda'; allowed: cpu: these engines were built for --backend ort-cpu" in \
        capsys.readouterr().err


def test_generate_with_engines_accepts_the_options_they_were_built_with(engines_dir, tiny_model_dir, tmp_path,
                                                                        capsys):
    from sparse_context.cli import main

    out = tmp_path / "same.png"
    assert main(["generate", "--engines", str(engines_dir), "--prompt", "x", "--model", str(tiny_model_dir),
                 "--dtype", "fp32", "--device", "cpu", "--steps", "1", "--width", "64", "--height", "64",
                 "--out", str(out)]) == 0
    assert out.is_file() and "image:" in capsys.readouterr().out


def test_one_wait_per_image_gives_the_same_images(engines_dir, reference_photos):
    """``sync="image"``: the generation is queued on the backend's own stream and waited for once, the persistent
    K/V cache included; the latents equal those of a wait after every run bit for bit."""
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    kwargs = dict(keep_fraction=0.1, strategy="edge", use_kv=True, num_steps=3, seed=4, output_type="latent",
                  height=64, width=64)
    results = {}
    for sync in ("run", "image"):
        ours = SparseContextGenerator.from_engines(engines_dir, sync=sync)
        ours.kv_cache = ReferenceKVCache(64 << 20)
        first = ours.generate("a harbour", reference_photos, **kwargs)
        second = ours.generate("a harbour", reference_photos, **kwargs)  # every step a cached step
        assert second.cache_hit and second.kv_state.keys.shape == first.kv_state.keys.shape
        results[sync] = (first.image.numpy(), second.image.numpy(), np.array(second.kv_state.keys))
        if sync == "image":
            assert ours.backend.stream.synchronizations == 2  # one per image: its final latents
    for run, image in zip(results["run"], results["image"]):
        assert run.tobytes() == image.tobytes()


def test_sync_option_errors(engines_dir, tmp_path, capsys):
    from dataclasses import replace

    from sparse_context.cli import main
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.index import EnginesIndex, open_backend
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.engines.ort.loader import with_default_options
    from sparse_context.engines.streams import CudaStream, import_cudart

    index = EnginesIndex.read(engines_dir)
    kv = index.path(index.graphs["kv"].onnx)
    with pytest.raises(BackendOptionError, match="synchronization: got 'step'; allowed: run or image.*--sync"):
        OrtTransformerBackend(kv=kv, sync="step")
    backend = OrtTransformerBackend(kv=kv)  # created without a stream of its own: it cannot start queueing
    with pytest.raises(BackendOptionError, match="got 'image'; allowed: run \\(this backend was created with "
                                                 "sync='run'"):
        backend.set_sync("image")
    queued = OrtTransformerBackend(kv=kv, sync="image")
    queued.set_sync("run")
    assert queued.sync == "run" and queued.stream is not None
    with pytest.raises(BackendOptionError, match="TensorRT engines queue a whole generation.*--sync"):
        open_backend(replace(index, backend="trt"), sync="run")
    # Both GPU providers are bound to the stream; the CPU provider has none.
    given = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    options = {p if isinstance(p, str) else p[0]: {} if isinstance(p, str) else p[1]
               for p in with_default_options(given, 1, stream=1234)}
    for gpu in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        assert options[gpu]["user_compute_stream"] == "1234" and options[gpu]["device_id"] == "1"
    assert options["CPUExecutionProvider"] == {}
    assert "user_compute_stream" not in dict(with_default_options(("CUDAExecutionProvider",))[0][1])
    # The CUDA stream needs cuda-python; without it the error names the package and the flag that avoids it.
    import sys

    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "cuda" or name.startswith("cuda.")}
    sys.modules["cuda"] = None
    try:
        with pytest.raises(BackendOptionError, match="cuda-python is not installed.*onnxruntime-gpu.*--sync run"):
            CudaStream(0)
    finally:
        del sys.modules["cuda"]
        sys.modules.update(saved)
    # Unless told, onnxruntime CUDA engines wait once per image (cuda-python present) and every other backend
    # after every run; without cuda-python, CUDA engines fall back to a wait after every run and say how to avoid it.
    from sparse_context.engines.index import default_sync

    assert default_sync(index) == "run" and open_backend(index).sync == "run"  # this folder is ort-cpu
    assert default_sync(replace(index, backend="ort-trt")) == "run"
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name == "cuda" or name.startswith("cuda.")}
    sys.modules["cuda"] = None
    try:
        with pytest.warns(RuntimeWarning, match="cuda-python is not installed.*after every run.*onnxruntime-gpu.*"
                                                "--sync run"):
            assert default_sync(replace(index, backend="ort-cuda")) == "run"
    finally:
        del sys.modules["cuda"]
        sys.modules.update(saved)
    try:
        import_cudart()
    except BackendOptionError:
        pass
    else:
        assert default_sync(replace(index, backend="ort-cuda")) == "image"
    # The CLI: --sync belongs to --engines.
    code = main(["generate", "--prompt", "x", "--sync", "image", "--out", str(tmp_path / "x.png")])
    assert code == 2 and "synchronization: got 'image'; allowed: set only with --engines" in capsys.readouterr().err


def test_ref_stream_option_of_the_build(tiny_model_dir, tmp_path, capsys):
    """build_engines.py --ref-stream plain: ort-cuda only (the other backends' MatMul attention has no guards to
    remove; the quantized recipes keep the graph they name), recorded in the index and repeated by its rebuild
    command; an index written before the option reads as guarded."""
    from dataclasses import replace

    from sparse_context.build_engines import main
    from sparse_context.engines.buckets import BucketPlan
    from sparse_context.engines.build import BuildRequest, build_command
    from sparse_context.engines.errors import BuildOptionError
    from sparse_context.engines.index import EnginesIndex, GraphEntry

    request = dict(model_dir=tiny_model_dir, plan=BucketPlan(keep_fractions=(0.1,)), out_dir=tmp_path / "e")
    assert BuildRequest(backend="ort-cuda", ref_stream="plain", **request).validate().ref_stream == "plain"
    # The unfused reference attention's scores at the plan's largest extract: the default plan (6 dense 1024^2
    # references, 24,576 tokens) would need 2.2 GiB per layer at the tiny model's 2 heads in fp16.
    with pytest.raises(BuildOptionError, match=r"plan of up to 24576 reference tokens: got 'plain'; allowed: "
                                               r"guarded: .* 2\.2 GiB of scores .*--keeps, --max-refs.*--ref-stream"):
        BuildRequest(backend="ort-cuda", ref_stream="plain", **{**request, "plan": BucketPlan()}).validate()
    assert BuildRequest(backend="ort-cuda", **{**request, "plan": BucketPlan()}).validate().ref_stream == "guarded"
    for backend, precision in (("ort-cpu", "fp32"), ("trt", "fp16"), ("ort-cuda", "int8")):
        with pytest.raises(BuildOptionError, match=f"reference stream form for {backend} {precision}: got 'plain'; "
                                                   "allowed: guarded.*ort-cuda.*--ref-stream"):
            BuildRequest(backend=backend, precision=precision, ref_stream="plain", **request).validate()
    with pytest.raises(BuildOptionError, match="reference stream form: got 'bare'; allowed: guarded or plain"):
        BuildRequest(backend="ort-cuda", ref_stream="bare", **request).validate()
    assert main(["--demo", "--ref-stream", "plain", "--out", str(tmp_path / "d")]) == 2  # ort-cpu: refused
    assert "--ref-stream" in capsys.readouterr().err and not (tmp_path / "d").exists()
    index = EnginesIndex(backend="ort-cuda", model_dir="/m", precision="fp16", attention="mha", plan=BucketPlan(),
                         graphs={}, providers=("CUDAExecutionProvider",), projections="split", ref_stream="plain")
    entry = GraphEntry(onnx="onnx/kv/model.onnx", onnx_sha256="0" * 64, reused_export=False, profiles=())
    written = replace(index, graphs={"kv": entry}).to_json()
    assert EnginesIndex.from_json(written).ref_stream == "plain"
    older = dict(written)
    del older["ref_stream"]
    assert EnginesIndex.from_json(older).ref_stream == "guarded"
    assert "--ref-stream plain" in build_command(index, "/o")
    assert "--ref-stream" not in build_command(replace(index, ref_stream="guarded"), "/o")
    assert "--ref-stream" not in build_command(index, "/o", backend="trt")  # not a TensorRT option
