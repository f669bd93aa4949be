"""The TensorRT path end to end on CPU: build_engines --backend trt -> TrtTransformerBackend -> generate.

TensorRT itself is replaced by ``tests/trt_standin.py`` (same API, executes the ONNX with onnxruntime on host
memory); everything else is real: the tiny model's export, the profile per bucket and KV step, engine manifests
and checks, the runner's address binding, the K/V buffers and the sampler. Tolerance 1e-4 on latents, as for the
onnxruntime runtime (different fp32 kernels than PyTorch, accumulated over the steps). The same flow on real
TensorRT is ``test_tiny_engine_matches_onnxruntime`` (marked trt/gpu).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the stand-in executes engines with onnxruntime (pip install .[onnx])")

from trt_standin import HostMemory, make_module  # noqa: E402

ATOL = 1e-4


@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", make_module())
    memory = HostMemory()
    monkeypatch.setattr("sparse_context.engines.trt.memory.default_memory", lambda device=0: memory)
    monkeypatch.setattr("sparse_context.engines.trt.backend.default_memory", lambda device=0: memory)
    monkeypatch.setattr("sparse_context.engines.trt.runner.default_memory", lambda device=0: memory)
    return memory


@pytest.fixture(scope="module")
def trt_engines_dir(tiny_model_dir, tmp_path_factory):
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, build_engines

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "tensorrt", make_module())
        patch.setattr("sparse_context.engines.trt.memory.default_memory", lambda device=0: HostMemory())
        out = tmp_path_factory.mktemp("trt-engines")
        plan = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                          target_resolutions=(Resolution(96, 96), Resolution(64, 64)), text_tokens=64).validate()
        events = []
        build_engines(BuildRequest(model_dir=tiny_model_dir, backend="trt", plan=plan, out_dir=out,
                                   precision="fp32"), progress=lambda *event: events.append(event))
    assert any(stage.startswith("trt kv") for stage, _, _ in events)
    return out


def runtime(engines_dir, memory):
    from sparse_context.reference.generator import SparseContextGenerator

    return SparseContextGenerator.from_engines(engines_dir, memory=memory)


def test_engines_json_records_engines_and_plan(trt_engines_dir):
    from sparse_context.engines.manifest import read_manifest

    engines = json.loads((trt_engines_dir / "engines.json").read_text())
    assert engines["backend"] == "trt" and engines["plan"]["max_refs"] == 3
    for graph in ("full", "kv"):
        manifest = read_manifest(trt_engines_dir / engines["graphs"][graph]["engine"])
        steps = {p.step for p in manifest.profiles}
        assert steps == ({"full"} if graph == "full" else {"extract", "cached"})
        assert len(manifest.profiles) == len(steps) * 2  # two buckets: keep 0.10 and keep 1.0


def test_step_engines_are_built_beside_the_transformer(trt_engines_dir):
    """fp32 engines: the Euler step (also on the float32 noise) and the guidance mix, one profile over the plan's
    target sizes (1 to 36 tokens of 128 channels)."""
    from sparse_context.engines.manifest import read_manifest

    steps = json.loads((trt_engines_dir / "engines.json").read_text())["steps"]
    assert set(steps) == {"euler", "guidance"}
    for name, entry in steps.items():
        (profile,) = read_manifest(trt_engines_dir / entry["engine"]).profiles
        assert profile.name == f"steps/{name}"
        assert set(profile.shape_dict().values()) == {((1, 1, 128), (1, 36, 128), (1, 36, 128))}


@pytest.mark.parametrize("settings", [dict(keep_fraction=1.0), dict(keep_fraction=0.1, use_kv=True)],
                         ids=["dense", "sparse_kv"])
def test_device_steps_equal_host_steps_and_download_only_the_result(standin, trt_engines_dir, reference_photos,
                                                                    settings):
    """With its step engines the loop queues every call on one stream and downloads only the final latents; the
    latents are the host step's, bit for bit."""
    ours = runtime(trt_engines_dir, standin)
    backend = ours.backend
    assert backend.device_steps
    kwargs = dict(num_steps=3, seed=5, output_type="latent", height=64, width=64, **settings)
    standin.downloads.clear()
    device = ours.generate("a lighthouse", reference_photos, **kwargs)
    assert standin.downloads == [16 * backend.dims.in_channels * 4]  # 4x4 tokens of float32: the result only
    assert len(backend.step_runners["euler"].context.executions) == 3
    backend.device_steps = False
    standin.downloads.clear()
    host = ours.generate("a lighthouse", reference_photos, **kwargs)
    assert len(standin.downloads) == 3  # a velocity per step
    np.testing.assert_array_equal(device.image.numpy(), host.image.numpy())
    assert len(backend.step_runners["euler"].context.executions) == 3  # host steps ran none


