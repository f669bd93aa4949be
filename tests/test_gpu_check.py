"""``bench gpu`` (issue 8's GPU check) on the CPU: the plan and its estimates, the depth extrapolation, the report's
derived figures, the placement summary of a real onnxruntime profile, option errors, and the tiny plan killed
mid-plan. The whole tiny plan runs end to end in ``.ci/run`` (every phase, both attention variants, onnxruntime
latents checked against PyTorch's), and after it the README's second call with ``--focus`` on its exports. The numbers mean nothing here (tiny model, CPU); the GPU command is in the
README."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparse_context.cli import main
from sparse_context.reference.benchmark_configs import CONFIGS
from sparse_context.reference.gpu_plan import (
    DEFAULT_KEY_TILE, GpuCheckOptions, Geometry, check_rows, depth_units, estimate_plan, extrapolate,
)
from sparse_context.reference.gpu_report import acceptance, derive, speedups, summary_lines

TINY = ["bench", "gpu", "--config", "tiny", "--device", "cpu", "--target-px", "64", "--ref-px", "64",
        "--text-tokens", "16", "--dtype", "fp32", "--repeats", "1", "--steps", "2", "--no-bf16"]


def test_klein_9b_plan_fits_480_s_on_an_80_gb_gpu_with_the_exports():
    plan = estimate_plan(GpuCheckOptions(config="klein-9b", budget_s=480.0), gpu_memory_gb=80)
    names = [phase.name for phase in plan.phases]
    assert plan.total_s <= 480.0
    assert "torch_full (PyTorch, full depth)" in names and "export d4 mha-split full" in names
    assert "export d4 mha-split-plain kv" in names and "export d4 mha-split-plain full" not in names  # shared
    assert all(phase.fits for phase in plan.phases if phase.name.startswith(("torch", "ort_d4_mha", "ort_d8_mha")))
    assert all(phase.parallel for phase in plan.phases if phase.name.startswith("export"))


def test_plan_marks_what_does_not_fit_and_full_depth_that_needs_more_memory():
    plan = estimate_plan(GpuCheckOptions(config="klein-9b", budget_s=120.0), gpu_memory_gb=24)
    by_name = {phase.name: phase for phase in plan.phases}
    assert not by_name["torch_full (PyTorch, full depth)"].fits  # 18 GB of weights + activations > 24 GB
    assert not by_name["ort_d8_mha-split"].fits


def test_dry_run_prints_the_plan_without_torch_work(capsys):
    assert main(["bench", "gpu", "--dry-run", "--gpu-memory-gb", "80"]) == 0
    printed = capsys.readouterr().out
    assert "planned total" in printed and "export d8 mha-split kv" in printed and "of a 480 s budget" in printed
    assert "attention_keys" in printed and "--focus" not in printed
    assert main(["bench", "gpu", "--dry-run", "--focus", "--no-full", "--budget-s", "250"]) == 0
    printed = capsys.readouterr().out
    assert "attention_keys" not in printed and "--focus: the rows the speedup criteria rest on" in printed


def test_split_projection_variant_plans_and_exports_mha_with_split_projections(capsys, tmp_path):
    from sparse_context.reference.gpu_check import export_job, export_options

    assert main(["bench", "gpu", "--dry-run"]) == 0  # the default variants
    printed = capsys.readouterr().out
    assert "export d4 mha-split full" in printed and "ort_d8_mha-split" in printed and "fused" not in printed
    assert main(["bench", "gpu", "--dry-run", "--variants", "mha", "fused"]) == 0
    assert "ort_d8_fused" in capsys.readouterr().out
    options = GpuCheckOptions(config="tiny", variants=("mha-split",), work_dir=tmp_path).validate()
    job = export_job(options, "d2", "mha-split", "kv")
    exported = export_options(job).validate()
    assert (job["name"], exported.attention, exported.projections) == ("d2-mha-split-kv", "mha", "split")
    assert export_options(export_job(options, "d2", "mha", "kv")).projections == "fused"
    # mha-split-plain: its own kv graph without If guards; its full graph is mha-split's job (exported once)
    plain_kv, plain_full = (export_job(options, "d2", "mha-split-plain", graph) for graph in ("kv", "full"))
    assert plain_kv["name"] == "d2-mha-split-plain-kv" and export_options(plain_kv).graph_ref_stream == "plain"
    assert plain_full == export_job(options, "d2", "mha-split", "full")
    assert export_options(plain_full).graph_ref_stream == "guarded"
    only_plain = estimate_plan(GpuCheckOptions(config="klein-9b", variants=("mha-split-plain",), export_workers=0),
                               gpu_memory_gb=80)
    names = [phase.name for phase in only_plain.phases]
    assert "export d4 mha-split full" in names and "export d4 mha-split-plain kv" in names


def test_depth_units_follow_the_weights_and_extrapolation_is_exact_for_linear_costs():
    assert [depth_units(CONFIGS[name]) for name in ("klein-9b-d4", "klein-9b-d8", "klein-9b-d16", "klein-9b",
                                                     "klein-4b")] == [5, 10, 20, 40, 30]
    fixed, per_unit = 0.07, 0.013
    cost = lambda units: fixed + per_unit * units  # noqa: E731
    assert extrapolate(cost(5), 5, cost(10), 10, 40) == pytest.approx(cost(40))
    # The block weights behind the units: a double block holds exactly twice a single block's matrices.
    geometry = Geometry.of(GpuCheckOptions(config="klein-9b"), CONFIGS["klein-9b"])
    assert geometry.unit_params == 13 * 4096 ** 2


def test_call_flops_order_the_rows_as_the_anchor_timings_do():
    options = GpuCheckOptions(config="klein-9b")
    geometry = Geometry.of(options, CONFIGS["klein-9b"])
    flops = {row.label: geometry.call_flops(row, CONFIGS["klein-9b"], 4) for row in check_rows(6)}
    assert flops["refs 6 keep 1 kv off"] > flops["refs 6 keep 0.1 kv off"] > flops["refs 6 keep 0.1 kv on"]
    assert flops["refs 6 keep 0.1 kv on"] > flops["refs 6 keep 0.1 kv cached"] > flops["target only"]
    # NOTES §1 on an H200: dense 6.44 s, target only 0.646 s (10x); the FLOP model gives the same order.
    assert 8 < flops["refs 6 keep 1 kv off"] / flops["target only"] < 12


@pytest.mark.parametrize("args, flag", [
    (["--config", "klein-2b"], "--config"),
    (["--depths", "d4", "d4"], "--depths"),
    (["--variants", "flash"], "--variants"),
    (["--refs", "99"], "--refs"),
    (["--budget-s", "0"], "--budget-s"),
    (["--export-workers", "-1"], "--export-workers"),
    (["--device", "tpu"], "--device"),
    (["--target-px", "100"], "--target-px"),
    (["--gpu-memory-gb", "0"], "--gpu-memory-gb"),
])
def test_bad_options_name_their_flag(args, flag, capsys):
    assert main(["bench", "gpu", "--dry-run", *args]) == 2
    error = capsys.readouterr().err
    assert flag in error and "got" in error and error.count("\n") == 1


def test_the_deeper_pair_is_opt_in_and_plans_inside_the_budget():
    """d4/d16 carries about a third of d4/d8's noise into the full-depth figure (the time difference is multiplied by
    (40 - 5) / (20 - 5) = 2.3 instead of 7); the default pair stays d4/d8, and one variant at d4/d16 fits 480 s."""
    assert GpuCheckOptions(config="klein-9b").ladder == ("d4", "d8")
    options = GpuCheckOptions(config="klein-9b", depths=("d4", "d16"), variants=("mha",), repeats=5, bf16=False,
                              export_workers=4).validate()
    plan = estimate_plan(options, gpu_memory_gb=141)
    assert plan.total_s <= 480 and all(p.fits for p in plan.phases)
    assert {p.name for p in plan.phases} >= {"export d16 mha kv", "torch_d16", "ort_d16_mha"}


def test_the_persistent_cache_row_is_timed_more_often_where_it_is_extrapolated(monkeypatch):
    """The persistent-cache row: 3x the timed calls in PyTorch phases and side rows, 6x in onnxruntime phases (the
    extrapolated figure whose noise decided runs 5-7); the plan counts them, and the next run's d4/d16 command (with
    the whole-key-tile rows), the default plan and runs 5-7's command (both variants, --repeats 5, --key-tile 0)
    stay inside 480 s on an 80 GB GPU."""
    from types import SimpleNamespace

    from sparse_context.reference import gpu_plan
    from sparse_context.reference.engine_benchmark import RowKey
    from sparse_context.reference.gpu_check import _Check

    checker = SimpleNamespace(options=SimpleNamespace(repeats=5, key_tile=0))
    hit, kv = RowKey(6, 0.1, True, cache_hit=True), RowKey(6, 0.1, True)
    assert [_Check.repeats_for(checker, hit, phase) for phase in ("ort_d8_mha-split", "torch_full", None)] == [
        30, 15, 15]
    assert _Check.repeats_for(checker, kv, "ort_d8_mha-split") == 5
    next_run = GpuCheckOptions(config="klein-9b", depths=("d4", "d16"), variants=("mha-split",), repeats=5,
                               bf16=False, export_workers=4).validate()
    for options in (next_run, GpuCheckOptions(config="klein-9b"),
                    GpuCheckOptions(config="klein-9b", repeats=5, bf16=False, export_workers=4, key_tile=0)):
        plan = estimate_plan(options, gpu_memory_gb=80)
        assert plan.total_s <= 480 and all(p.fits for p in plan.phases), [(p.name, p.seconds) for p in plan.phases]
    ort_phase = lambda plan: {p.name: p.seconds for p in plan.phases}["ort_d16_mha-split"]  # noqa: E731
    six = ort_phase(estimate_plan(next_run, gpu_memory_gb=80))
    monkeypatch.setattr(gpu_plan, "ORT_CACHE_HIT_REPEAT_FACTOR", gpu_plan.CACHE_HIT_REPEAT_FACTOR)
    assert ort_phase(estimate_plan(next_run, gpu_memory_gb=80)) < six


def test_whole_key_tile_rows_come_before_the_dense_baselines_and_keep_more_tokens():
    """--key-tile (default 128): 6 refs at keep 0.10 + KV and its persistent-cache call once more, with the kept
    tokens topped up to whole tiles of attention keys (klein-9b: 2,460 -> 2,560, 7,068 -> 7,168 keys), timed as
    often as the other rows, after the issue's rows and before the dense baselines of 1 and 3 references."""
    from types import SimpleNamespace

    from sparse_context.reference.gpu_check import _Check
    from sparse_context.runtime.errors import InputError

    plain, rows = check_rows(6), check_rows(6, DEFAULT_KEY_TILE)
    assert DEFAULT_KEY_TILE == 128 and check_rows(6, 0) == plain and len(rows) == len(plain) + 2
    assert rows[:7] == plain[:7] and rows[9:] == plain[7:]
    assert [row.label for row in rows[7:9]] == ["refs 6 keep 0.1 kv on tile 128", "refs 6 keep 0.1 kv cached tile 128"]
    assert rows[8].kv_row == rows[7] and rows[2].kv_row == rows[1]  # each cache hit reuses its own KV row's K/V
    geometry = Geometry.of(GpuCheckOptions(config="klein-9b"), CONFIGS["klein-9b"])
    assert geometry.ref_tokens(rows[2]) == 2460 and geometry.ref_tokens(rows[8]) == 2560
    assert geometry.call_flops(rows[8], CONFIGS["klein-9b"], 4) > geometry.call_flops(rows[2], CONFIGS["klein-9b"], 4)
    # The two persistent-cache rows share the extra calls: the same precision for both, at the same cost.
    checker = SimpleNamespace(options=SimpleNamespace(repeats=5, key_tile=DEFAULT_KEY_TILE))
    for phase, each, alone in (("ort_d16_mha-split", 18, 30), ("torch_full", 10, 15)):
        assert _Check.repeats_for(checker, rows[8], phase) == _Check.repeats_for(checker, rows[2], phase) == each
        assert abs(2 * each - (alone + 5)) <= 1  # the pair costs what the row alone and a twin at --repeats cost
        assert _Check.repeats_for(SimpleNamespace(options=SimpleNamespace(repeats=5, key_tile=0)), rows[2],
                                  phase) == alone
    assert _Check.repeats_for(checker, rows[7], "ort_d16_mha-split") == _Check.repeats_for(checker, rows[1]) == 5
    assert _Check.repeats_for(checker, rows[2]) == 15  # side rows: the row as kept alone, as before
    with pytest.raises(InputError, match="key tile: got -1.*--key-tile"):
        GpuCheckOptions(key_tile=-1).validate()
    untiled = estimate_plan(GpuCheckOptions(config="klein-9b", key_tile=0), gpu_memory_gb=80)
    assert untiled.total_s < estimate_plan(GpuCheckOptions(config="klein-9b"), gpu_memory_gb=80).total_s


