"""Exported graphs on onnxruntime CPU against PyTorch/diffusers on the tiny real model.

Tolerances: fp32 graphs atol 1e-4 + rtol 1e-4 x max|torch| per output (measured ~1e-6: same math, other kernels);
full generations 1e-4 absolute on latents; fp16 graphs 3e-2 (fp16 keeps ~3 decimal digits through every layer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
torch = pytest.importorskip("torch")

from sparse_context.export.exporter import ExportOptions, export_onnx  # noqa: E402
from sparse_context.reference.validate import validate_export  # noqa: E402

TARGET_SIZES = ((64, 48), (32, 32))  # 12 and 4 tokens
MAX_REF_TOKENS = 40


def _options(model_dir, out_dir, **changes):
    settings = dict(model_dir=Path(model_dir), precision="fp32", attention="matmul", max_ref_tokens=MAX_REF_TOKENS,
                    target_sizes=TARGET_SIZES, out_dir=Path(out_dir))
    settings.update(changes)
    return ExportOptions(**settings)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def full_export(tiny_model_dir, out_dir):
    return export_onnx(_options(tiny_model_dir, out_dir, graph="full"))


@pytest.fixture(scope="module")
def kv_export(tiny_model_dir, out_dir):
    return export_onnx(_options(tiny_model_dir, out_dir, graph="kv"))


@pytest.fixture(scope="module")
def torch_transformer(tiny_model_dir):
    from sparse_context.export.exporter import load_transformer

    return load_transformer(_options(tiny_model_dir, "unused"))[0]


def _assert_passed(report, expected_counts):
    assert not report.failures, "\n".join(report.lines())
    assert {r.ref_tokens for r in report.records} == set(expected_counts)


def test_full_graph_parity_grid(full_export, torch_transformer):
    report = validate_export(full_export.path, torch_transformer)
    _assert_passed(report, [0, 1, 39, 40])  # the export traced 4 reference tokens
    assert max(r.max_abs for r in report.records) < 1e-5


def test_kv_graph_parity_grid_extract_then_cached(kv_export, torch_transformer):
    report = validate_export(kv_export.path, torch_transformer)
    _assert_passed(report, [0, 1, 39, 40])
    cases = {(r.case, r.output) for r in report.records}
    assert {("extract", "ref_keys"), ("cached step 3", "velocity")} <= cases


def test_fused_attention_kv_graph_opset23(tiny_model_dir, out_dir, torch_transformer):
    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="fused"))
    assert result.manifest["opset"] == 23 and "Attention" in result.manifest["ops"]
    assert result.manifest["for_tensorrt"] is False
    _assert_passed(validate_export(result.path, torch_transformer), [0, 1, 39, 40])


@pytest.mark.parametrize("graph", ["full", "kv"])
def test_onnxruntime_contrib_attention_graphs(tiny_model_dir, out_dir, torch_transformer, graph):
    """attention="mha": onnxruntime's contrib MultiHeadAttention (flash kernels on CUDA) equals diffusers on the
    CPU provider at reference-token counts other than the traced one, extract and cached steps included."""
    result = export_onnx(_options(tiny_model_dir, out_dir, graph=graph, attention="mha"))
    ops = result.manifest["ops"]
    assert "MultiHeadAttention" in ops and "RotaryEmbedding" in ops and "Attention" not in ops
    assert result.manifest["for_tensorrt"] is False
    report = validate_export(result.path, torch_transformer)
    _assert_passed(report, [0, 1, 39, 40])
    assert max(r.max_abs for r in report.records) < 1e-5


@pytest.mark.parametrize("attention,projections", [("matmul", "fused"), ("mha", "fused"), ("mha", "split")])
def test_fp16_graph_within_fp16_tolerance(tiny_model_dir, out_dir, torch_transformer, attention, projections):
    result = export_onnx(_options(tiny_model_dir, out_dir, graph="full", precision="fp16", attention=attention,
                                  projections=projections))
    report = validate_export(result.path, torch_transformer, ref_token_counts=[0, 7, 40])
    assert not report.failures, "\n".join(report.lines())
    assert report.atol == pytest.approx(3e-2)


def test_rerun_reuses_cached_export(tiny_model_dir, out_dir, full_export):
    stages = []
    again = export_onnx(_options(tiny_model_dir, out_dir, graph="full"), progress=lambda s, i, n: stages.append(s))
    assert again.reused and again.path == full_export.path and stages == ["hash"]
    manifest = again.manifest
    assert manifest["onnx_sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert manifest["spec"]["bounds"]["ref_tokens"] == [0, 4, 40] and manifest["lora"] is None
    assert set(manifest["versions"]) >= {"torch", "onnx", "onnxscript", "diffusers"}


def test_one_kv_session_serves_extract_and_cached_steps(kv_export, torch_transformer):
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.reference.torch_backend import TorchTransformerBackend
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    backend = OrtTransformerBackend(kv=kv_export.path)
    assert list(backend.sessions) == ["kv"]
    session = backend.sessions["kv"]
    rng = np.random.default_rng(3)
    target, refs, text = (rng.standard_normal(s).astype(np.float32) for s in ((1, 12, 128), (1, 23, 128), (1, 64, 96)))
    ids = grid_position_ids(3, 4), grid_position_ids(23, 1, time=20), text_position_ids(64)
    velocity, state = backend.kv_extract(target, ids[0], refs, ids[1], text, ids[2], np.float32(0.9))
    cached = [backend.kv_cached(target, ids[0], state, text, ids[2], np.float32(t)) for t in (0.6, 0.3)]
    assert backend.sessions["kv"] is session and state.num_ref_tokens == 23
    reference = TorchTransformerBackend(torch_transformer)
    as_torch = lambda a: torch.from_numpy(a)
    expected, cache = reference.kv_extract(as_torch(target), ids[0], as_torch(refs), ids[1], as_torch(text), ids[2],
                                           np.float32(0.9))
    np.testing.assert_allclose(velocity, expected.numpy(), atol=1e-5, rtol=0)
    for got, step_time in zip(cached, (0.6, 0.3)):
        want = reference.kv_cached(as_torch(target), ids[0], cache, as_torch(text), ids[2], np.float32(step_time))
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["dense", "sparse", "sparse_kv"])
def test_tiny_generation_on_ort_equals_pytorch_generator(tiny_generator, full_export, kv_export, mode):
    """runtime.sampler.denoise on onnxruntime equals SparseContextGenerator's latents (atol 1e-4)."""
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.runtime.packing import pack_grid, pack_references
    from sparse_context.runtime.sampler import Conditioning, denoise
    from sparse_context.runtime.schedule import flow_match_schedule
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    rng = np.random.default_rng(11)
    text = rng.standard_normal((1, 64, 96)).astype(np.float32)
    grids = [rng.standard_normal((128, 3, 4)).astype(np.float32), rng.standard_normal((128, 2, 3)).astype(np.float32)]
    selections = None if mode == "dense" else [np.array([0, 5, 6, 11]), np.array([1, 4])]
    result = tiny_generator.generate(prompt_embeds=torch.from_numpy(text), reference_latents=[torch.from_numpy(g)
                                     for g in grids], selections=selections, use_kv=mode == "sparse_kv",
                                     height=48, width=64, num_steps=3, seed=5, output_type="latent")

    latents = torch.randn((1, 128, 3, 4), generator=torch.Generator("cpu").manual_seed(5))
    latents = pack_grid(latents[0])[None].numpy()  # (1, 12, 128), as the generator seeds them
    packed = pack_references(grids, selections)
    schedule = flow_match_schedule(3, 12, tiny_generator.scheduler_config)
    backend = OrtTransformerBackend(full=full_export.path, kv=kv_export.path)
    ours, _ = denoise(backend, latents, grid_position_ids(3, 4), Conditioning(text, text_position_ids(64)), schedule,
                      packed.tokens[None], packed.position_ids, use_kv=mode == "sparse_kv")
    np.testing.assert_allclose(ours, result.latents.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_device_steps_equal_host_steps(tiny_model_dir, out_dir, full_export, kv_export, precision):
    """Latents kept on the session's device (Euler step and guidance as onnxruntime graphs) are bit-equal to the
    host loop, for dense, sparse, sparse + KV and guided generation; only host arrays leave the loop."""
    from sparse_context.engines.ort.backend import OrtTransformerBackend
    from sparse_context.runtime.sampler import Conditioning, denoise
    from sparse_context.runtime.schedule import flow_match_schedule
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    if precision == "fp32":
        graphs = {"full": full_export.path, "kv": kv_export.path}
    else:  # the fp16 full graph serves dense and sparse; the KV path shares every step with fp32
        graphs = {"full": export_onnx(_options(tiny_model_dir, out_dir, graph="full", precision="fp16")).path}
    rng = np.random.default_rng(21)
    text, negative = (rng.standard_normal((1, 64, 96)).astype(np.float32) for _ in range(2))
    refs = rng.standard_normal((1, 7, 128)).astype(np.float32)
    ref_ids = grid_position_ids(7, 1, time=10)
    latents = rng.standard_normal((1, 12, 128)).astype(np.float32)
    schedule = flow_match_schedule(3, 12, None)
    plain = Conditioning(text, text_position_ids(64))
    guided = Conditioning(text, text_position_ids(64), negative, text_position_ids(64), guidance_scale=3.5)
    runs = [("dense", plain, None, False), ("sparse", plain, refs, False), ("guided", guided, refs, False)]
    if "kv" in graphs:
        runs += [("sparse_kv", plain, refs, True), ("guided_kv", guided, refs, True)]
    host = OrtTransformerBackend(**graphs, device_steps=False)
    device = OrtTransformerBackend(**graphs)
    queued = OrtTransformerBackend(**graphs, sync="image")  # one stream, one wait per image
    for name, conditioning, references, use_kv in runs:
        ids = None if references is None else ref_ids
        expected, _ = denoise(host, latents, grid_position_ids(3, 4), conditioning, schedule, references, ids,
                              use_kv=use_kv)
        for backend in (device, queued):
            got, _ = denoise(backend, latents, grid_position_ids(3, 4), conditioning, schedule, references, ids,
                             use_kv=use_kv)
            assert isinstance(got, np.ndarray) and got.dtype == expected.dtype == backend.dtype, name
            assert got.tobytes() == expected.tobytes(), (name, backend.sync)
    assert device._step_sessions and not host._step_sessions  # the device loop really ran the step graphs
    assert device.step_seconds > 0 and host.step_seconds == 0  # and timed them apart from the transformer
    assert device.stream is None and host.stream is None
    # Every host value of the loop went through the stream (first latents, timesteps, step scalars, prompt, RoPE),
    # and the whole of each generation was waited for once.
    assert queued.stream.synchronizations == len(runs) and queued.stream.writes > 4 * len(runs)


def test_device_tensors_refuse_stale_or_foreign_use(full_export):
    from sparse_context.engines.errors import BackendOptionError
    from sparse_context.engines.ort.backend import OrtTensor, OrtTransformerBackend
    from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

    rng = np.random.default_rng(22)
    target, text = rng.standard_normal((1, 12, 128)).astype(np.float32), rng.standard_normal((1, 64, 96))
    args = (grid_position_ids(3, 4), None, None, text.astype(np.float32), text_position_ids(64), np.float32(0.5))
    backend, other = OrtTransformerBackend(full=full_export.path), OrtTransformerBackend(full=full_export.path)
    direct = backend.full(target, *args)
    assert isinstance(direct, np.ndarray)  # outside the loop: host arrays, as before
    with backend.device_loop():
        first = backend.full(target, *args)
        assert isinstance(first, OrtTensor) and np.array_equal(np.asarray(first), direct)
        backend.full(target, *args), backend.full(target, *args)  # the first buffer comes round again
        with pytest.raises(BackendOptionError, match="reused by a later call"):
            np.asarray(first)
        latest = backend.full(target, *args)
    with pytest.raises(BackendOptionError, match="from another backend"), other.device_loop():
        other.full(latest, *args)
    assert isinstance(backend.full(target, *args), np.ndarray)  # the loop's mode ends with it


@pytest.mark.parametrize("graph", ["full", "kv"])
def test_split_projections_equal_pytorch_and_fold_their_weight_slices(tiny_model_dir, out_dir, torch_transformer,
                                                                      graph):
    """``--projections split``: one matrix product per slice of each fused projection. Equal to diffusers at 0, 1,
    39 and 40 reference tokens (fp32, < 1e-5); fewer activation slices and concatenations than the fused form; and
    onnxruntime folds every weight slice into an initializer when the session loads (none runs per call)."""
    import onnx
    import onnxruntime as ort

    result = export_onnx(_options(tiny_model_dir, out_dir, graph=graph, attention="mha", projections="split"))
    fused = export_onnx(_options(tiny_model_dir, out_dir, graph=graph, attention="mha"))
    assert result.manifest["projections"] == "split" and fused.manifest["projections"] == "fused"
    assert result.path.parent.name.startswith(f"{graph}-fp32-mha-split-") and result.path != fused.path
    report = validate_export(result.path, torch_transformer)
    _assert_passed(report, [0, 1, 39, 40])
    assert max(r.max_abs for r in report.records) < 1e-5

    def activation_ops(path, folded: bool = False) -> dict[str, int]:
        if folded:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding
            options.optimized_model_filepath = str(out_dir / f"{graph}-optimized.onnx")
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            path = out_dir / f"{graph}-optimized.onnx"
        model = onnx.load(str(path), load_external_data=False)
        weights = {initializer.name for initializer in model.graph.initializer}
        counts = {"Slice": 0, "Concat": 0, "weight Slice": 0}
        for node in model.graph.node:
            if node.op_type == "Slice" and node.input[0] in weights:
                counts["weight Slice"] += 1
            elif node.op_type in counts:
                counts[node.op_type] += 1
        return counts

    split, plain = activation_ops(result.path), activation_ops(fused.path)
    assert split["Slice"] < plain["Slice"] and split["Concat"] < plain["Concat"] and split["weight Slice"] > 0
    assert activation_ops(result.path, folded=True)["weight Slice"] == 0


def test_cached_step_copies_the_cached_keys_once_per_layer(tiny_model_dir, out_dir):
    """A cached KV step (no new references) joins the cached K/V into the joint attention's keys and nowhere else
    when the references' own attention is guarded: onnxruntime's profile of one cached step shows the bytes its
    Concat nodes write growing by exactly one copy of each layer's cached K and V per cached token (two before the
    references' attention joined its keys inside its guard)."""
    import json as json_module

    import onnxruntime as ort

    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="mha", projections="split"))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / "cached-copies")
    session = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    layers = sum(i.name.startswith("cached_keys_") for i in session.get_inputs())  # one input per layer
    _, _, heads, head_dim = session.get_inputs()[-1].shape
    sizes = {"target_tokens": 12, "ref_tokens": 0, "text_tokens": 7, "text_target_tokens": 19}
    rng = np.random.default_rng(0)

    def feeds(cached):
        shapes = {**sizes, "cached_ref_tokens": cached}
        return {i.name: rng.standard_normal([d if isinstance(d, int) else shapes[d] for d in i.shape]).astype(
            np.float32) for i in session.get_inputs()}

    for cached in (16, 48):  # two cached steps, profiled one after the other
        session.run(None, feeds(cached))
    events = json_module.loads(Path(session.end_profiling()).read_text())
    concat_bytes = [0, 0]
    runs = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(runs) // 2
    for index, event in enumerate(runs):
        if event["args"].get("op_name") == "Concat":
            concat_bytes[index // per_run] += int(event["args"]["output_size"])
    one_copy = (48 - 16) * layers * 2 * heads * head_dim * 4  # K and V, fp32
    assert concat_bytes[1] - concat_bytes[0] == one_copy


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_kv_joins_never_copy_an_empty_part(tiny_model_dir, out_dir, torch_transformer, precision):
    """onnxruntime CUDA's ``Concat`` takes its coalesced input-major kernel only when every input has rows; one empty
    input sends the whole join to an element-wise kernel at half the speed (run 9 on an H200). So no K/V join of
    the kv graph gets an empty part: not in a first KV call (no cached references), not in a cached call (no new
    ones), not when both are present; the guarded attention leaves the empty part out instead. Checked on
    onnxruntime's CPU profile, which lists every node run with its input shapes, subgraph nodes included; the
    velocities still equal the PyTorch graph's at every mix."""
    import json as json_module

    import onnxruntime as ort
    import torch

    from sparse_context.export.graphs import KVGraph

    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="mha", projections="split",
                                  precision=precision))
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / f"joins-{precision}")
    session = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    mixes = [(0, 13), (17, 0), (17, 13), (1, 1)]  # (cached, new) reference tokens
    graph = KVGraph(torch_transformer).eval()

    def feeds(cached, new):
        shapes = {"target_tokens": 12, "ref_tokens": new, "text_tokens": 7, "text_target_tokens": 19,
                  "cached_ref_tokens": cached}
        out, angles = {}, {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) else shapes[d] for d in i.shape]
            if "rope" in i.name:  # real RoPE tables: one angle per (x0, x1) pair, cos and sin of the same angles
                table = angles.setdefault(i.name.replace("cos", "").replace("sin", ""), np.repeat(
                    rng.uniform(0, 2 * np.pi, (shape[0], shape[1] // 2)), 2, axis=1))
                values = np.cos(table) if "cos" in i.name else np.sin(table)
            else:
                values = rng.uniform(0.05, 1.0, shape) if i.name == "timestep" else rng.standard_normal(shape)
            out[i.name] = values.astype(np.float16 if i.type == "tensor(float16)" else np.float32)
        return out

    for cached, new in mixes:
        inputs = feeds(cached, new)
        got = session.run(None, inputs)
        tensors = {name: torch.from_numpy(value.astype(np.float32)) for name, value in inputs.items()}
        per_layer = [[tensors[i.name] for i in session.get_inputs() if i.name.startswith(family)]
                     for family in ("cached_keys_", "cached_values_")]
        with torch.no_grad():  # the eager graph in fp32, the matmul form: diffusers' math (1e-5, other tests)
            velocity, keys, values = graph(*(tensors[i.name] for i in session.get_inputs()
                                             if not i.name.startswith("cached_")), *per_layer)
        expected = [velocity, *keys, *values]  # the graph's outputs: one per layer and family
        assert len(got) == len(expected)
        for ours, theirs in zip(got, expected):
            assert ours.shape == tuple(theirs.shape)
            error = float(np.abs(ours.astype(np.float32) - theirs.numpy()).max()) if ours.size else 0.0
            assert error <= (3e-2 if precision == "fp16" else 1e-4), (cached, new, error)
    events = json_module.loads(Path(session.end_profiling()).read_text())
    joins = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
             and e["args"].get("op_name") == "Concat"]
    shapes = [[list(entry.values())[0] for entry in e["args"]["input_type_shape"]] for e in joins]
    kv_joins = [s for s in shapes if all(len(shape) == 4 for shape in s)]  # (1, tokens, heads, head_dim) parts
    empty = [s for s in kv_joins if any(shape[1] == 0 for shape in s)]
    assert len(kv_joins) >= 4 * len(mixes) and not empty, empty[:3]


def test_guard_branches_return_what_their_op_wrote(tiny_model_dir, out_dir):
    """onnxruntime gives a subgraph's outputs buffers of their own, so a guard branch whose value leaves through a
    Reshape pays a copy of it (the allocation planner never aliases a graph output). Every ``If`` branch of the
    guarded kv graph that computes (attention, RoPE) returns that op's output, or a nested guard's; branches that
    compute nothing (the 0-token ones) are free to end in a view of nothing."""
    import onnx

    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="mha", projections="split"))
    compute_ops = {"MultiHeadAttention", "RotaryEmbedding", "Attention"}
    endings, ifs = [], 0

    def walk(graph):
        nonlocal ifs
        for node in graph.node:
            if node.op_type != "If":
                continue
            ifs += 1
            for attribute in node.attribute:
                branch = attribute.g
                producer = {output: n.op_type for n in branch.node for output in n.output}
                if compute_ops & {n.op_type for n in branch.node} or "If" in producer.values():
                    endings.extend(producer[output.name] for output in branch.output)
                walk(branch)

    walk(onnx.load(str(result.path), load_external_data=False).graph)
    layers = 3  # the tiny model: 1 double + 2 single blocks
    assert set(endings) <= compute_ops | {"If"}, sorted(set(endings))
    assert ifs >= 4 * layers and len(endings) >= 4 * layers


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_kv_graph_holds_the_references_modulation_as_constants(tiny_model_dir, out_dir, precision):
    """The references are modulated at the fixed timestep 0 (diffusers' KV path), a constant of the weights: the kv
    graph holds that modulation as initializers and runs one time embedding and one product per modulation weight,
    the timestep's. Before, it ran them twice per step, and onnxruntime could not fold the second run in fp16 (it
    has no fp16 CPU Gemm), so every KV and cached step paid it. Values: the parity tests (diffusers at 1e-5)."""
    import onnx

    from sparse_context.export.checks import _all_nodes

    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="mha", projections="split",
                                  precision=precision))
    graph = onnx.load(str(result.path), load_external_data=False).graph
    nodes = list(_all_nodes(graph))
    weights = [name for name in (i.name for i in graph.initializer) if name.endswith(".weight") and (
        "time_guidance_embed" in name or "stream_modulation" in name)]
    assert len(weights) >= 5  # two time-embedding linears, three modulations
    for weight in weights:
        readers = [n for n in nodes if weight in n.input]
        assert len(readers) == 1, (weight, [n.op_type for n in readers])
    # Nor is any arithmetic left on constants alone: each scale is held as 1 + scale, so no Add of constants runs
    # at every call (onnxruntime folds no fp16 Add: "can't constant fold"). Slices of weights fold when the session
    # loads (test_split_projections_equal_pytorch_and_fold_their_weight_slices).
    constants = {i.name for i in graph.initializer} | {o for n in nodes if n.op_type == "Constant" for o in n.output}
    constant_ops = [(n.op_type, n.name) for n in nodes if n.op_type in ("Add", "Mul", "Sub")
                    and all(name in constants for name in n.input if name)]
    assert not constant_ops, constant_ops