def test_loop_tensors_are_refused_once_their_buffer_is_reused(standin, trt_engines_dir):
    from sparse_context.engines.errors import RunnerError
    from sparse_context.engines.trt.backend import TrtTransformerBackend

    backend = TrtTransformerBackend(_kv_only(trt_engines_dir), memory=standin)
    other = TrtTransformerBackend(_kv_only(trt_engines_dir), memory=standin)
    dims = backend.dims
    target, text = np.ones((1, 16, dims.in_channels), np.float32), np.ones((1, 64, dims.text_dim), np.float32)
    args = (np.zeros((16, 4), np.int64), None, None, text, np.zeros((64, 4), np.int64), np.float32(0.5))
    with backend.device_loop():
        first = backend.full(target, *args)
        second = backend.full(target, *args)
        assert np.array_equal(np.asarray(first), np.asarray(second))  # read before the ring comes round
        backend.full(target, *args)  # writes the first one's buffer again
        with pytest.raises(RunnerError, match="an earlier call was passed in"):
            np.asarray(first)
        with pytest.raises(RunnerError, match="another backend"):
            other.euler_step(target, second, np.float32(-0.5))
    assert isinstance(backend.full(target, *args), np.ndarray)  # outside the loop: host arrays
    backend.close()
    other.close()


@pytest.mark.parametrize("settings", [dict(keep_fraction=1.0), dict(keep_fraction=0.1, strategy="edge"),
                                      dict(keep_fraction=0.1, strategy="saliency", use_kv=True),
                                      dict(keep_fraction=1.0, use_kv=True)],
                         ids=["dense", "sparse", "sparse_kv", "dense_kv"])
def test_trt_generation_equals_pytorch(standin, trt_engines_dir, tiny_generator, reference_photos, settings):
    ours = runtime(trt_engines_dir, standin)
    kwargs = dict(num_steps=3, seed=2, output_type="latent", height=96, width=96, **settings)
    result = ours.generate("a red bicycle", reference_photos, **kwargs)
    reference = tiny_generator.generate("a red bicycle", reference_photos, **kwargs)
    assert result.ref_tokens == reference.ref_tokens
    np.testing.assert_allclose(result.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)


def test_profiles_follow_the_request(standin, trt_engines_dir, reference_photos):
    """Each call runs in its bucket's profile: sparse KV uses keep0.10 extract then keep0.10 cached."""
    ours = runtime(trt_engines_dir, standin)
    ours.generate("x", reference_photos, keep_fraction=0.1, use_kv=True, num_steps=3, output_type="latent",
                  height=64, width=64)
    context = ours.backend.runners["kv"].context
    names = [ours.backend.runners["kv"].manifest.profiles[index].name for index, *_ in context.executions]
    assert names == ["keep0.10/extract", "keep0.10/cached", "keep0.10/cached"]