def test_whole_key_tile_rows_are_compared_side_by_side_and_judged_like_the_rows_they_top_up():
    data = _data(ort_factor=0.9)
    for rows in data["rows"].values():
        for row in list(rows)[1:]:  # 2 % faster with 100 more tokens
            rows.append({**row, "label": f"{row['label']} tile 128", "tile": 128, "seconds": 0.98 * row["seconds"],
                         "ref_tokens": 2560})
            row["ref_tokens"] = 2460
    data["setup"]["key_tile"] = 128
    profile = lambda attention, busy: {"status": "done", "busy_ms": busy, "ms_per_category": {  # noqa: E731
        "attention": attention, "matmul": busy - attention}}
    data["phases"] = {"ort_d4_mha": {"kernels": {"refs 6 keep 0.1 kv cached": profile(14.6, 76.1),
                                                 "refs 6 keep 0.1 kv cached tile 128": profile(13.9, 75.5)}}}
    data["derived"] = derive(data)
    tiles = data["derived"]["key_tiles"]
    in_kernels = tiles["ort_d4_mha"]["refs 6 keep 0.1 kv cached"]
    assert in_kernels["attention_ms"] == [14.6, 13.9] and in_kernels["busy_ms"] == [76.1, 75.5]
    cached = tiles["torch_full"]["refs 6 keep 0.1 kv cached"]
    assert cached["tiled_over_plain"] == pytest.approx(0.98) and (cached["plain_tokens"], cached["tiled_tokens"]) == (
        2460, 2560)
    assert tiles["ort mha full (extrapolated)"]["refs 6 keep 0.1 kv cached"]["tiled_over_plain"] == pytest.approx(0.98)
    criteria = acceptance(data)
    dense, hit = 0.01 + 0.17 * 40, 0.01 + 0.018 * 40
    entry = criteria["torch: speedup persistent cache, whole key tiles of 128"]
    assert entry["value"] == pytest.approx(dense / (0.98 * hit)) and entry["target"] == ">= 9.5"
    assert criteria["torch: speedup persistent cache"]["value"] == pytest.approx(dense / hit)
    assert "ort mha: speedup persistent cache, whole key tiles of 128 (extrapolated)" in criteria
    text = "\n".join(summary_lines({**data, "acceptance": criteria, "skipped": [], "precision": "fp16",
                                     "device": "cuda", "setup": {**data["setup"], "target_px": 1024, "ref_px": 1024,
                                                                 "text_tokens": 512, "steps": 4}}))
    assert (f"torch_full refs 6 keep 0.1 kv cached: whole key tiles of 128 {0.98 * hit:.3f}s, as kept {hit:.3f}s "
            "(0.980x) (2560 against 2460 reference tokens)") in text
    assert ("ort_d4_mha refs 6 keep 0.1 kv cached, one generation's GPU time: attention 13.9 ms with whole key tiles "
            "of 128, 14.6 ms as kept; all kernels 75.5 against 76.1 ms") in text
    table = [line for line in text.splitlines() if line.startswith("refs 6 keep 0.1 kv cached tile 128 ")]
    assert len(table) == 1 and f"{0.98 * hit:.3f}s" in table[0]  # the table's own row, its label in full