@pytest.mark.parametrize("graph", ["full", "kv"])
def test_single_blocks_attend_without_joining_queries(tiny_model_dir, out_dir, graph):
    """Text and target are one stream through the single blocks (the full graph's references too): a single block's
    attention takes its queries straight from RoPE, and only the double blocks' attention joins the streams'
    queries with a ``Concat``. Values are the other tests' business (diffusers at 1e-5)."""
    import onnx

    from sparse_context.reference.tiny import TINY_TRANSFORMER

    from sparse_context.export.checks import _all_nodes

    result = export_onnx(_options(tiny_model_dir, out_dir, graph=graph, attention="mha", projections="split"))
    nodes = list(_all_nodes(onnx.load(str(result.path), load_external_data=False).graph))  # If branches too
    producer = {output: node for node in nodes for output in node.output}

    def query_path(node):
        ops, name = [], node.input[0]
        while name in producer and producer[name].op_type in ("Reshape", "Concat"):
            ops.append(producer[name].op_type)
            name = producer[name].input[0]
        return tuple(ops), producer[name].op_type if name in producer else name, name

    # One query tensor per layer for text and target, however many guarded branches attend with it; the kv
    # graph's reference queries come out of their RoPE's guard (an If) and are not these.
    paths = {query_path(node) for node in nodes if node.op_type == "MultiHeadAttention"}
    paths = [(ops, source) for ops, source, _ in paths if source != "If"]
    assert len(paths) == TINY_TRANSFORMER["num_layers"] + TINY_TRANSFORMER["num_single_layers"]
    joined = [ops for ops, _ in paths if "Concat" in ops]
    assert len(joined) == TINY_TRANSFORMER["num_layers"]
    assert [source for ops, source in paths if "Concat" not in ops] == ["RotaryEmbedding"] * TINY_TRANSFORMER[
        "num_single_layers"]