def test_kv_stays_in_place_and_buffers_are_reused(standin, trt_engines_dir, reference_photos):
    """K/V are written by extract and read by cached steps at the same addresses; nothing K/V-sized is copied;
    the prompt and the references are uploaded once per image; the second image reuses the pooled buffers."""
    ours = runtime(trt_engines_dir, standin)
    backend = ours.backend
    kwargs = dict(keep_fraction=0.1, use_kv=True, num_steps=4, output_type="latent", height=64, width=64)
    standin.uploads.clear()
    first = ours.generate("a harbour", reference_photos, **kwargs)
    state = first.kv_state
    kv_bytes = int(np.prod(state.shape)) * 4
    assert state.buffers.capacity_tokens == ours.backend.selector.plan.bucket_for(state.num_ref_tokens).max_ref_tokens
    assert max(standin.uploads) < kv_bytes  # no upload is as large as the K/V
    text_bytes = 64 * ours.backend.dims.text_dim * 4
    assert standin.uploads.count(text_bytes) == 1  # the prompt once, not once per step
    executions = backend.runners["kv"].context.executions
    extract, cached = executions[0][2], [addresses for _, _, addresses in executions[1:]]
    layer_bytes = int(np.prod(state.shape[1:])) * 4  # one layer's K (or V): layers lie back to back in the buffer
    for layer in range(state.shape[0]):
        at = layer * layer_bytes
        assert extract[f"ref_keys_{layer}"] == state.buffers.keys.ctypes.data + at  # written in place ...
        assert {a[f"cached_keys_{layer}"] for a in cached} == {state.buffers.keys.ctypes.data + at}  # ... read in place
        assert {a[f"cached_values_{layer}"] for a in cached} == {extract[f"ref_values_{layer}"]} == {
            state.buffers.values.ctypes.data + at}
    keys = state.keys.copy()
    assert keys.shape == state.shape and np.abs(keys).max() > 0
    del first, state
    allocations = backend.kv_pool.stats.allocations
    ours.generate("a harbour", reference_photos, **kwargs)
    assert backend.kv_pool.stats.allocations == allocations and backend.kv_pool.stats.reuses >= 1


def test_persistent_cache_second_call(standin, trt_engines_dir, tiny_generator, reference_photos):
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    ours = runtime(trt_engines_dir, standin)
    ours.kv_cache = ReferenceKVCache(64 << 20)
    kwargs = dict(keep_fraction=0.1, strategy="edge", use_kv=True, num_steps=2, seed=1, output_type="latent",
                  height=64, width=64)
    first = ours.generate("a harbour", reference_photos, **kwargs)
    second = ours.generate("a harbour", reference_photos, **kwargs)
    assert not first.cache_hit and second.cache_hit
    extracts = [ours.backend.runners["kv"].manifest.profiles[i].step for i, *_ in
                ours.backend.runners["kv"].context.executions]
    assert extracts.count("extract") == 1  # the second call ran cached steps only
    reference = tiny_generator.generate("a harbour", reference_photos, **kwargs)
    np.testing.assert_allclose(second.image.numpy(), reference.image.numpy(), atol=ATOL, rtol=0)
    # A cached state keeps its buffers: the next extract must not reuse them.
    assert ours.kv_cache.stats.bytes == second.kv_state.nbytes


def test_request_outside_every_profile(standin, trt_engines_dir, reference_photos):
    from sparse_context.engines.errors import ProfileError

    ours = runtime(trt_engines_dir, standin)
    with pytest.raises(ProfileError,
                       match=r"64 target tokens is outside the engines' range 16\.\.36.*--width/--height"):
        ours.generate("x", reference_photos, num_steps=1, output_type="latent", height=128, width=128)
    from conftest import photo

    large = [photo(seed, 512, 512) for seed in range(3)]  # 3 x 1024 tokens: more than 3 refs of 256x256 px
    with pytest.raises(ProfileError, match="3072 reference tokens .*exceed every engine profile; nearest profile "
                                           "keep1.00 holds 79..768"):
        ours.generate("x", large, num_steps=1, output_type="latent", height=96, width=96)
    prompt = np.zeros((1, 32, ours.backend.dims.text_dim), np.float32)
    import torch

    with pytest.raises(ProfileError, match="padded to 64 tokens.*--text-tokens 32"):
        ours.generate(prompt_embeds=torch.from_numpy(prompt), num_steps=1, output_type="latent", height=96, width=96)
    assert not any(context.executions for context in (r.context for r in ours.backend.runners.values()))


def test_corrupted_engine_is_refused_before_deserializing(standin, trt_engines_dir, tmp_path):
    import shutil

    from sparse_context.engines.errors import EngineCorruptError

    copy = tmp_path / "engines"  # a copied folder loads as it is: its paths are relative to it
    shutil.copytree(trt_engines_dir, copy)
    runtime(copy, standin)
    engines = json.loads((copy / "engines.json").read_text())
    engine = copy / engines["graphs"]["kv"]["engine"]
    with open(engine, "ab") as stream:
        stream.write(b"tampered")
    with pytest.raises(EngineCorruptError, match="modified or truncated"):
        runtime(copy, standin)


