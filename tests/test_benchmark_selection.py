"""`bench select`: the request-level measurement (6 numpy references, selection + packing) and its 2 % verdict."""

from __future__ import annotations

import functools
import json
import math

import pytest

import sparse_context.runtime.benchmark_selection as benchmark_module
from sparse_context.cli import main
from sparse_context.runtime.benchmark_selection import (
    DEFAULT_GENERATION_S, SELECTION_BUDGET_SHARE, benchmark_references, summary_lines, write_selection_report,
)
from sparse_context.runtime.errors import InputError
from sparse_context.runtime.tokens import kept_token_count


class SteppingClock:
    """A stand-in for the ``time`` module whose perf_counter advances by the given steps, in turn."""

    def __init__(self, steps_s):
        self.steps_s, self.calls, self.now = steps_s, 0, 100.0

    def perf_counter(self):
        self.now += self.steps_s[self.calls % len(self.steps_s)]
        self.calls += 1
        return self.now


def test_benchmark_references_structure_and_shares_of_its_own_timings():
    progress = []
    result = benchmark_references(strategies=("uniform", "edge", "mask"), references=3, size=256, repeats=2,
                                  generation_s=0.5, on_progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 3), (2, 3), (3, 3)]
    assert (result["references"], result["size"], result["grid"], result["repeats"]) == (3, 256, [16, 16], 2)
    assert result["latent_channels"] == 128 and result["keep_fraction"] == 0.1
    assert result["generation_s"] == 0.5 and result["budget_ms"] == pytest.approx(10.0)
    assert set(result["strategies"]) == {"uniform", "edge", "mask"}
    for row in result["strategies"].values():
        assert row["ref_tokens"] == 3 * kept_token_count(16 * 16, 0.1)
        assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("select_ms", "pack_ms", "total_ms"))
        assert row["min_total_ms"] <= row["total_ms"]
        assert row["share"] == pytest.approx(row["total_ms"] / 500.0, abs=1e-6)  # total_ms is rounded to 1 us
        assert row["passes"] is (row["share"] <= SELECTION_BUDGET_SHARE)
    assert result["passes"] is all(row["passes"] for row in result["strategies"].values())
    assert json.loads(json.dumps(result)) == result  # what the report writes


@pytest.mark.parametrize("generation_s, passes", [(0.5, True), (0.2, False)])
def test_benchmark_references_verdict_follows_the_measured_medians(monkeypatch, generation_s, passes):
    # Each repeat reads the clock three times: start, after select_references, after pack_references.
    monkeypatch.setattr(benchmark_module, "time", SteppingClock([0.010, 0.004, 0.001]))
    result = benchmark_references(strategies=("random",), references=2, size=128, repeats=3,
                                  generation_s=generation_s)
    row = result["strategies"]["random"]
    assert (row["select_ms"], row["pack_ms"], row["total_ms"]) == pytest.approx((4.0, 1.0, 5.0))
    assert row["share"] == pytest.approx(5.0 / (generation_s * 1e3))
    assert row["passes"] is passes and result["passes"] is passes
    lines = summary_lines(result)
    assert f"against a {generation_s:g} s generation" in lines[0]
    assert ("pass" if passes else "FAIL") in lines[1]
    verdict = next(line for line in lines if line.startswith("selection + packing within"))
    assert verdict.endswith("yes" if passes else "no")
    # A repeated request, timed the same way: scored and hashed again (4 ms) against remembered (1 ms).
    assert (row["rescored_ms"], row["remembered_ms"], row["repeat_speedup"]) == pytest.approx((4.0, 1.0, 4.0))
    assert lines[-1].split() == ["random", "scored", "again,", "hashed", "one", "by", "one", "4.00", "ms",
                                 "remembered,", "hashed", "in", "threads", "1.00", "ms", "4.0x"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"generation_s": 0.0}, r"generation seconds: got 0.0; allowed: a positive number.*--generation-s"),
        ({"generation_s": float("nan")}, r"generation seconds: got nan.*--generation-s"),
        ({"references": 11}, r"number of reference images: got 11"),
        ({"repeats": 0}, r"benchmark repeats: got 0"),
        ({"size": 100}, r"reference size: got 100; allowed: a multiple of 16"),
        ({"strategies": ("smart",)}, r"selection strategy: got 'smart'"),
    ],
)
def test_benchmark_references_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        benchmark_references(**kwargs)


def test_write_selection_report_replaces_the_file_whole(tmp_path):
    first = write_selection_report({"references": {"passes": False}}, tmp_path / "bench")
    second = write_selection_report({"references": {"passes": True}}, tmp_path / "bench")
    assert first == second == tmp_path / "bench" / "select.json"
    assert json.loads(second.read_text()) == {"references": {"passes": True}}
    assert [path.name for path in second.parent.iterdir()] == ["select.json"]  # no temporary left behind


def test_cli_bench_select_writes_both_measurements(tmp_path, capsys, monkeypatch):
    for name in ("benchmark_references", "benchmark_selection"):  # one repeat each: this checks the wiring
        monkeypatch.setattr(benchmark_module, name, functools.partial(getattr(benchmark_module, name), repeats=1))
    assert main(["bench", "select", "--refs", "2", "--generation-s", "1.6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 x 1024^2 numpy references" in out and "against a 1.6 s generation (budget 2% = 32 ms)" in out
    report = json.loads((tmp_path / "select.json").read_text())
    assert report["references"]["references"] == 2 and report["references"]["generation_s"] == 1.6
    assert set(report["references"]["strategies"]) == {"random", "uniform", "edge", "saliency", "mask"}
    assert report["per_reference"]["size"] == 1024


def test_cli_bench_select_bad_generation_time(tmp_path, capsys):
    assert main(["bench", "select", "--generation-s", "-1", "--out", str(tmp_path)]) == 2
    assert "generation seconds: got -1.0; allowed: a positive number of seconds (change it with --generation-s)" \
        in capsys.readouterr().err
    assert not (tmp_path / "select.json").exists()
    assert DEFAULT_GENERATION_S == 0.80  # the H200 anchor the help text quotes