@pytest.mark.parametrize("graph, attention", [("full", "matmul"), ("kv", "mha")])
def test_modulation_is_the_norms_own_scale_and_bias(tiny_model_dir, out_dir, graph, attention):
    """Every modulated norm, ``(1 + scale) * norm(x) + shift``, is one ``LayerNormalization`` whose Scale and B are
    the modulation (computed in the graph from the timestep; in the kv graph the references' fixed-timestep
    modulation is held as constants), and its output goes straight into the projections: no multiply or add over the
    tokens around it. Per double block each of the three streams has two such norms; per single block each of its
    streams one (kv: [text, target] and references; full: one stream); the final norm (diffusers' ``norm_out``)
    keeps its constant scale. Values are the other tests' business (diffusers at 1e-5)."""
    import onnx

    from sparse_context.reference.tiny import TINY_TRANSFORMER

    result = export_onnx(_options(tiny_model_dir, out_dir, graph=graph, attention=attention, projections="split",
                                  precision="fp16"))
    model = onnx.load(str(result.path), load_external_data=False).graph
    constants = {tensor.name for tensor in model.initializer}
    constants |= {node.output[0] for node in model.node if node.op_type == "Constant"}
    consumers: dict[str, list[str]] = {}
    for node in model.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    norms = [node for node in model.node if node.op_type == "LayerNormalization"]
    modulated = [node for node in norms if not any(name in constants for name in node.input[1:])]
    fixed = [node for node in norms if all(name in constants for name in node.input[1:])]
    doubles, singles = TINY_TRANSFORMER["num_layers"], TINY_TRANSFORMER["num_single_layers"]
    if graph == "kv":  # the references' norms take their fixed-timestep modulation as constants (1 + scale, shift)
        assert len(modulated) == 4 * doubles + singles and len(fixed) == 2 * doubles + singles + 1
    else:
        assert len(modulated) == 6 * doubles + singles and len(fixed) == 1
    assert len(norms) == len(modulated) + len(fixed)  # the last is the final norm's constant scale
    shaped = [node for node in norms if node not in fixed[-1:]]
    assert all(len(node.input) == 3 for node in shaped)  # scale and bias both fed
    assert {op for node in shaped for op in consumers[node.output[0]]} == {"MatMul"}


