"""engines.ort.graphs: the KV graph's calls without new references through fixed buffers, the addresses a CUDA
graph replays. On the CPU provider the same code runs without asking onnxruntime for graphs (``capture=False``)
and must give the ordinary runs' velocities and latents bit for bit; on a GPU with onnxruntime's CUDA provider the
graphs are captured and replayed for real (``gpu`` tests)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from sparse_context.runtime.tokens import grid_position_ids, reference_time, text_position_ids

pytest.importorskip("onnxruntime", reason="the engines need onnxruntime (pip install .[onnx])")

TARGET_GRID = (16, 16)  # the engines' 256 x 256 px target
TEXT_TOKENS = 64


def _backend(engines_dir, capture=False, limit=None, **options):
    """The engines' kv graph on the CPU provider, on a stream of its own, with fixed-address calls attached."""
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.engines.ort.graphs import MAX_GRAPHS, CachedCallGraphs

    index = EnginesIndex.read(engines_dir)
    options.setdefault("sync", "image")
    backend = OrtTransformerBackend(kv=index.path(index.graphs["kv"].onnx), plan=index.plan, **options)
    backend.graphs = CachedCallGraphs(backend, capture=capture, limit=MAX_GRAPHS if limit is None else limit)
    return backend


def _call_inputs(backend, seed):
    rng = np.random.default_rng(seed)
    d = backend.dims
    target = rng.standard_normal((1, TARGET_GRID[0] * TARGET_GRID[1], d.in_channels)).astype(np.float32)
    text = rng.standard_normal((1, TEXT_TOKENS, d.text_dim)).astype(np.float32)
    return target, grid_position_ids(*TARGET_GRID), text, text_position_ids(TEXT_TOKENS)


def _state(backend, tokens, seed):
    """K/V of ``tokens`` reference tokens (three 16 x 16 references' ids, the first ``tokens`` of them)."""
    target, target_ids, text, text_ids = _call_inputs(backend, seed)
    ids = np.concatenate([grid_position_ids(16, 16, reference_time(i)) for i in range(3)])[:tokens]
    refs = np.random.default_rng(seed + 1).standard_normal((1, tokens, backend.dims.in_channels)).astype(np.float32)
    _, state = backend.kv_extract(target, target_ids, refs, ids, text, text_ids, np.float32(0.9))
    return state


def _both(backend, call):
    """``call()`` with the fixed-address path off, then on (same sessions, same buffers)."""
    backend.set_cuda_graphs(False)
    ordinary = np.array(call(), copy=True)
    backend.set_cuda_graphs(True)
    return ordinary, np.array(call(), copy=True)


@pytest.mark.parametrize("tokens", [0, 1, 37, 768])  # none, one, odd, the plan's largest bucket
def test_fixed_address_calls_equal_ordinary_runs(engines_dir, tokens):
    backend = _backend(engines_dir)
    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    state = _state(backend, tokens, 5) if tokens else None
    for step, timestep in enumerate((0.6, 0.3)):
        def call():
            if state is None:  # no references at all: the kv graph's dense forward, no cached K/V
                return backend.run_kv(target, target_ids, None, None, text, text_ids, np.float32(timestep))
            return backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(timestep))

        ordinary, fixed = _both(backend, call)
        assert np.isfinite(fixed).all() and np.abs(fixed).max() > 0
        assert fixed.tobytes() == ordinary.tobytes(), f"{tokens} cached tokens, step {step}"
    stats = backend.graphs.stats
    assert (stats.graphs, stats.calls, stats.over_limit) == (1, 2, 0)
    assert stats.kept >= 1  # the second call found this generation's prompt and RoPE tables in place


def test_generation_and_persistent_cache_hit_bit_equal(engines_dir, reference_photos):
    """A KV generation (steps 2+ through the graph) and its persistent-cache call (every step), queued once per image
    with device Euler steps: the same latents as without; one graph serves both images."""
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.runtime.kv_cache import ReferenceKVCache

    kwargs = dict(keep_fraction=0.1, strategy="edge", use_kv=True, num_steps=4, seed=4, output_type="latent",
                  height=64, width=64)
    results = {}
    for graphs in (False, True):
        ours = SparseContextGenerator.from_engines(engines_dir, sync="image")
        if graphs:
            ours.backend = _backend(engines_dir)
        ours.kv_cache = ReferenceKVCache(64 << 20)
        first = ours.generate("a harbour", reference_photos, **kwargs)
        second = ours.generate("a harbour", reference_photos, **kwargs)
        other = ours.generate("a lighthouse", reference_photos, **kwargs)  # another prompt, the same K/V
        assert second.cache_hit and other.cache_hit
        results[graphs] = [np.asarray(r.image.numpy()) for r in (first, second, other)]
        if graphs:
            stats = ours.backend.graphs.stats
            # The first prompt's graph serves both of its images; the new prompt takes the second prompt slot
            # (where a negative prompt would sit), with its own graph.
            assert stats.graphs == 2 and stats.calls == 3 + 4 + 4 and stats.over_limit == 0
    for ordinary, fixed in zip(results[False], results[True]):
        assert fixed.tobytes() == ordinary.tobytes()
    assert results[True][1].tobytes() != results[True][2].tobytes()  # the new prompt was copied in, not kept