# -- real TensorRT ------------------------------------------------------------------------------------------
@pytest.mark.trt
@pytest.mark.gpu
def test_real_tensorrt_generation_equals_pytorch(tiny_model_dir, tiny_generator, reference_photos, tmp_path):
    """The same flow on real TensorRT and a CUDA GPU: fp32 engines of the tiny model, dense / sparse / sparse + KV."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install .[tensorrt])")
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, build_engines
    from sparse_context.engines.trt.memory import default_memory
    from sparse_context.engines.errors import RunnerError, TensorRTUnavailableError
    from sparse_context.reference.generator import SparseContextGenerator

    try:
        default_memory().device_info()
    except (TensorRTUnavailableError, RunnerError) as error:
        pytest.skip(f"no CUDA device: {error}")
    plan = BucketPlan(keep_fractions=(0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256),
                      target_resolutions=(Resolution(96, 96), Resolution(64, 64)), text_tokens=64).validate()
    build_engines(BuildRequest(model_dir=tiny_model_dir, backend="trt", plan=plan, out_dir=tmp_path, precision="fp32"))
    ours = SparseContextGenerator.from_engines(tmp_path)
    for settings in (dict(keep_fraction=1.0), dict(keep_fraction=0.1, strategy="edge"),
                     dict(keep_fraction=0.1, strategy="saliency", use_kv=True)):
        kwargs = dict(num_steps=3, seed=2, output_type="latent", height=96, width=96, **settings)
        result = ours.generate("a red bicycle", reference_photos, **kwargs)
        reference = tiny_generator.generate("a red bicycle", reference_photos, **kwargs)
        # TF32 may be used by TensorRT's fp32 kernels: a looser bound than onnxruntime CPU's 1e-4
        np.testing.assert_allclose(result.image.numpy(), reference.image.numpy(), atol=2e-3, rtol=0)
        # The step engines against the host step: the same arithmetic, up to a fused float32 multiply-add.
        assert ours.backend.device_steps
        ours.backend.device_steps = False
        host = ours.generate("a red bicycle", reference_photos, **kwargs)
        ours.backend.device_steps = True
        np.testing.assert_allclose(result.image.numpy(), host.image.numpy(), atol=1e-5, rtol=0)


@pytest.mark.trt
@pytest.mark.gpu
def test_real_tensorrt_step_engines_equal_the_host_step(tiny_model_dir, tmp_path):
    """The step engines alone on real TensorRT, fp16: bit-equal to the numpy step (its float16 roundings are Cast
    nodes, which a strongly typed network keeps)."""
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip install .[tensorrt])")
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, _build_steps
    from sparse_context.engines.errors import RunnerError, TensorRTUnavailableError
    from sparse_context.engines.step_graphs import rounded_scalar
    from sparse_context.engines.trt.memory import default_memory
    from sparse_context.engines.trt.runner import TrtRunner
    from sparse_context.runtime.schedule import euler_step

    try:
        memory = default_memory()
        memory.device_info()
    except (TensorRTUnavailableError, RunnerError) as error:
        pytest.skip(f"no CUDA device: {error}")
    plan = BucketPlan(keep_fractions=(1.0,), max_refs=1, ref_resolution=Resolution(64, 64),
                      target_resolutions=(Resolution(96, 96),), text_tokens=64).validate()
    request = BuildRequest(model_dir=tiny_model_dir, backend="trt", plan=plan, out_dir=tmp_path, precision="fp16")
    steps = _build_steps(request, tmp_path, None)
    assert set(steps) == {"euler", "euler_noise", "guidance"}
    rng = np.random.default_rng(9)
    noise = rng.standard_normal((1, 36, 128)).astype(np.float32)
    velocity, negative = (rng.standard_normal((1, 36, 128)).astype(np.float16) for _ in range(2))
    delta, scale = np.float32(-0.2718), 3.5
    expected = {"euler_noise": euler_step(noise, velocity, delta),
                "euler": euler_step(noise.astype(np.float16), velocity, delta),
                "guidance": negative + scale * (velocity - negative)}
    feeds = {"euler_noise": {"latents": noise, "velocity": velocity, "delta": rounded_scalar(delta, np.float16)},
             "euler": {"latents": noise.astype(np.float16), "velocity": velocity,
                       "delta": rounded_scalar(delta, np.float16)},
             "guidance": {"positive": velocity, "negative": negative, "scale": rounded_scalar(scale, np.float16)}}
    for name, entry in steps.items():
        with TrtRunner(tmp_path / entry.engine, memory=memory) as runner:
            (result,) = runner.infer(feeds[name], 0).values()
            result = result.cpu().numpy() if hasattr(result, "cpu") else np.asarray(result)
            assert result.tobytes() == expected[name].tobytes(), name


def test_step_engines_only_for_tensorrt_and_numpy_dtypes(tiny_model_dir, tmp_path):
    """Other backends run the step graphs as they are (onnxruntime) and bf16 keeps the host step: no step
    engines, and nothing is written."""
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, _build_steps

    plan = BucketPlan(keep_fractions=(1.0,), max_refs=1, ref_resolution=Resolution(64, 64),
                      target_resolutions=(Resolution(64, 64),), text_tokens=64).validate()
    for backend, precision in (("ort-cuda", "fp16"), ("ort-cpu", "fp32"), ("trt", "bf16")):
        request = BuildRequest(model_dir=tiny_model_dir, backend=backend, plan=plan, out_dir=tmp_path,
                               precision=precision)
        assert _build_steps(request, tmp_path, None) == {}
    assert not any(tmp_path.iterdir())


def _kv_only(engines_dir):
    from sparse_context.engines.index import EnginesIndex

    engines = json.loads((engines_dir / "engines.json").read_text())
    engines["graphs"].pop("full")
    return dataclasses.replace(EnginesIndex.from_json(engines), folder=str(engines_dir))


def test_backend_errors_name_the_fix(standin, trt_engines_dir):
    from sparse_context.engines.errors import RunnerError
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.trt.backend import TrtTransformerBackend

    engines = json.loads((trt_engines_dir / "engines.json").read_text())
    no_engines = EnginesIndex.from_json({**engines, "graphs": {graph: {**entry, "engine": None}
                                                               for graph, entry in engines["graphs"].items()}})
    with pytest.raises(RunnerError, match="TensorRT engines: got 'none in engines.json'.*--engines"):
        TrtTransformerBackend(no_engines, memory=standin)
    backend = TrtTransformerBackend(_kv_only(trt_engines_dir), memory=standin)
    dims = backend.dims
    target, text = np.zeros((1, 16, dims.in_channels), np.float32), np.zeros((1, 64, dims.text_dim), np.float32)
    refs, ref_ids = np.zeros((1, 4, dims.in_channels), np.float32), np.zeros((4, 4), np.int64)
    ids = np.zeros((16, 4), np.int64)
    with pytest.raises(RunnerError, match=r"the full engine for this call \(build it with --graphs full\)"):
        backend.full(target, ids, refs, ref_ids, text, np.zeros((64, 4), np.int64), np.float32(0.5))
    with pytest.raises(RunnerError, match="kv_state: got 'dict'.*kv_extract"):
        backend.kv_cached(target, ids, {}, text, np.zeros((64, 4), np.int64), np.float32(0.5))
    backend.close()


def test_runner_external_tensor_errors(standin, trt_engines_dir):
    from sparse_context.engines.errors import RunnerError
    from sparse_context.engines.trt.runner import DeviceTensor, TrtRunner

    engine = trt_engines_dir / json.loads((trt_engines_dir / "engines.json").read_text())["graphs"]["kv"]["engine"]
    with pytest.raises(RunnerError, match=r"external tensors: got \['kv_cache'\]"):
        TrtRunner(engine, memory=standin, external=("kv_cache",)).activate()
    from sparse_context.engines.manifest import read_manifest

    layers = sum(name.startswith("cached_keys_") for name, _ in read_manifest(engine).profiles[0].shapes)
    assert layers >= 2
    families = ("cached_keys", "cached_values", "ref_keys", "ref_values")
    spec = tuple(f"{family}_{layer}" for family in families for layer in range(layers))
    with TrtRunner(engine, memory=standin, external=spec) as runner:
        profile = runner.manifest.profiles[0]
        feed = {name: np.zeros(ranges[0], np.float32) for name, ranges in profile.shapes}
        feed["timestep"] = np.zeros((1,), np.float32)
        kv = {name: DeviceTensor(standin.pointer(standin.alloc(64)), tuple(feed[name].shape))
              for name in spec[:2 * layers]}
        with pytest.raises(RunnerError, match="input 'cached_keys_0' is external: pass it as a DeviceTensor"):
            runner.infer(feed, 0)
        feed.update(kv)
        with pytest.raises(RunnerError, match="output 'ref_keys_0' is external: pass its buffer in `into`"):
            runner.infer(feed, 0)
        refs_shape = list(profile.shape_dict()["refs"][2])  # the most new reference tokens this profile takes
        feed["refs"] = np.zeros(refs_shape, np.float32)
        feed["ref_rope_cos"] = feed["ref_rope_sin"] = np.zeros((refs_shape[1], runner.manifest.profiles[0]
                                                                .shape_dict()["ref_rope_cos"][2][1]), np.float32)
        small = {name: DeviceTensor(standin.pointer(standin.alloc(8)), (), 8) for name in spec[2 * layers:]}
        with pytest.raises(RunnerError, match=r"output 'ref_keys_0' of shape .* needs \d+ bytes; the buffer given "
                                              r"holds 8"):
            runner.infer(feed, 0, into=small)


def test_fp16_engines_give_the_same_latents_on_both_backends(standin, tiny_model_dir, tmp_path):
    """fp16 engines: the TensorRT backend (stand-in) and the onnxruntime backend run the same ONNX graphs with the
    same feeds and the same Euler step, so they return identical velocities (float16) and identical latents."""
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.build import BuildRequest, build_engines
    from sparse_context.engines.index import open_backend
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.engines.runtime import EngineRuntime, read_model_settings

    plan = BucketPlan(keep_fractions=(0.25, 1.0), max_refs=2, ref_resolution=Resolution(128, 128),
                      target_resolutions=(Resolution(64, 64),), text_tokens=64).validate()
    index = build_engines(BuildRequest(model_dir=tiny_model_dir, backend="trt", plan=plan, out_dir=tmp_path,
                                       precision="fp16"))
    trt = open_backend(index, memory=standin)
    ort = OrtTransformerBackend(full=index.path(index.graphs["full"].onnx), kv=index.path(index.graphs["kv"].onnx),
                                plan=index.plan)
    scheduler, _ = read_model_settings(index.model_dir)
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((1, 64, trt.dims.text_dim)).astype(np.float32)
    grids = [rng.standard_normal((trt.dims.in_channels, 8, 8)).astype(np.float32) for _ in range(2)]
    negative = rng.standard_normal((1, 64, trt.dims.text_dim)).astype(np.float32)
    assert trt.device_steps and set(trt.step_runners) == {"euler", "euler_noise", "guidance"}
    for settings in (dict(keep_fraction=1.0), dict(keep_fraction=0.25), dict(keep_fraction=0.25, use_kv=True),
                     dict(keep_fraction=0.25, use_kv=True, negative_prompt_embeds=negative, guidance_scale=3.5),
                     dict(keep_fraction=0.2, use_kv=True, refs=1)):
        refs = grids[: settings.pop("refs", len(grids))]
        kwargs = dict(height=64, width=64, num_steps=3, seed=1, strategy="uniform", **settings)
        results = [EngineRuntime(backend, scheduler).generate_latents(embeds, refs, **kwargs)
                   for backend in (trt, ort)]
        trt.device_steps = False  # the host step, as before the step engines
        results.append(EngineRuntime(trt, scheduler).generate_latents(embeds, refs, **kwargs))
        trt.device_steps = True
        assert results[0].ref_tokens == results[1].ref_tokens > 0
        if len(refs) == 1:
            # An odd count: a float16 K/V token is 128 bytes here, so layer l of a stacked buffer would start at
            # l * 13 * 128 bytes, which TensorRT refuses; the layers start at 256-byte aligned strides instead.
            assert results[0].ref_tokens % 2 == 1
        np.testing.assert_array_equal(results[0].latents, results[1].latents)
        np.testing.assert_array_equal(results[0].latents, results[2].latents)
    runs = {name: len(r.context.executions) for name, r in trt.step_runners.items()}
    assert runs == {"euler_noise": 5, "euler": 10, "guidance": 3}  # noise on the first of 3 steps, 5 generations
    target, target_ids = np.zeros((1, 16, trt.dims.in_channels), np.float32), np.zeros((16, 4), np.int64)
    text_ids = np.zeros((64, 4), np.int64)
    velocities = [b.full(target, target_ids, None, None, embeds, text_ids, np.float32(0.5)) for b in (trt, ort)]
    assert velocities[0].dtype == velocities[1].dtype == np.float16
    steps = [b.euler_step(target, v, np.float32(-0.3)) for b, v in zip((trt, ort), velocities)]
    assert steps[0].dtype == steps[1].dtype == np.float16
    np.testing.assert_array_equal(steps[0], steps[1])
    trt.close()


def test_trt_part_engines_and_the_torch_free_pipeline(standin, trt_engines_dir, tiny_generator, reference_photos):
    """The text encoder and VAE engines go through the transformer's build steps (parse, profile, build,
    manifest), one profile each: the part spec's min/opt/max. The whole pipeline on TensorRT equals PyTorch."""
    import torch

    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.manifest import read_manifest
    from sparse_context.engines.pipeline import EnginePipeline

    index = EnginesIndex.read(trt_engines_dir)
    assert set(index.parts) == {"text_encoder", "vae_encoder", "vae_decoder"}
    for part, entry in index.parts.items():
        manifest = read_manifest(index.path(entry.engine))
        assert manifest.graph == part and [p.name for p in manifest.profiles] == [f"parts/{part}"]
        assert manifest.profiles[0].to_json() == dict(entry.profiles[0])
    decoder = read_manifest(index.path(index.parts["vae_decoder"].engine)).profiles[0].shape_dict()["latents"]
    assert decoder == ((1, 128, 4, 4), (1, 128, 6, 6), (1, 128, 6, 6))  # the 64 and 96 px targets, 96 first
    pipe = EnginePipeline.from_engines(trt_engines_dir, memory=standin)
    latents = np.random.default_rng(4).standard_normal((1, 36, 128)).astype(np.float32)
    kwargs = dict(keep_fraction=0.1, strategy="saliency", use_kv=True, num_steps=3, seed=2, height=96, width=96)
    ours = pipe.generate("a red bicycle", reference_photos, latents=latents, **kwargs)
    theirs = tiny_generator.generate("a red bicycle", reference_photos, latents=torch.from_numpy(latents), **kwargs)
    assert ours.ref_tokens == theirs.ref_tokens
    np.testing.assert_allclose(ours.latents, theirs.latents.numpy(), atol=ATOL, rtol=0)
    assert np.abs(ours.image.astype(int) - np.asarray(theirs.image).astype(int)).max() <= 2
    pipe.close()