def test_sync_option_of_the_check():
    from sparse_context.runtime.errors import InputError

    with pytest.raises(InputError, match="synchronization: got 'step'; allowed: run or image.*--sync"):
        GpuCheckOptions(sync="step").validate()
    image, run = (estimate_plan(GpuCheckOptions(config="klein-9b", sync=sync), gpu_memory_gb=80) for sync in
                  ("image", "run"))
    assert run.total_s < image.total_s  # no rows waiting after every run to time beside the others


def _row(label, refs, keep, kv, hit, seconds):
    return {"label": label, "refs": refs, "keep": keep, "kv": kv, "cache_hit": hit, "seconds": seconds}


def test_whole_key_tile_ratio_comes_with_its_spread_over_the_timed_calls():
    """tiled / as kept per phase and extrapolated to full depth, with the 5th-95th percentile over bootstrap
    resamples of both rows' calls: a 2 % gain over 1 % jitter clears 1.0; the same calls in both rows do not."""
    data = _data(ort_factor=0.9)
    jitter = [0.99, 1.0, 1.01, 0.995, 1.005, 1.0, 0.99, 1.01, 1.0]
    for phase, rows in data["rows"].items():
        for row in list(rows)[1:]:
            gain = 1.0 if phase.endswith("d8_mha") else 0.98  # d8: no gain, so the extrapolation sees less of it
            row["samples_s"] = [row["seconds"] * j for j in jitter]
            rows.append({**row, "label": f"{row['label']} tile 128", "tile": 128, "seconds": gain * row["seconds"],
                         "samples_s": [gain * row["seconds"] * j for j in reversed(jitter)]})
    data["setup"]["key_tile"] = 128
    tiles = derive(data)["key_tiles"]
    low, high = tiles["torch_full"]["refs 6 keep 0.1 kv cached"]["tiled_over_plain_interval"]
    assert low < 0.98 < high < 1.0  # faster beyond the noise
    low, high = tiles["ort_d8_mha"]["refs 6 keep 0.1 kv cached"]["tiled_over_plain_interval"]
    assert low < 1.0 < high  # the same calls: no verdict
    full = tiles["ort mha full (extrapolated)"]["refs 6 keep 0.1 kv cached"]
    low, high = full["tiled_over_plain_interval"]
    assert low < full["tiled_over_plain"] < high and full["tiled_over_plain"] > 1.0  # d8 - d4 carries it up
    data["derived"] = derive(data)
    data["acceptance"] = acceptance(data)
    text = "\n".join(summary_lines({**data, "skipped": [], "precision": "fp16", "device": "cuda",
                                     "setup": {**data["setup"], "target_px": 1024, "ref_px": 1024,
                                               "text_tokens": 512, "steps": 4}}))
    entry = tiles["torch_full"]["refs 6 keep 0.1 kv cached"]
    spread = entry["tiled_over_plain_interval"]
    assert (f"torch_full refs 6 keep 0.1 kv cached: whole key tiles of 128 {entry['tiled_s']:.3f}s, as kept "
            f"{entry['plain_s']:.3f}s (0.980x [{spread[0]:.3f}-{spread[1]:.3f}])") in text


def _data(ort_factor):
    """A report with PyTorch at three depths following ``fixed + units x per unit``, onnxruntime at two."""
    rows = lambda scale, fixed: [  # noqa: E731
        _row("refs 6 keep 1 kv off", 6, 1.0, False, False, fixed + 0.17 * scale),
        _row("refs 6 keep 0.1 kv on", 6, 0.1, True, False, fixed + 0.021 * scale),
        _row("refs 6 keep 0.1 kv cached", 6, 0.1, True, True, fixed + 0.018 * scale)]
    units = {"d4": 5, "d8": 10, "full": 40}
    data = {"config": "klein-9b", "depths": ["d4", "d8"], "variants": ["mha"], "setup": {"refs": 6},
            "rows": {"torch_full": rows(units["full"], 0.01), "torch_d4": rows(units["d4"], 0.01),
                     "torch_d8": rows(units["d8"], 0.01),
                     "ort_d4_mha": rows(units["d4"] * ort_factor, 0.02),
                     "ort_d8_mha": rows(units["d8"] * ort_factor, 0.02)},
            "selection": {"edge": {"select_s": 0.004, "pack_s": 0.001}}}
    data["derived"] = derive(data)
    return data


def test_report_extrapolates_onnxruntime_and_checks_the_prediction_on_pytorch():
    data = _data(ort_factor=0.9)
    derived = data["derived"]
    for check in derived["torch_extrapolation_check"].values():
        assert check["error"] == pytest.approx(0.0, abs=1e-12)
    dense = derived["ort"]["mha"]["rows"]["refs 6 keep 1 kv off"]
    assert dense["predicted_full_s"] == pytest.approx(0.02 + 0.17 * 40 * 0.9)
    assert dense["ratio_full"] == pytest.approx((0.02 + 0.17 * 36) / (0.01 + 0.17 * 40))
    criteria = acceptance(data)
    assert criteria["ort mha: onnxruntime / PyTorch, worst row, full"]["passed"] is True
    kv = criteria["torch: speedup 6 refs keep 0.10 + KV"]
    assert kv["value"] == pytest.approx((0.01 + 0.17 * 40) / (0.01 + 0.021 * 40)) and kv["passed"] is True
    share = criteria["selection + packing share (edge)"]
    assert share["value"] == pytest.approx(0.005 / (0.01 + 0.021 * 40))
    slower = acceptance(_data(ort_factor=1.2))
    assert slower["ort mha: onnxruntime / PyTorch, worst row, d8"]["passed"] is False


def test_no_full_run_still_extrapolates_onnxruntime_speedups():
    """--no-full: no PyTorch rows at full depth, so no full-depth ratio; onnxruntime's own extrapolated speedups
    need none."""
    data = _data(ort_factor=0.9)
    del data["rows"]["torch_full"]
    data["derived"] = derive(data)
    predicted = data["derived"]["ort"]["mha"]["predicted_full_speedups"]
    dense, kv = 0.02 + 0.17 * 36, 0.02 + 0.021 * 36
    assert predicted["refs 6 keep 0.1 kv on"] == pytest.approx(dense / kv)
    criteria = acceptance(data)
    measured = criteria["ort mha: speedup 6 refs keep 0.10 + KV (extrapolated)"]
    assert measured["value"] == pytest.approx(dense / kv) and measured["passed"] is (dense / kv >= 8)
    assert criteria["ort mha: onnxruntime / PyTorch, worst row, full"]["passed"] is None
    assert criteria["torch: speedup 6 refs keep 0.10 + KV"]["passed"] is None