def test_a_prompt_changed_in_place_between_images_is_copied_again(engines_dir):
    """A static input is kept in its graph buffer only while it cannot have changed: the same array within one
    image. A caller's float32 prompt is used as it is (no cast copy), so an in-place change between images must
    reach the graph."""
    backend = _backend(engines_dir)
    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    state = _state(backend, 37, 5)

    def call():
        return backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(0.5))

    before = np.array(call(), copy=True)
    backend.release_static()  # the image ends
    text[:] = np.random.default_rng(9).standard_normal(text.shape)
    ordinary, fixed = _both(backend, call)
    assert fixed.tobytes() == ordinary.tobytes() and fixed.tobytes() != before.tobytes()


def test_a_prompt_and_its_negative_keep_a_buffer_each(engines_dir):
    """With guidance the positive and the negative prompt alternate at every step: each keeps its own buffer (and
    graph), so neither is copied again within the image; the results equal ordinary runs."""
    backend = _backend(engines_dir)
    target, target_ids, positive, text_ids = _call_inputs(backend, 3)
    negative = _call_inputs(backend, 4)[2]
    state = _state(backend, 37, 5)
    for step in range(3):
        for text in (positive, negative):
            ordinary, fixed = _both(backend, lambda: backend.kv_cached(target, target_ids, state, text, text_ids,
                                                                        np.float32(0.5 - 0.1 * step)))
            assert fixed.tobytes() == ordinary.tobytes()
    stats = backend.graphs.stats
    # 6 calls: the prompts are copied on their first call only (2 copies, 4 kept), the RoPE tables once (kept 5 x 2)
    assert (stats.graphs, stats.calls, stats.kept) == (2, 6, 4 + 10)


def test_a_read_only_prompt_made_writeable_and_changed_is_copied_again(engines_dir):
    """A lasting (read-only) prompt stays in its buffer across images only while it is read-only: made writeable
    and changed in place, it is copied again (the float32 engines use the array itself, without a cast)."""
    backend = _backend(engines_dir)
    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    state = _state(backend, 37, 5)
    text.flags.writeable = False

    def call():
        return backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(0.5))

    before = np.array(call(), copy=True)
    backend.release_static()
    text.flags.writeable = True
    text[:] = np.random.default_rng(9).standard_normal(text.shape)
    ordinary, fixed = _both(backend, call)
    assert fixed.tobytes() == ordinary.tobytes() and fixed.tobytes() != before.tobytes()


def test_waiting_after_every_run_has_a_stream_for_the_copies(engines_dir):
    backend = _backend(engines_dir, sync="run")
    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    state = _state(backend, 1, 5)
    ordinary, fixed = _both(backend, lambda: backend.kv_cached(target, target_ids, state, text, text_ids,
                                                                np.float32(0.5)))
    assert fixed.tobytes() == ordinary.tobytes() and backend.stream.copies > 0 and backend.sync == "run"


def test_a_failed_graph_call_turns_graphs_off_and_runs_ordinarily(engines_dir):
    """A kernel onnxruntime cannot capture fails the graph's run: the backend warns once (naming the flag), turns
    graphs off, and that call and every later one run ordinarily with the same results."""
    from sparse_context.engines.ort.graphs import NO_GRAPH

    backend = _backend(engines_dir)
    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    state = _state(backend, 37, 5)
    backend.set_cuda_graphs(False)
    expected = [np.array(backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(t)), copy=True)
                for t in (0.6, 0.3)]
    backend.set_cuda_graphs(True)
    ordinary_run = backend._run_binding

    def capture_fails(session, binding, graph_id=None):
        if graph_id is not None and graph_id != NO_GRAPH:
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
        return ordinary_run(session, binding, graph_id)
    backend._run_binding = capture_fails
    with pytest.warns(RuntimeWarning, match=r"CUDA graphs are off for this backend: a graph call failed "
                                            r"\(RuntimeError: CUDA failure 900.*leave out --cuda-graphs"):
        first = backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(0.6))
    second = backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(0.3))
    assert first.tobytes() == expected[0].tobytes() and second.tobytes() == expected[1].tobytes()
    assert not backend.graphs.enabled and "operation not permitted" in backend.graphs.error
    assert backend.graphs.stats.calls == 1  # the failed call only; the next ran ordinarily


