"""``bench engines`` (issue 4's GPU check) on the tiny model on the CPU: every row timed on PyTorch and onnxruntime,
ratios that follow from the times, the acceptance block, the report files, the time budget and argument errors.
The numbers mean nothing here (tiny model, CPU); the GPU command is in the README."""

from __future__ import annotations

import json

import numpy as np

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

from sparse_context.cli import main  # noqa: E402
from sparse_context.reference.engine_benchmark import (  # noqa: E402
    CostModel, EngineBenchOptions, RowKey, TimeBudget, open_backend, planned_rows,
)

SMALL = ["bench", "engines", "--target-px", "64", "--ref-px", "64", "--text-tokens", "16", "--refs", "1", "3",
         "--keeps", "1", "0.1", "--steps", "2", "--repeats", "1"]
CRITERIA = {"kv_speedup_ort", "persistent_speedup_ort", "ort_over_torch", "selection_share"}


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine-bench")


@pytest.fixture(autouse=True)
def one_torch_thread():
    # On a shared 2-core machine two OpenMP threads wait on each other: 0.8 s per tiny call instead of 4 ms.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(args, work_dir, out_dir):
    return main(SMALL + args + ["--work-dir", str(work_dir), "--out", str(out_dir)])


def test_every_row_on_both_backends_with_consistent_ratios(work_dir, tmp_path, capsys):
    assert _run([], work_dir, tmp_path) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "engines.json").read_text())
    assert (tmp_path / "engines.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = result["rows"]
    assert len(rows) == 1 + 2 * 2 * 3  # target only + refs {1, 3} x keeps {1, 0.1} x (off, on, cached)
    assert [r["label"] for r in rows[:4]] == ["refs 3 keep 1 kv off", "refs 3 keep 0.1 kv on",
                                             "refs 3 keep 0.1 kv cached", "target only"]
    assert result["skipped"] == [] and result["ort_problem"] is None
    dense = {r["refs"]: r for r in rows if r["keep"] == 1.0 and not r["kv"]}
    for row in rows:
        assert row["torch_s"] > 0 and row["ort_s"] > 0, row["label"]
        assert row["ort_over_torch"] == pytest.approx(row["ort_s"] / row["torch_s"])
        assert row["speedup_torch"] == pytest.approx(dense[row["refs"]]["torch_s"] / row["torch_s"])
        assert row["speedup_ort"] == pytest.approx(dense[row["refs"]]["ort_s"] / row["ort_s"])
        assert row["finite"] and row["rel_diff"] < 1e-4 and not row["flagged"]  # fp32 on both sides
    assert {r["label"]: r["ref_tokens"] for r in rows if r["refs"] == 3} == {
        "refs 3 keep 1 kv off": 48, "refs 3 keep 1 kv on": 48, "refs 3 keep 1 kv cached": 48,
        "refs 3 keep 0.1 kv off": 6, "refs 3 keep 0.1 kv on": 6, "refs 3 keep 0.1 kv cached": 6}

    assert [r["label"] for r in result["correctness"]["rows"]] == [
        "refs 3 keep 0.1 kv on", "refs 3 keep 0.1 kv cached", "refs 3 keep 0.1 kv off"]
    for strategy in ("edge", "saliency"):
        timing = result["selection"]["strategies"][strategy]
        assert timing["references"] == 3 and timing["ref_tokens"] == 6 and timing["select_s"] > 0
        assert 0 < timing["share_torch"] < 1 and 0 < timing["share_ort"] < 1
    acceptance = result["acceptance"]
    assert {c["name"] for c in acceptance["criteria"]} == CRITERIA
    assert all(c["value"] is not None and isinstance(c["pass"], bool) for c in acceptance["criteria"])
    assert acceptance["meaningful"] is False and "klein-9b" in acceptance["note"]
    assert set(result["exports"]) == {"full", "kv"} and result["attention"] == "matmul"
    assert {"build", "export", "torch_bench", "sessions", "ort_bench", "total"} <= set(result["phases_s"])
    assert {"torch", "onnxruntime", "diffusers"} <= set(result["versions"])
    assert "kv_speedup_ort" in printed and "ort/torch" in printed and "refs 3 keep 0.1 kv cached" in printed
    # the I/O ablation re-ran the acceptance rows with host buffers
    assert set(result["io_binding"]) == {"refs 3 keep 1 kv off", "refs 3 keep 1 kv on", "refs 3 keep 1 kv cached",
                                         "refs 3 keep 0.1 kv on", "refs 3 keep 0.1 kv cached", "refs 3 keep 0.1 kv off"}
    for io in result["io_binding"].values():
        assert io["host_over_device"] == pytest.approx(io["host_io_s"] / io["device_io_s"])
    assert "I/O binding refs 3 keep 0.1 kv on" in printed and "ort_host_io" in result["phases_s"]


def test_a_spent_budget_skips_and_lists_every_row(work_dir, tmp_path, capsys):
    assert _run(["--budget-s", "0.001"], work_dir, tmp_path) == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "engines.json").read_text())
    skipped = {(s["backend"], s["what"]) for s in result["skipped"]}
    assert ("export", "ONNX export (full, kv)") in skipped
    for row in result["rows"]:
        assert row["torch_s"] is None and row["ort_s"] is None
        assert {("torch", row["label"]), ("onnxruntime", row["label"])} <= skipped
    assert all(c["pass"] is None for c in result["acceptance"]["criteria"])
    assert result["acceptance"]["passed"] is False
    assert (tmp_path / "engines.png").is_file() and "skipped (torch): refs 3 keep 1 kv off" in printed