def test_speedups_carry_the_interval_of_their_timing_noise():
    """Each row's timed calls give a bootstrap interval of its speedup: identical calls give a zero-width one at the
    median, noisy calls a wider one around it, and the acceptance says whether the target clears the whole of it."""
    data = _data(ort_factor=0.9)
    for rows in data["rows"].values():
        for row in rows:
            row["samples_s"] = [row["seconds"]] * 5
    data["derived"] = derive(data)
    derived = data["derived"]
    kv, hit = "refs 6 keep 0.1 kv on", "refs 6 keep 0.1 kv cached"
    measured = derived["speedups"]["torch_full"][kv]
    assert derived["torch_full_speedup_intervals"][kv] == pytest.approx([measured, measured])
    extrapolated = derived["ort"]["mha"]["predicted_full_speedups"][hit]
    assert derived["ort"]["mha"]["predicted_full_speedup_intervals"][hit] == pytest.approx([extrapolated] * 2)
    assert "refs 6 keep 1 kv off" not in derived["torch_full_speedup_intervals"]  # dense over itself: no interval

    rng = np.random.default_rng(1)
    for name in ("ort_d4_mha", "ort_d8_mha"):  # 2 % noise on every call at the reduced depths
        for row in data["rows"][name]:
            row["samples_s"] = list(row["seconds"] * (1 + 0.02 * rng.standard_normal(15)))
    data["derived"] = derive(data)
    low, high = data["derived"]["ort"]["mha"]["predicted_full_speedup_intervals"][hit]
    assert low < extrapolated < high and high - low > 0.05 * extrapolated  # the extrapolation amplifies the noise
    for row in data["rows"]["torch_full"]:
        row["samples_s"] = row["samples_s"][:1]  # one timed call is not a spread
    data["derived"] = derive(data)
    criteria = acceptance(data)
    entry = criteria["ort mha: speedup persistent cache (extrapolated)"]
    assert entry["interval_90"] == [low, high] and entry["clears_within_noise"] is (low >= 9.5)
    assert criteria["torch: speedup persistent cache"]["interval_90"] is None
    text = "\n".join(summary_lines({**data, "acceptance": criteria, "skipped": [], "precision": "fp16",
                                     "device": "cuda", "setup": {"refs": 6, "target_px": 1024, "ref_px": 1024,
                                                                 "text_tokens": 512, "steps": 4}}))
    assert f"90 % of resamples {low:.4g}-{high:.4g}" in text
    # Each onnxruntime phase's side rows are printed with what they compare.
    phases = {"ort_d4_mha": {
        "waits_per_run": {"status": "done", "rows": {"refs 6 keep 0.1 kv cached": {
            "run_s": 0.105, "image_s": 0.1, "run_over_image": 1.05, "latents_equal": True}}},
        "host_steps": {"status": "done", "row": "refs 6 keep 0.1 kv on", "host_steps_s": 0.15, "device_steps_s": 0.1,
                       "host_over_device": 1.5, "latents_equal": False}}}
    text = "\n".join(summary_lines({**data, "acceptance": criteria, "skipped": [], "precision": "fp16",
                                     "device": "cuda", "phases": phases,
                                     "setup": {"refs": 6, "target_px": 1024, "ref_px": 1024, "text_tokens": 512,
                                               "steps": 4}}))
    assert ("ort_d4_mha refs 6 keep 0.1 kv cached: a wait after every run 0.105s, one per image 0.100s (1.050x), "
            "latents equal") in text
    assert "ort_d4_mha refs 6 keep 0.1 kv on: host steps 0.150s, device steps 0.100s (1.500x), latents DIFFER" in text


def test_speedups_need_the_dense_row_of_the_same_reference_count():
    rows = [_row("refs 6 keep 1 kv off", 6, 1.0, False, False, 6.0), _row("refs 6 keep 0.1 kv on", 6, 0.1, True,
            False, 0.75), _row("refs 3 keep 0.1 kv on", 3, 0.1, True, False, 0.7)]
    assert speedups(rows) == {"refs 6 keep 1 kv off": 1.0, "refs 6 keep 0.1 kv on": 8.0}


def test_profile_summary_counts_providers_and_finds_heavy_cpu_nodes(tmp_path):
    """A real onnxruntime profile of a small MatMul graph on the CPU provider: read as a CUDA session's would be,
    every MatMul on the CPU is a fallback; read as a CPU session's, none is."""
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    from sparse_context.reference.gpu_check import summarize_profile

    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="r")]
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.ones(64 * 64, np.float32))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "p")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((32, 64), np.float32)})
    path = Path(session.end_profiling())
    as_cuda = summarize_profile(path)
    assert as_cuda["nodes_per_provider"] == {"CPUExecutionProvider": 2}
    assert as_cuda["cpu_fallback_count"] == 2 and as_cuda["cpu_fallbacks"]["mm"]["op"] == "MatMul"
    as_cpu = summarize_profile(path, expect_cpu=True)
    assert as_cpu["cpu_fallback_count"] == 0 and {t["op"] for t in as_cpu["top_ops"]} == {"MatMul", "Relu"}
    runs = as_cpu["runs"]  # one session run; its nodes' time lies inside the run's
    assert runs["count"] == 1 and 0 < runs["node_ms"] <= runs["run_ms"]


class _BackendIO:
    """What the probe's fallbacks change on a backend: when it waits, its step mode and its I/O device."""

    def __init__(self, sync):
        self.sync, self.device_steps, self.io_device = sync, True, "cuda"

    def set_sync(self, sync):
        self.sync = sync

    def set_io_device(self, device):
        self.io_device = device


class _FailingProbe:
    """The checker's probe failing its first ``failures`` calls, as a provider's kernel error would."""

    def __init__(self, failures):
        self.failures, self.calls, self.lines = failures, [], []
        self.log = self.lines.append

    def _probe(self, backend, phase):
        self.calls.append((backend.sync, backend.device_steps, backend.io_device))
        if len(self.calls) <= self.failures:
            raise RuntimeError(f"kernel failure {len(self.calls)}")
        phase.update(io=backend.io_device, device_steps=backend.device_steps, sync=backend.sync)
        return {"kv": "profiled"}


FALLBACKS = [("image", True, "cuda"), ("run", True, "cuda"), ("run", False, "cuda"), ("run", False, "cpu")]