def test_unknown_projection_form_names_its_flag(tiny_model_dir, out_dir):
    from sparse_context.export.errors import ExportConfigError

    with pytest.raises(ExportConfigError,
                       match="projection form: got 'packed'; allowed: fused or split.*--projections"):
        _options(tiny_model_dir, out_dir, projections="packed").validate()


def test_plain_reference_stream_has_no_if_nodes_and_equals_pytorch(tiny_model_dir, out_dir, torch_transformer):
    """``--ref-stream plain`` (kv graph, contrib attention, split projections): the references' RoPE is elementwise
    and their attention MatMul-Softmax-MatMul, so the graph holds no ``If`` node; it equals diffusers at 0, 1, 39 and
    40 reference tokens, extract and cached steps. The full graph ignores the option: the same export is reused."""
    import onnx

    guarded = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="mha", projections="split"))
    plain = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention="mha", projections="split",
                                 ref_stream="plain"))
    assert plain.manifest["ref_stream"] == "plain" and guarded.manifest["ref_stream"] == "guarded"
    assert plain.path.parent.name.startswith("kv-fp32-mha-split-plain-") and plain.path != guarded.path

    from sparse_context.export.checks import _all_nodes
    from sparse_context.reference.tiny import TINY_TRANSFORMER

    def count(path, op):  # If branches included
        graph = onnx.load(str(path), load_external_data=False).graph
        return sum(node.op_type == op for node in _all_nodes(graph))

    assert count(guarded.path, "If") > 0 and count(plain.path, "If") == 0
    layers = TINY_TRANSFORMER["num_layers"] + TINY_TRANSFORMER["num_single_layers"]
    assert count(plain.path, "MultiHeadAttention") == layers  # text + target; the references' is MatMul-Softmax
    report = validate_export(plain.path, torch_transformer)
    _assert_passed(report, [0, 1, 39, 40])
    assert max(r.max_abs for r in report.records) < 1e-5
    full = export_onnx(_options(tiny_model_dir, out_dir, graph="full", attention="mha", projections="split"))
    again = export_onnx(_options(tiny_model_dir, out_dir, graph="full", attention="mha", projections="split",
                                 ref_stream="plain"))
    assert again.reused and again.path == full.path and again.manifest["ref_stream"] == "guarded"
    matmul = _options(tiny_model_dir, out_dir, graph="kv", ref_stream="plain")  # MatMul attention: nothing to remove
    assert matmul.graph_ref_stream == "guarded"
    from sparse_context.export.errors import ExportConfigError

    with pytest.raises(ExportConfigError, match="reference stream form: got 'bare'; allowed: guarded or plain.*"
                                                "--ref-stream"):
        _options(tiny_model_dir, out_dir, ref_stream="bare").validate()