def test_a_failing_export_is_reported_and_pytorch_rows_still_run(monkeypatch, tmp_path):
    import sparse_context.reference.engine_benchmark as engine_benchmark
    from sparse_context.export.errors import ExportError

    def no_disk(*args):
        raise ExportError("No space left on device")

    monkeypatch.setattr(engine_benchmark, "export_graphs", no_disk)
    options = EngineBenchOptions(refs=(1,), keeps=(1.0,), target_px=64, ref_px=64, text_tokens=16, steps=1,
                                 repeats=1, work_dir=tmp_path)
    result = engine_benchmark.benchmark_engines(options)
    assert all(row["torch_s"] > 0 and row["ort_s"] is None for row in result["rows"])
    reasons = {(s["backend"], s["what"]): s["reason"] for s in result["skipped"]}
    assert reasons[("export", "ONNX export (full, kv)")] == "failed: ExportError: No space left on device"
    assert "no ONNX export" in reasons[("onnxruntime", "refs 1 keep 0.1 kv on")]


def test_row_order_and_budget_decisions():
    rows = planned_rows(EngineBenchOptions(refs=(1, 6), keeps=(0.25,)))
    assert rows[:4] == [RowKey(6, 1.0, False), RowKey(6, 0.1, True), RowKey(6, 0.1, True, True), RowKey(0, 1.0, False)]
    assert len(rows) == len(set(rows)) == 1 + 2 * 3 * 3  # keeps 0.25 plus the always-measured 1.0 and 0.10
    for index, row in enumerate(rows):  # a cache hit reuses the K/V of the row just before it
        if row.cache_hit:
            assert rows[index - 1] == RowKey(row.refs, row.keep, True)

    now = [0.0]
    budget = TimeBudget(10.0, clock=lambda: now[0])
    now[0] = 4.0
    assert budget.fits(None) and budget.fits(5.9) and not budget.fits(6.1)
    assert not budget.fits(3.0, reserve=3.5)  # room kept for later work counts against a row
    now[0] = 10.5
    assert not budget.fits(None)  # nothing left: not even a row without an estimate starts
    cost = CostModel()
    assert cost.estimate(100) is None
    cost.observe(100, 2.0)
    cost.observe(100, 1.0)  # the largest rate seen wins: estimates err long
    assert cost.estimate(50) == pytest.approx(1.0)


def test_backend_gets_the_bucket_plan_of_the_run(monkeypatch):
    import sparse_context.engines.ort.backend as ort_backend

    calls = []

    class WithPlan:
        def __init__(self, full=None, kv=None, providers=(), plan=None):
            calls.append(plan)

    monkeypatch.setattr(ort_backend, "OrtTransformerBackend", WithPlan)
    exported = type("Export", (), {"path": "model.onnx"})
    options = EngineBenchOptions(refs=(1, 3), keeps=(0.25,), target_px=64, ref_px=128, text_tokens=16)
    open_backend({"full": exported, "kv": exported}, options)
    plan = calls[0]
    assert plan.max_refs == 3 and plan.keep_fractions == (1.0, 0.25, 0.1) and plan.text_tokens == 16
    assert plan.ref_resolution.tokens == 64 and plan.max_ref_tokens == 3 * 64