@pytest.mark.parametrize("failures", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("sync", ["image", "run"])
def test_probe_falls_back_to_waits_per_run_host_steps_then_host_io_and_records_why(failures, sync):
    """One wait per image first, then a wait after every run, host steps, host I/O; a backend that already
    waits after every run starts at the second."""
    from sparse_context.reference.gpu_check import _Check

    checker, backend, phase = _FailingProbe(failures), _BackendIO(sync), {}
    ladder = FALLBACKS if sync == "image" else FALLBACKS[1:]
    if failures >= len(ladder):  # nothing left to fall back to: the phase fails with the last error
        with pytest.raises(RuntimeError, match=f"kernel failure {len(ladder)}"):
            _Check._probe_with_fallbacks(checker, backend, phase, "ort_d4_mha")
        assert checker.calls == ladder
        return
    attempts = ladder[:failures + 1]
    assert _Check._probe_with_fallbacks(checker, backend, phase, "ort_d4_mha") == {"kv": "profiled"}
    assert checker.calls == attempts
    assert (phase["sync"], phase["device_steps"], phase["io"]) == attempts[-1]
    errors = ["sync_error", "device_steps_error", "device_io_error"][len(FALLBACKS) - len(ladder):]
    assert [key for key in errors if key in phase] == errors[:failures]
    if failures:
        assert phase[errors[0]] == "RuntimeError: kernel failure 1"
        assert ("a wait after every run" if sync == "image" else "host steps") in checker.lines[0]


class _SyncBackend:
    def __init__(self, sync):
        self.sync, self.switches = sync, []

    def set_sync(self, sync):
        self.switches.append(sync)
        self.sync = sync


class _ReplayRunner:
    """Rows as a LoopRunner returns them: (median, wall, latents), recording the backend's mode of each call."""

    def __init__(self, backend, latents, fail=False):
        self.backend, self.latents, self.fail, self.calls, self.samples = backend, latents, fail, [], []

    def run(self, row, repeats=None):
        self.calls.append((row.label, repeats, self.backend.sync))
        if self.fail:
            raise RuntimeError("kernel failure")
        self.samples = [0.2] * repeats
        return 0.2, 0.2 * (repeats + 1), self.latents[row.cache_hit]


def _waits_checker(budget_s=100.0):
    from types import SimpleNamespace

    from sparse_context.reference.engine_benchmark import TimeBudget
    from sparse_context.reference.gpu_check import _Check

    options = GpuCheckOptions(config="tiny", repeats=2)
    checker = SimpleNamespace(options=options, budget=TimeBudget(budget_s), lines=[])
    checker.log = checker.lines.append
    checker.repeats_for = lambda row: _Check.repeats_for(checker, row)
    checker._rerun = lambda *args: _Check._rerun(checker, *args)
    return checker


@pytest.mark.parametrize("case", ["done", "differ", "waits per run already", "--sync run", "rows missing",
                                  "over budget", "fails"])
def test_waits_per_run_side_rows(case):
    """The KV row and its persistent-cache call again with a wait after every run, on the same sessions: both
    times, the ratio and whether the latents are identical; the backend goes back to one wait per image, also
    when a row fails; skipped (saying why) when there is nothing to compare."""
    from sparse_context.reference.engine_benchmark import RowKey
    from sparse_context.reference.gpu_check import _Check

    checker = _waits_checker(budget_s=0.5 if case == "over budget" else 100.0)
    if case == "--sync run":
        checker.options = GpuCheckOptions(config="tiny", repeats=2, sync="run")
    backend = _SyncBackend("run" if case in ("waits per run already", "--sync run") else "image")
    kv, hit = RowKey(6, 0.1, True), RowKey(6, 0.1, True, cache_hit=True)
    latents = {False: np.zeros(3), True: np.ones(3)}
    timed = {kv: (0.1, latents[False]), hit: (0.05, latents[True] + (case == "differ"))}
    if case == "rows missing":
        del timed[hit]
    runner = _ReplayRunner(backend, latents, fail=case == "fails")
    if case == "fails":
        with pytest.raises(RuntimeError, match="kernel failure"):
            _Check._waits_per_run(checker, backend, runner, timed)
        assert backend.switches == ["run", "image"] and backend.sync == "image"
        return
    result = _Check._waits_per_run(checker, backend, runner, timed)
    reasons = {"waits per run already": "(see sync_error)", "--sync run": "--sync run: the rows already waited",
               "rows missing": "did not run", "over budget": "does not fit the budget"}
    if case in reasons:
        assert result["status"] == "skipped" and reasons[case] in result["reason"] and not runner.calls
        return
    # The KV row first (its K/V serve the cache-hit call), each at its own repeats, both waiting after every run.
    assert runner.calls == [(kv.label, 2, "run"), (hit.label, 6, "run")] and backend.sync == "image"
    rows = result["rows"]
    assert rows[kv.label]["run_over_image"] == pytest.approx(2.0) and rows[hit.label]["run_over_image"] == \
        pytest.approx(4.0)
    assert rows[kv.label]["latents_equal"] and rows[hit.label]["latents_equal"] == (case == "done")
    assert len(rows[hit.label]["samples_s"]) == 6 and len(checker.lines) == 2


@pytest.mark.slow
def test_tiny_plan_killed_mid_run_leaves_every_finished_row(tmp_path):
    """The whole command in a child process, killed (SIGKILL: no cleanup runs) once a phase after PyTorch's
    full-depth rows has finished: the report on disk holds every row that finished, and parses."""
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    out = tmp_path / "out"
    # In-process exports: a SIGKILLed parent would leave export workers (their own sessions) running.
    command = [sys.executable, "-m", "sparse_context", *TINY, "--export-workers", "0", "--budget-s", "300",
               "--out", str(out), "--work-dir", str(tmp_path / "work")]
    environment = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)
    seen, deadline = [], time.monotonic() + 240
    try:
        for line in process.stdout:
            seen.append(line)
            if line.startswith("torch_d2 done") or time.monotonic() > deadline:
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert any(line.startswith("torch_d2 done") for line in seen), "".join(seen[-20:])
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["status"] == "running"  # killed: never finished
    assert report["phases"]["torch_full"]["status"] == "done" and report["phases"]["torch_d2"]["status"] == "done"
    for phase in ("torch_full", "torch_d2"):
        labels = {row["label"] for row in report["rows"][phase]}
        assert labels == {row.label for row in check_rows(6, DEFAULT_KEY_TILE)}
    assert report["selection"]["edge"]["references"] == 6
    assert not list(out.glob(".gpu_check.json.*")), "a half-written report was left behind"