def test_new_buffers_make_new_graphs_up_to_the_limit(engines_dir):
    """K/V buffers are bound where they are, so each set of buffers has its graph; past the limit calls run
    ordinarily, with the same results."""
    backend = _backend(engines_dir, limit=2)
    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    states = [_state(backend, 37, seed) for seed in (5, 6, 7)]  # alive together: three buffer pairs
    assert len({backend._pointer(s.buffers.keys) for s in states}) == 3
    for state in states:
        ordinary, fixed = _both(backend, lambda: backend.kv_cached(target, target_ids, state, text, text_ids,
                                                                    np.float32(0.5)))
        assert fixed.tobytes() == ordinary.tobytes()
    assert (backend.graphs.stats.graphs, backend.graphs.stats.over_limit) == (2, 1)


def test_new_references_run_ordinarily(engines_dir):
    backend = _backend(engines_dir)
    _state(backend, 37, 5)  # an extract writes new K/V: never a graph
    assert backend.graphs.stats.calls == 0 and backend.graphs.stats.graphs == 0


def test_run_options_name_the_graph_and_ordinary_runs_name_none(engines_dir):
    from sparse_context.engines.ort.graphs import FIRST_GRAPH, GRAPH_ID, NO_GRAPH
    from sparse_context.engines.ort.loader import NO_SYNC_AFTER_RUN

    backend = _backend(engines_dir, capture=True)
    options = backend.graphs.run_options(FIRST_GRAPH + 2, queued=True)
    assert options.get_run_config_entry(GRAPH_ID) == "3" and options.get_run_config_entry(NO_SYNC_AFTER_RUN) == "1"
    assert backend.graphs.run_options(NO_GRAPH, queued=False).get_run_config_entry(GRAPH_ID) == "-1"
    assert FIRST_GRAPH > 0  # 0 is the id onnxruntime assumes for a run that names none
    with pytest.raises(RuntimeError, match=GRAPH_ID):  # capture=False (the CPU tests) names no graph at all
        _backend(engines_dir).graphs.run_options(FIRST_GRAPH, queued=False).get_run_config_entry(GRAPH_ID)