@pytest.mark.parametrize("args, flag", [
    (["--config", "klein-99b"], "--config"),
    (["--device", "cpu", "--backend", "ort-cuda"], "--backend"),
    (["--budget-s", "0"], "--budget-s"),
    (["--ref-px", "72"], "--ref-px"),
    (["--keeps", "1.5"], "--keeps"),
])
def test_bad_arguments_are_clear_errors(tmp_path, capsys, args, flag):
    assert main(SMALL + args + ["--work-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "engines.json").exists()


def test_loop_runner_single_untimed_call_and_its_cache_hit():
    """``run(row, repeats=0)``: one call, its seconds its wall time, the same latents as a timed run; the KV row
    leaves its K/V for the cache-hit row (what the GPU check's kernel profiles run)."""
    from sparse_context.reference.benchmark import build_transformer
    from sparse_context.reference.engine_benchmark import BenchInputs, LoopRunner
    from sparse_context.reference.torch_backend import TorchTransformerBackend

    options = EngineBenchOptions(refs=(2,), target_px=64, ref_px=64, text_tokens=8, steps=2, repeats=2).validate()
    model = build_transformer("tiny", "cpu", torch.float32)
    inputs = BenchInputs.create(options, int(model.config.in_channels), int(model.config.joint_attention_dim))
    runner = LoopRunner(TorchTransformerBackend(model), inputs, torch.from_numpy)
    kv_row = RowKey(2, 0.1, True)
    timed_s, _, timed = runner.run(kv_row)
    once_s, wall_s, once = runner.run(kv_row, repeats=0)
    assert once_s > 0 and wall_s >= once_s and np.array_equal(once, timed)
    assert runner.has_state_for(RowKey(2, 0.1, True, cache_hit=True))
    _, _, cached = runner.run(RowKey(2, 0.1, True, cache_hit=True), repeats=0)
    assert cached.shape == once.shape and np.isfinite(cached).all()
    # A whole-key-tile row keeps its plain row's tokens and more: 8 text + 16 target + 2 x 2 kept = 28 keys, topped
    # up to 32 (tiles of 16): 4 more tokens, two per reference. Its cache hit needs its own KV row's K/V.
    tiled_kv, tiled_hit = RowKey(2, 0.1, True, tile=16), RowKey(2, 0.1, True, cache_hit=True, tile=16)
    plain, tiled = inputs.kept_for(kv_row), inputs.kept_for(tiled_kv)
    assert [k.size for k in plain] == [2, 2] and [k.size for k in tiled] == [4, 4]
    assert all(np.isin(p, t).all() and np.unique(t).size == t.size for p, t in zip(plain, tiled))
    assert inputs.ref_tokens(tiled_hit) == 8 and inputs.ref_tokens(kv_row) == 4
    assert not runner.has_state_for(tiled_hit)
    runner.run(tiled_kv, repeats=0)
    assert runner.has_state_for(tiled_hit) and not runner.has_state_for(RowKey(2, 0.1, True, cache_hit=True))


def test_loop_runner_times_with_the_cycle_collector_paused():
    """Python's cycle collector is off inside every timed call of a row (a collection there is host time the
    engine did not spend) and back on afterwards, also when a call fails; left off if it was off."""
    import gc

    from sparse_context.reference.benchmark import build_transformer
    from sparse_context.reference.engine_benchmark import BenchInputs, LoopRunner
    from sparse_context.reference.torch_backend import TorchTransformerBackend

    class Recording(TorchTransformerBackend):
        def __init__(self, model):
            super().__init__(model)
            self.collector_on: list[bool] = []
            self.fail = False

        def full(self, *args, **kwargs):
            self.collector_on.append(gc.isenabled())
            if self.fail:
                raise RuntimeError("engine failed")
            return super().full(*args, **kwargs)

    options = EngineBenchOptions(refs=(1,), target_px=64, ref_px=64, text_tokens=8, steps=2, repeats=2).validate()
    model = build_transformer("tiny", "cpu", torch.float32)
    inputs = BenchInputs.create(options, int(model.config.in_channels), int(model.config.joint_attention_dim))
    backend = Recording(model)
    runner = LoopRunner(backend, inputs, torch.from_numpy)
    assert gc.isenabled()
    runner.run(RowKey(1, 1.0, False))
    assert backend.collector_on == [False] * 6 and gc.isenabled()  # 3 calls (1 warm-up) x 2 steps
    backend.fail = True
    with pytest.raises(RuntimeError, match="engine failed"):
        runner.run(RowKey(1, 1.0, False))
    assert gc.isenabled()
    gc.disable()
    try:
        backend.fail = False
        runner.run(RowKey(1, 1.0, False))
        assert not gc.isenabled()
    finally:
        gc.enable()