def test_cuda_asked_where_torch_sees_no_gpu_is_refused_before_any_work(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU, so --device cuda is valid here")
    args = TINY + ["--device", "cuda", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "--device" in error and "no CUDA GPU" in error
    assert not (tmp_path / "work" / "onnx").exists()  # nothing exported


def test_too_little_disk_for_the_exports_names_the_work_folder(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    import shutil as shutil_module

    from sparse_context.reference import gpu_check

    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    args = TINY + ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "free disk" in error and "--work-dir" in error
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["phases"]["environment"]["status"] == "failed" and not report["rows"]


def _fake_export(folder: Path, manifest: dict, payload: int) -> int:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "model.onnx.data").write_bytes(b"\0" * payload)
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def test_a_rerun_counts_what_the_work_folder_already_holds(tmp_path):
    """Run 9 on the H200: a second call on the warm machine, whose first call had left 30 GB of exports in the work
    folder, was refused for want of 40 GB free. What the run would reuse now counts as room: the complete model
    folders of its depths and the complete exports (this exporter's format) of its jobs, matched on graph, forms
    and model shape; stale, foreign and damaged exports do not count."""
    from sparse_context.export.manifest import FORMAT_VERSION
    from sparse_context.reference.gpu_check import export_job, model_folder, reusable_bytes

    options = GpuCheckOptions(config="klein-9b", variants=("mha-split",), work_dir=tmp_path).validate()
    folder = model_folder(options, "d4")
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "transformer" / "weights.safetensors").write_bytes(b"\0" * 1000)
    expected = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    half_written = model_folder(options, options.ladder[1])  # no model_index.json: written again
    (half_written / "transformer").mkdir(parents=True)
    (half_written / "transformer" / "weights.safetensors").write_bytes(b"\0" * 3000)

    job = export_job(options, "d4", "mha-split", "kv")
    d4 = {name: CONFIGS["klein-9b-d4"][name] for name in ("num_layers", "num_single_layers", "num_attention_heads",
                                                          "attention_head_dim")}
    manifest = {"graph": "kv", "precision": job["precision"], "attention": job["attention"],
                "projections": job["projections"], "ref_stream": job["ref_stream"], "model_config": d4,
                "versions": {"format": str(FORMAT_VERSION)}}
    onnx_dir = tmp_path / "onnx"
    expected += _fake_export(onnx_dir / "kv-a", manifest, 5000)
    _fake_export(onnx_dir / "kv-stale", {**manifest, "versions": {"format": str(FORMAT_VERSION - 1)}}, 7000)
    _fake_export(onnx_dir / "kv-4b", {**manifest, "model_config": {**d4, "num_attention_heads": 24}}, 11000)
    _fake_export(onnx_dir / "kv-plain", {**manifest, "ref_stream": "plain"}, 13000)  # not a job of this run
    _fake_export(onnx_dir / "kv-damaged", {"graph": "kv"}, 17000)
    assert reusable_bytes(options) == expected


def test_reused_exports_are_room_for_the_rerun(tmp_path, monkeypatch, capsys):
    """The environment step with 30 GB free and the first run's exports in the work folder plans the run (run 9's
    plan, klein-9b at d4 and d16, needs 40 GB for its folders and one variant's exports); with nothing to reuse it
    is refused, and with too little to reuse the error names both figures."""
    pytest.importorskip("torch")
    import shutil as shutil_module

    from sparse_context.reference import gpu_check
    from sparse_context.reference.engine_benchmark import TimeBudget
    from sparse_context.reference.gpu_report import CheckReport
    from sparse_context.runtime.errors import InputError

    options = GpuCheckOptions(config="klein-9b", variants=("mha-split",), depths=("d4", "d16"), device="cpu",
                              work_dir=tmp_path / "work", out=tmp_path / "out").validate()
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(gpu_check.shutil, "disk_usage", lambda path: usage._replace(free=int(30e9)))
    lines = []
    checker = gpu_check._Check(options, TimeBudget(480), CheckReport(options, tmp_path / "out", lines.append),
                               lines.append)
    monkeypatch.setattr(gpu_check, "reusable_bytes", lambda options: 0)
    with pytest.raises(InputError, match=r"free disk .* got 30\.0;"):
        checker._environment()
    monkeypatch.setattr(gpu_check, "reusable_bytes", lambda options: int(30e9))
    environment = checker._environment()
    assert environment["reused_gb"] == 30.0 and environment["plan"]
    monkeypatch.setattr(gpu_check, "reusable_bytes", lambda options: int(1e9))
    with pytest.raises(InputError, match=r"got 30\.0; allowed: at least 40, counting the 1\.0 GB this run would reuse"):
        checker._environment()
    # Room for one variant of two, counting what is reused: the second is skipped, and the reason counts it too.
    two = GpuCheckOptions(config="klein-9b", variants=("mha-split", "mha-split-plain"), depths=("d4", "d16"),
                          device="cpu", work_dir=tmp_path / "work", out=tmp_path / "out2").validate()
    report = CheckReport(two, tmp_path / "out2", lines.append)
    checker = gpu_check._Check(two, TimeBudget(480), report, lines.append)
    monkeypatch.setattr(gpu_check, "reusable_bytes", lambda options: int(30e9))
    checker._environment()
    assert checker.options.variants == ("mha-split",)
    assert [s["what"] for s in report.data["skipped"]] == ["variant mha-split-plain"]
    assert report.data["skipped"][0]["reason"].startswith("disk: 60 GB free or reused holds 1 variant(s)")


def test_kernel_profiles_are_estimated_from_the_rows_they_profile():
    """Run 9 skipped the d16 kernel profile: 50 s of budget were left after the last row, less after the side
    measurements, and the estimate came from PyTorch's whole d16 phase (52 s of wall for nine rows): 45 s.
    Estimated from the three profiled rows' own times (0.30, 0.37, 0.33 s) it is ~10 s; rows that were not timed
    keep the phase-based guess."""
    from sparse_context.reference.gpu_check import PROFILE_ROW_S, profile_estimate

    report = json.loads((Path(__file__).resolve().parents[1] / "reference" / "measured" /
                         "gpu_check_h200_2026-11-27_run9.json").read_text())
    rows = {row["label"]: row["seconds"] for row in report["rows"]["ort_d16_mha-split"]}
    profiled = [rows["target only"], rows["refs 6 keep 0.1 kv on"], rows["refs 6 keep 0.1 kv cached"]]
    wall = sum(row["wall_s"] for row in report["rows"]["torch_d16"])
    assert 3 * 2.0 * wall / 9 + 10.0 > 40  # the old estimate
    assert profile_estimate(profiled, wall) == pytest.approx(3.0 * sum(profiled) + 3 * PROFILE_ROW_S)
    assert profile_estimate(profiled, wall) < 15
    assert profile_estimate([None, 0.3, None], 90.0) == pytest.approx(2 * (20.0 + PROFILE_ROW_S) + 0.9 +
                                                                      PROFILE_ROW_S)


def test_time_outside_kernels_from_the_h200_report():
    """Row time = GPU busy time + the rest, split at the time inside the runs where each run waited (run 4 on the
    H200, in the repository); with one wait per image the split is left out."""
    from sparse_context.reference.gpu_report import outside_kernels

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "reference" / "measured" / "gpu_check_h200_2026-11-27_run4.json").read_text())
    gaps = outside_kernels(report)
    cached = gaps["ort_d4_mha"]["refs 6 keep 0.1 kv cached"]
    assert (round(cached["row_ms"], 1), round(cached["busy_ms"], 1)) == (98.8, 83.6)
    assert round(cached["idle_in_runs_ms"], 1) == 8.0 and round(cached["outside_runs_ms"], 1) == 7.3
    assert cached["idle_in_runs_ms"] + cached["outside_runs_ms"] == pytest.approx(cached["outside_kernels_ms"])
    assert set(gaps["torch_d4"]["target only"]) == {"row_ms", "busy_ms", "outside_kernels_ms"}  # PyTorch: no runs
    report["phases"]["ort_d4_mha"]["sync"] = "image"
    assert "idle_in_runs_ms" not in outside_kernels(report)["ort_d4_mha"]["target only"]
    report["phases"]["ort_d4_mha"]["sync"] = "run"
    report["derived"] = derive(report)
    report["acceptance"] = acceptance(report)
    text = "\n".join(summary_lines(report))
    assert ("ort_d4_mha refs 6 keep 0.1 kv cached: 98.8 ms = 83.6 GPU busy + 15.2 outside kernels (8.0 idle inside "
            "runs, 7.3 outside them)") in text
    pytest.importorskip("matplotlib", reason="the picture needs the plot extra (pip install .[plot])")
    from sparse_context.reference.gpu_report import plot_png

    assert plot_png(report).startswith(b"\x89PNG")  # a third panel: busy vs outside kernels per profiled row


def test_busy_and_outside_kernel_time_extrapolate_apart_to_full_depth():
    """With kernel profiles at both depths, GPU busy time and the time outside kernels each go to full depth on
    their own line (klein-9b = 8 units of d4, d8 = 2), with what each adds per unit; rows or phases profiled at
    one depth only are left out."""
    from sparse_context.reference.gpu_report import kernels_at_full_depth

    def entry(row_ms, busy_ms):
        return {"row_ms": row_ms, "busy_ms": busy_ms, "outside_kernels_ms": row_ms - busy_ms}

    outside = {"torch_d4": {"target only": entry(90.0, 82.0)}, "torch_d8": {"target only": entry(178.0, 162.0)},
               "ort_d4_mha-split": {"cached": entry(89.0, 78.0), "kv on": entry(95.0, 85.0)},
               "ort_d8_mha-split": {"cached": entry(176.0, 158.0)}, "ort_d4_mha": {"cached": entry(97.0, 86.0)}}
    result = kernels_at_full_depth(outside, ("d4", "d8"), {"d4": 1.0, "d8": 2.0, "full": 8.0})
    assert set(result) == {"torch", "ort mha-split"} and set(result["ort mha-split"]) == {"cached"}
    cached = result["ort mha-split"]["cached"]
    assert cached == pytest.approx({"busy_full_ms": 78.0 + 7 * 80.0, "outside_full_ms": 11.0 + 7 * 7.0,
                                    "busy_per_unit_ms": 80.0, "outside_per_unit_ms": 7.0})
    assert result["torch"]["target only"]["outside_per_unit_ms"] == pytest.approx(8.0)
    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "reference" / "measured" / "gpu_check_h200_2026-11-27_run6.json").read_text())
    report["derived"]["kernels_at_full_depth"] = result
    text = "\n".join(summary_lines(report))
    assert ("ort mha-split cached at full depth (extrapolated): 638.0 ms GPU busy (+80.0 per unit) + 60.0 outside "
            "kernels (+7.0 per unit)") in text