def test_plain_reference_stream_fp16_within_fp16_tolerance(tiny_model_dir, out_dir, torch_transformer):
    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", precision="fp16", attention="mha",
                                  projections="split", ref_stream="plain"))
    report = validate_export(result.path, torch_transformer, ref_token_counts=[0, 7, 40])
    assert not report.failures, "\n".join(report.lines())
    assert report.atol == pytest.approx(3e-2)


@pytest.mark.parametrize("form", ["matmul", "mha", "mha-plain"])
def test_kv_graph_reads_and_writes_each_layers_kv_in_place(tiny_model_dir, out_dir, form):
    """The reference K/V are one graph input and one graph output per layer, so no layer's cached K/V is cut out of
    a stacked tensor (a Gather, a copy per layer per call) and no extract call stacks the new ones (a Concat of every
    layer): each cached input goes straight into the joins that attend over it, and each output is written by the
    operator that computes it (RoPE, or the view after the guard around it), in every attention form."""
    import onnx

    from sparse_context.export.checks import _all_nodes

    attention, ref_stream = ("mha", "plain") if form == "mha-plain" else (form, "guarded")
    result = export_onnx(_options(tiny_model_dir, out_dir, graph="kv", attention=attention, ref_stream=ref_stream))
    model = onnx.load(str(result.path), load_external_data=False)
    inputs = [i.name for i in model.graph.input if i.name.startswith("cached_")]
    outputs = [o.name for o in model.graph.output if o.name.startswith("ref_")]
    config = result.manifest["model_config"]
    layers = config["num_layers"] + config["num_single_layers"]
    assert len(inputs) == len(outputs) == 2 * layers
    nodes = list(_all_nodes(model.graph))
    readers = {node.op_type for node in nodes for name in node.input if name in inputs}
    # Joins (some inside guards) and the guards' token counts; never a Gather, Slice or Split.
    assert readers <= {"Concat", "If", "Shape"} and "Concat" in readers, readers
    writers = {node.op_type for node in nodes for name in node.output if name in outputs}
    # RoPE's last op, or the (B, S, H, D) view of a guard's output; never a stack of layers or a copy of one.
    assert writers and writers.isdisjoint({"Concat", "Identity", "Gather", "Unsqueeze", "Expand"}), writers