def test_cuda_graph_options_and_errors(engines_dir, tmp_path, capsys):
    from sparse_context.cli import main
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.index import EnginesIndex, open_backend
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.engines.ort.graphs import check_cuda_graphs, with_cuda_graphs

    index = EnginesIndex.read(engines_dir)
    kv = index.path(index.graphs["kv"].onnx)
    full = index.path(index.graphs["full"].onnx)
    with pytest.raises(BackendOptionError, match=r"execution provider for CUDA graphs: got 'CPUExecutionProvider'; "
                                                 r"allowed: CUDAExecutionProvider .*--cuda-graphs"):
        OrtTransformerBackend(kv=kv, cuda_graphs=True)
    manifest = {"ops": ["MatMul", "If", "Softmax"]}
    cuda = ("CUDAExecutionProvider",)
    with pytest.raises(BackendOptionError, match=r"kv graph for CUDA graphs: got .*with If nodes.*--ref-stream "
                                                 r"plain.*--cuda-graphs"):
        check_cuda_graphs(cuda, {"kv": ("kv.onnx", manifest)})
    with pytest.raises(BackendOptionError, match=r"graphs for CUDA graphs: got \['full'\]; allowed: a kv graph"):
        check_cuda_graphs(cuda, {"full": (full, manifest)})
    with pytest.raises(BackendOptionError, match=r"manifest lists no operators.*export it again"):
        check_cuda_graphs(cuda, {"kv": ("kv.onnx", {})})
    check_cuda_graphs(cuda, {"kv": ("kv.onnx", {"ops": ["MatMul", "MultiHeadAttention"]})})  # no control flow
    with pytest.raises(BackendOptionError, match=r"CUDA graphs: got 'turned on for a backend created without them'"):
        OrtTransformerBackend(kv=kv).set_cuda_graphs(True)
    with pytest.raises(BackendOptionError, match=r"CUDA graphs: got 'on for engines built with --backend ort-cpu'.*"
                                                 r"--ref-stream plain.*--cuda-graphs"):
        open_backend(index, cuda_graphs=True)
    with pytest.raises(BackendOptionError, match=r"--backend ort-trt"):
        open_backend(replace(index, backend="ort-trt"), cuda_graphs=True)
    providers = with_cuda_graphs([("CUDAExecutionProvider", {"device_id": "0"}), "CPUExecutionProvider"])
    assert providers == [("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "1"}),
                         "CPUExecutionProvider"]
    # The command line: only with engines, and only engines that can.
    out = str(tmp_path / "x.png")
    assert main(["generate", "--prompt", "x", "--cuda-graphs", "--out", out]) == 2
    assert "CUDA graphs: got 'on without engines'" in capsys.readouterr().err
    assert main(["generate", "--engines", str(engines_dir), "--prompt", "x", "--cuda-graphs", "--out", out]) == 2
    assert "--backend ort-cpu" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_cuda_graphs_without_cuda_python_name_the_extra_and_the_flag(engines_dir, monkeypatch):
    """CUDA graphs copy on a stream of the backend's own (cuda-python): without it the error says how to install it
    or which flag to leave out (not --sync, which cannot help here)."""
    import sys

    import onnxruntime

    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.index import EnginesIndex
    from sparse_context.engines.ort import graphs
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    index = EnginesIndex.read(engines_dir)
    available = onnxruntime.get_available_providers()
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    monkeypatch.setattr(graphs, "CONTROL_FLOW", ())  # the CPU engines' kv graph keeps its If guards
    for name in [name for name in sys.modules if name == "cuda" or name.startswith("cuda.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cuda", None)  # import of a None entry raises ImportError
    with pytest.raises(BackendOptionError, match=r"cuda-python is not installed; install it \(pip install "
                                                 r"sparse-context\[onnxruntime-gpu\]\) or leave out --cuda-graphs"):
        OrtTransformerBackend(kv=index.path(index.graphs["kv"].onnx), cuda_graphs=True,
                              providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


def _cuda_ready():
    ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime-gpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (pip install .[onnxruntime-gpu] on a GPU host)")
    pytest.importorskip("cuda.bindings.runtime", reason="CUDA graphs copy on a cuda-python stream "
                                                        "(pip install .[onnxruntime-gpu])")


def _replay_checks(backend):
    """Cached calls at 0, 1, odd and the largest cached token counts (three each: on a GPU the first captures,
    the next two replay), then a whole KV generation and its persistent-cache call queued on the stream with device
    steps and one wait per image: everything equal to ordinary runs bit for bit (the same kernels)."""
    from sparse_context.runtime.sampler import Conditioning, denoise
    from sparse_context.runtime.schedule import flow_match_schedule

    target, target_ids, text, text_ids = _call_inputs(backend, 3)
    for tokens in (0, 1, 37, 768):
        state = _state(backend, tokens, 5) if tokens else None
        for timestep in (0.6, 0.3, 0.1):
            def call():
                if state is None:
                    return backend.run_kv(target, target_ids, None, None, text, text_ids, np.float32(timestep))
                return backend.kv_cached(target, target_ids, state, text, text_ids, np.float32(timestep))

            ordinary, replayed = _both(backend, call)
            assert np.isfinite(replayed).all()
            np.testing.assert_array_equal(replayed, ordinary)
    assert backend.graphs.stats.graphs == 4 and backend.graphs.stats.calls == 12
    tokens = 37
    ids = np.concatenate([grid_position_ids(16, 16, reference_time(i)) for i in range(3)])[:tokens]
    refs = np.random.default_rng(8).standard_normal((1, tokens, backend.dims.in_channels)).astype(np.float32)
    schedule = flow_match_schedule(4, target.shape[1])
    conditioning = Conditioning(text, text_ids)
    results = {}
    for on in (False, True):
        backend.set_cuda_graphs(on)
        latents, kv = denoise(backend, target, target_ids, conditioning, schedule, refs, ids, use_kv=True)
        hit, _ = denoise(backend, target, target_ids, conditioning, schedule, use_kv=True, kv_state=kv)
        results[on] = (np.array(latents, copy=True), np.array(hit, copy=True))
        kv = None  # its buffers go back to the pool
    for ordinary, replayed in zip(results[False], results[True]):
        assert np.isfinite(replayed).all()
        np.testing.assert_array_equal(replayed, ordinary)
    assert backend.graphs.stats.calls == 12 + 3 + 4 and backend.graphs.enabled


def test_the_gpu_checks_on_the_cpu_path(engines_dir):
    """The GPU test's checks, on onnxruntime CPU through the same fixed-address calls (no capture)."""
    _replay_checks(_backend(engines_dir))


@pytest.mark.gpu
def test_cuda_graphs_replay_on_the_gpu(tiny_model_dir, tmp_path):
    """onnxruntime CUDA, a plain kv graph (no If): the cached calls captured and replayed as CUDA graphs
    (:func:`_replay_checks`)."""
    _cuda_ready()
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.export.exporter import ExportOptions, export_onnx

    exported = export_onnx(ExportOptions(model_dir=tiny_model_dir, out_dir=tmp_path, graph="kv", precision="fp16",
                                         attention="mha", projections="split", ref_stream="plain",
                                         max_ref_tokens=768, target_sizes=((256, 256),),
                                         text_tokens=TEXT_TOKENS))
    backend = OrtTransformerBackend(kv=exported.path, providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
                                    sync="image", cuda_graphs=True)
    _replay_checks(backend)