def test_what_the_persistent_cache_call_adds_over_target_only_by_kernel_category():
    """From the kernel profiles of run 7 (H200): the persistent-cache call's extra GPU time over the target-only
    call per backend and kernel category, at d4, d8 and extrapolated to full depth; a phase profiled without one
    of the two rows is left out, and a backend profiled at one depth keeps that depth only."""
    from sparse_context.reference.gpu_report import cached_over_target

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "reference" / "measured" / "gpu_check_h200_2026-11-27_run7.json").read_text())
    units = {"d4": 5.0, "d8": 10.0, "full": 40.0}
    result = cached_over_target(report, ("d4", "d8"), units)
    assert set(result) == {"torch", "ort mha-split", "ort mha-split-plain"}
    plain = result["ort mha-split-plain"]
    assert (round(plain["d8"]["busy"], 1), round(plain["d8"]["attention"], 1), round(plain["d8"]["copy"], 1)) == (
        13.6, 12.5, 2.0)
    for backend in result.values():  # categories add up to the busy time at every depth
        for values in backend.values():
            assert sum(v for k, v in values.items() if k != "busy") == pytest.approx(values["busy"])
    torch = result["torch"]
    assert torch["full"]["attention"] == pytest.approx(
        torch["d4"]["attention"] + 7 * (torch["d8"]["attention"] - torch["d4"]["attention"]))
    del report["phases"]["ort_d8_mha-split"]["kernels"]["target only"]
    one_depth = cached_over_target(report, ("d4", "d8"), units)["ort mha-split"]
    assert set(one_depth) == {"d4"}
    report["derived"] = derive(report)
    text = "\n".join(summary_lines(report))
    assert "ort mha-split-plain persistent cache over target only, GPU ms at d4 · d8 · full (extrapolated): busy " \
           "+6.3 · +13.6 · +57.3 = attention +5.5 · +12.5 · +54.2, copy +1.0 · +2.0 · +8.5" in text
    assert "ort mha-split persistent cache over target only, GPU ms at d4: busy +6.8 = attention +6.0" in text


class _GraphBackend:
    """What the checker reads of a backend with CUDA graphs: whether they are on, and the switch."""

    def __init__(self, enabled=True, capture=True):
        from types import SimpleNamespace

        from sparse_context.engines.ort.graphs import GraphStats

        self.graphs = SimpleNamespace(enabled=enabled, capture=capture, stats=GraphStats(graphs=1, calls=3))
        self.switches, self.sync = [], "image"

    def set_cuda_graphs(self, on):
        self.switches.append(on)
        self.graphs.enabled = on


class _GraphRunner(_ReplayRunner):
    """Rows whose time and latents depend on whether CUDA graphs are on; ``fail`` raises with graphs on."""

    def run(self, row, repeats=None):
        on = self.backend.graphs.enabled
        self.calls.append((row.label, repeats, on))
        if self.fail and on:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.samples = [0.2] * (repeats or 1)
        return (0.1 if on else 0.2), 0.3, self.latents[row.cache_hit]


@pytest.mark.parametrize("case", ["done", "differ", "graphs failed", "rows missing", "over budget", "fails"])
def test_without_graphs_side_rows(case):
    """The KV row and its persistent-cache call again with CUDA graphs off, on the same sessions: both times, the
    ratio and whether the latents are identical; graphs go back on, also when a row fails; skipped (saying why)
    when there is nothing to compare."""
    from sparse_context.reference.engine_benchmark import RowKey
    from sparse_context.reference.gpu_check import _Check

    checker = _waits_checker(budget_s=0.5 if case == "over budget" else 100.0)
    backend = _GraphBackend(enabled=case != "graphs failed")
    kv, hit = RowKey(6, 0.1, True), RowKey(6, 0.1, True, cache_hit=True)
    latents = {False: np.zeros(3), True: np.ones(3)}
    timed = {kv: (0.1, latents[False]), hit: (0.05, latents[True] + (case == "differ"))}
    if case == "rows missing":
        del timed[hit]
    runner = _GraphRunner(backend, latents)
    if case == "fails":
        runner.run = lambda row, repeats=None: (_ for _ in ()).throw(RuntimeError("kernel failure"))
        with pytest.raises(RuntimeError, match="kernel failure"):
            _Check._without_graphs(checker, backend, runner, timed)
        assert backend.switches == [False, True] and backend.graphs.enabled
        return
    result = _Check._without_graphs(checker, backend, runner, timed)
    reasons = {"graphs failed": "see cuda_graphs_error", "rows missing": "did not run",
               "over budget": "does not fit the budget"}
    if case in reasons:
        assert result["status"] == "skipped" and reasons[case] in result["reason"] and not runner.calls
        return
    assert runner.calls == [(kv.label, 2, False), (hit.label, 6, False)] and backend.graphs.enabled
    rows = result["rows"]
    assert rows[kv.label]["off_over_on"] == pytest.approx(2.0) and rows[hit.label]["off_over_on"] == \
        pytest.approx(4.0) and rows[hit.label]["refs"] == 6
    assert rows[kv.label]["latents_equal"] and rows[hit.label]["latents_equal"] == (case == "done")
    assert result["capture"] and len(checker.lines) == 2


@pytest.mark.parametrize("case", ["equal", "raises", "turned off", "differ", "no calls"])
def test_graph_probe_compares_with_ordinary_runs(case):
    """The KV row once ordinarily, then captured and replayed; latents compared. A failed graph call (raised, or
    caught by the backend, which turns graphs off) asks the caller for new sessions without graphs; latents beyond
    the tolerance, or no call through a graph, turn graphs off on these sessions; each says why."""
    from sparse_context.reference.engine_benchmark import RowKey
    from sparse_context.reference.gpu_check import GRAPH_REL_TOLERANCE, _Check

    checker = _waits_checker()
    backend, phase = _GraphBackend(enabled=False), {}
    backend.graphs.error = None
    if case == "no calls":
        backend.graphs.stats.calls = 0
    latents = {False: np.ones(3), True: np.ones(3)}
    runner = _GraphRunner(backend, latents, fail=case == "raises")
    if case in ("turned off", "differ"):
        plain_run = runner.run

        def run(row, repeats=None):
            seconds, wall, result = plain_run(row, repeats)
            if backend.graphs.enabled and case == "turned off":
                backend.graphs.error = "RuntimeError: operation not permitted when stream is capturing"
            return seconds, wall, result * (1 + 10 * GRAPH_REL_TOLERANCE) if backend.graphs.enabled else result
        runner.run = run
    usable = _Check._probe_graphs(checker, backend, runner, "ort_d4_mha-split-plain", phase)
    kv = RowKey(6, 0.1, True).label
    if case in ("raises", "turned off"):
        assert not usable and "stream is capturing" in phase["cuda_graphs_error"]
        assert "new sessions without CUDA graphs" in checker.lines[0]
        return
    assert usable and runner.calls[0] == (kv, 0, False) and len(runner.calls) == 3
    entry = phase["cuda_graphs"]
    if case == "equal":
        assert entry["ordinary_equal"] and entry["replay_equal"] and entry["rel_diff"] == 0 and entry["capture"]
        assert entry["stats"]["calls"] == 3 and backend.graphs.enabled and "captured" in checker.lines[0]
        return
    reason = {"differ": "differ from ordinary runs by 0.01 (relative; allowed 0.001)", "no calls": "no call went"}
    assert reason[case] in phase["cuda_graphs_off"] and not backend.graphs.enabled
    assert "CUDA graphs off" in checker.lines[0]