def test_a_profile_tensorrt_refuses_names_the_fix(standin, trt_engines_dir):
    """TensorRT's Python binding raises RuntimeError("Error in set optimization profile async.") where the C++ call
    returns false (an engine holding other profiles than its manifest records): the error names the profile, the
    engine, TensorRT's words and the fix."""
    from sparse_context.engines.errors import RunnerError
    from sparse_context.engines.trt.runner import TrtRunner

    engine = trt_engines_dir / json.loads((trt_engines_dir / "engines.json").read_text())["graphs"]["kv"]["engine"]
    with TrtRunner(engine, memory=standin) as runner:
        profiles = runner.manifest.profiles
        assert len(profiles) >= 2

        def refuse(index, stream):
            raise RuntimeError("Error in set optimization profile async.")

        runner.context.set_optimization_profile_async = refuse
        feed = {name: np.zeros(ranges[0], np.float32) for name, ranges in profiles[1].shapes}
        feed["timestep"] = np.zeros((1,), np.float32)
        with pytest.raises(RunnerError, match=rf"TensorRT refused profile 1 \({profiles[1].name}\) of {len(profiles)} "
                                              rf"for {engine.name}: Error in set optimization profile async.; "
                                              r"rebuild the engines with build_engines.py"):
            runner.infer(feed, 1)