def test_side_measurements_fail_alone_and_reopening_fails_the_phase_only():
    """A side measurement's error goes into its entry (the phase and the check go on); new sessions that cannot be
    made after a failed capture fail the phase with a plain error, never as the package's user error that would
    end the whole check."""
    from sparse_context.engines.errors import EngineCorruptError
    from sparse_context.reference.gpu_check import _Check

    checker = _waits_checker()

    def broken(*args):
        raise EngineCorruptError(f"a CUDA call failed {args}")
    entry = _Check._side(checker, "ort_d4_mha-split-plain", "without_graphs", broken, 1, 2)
    assert entry == {"status": "failed", "reason": "EngineCorruptError: a CUDA call failed (1, 2)"}
    assert checker.lines == ["ort_d4_mha-split-plain without_graphs failed: EngineCorruptError: a CUDA call failed "
                             "(1, 2)"]
    assert _Check._side(checker, "x", "y", lambda a: {"status": "done", "a": a}, 3) == {"status": "done", "a": 3}
    checker._open = lambda exports, name, phase, graphs=False, profile=True: broken()
    with pytest.raises(RuntimeError, match="sessions without CUDA graphs after a failed capture: "
                                           "EngineCorruptError") as raised:
        _Check._reopen(checker, {}, "ort_d4_mha-split-plain", {})
    assert type(raised.value) is RuntimeError


def test_graphs_only_for_plain_kv_variants_and_planned_as_side_rows():
    options = GpuCheckOptions(variants=("mha-split", "mha-split-plain"))
    assert options.graphs_for("mha-split-plain") and not options.graphs_for("mha-split")
    assert not GpuCheckOptions(cuda_graphs=False).graphs_for("mha-split-plain")
    phases = {p.name: p.seconds for p in estimate_plan(options, 141).phases}
    without = {p.name: p.seconds for p in estimate_plan(GpuCheckOptions(
        variants=("mha-split", "mha-split-plain"), cuda_graphs=False), 141).phases}
    # The plain variant's phase carries the graph probe and both rows again without graphs; nothing else changes.
    assert phases["ort_d8_mha-split-plain"] > without["ort_d8_mha-split-plain"] == pytest.approx(
        without["ort_d8_mha-split"])
    assert phases["ort_d8_mha-split"] == without["ort_d8_mha-split"]


def test_without_graphs_extrapolate_to_full_depth_with_speedups_over_dense():
    from sparse_context.reference.gpu_report import without_graphs_at_full_depth

    def side(on, off):
        return {"refs": 6, "on_s": on, "off_s": off, "off_over_on": off / on, "latents_equal": True}

    cached = "refs 6 keep 0.1 kv cached"
    data = {"phases": {"ort_d4_mha-split-plain": {"without_graphs": {"rows": {cached: side(0.080, 0.089)}}},
                       "ort_d8_mha-split-plain": {"without_graphs": {"rows": {cached: side(0.150, 0.170)}}},
                       "ort_d4_mha-split": {}}}
    ort = {"mha-split-plain": {"rows": {"refs 6 keep 1 kv off": {"predicted_full_s": 6.5}}},
           "mha-split": {"rows": {}}}
    result = without_graphs_at_full_depth(data, ("d4", "d8"), {"d4": 5.0, "d8": 10.0, "full": 40.0}, ort)
    entry = result["mha-split-plain"][cached]
    on, off = 0.080 + 7 * 0.070, 0.089 + 7 * 0.081  # 40 units = d4 + 7 x (d8 - d4)
    assert entry["on_full_s"] == pytest.approx(on) and entry["off_full_s"] == pytest.approx(off)
    assert entry["speedup_on"] == pytest.approx(6.5 / on) and entry["speedup_off"] == pytest.approx(6.5 / off)
    assert entry["latents_equal"] and set(result) == {"mha-split-plain"}
    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "reference" / "measured" / "gpu_check_h200_2026-11-27_run6.json").read_text())
    report["derived"]["without_graphs"] = result
    assert ("ort mha-split-plain refs 6 keep 0.1 kv cached at full depth (extrapolated): with CUDA graphs 0.570s, "
            "without 0.656s (1.151x); over dense 11.40x with, 9.91x without") in "\n".join(summary_lines(report))


def test_the_cached_calls_attention_rounded_up_to_whole_tiles_at_full_depth():
    """The ``attention_keys`` sweep in a klein-9b report (run 9's rows, a sweep with made-up times): the change per
    call of rounding 7,068 keys up to 7,168, times one attention per block and step at full depth (32 x 4)."""
    from sparse_context.reference.attention_kernels import key_counts

    root = Path(__file__).resolve().parents[1]
    report = json.loads((root / "reference" / "measured" / "gpu_check_h200_2026-11-27_run9.json").read_text())
    times = {4608: 0.52, 4636: 0.56, 7040: 0.80, 7068: 0.90, 7104: 0.86, 7168: 0.82}
    report["attention_keys"] = {
        "queries": 4608, "keys": 7068, "tile": 128, "heads": 32, "head_dim": 128, "dtype": "fp16", "device": "cuda",
        "chain": 8, "rounds": 9, "keys_ms": 0.90, "aligned_up": 7168, "aligned_up_ms": 0.82, "aligned_down": 7040,
        "aligned_down_ms": 0.80,
        "rows": [{"keys": k, "remainder": k % 128, "ms": times[k], "tflops": 4 * 4608 * k * 4096 / times[k] / 1e9,
                  "us_per_tile": times[k] * 1e3 / -(-k // 128)} for k in key_counts(4608, 7068)]}
    report["derived"] = derive(report)
    aligned = report["derived"]["attention_keys"]
    assert aligned["calls_at_full_depth"] == 128
    assert aligned["change_at_full_depth_ms"] == pytest.approx(-0.08 * 128)
    assert aligned["up_over_keys"] == pytest.approx(0.82 / 0.90)
    text = "\n".join(summary_lines(report))
    assert "7068 keys rounded up to 7168 (whole tiles of 128): 0.911x the time" in text
    assert "at full depth (128 attention calls per persistent-cache call): -10.2 ms with 7168 keys instead of " \
           "7068" in text
    del report["attention_keys"]  # a run that skipped the sweep (or one from before it) says nothing of it
    assert derive(report)["attention_keys"] == {}


def test_the_plan_counts_the_attention_sweep():
    plan = estimate_plan(GpuCheckOptions(budget_s=480))
    sweep = next(p for p in plan.phases if p.name.startswith("attention_keys"))
    assert 2.0 < sweep.seconds < 10.0  # six key counts of ~1 ms, ten runs of eight calls each, a plan build each


def test_focus_keeps_the_criteria_rows_and_fits_the_second_call():
    """--focus: only the rows the two speedup criteria rest on (6 refs dense, keep 0.10 + KV and its persistent-cache
    call, and their whole-key-tile twins), no key sweep, no side rows. The README's second call on the warm machine
    (exports and weights reused) then fits 250 s at --repeats 7 even at the plan's pessimistic onnxruntime rate
    (1.3x PyTorch; runs 5-9 measured 0.9x), where the same call without --focus needs ~390 s."""
    rows = check_rows(6, DEFAULT_KEY_TILE, focus=True)
    assert [row.label for row in rows] == [
        "refs 6 keep 1 kv off", "refs 6 keep 0.1 kv on", "refs 6 keep 0.1 kv cached", "refs 6 keep 0.1 kv on tile 128",
        "refs 6 keep 0.1 kv cached tile 128"]
    assert check_rows(6, 0, focus=True) == check_rows(6)[:3]

    def second_call(focus: bool) -> tuple[float, list[str], list[str]]:
        options = GpuCheckOptions(config="klein-9b", depths=("d4", "d16"), variants=("mha-split",), repeats=7,
                                  bf16=False, full=False, export_workers=4, budget_s=250, focus=focus)
        plan = estimate_plan(options, gpu_memory_gb=139)
        reused = ("export ", "weights ")  # on the warm machine: the first call's exports and model folders
        return (sum(p.seconds for p in plan.phases if not p.name.startswith(reused)),
                [p.name for p in plan.phases], plan.notes)

    focused, names, notes = second_call(True)
    everything, all_names, _ = second_call(False)
    assert focused <= 250 and everything > 1.5 * focused, (focused, everything)
    assert not any(name.startswith("attention_keys") for name in names)
    assert any(name.startswith("attention_keys") for name in all_names)
    assert any(note.startswith("--focus") for note in notes)

