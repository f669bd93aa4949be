"""The report of ``bench gpu`` (``reference.gpu_check``): rows per phase, the depth extrapolation, the acceptance
block, ``gpu_check.json`` + ``gpu_check.png``. Every derived figure is recomputed from the rows on each save, so the
files on disk are complete after every row and a killed run leaves everything it finished."""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from sparse_context.reference.attention_kernels import key_sweep_lines
from sparse_context.reference.benchmark_configs import CONFIGS
from sparse_context.reference.engine_benchmark import RowKey
from sparse_context.reference.gpu_plan import ACCEPTANCE_KEEP, depth_units, extrapolate
from sparse_context.runtime.files import atomic_write_bytes

JSON_NAME, PNG_NAME = "gpu_check.json", "gpu_check.png"
TARGETS = {"speedup_kv": 8.0, "speedup_cached": 9.5, "ort_over_torch": 1.0, "selection_share": 0.02}
# Speedups come with the 5th-95th percentile of the same figure over bootstrap resamples of each row's timed calls:
# how far the run's own timing noise moves it (the extrapolation multiplies the d8 - d4 difference).
INTERVAL_PERCENTILES = (5.0, 95.0)
BOOTSTRAP_DRAWS = 2000


class CheckReport:
    def __init__(self, options: Any, out: Path, log: Callable[[str], None]):
        self.options, self.out, self.log = options, Path(out), log
        self.started = time.perf_counter()
        self.exports_snapshot: Callable[[], dict[str, Any]] | None = None
        self.data: dict[str, Any] = {
            "check": "sparse-context bench gpu", "config": options.config, "depths": list(options.ladder),
            "variants": list(options.variants), "precision": options.precision, "device": options.device,
            "setup": {"refs": options.refs, "target_px": options.target_px, "ref_px": options.ref_px,
                      "text_tokens": options.text_tokens, "steps": options.steps, "repeats": options.repeats,
                      "budget_s": options.budget_s, "seed": options.seed, "key_tile": options.key_tile,
                      "focus": options.focus},
            "status": "running", "phases": {}, "rows": {}, "skipped": [], "exports": {},
        }
        self.out.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[dict[str, Any]]:
        entry: dict[str, Any] = {"status": "running", "started_s": self.elapsed()}
        self.data["phases"][name] = entry
        self.log(f"{name} ...")
        start = time.perf_counter()
        try:
            yield entry
            entry["status"] = "done"
        except Exception as error:  # one broken phase must not cost the rows of the others
            entry.update(status="failed", error=f"{type(error).__name__}: {str(error)[:500]}",
                         traceback=traceback.format_exc()[-2000:])
            self.log(f"{name} failed: {entry['error']}")
            if _is_user_error(error):
                raise
        finally:
            entry["seconds"] = time.perf_counter() - start
            self.save(png=True)  # on disk before it is announced: whoever reads the line finds the rows
            self.log(f"{name} {entry['status']} in {entry['seconds']:.1f}s")

    def row(self, phase: str, row: Any, **values: Any) -> None:
        entry = {"label": row.label, "refs": row.refs, "keep": row.keep, "kv": row.kv, "cache_hit": row.cache_hit,
                 "tile": row.tile, **values}
        self.data["rows"].setdefault(phase, []).append(entry)
        self.save()

    def skip(self, what: str, kind: str, reason: str) -> None:
        self.data["skipped"].append({"what": what, "kind": kind, "reason": reason, "at_s": self.elapsed()})
        self.log(f"skipped {what}: {reason}")
        self.save()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def finish(self) -> None:
        self.data["status"] = "finished"
        self.data["total_s"] = self.elapsed()
        self.save(png=True)
        self.log("\n".join(summary_lines(self.data)))

    def save(self, png: bool = False) -> None:
        if self.exports_snapshot is not None:
            self.data["exports"] = self.exports_snapshot()
        self.data["derived"] = derive(self.data)
        self.data["acceptance"] = acceptance(self.data)
        atomic_write_bytes(self.out / JSON_NAME, json.dumps(self.data, indent=1, default=str).encode())
        if png:
            with contextlib.suppress(ImportError):  # matplotlib is the plot extra
                atomic_write_bytes(self.out / PNG_NAME, plot_png(self.data))


# -- derived figures -------------------------------------------------------------------------------------------

def _by_label(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["label"]: row for row in rows}


def _dense_label(row: dict[str, Any]) -> str:
    return f"refs {row['refs']} keep 1 kv off"


def speedups(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per row: seconds of dense with the same references over this row's seconds (same phase, same backend)."""
    table = _by_label(rows)
    result = {}
    for row in rows:
        dense = table.get(_dense_label(row))
        if row["refs"] and dense and row.get("seconds"):
            result[row["label"]] = dense["seconds"] / row["seconds"]
    return result


def bootstrap_interval(sample_sets: list[list[float] | None], statistic: Callable[..., Any]) -> list[float] | None:
    """The 5th and 95th percentile of ``statistic(median_1, median_2, ...)`` when each row's median is recomputed
    on resamples (with replacement) of its timed calls; None unless every row has two or more calls."""
    import numpy as np

    if any(not samples or len(samples) < 2 for samples in sample_sets):
        return None
    rng = np.random.default_rng(0)
    medians = []
    for samples in sample_sets:
        values = np.asarray(samples, dtype=np.float64)
        medians.append(np.median(values[rng.integers(0, len(values), (BOOTSTRAP_DRAWS, len(values)))], axis=1))
    spread = np.asarray(statistic(*medians), dtype=np.float64)
    return [float(np.percentile(spread, q)) for q in INTERVAL_PERCENTILES]


def _speedup_intervals(tables: list[dict[str, dict[str, Any]]], rows: list[dict[str, Any]],
                       statistic: Callable[..., Any]) -> dict[str, list[float]]:
    """Per row with references: the interval of dense / row, both taken from ``tables`` (one per depth) through
    ``statistic(dense per table..., row per table...)``."""
    result = {}
    for row in rows:
        if not row["refs"] or row["label"] == _dense_label(row):
            continue
        sets = [t.get(_dense_label(row), {}).get("samples_s") for t in tables]
        sets += [t.get(row["label"], {}).get("samples_s") for t in tables]
        interval = bootstrap_interval(sets, statistic)
        if interval is not None:
            result[row["label"]] = interval
    return result


def derive(data: dict[str, Any]) -> dict[str, Any]:
    """Speedups per phase, onnxruntime / PyTorch per row and depth, and the full-depth extrapolation."""
    rows = data["rows"]
    depths = data["depths"]
    units = {d: depth_units(CONFIGS[f"{data['config']}-{d}"]) for d in depths}
    units["full"] = depth_units(CONFIGS[data["config"]])
    derived: dict[str, Any] = {"units": units, "speedups": {p: speedups(r) for p, r in rows.items()}}
    torch_full = _by_label(rows.get("torch_full", []))
    torch_at = {d: _by_label(rows.get(f"torch_{d}", [])) for d in depths}

    def predicted(tables: dict[str, dict[str, dict[str, Any]]], label: str) -> float | None:
        a, b = (tables[d].get(label, {}).get("seconds") for d in depths)
        if a is None or b is None:
            return None
        return extrapolate(a, units[depths[0]], b, units[depths[1]], units["full"])

    check = {}
    for label, row in torch_full.items():
        guess = predicted(torch_at, label)
        if guess is not None and row.get("seconds"):
            check[label] = {"measured_s": row["seconds"], "predicted_s": guess,
                            "error": guess / row["seconds"] - 1.0}
    derived["torch_extrapolation_check"] = check
    derived["torch_full_speedup_intervals"] = _speedup_intervals([torch_full], list(torch_full.values()),
                                                                 lambda dense, row: dense / row)
    a, b, full = units[depths[0]], units[depths[1]], units["full"]

    def line(dense_a: Any, dense_b: Any, row_a: Any, row_b: Any) -> Any:  # extrapolated dense / extrapolated row
        return extrapolate(dense_a, a, dense_b, b, full) / extrapolate(row_a, a, row_b, b, full)
    variants = {}
    for variant in data["variants"]:
        ort_at = {d: _by_label(rows.get(f"ort_{d}_{variant}", [])) for d in depths}
        per_row = {}
        labels = [r["label"] for r in rows.get("torch_full", [])] or [r["label"] for r in rows.get(
            f"torch_{depths[0]}", [])]
        for label in labels:
            entry: dict[str, Any] = {}
            for depth in depths:
                ort, reference = ort_at[depth].get(label, {}), torch_at[depth].get(label, {})
                if ort.get("seconds") and reference.get("seconds"):
                    entry[f"ratio_{depth}"] = ort["seconds"] / reference["seconds"]
                if ort.get("rel_diff") is not None:
                    entry[f"rel_diff_{depth}"] = ort["rel_diff"]
            full_ort = predicted(ort_at, label)
            if full_ort is not None:
                entry["predicted_full_s"] = full_ort
                if torch_full.get(label, {}).get("seconds"):
                    entry["ratio_full"] = full_ort / torch_full[label]["seconds"]
            if entry:
                per_row[label] = entry
        # Reference counts come from any PyTorch row set: without --no-full's full-depth rows, from the first depth.
        predicted_rows = [{"label": label, "refs": row["refs"], "seconds": per_row[label]["predicted_full_s"]}
                          for label, row in (torch_full or torch_at[depths[0]]).items()
                          if "predicted_full_s" in per_row.get(label, {})]
        variants[variant] = {"rows": per_row, "predicted_full_speedups": speedups(predicted_rows),
                             "predicted_full_speedup_intervals": _speedup_intervals(
                                 [ort_at[d] for d in depths], list((torch_full or torch_at[depths[0]]).values()),
                                 line)}
    derived["ort"] = variants
    bf16 = _by_label(rows.get(f"torch_bf16_{depths[0]}", []))
    derived["bf16_over_fp16"] = {label: bf16[label]["seconds"] / row["seconds"]
                                 for label, row in torch_at[depths[0]].items()
                                 if label in bf16 and row.get("seconds")}
    derived["outside_kernels"] = outside_kernels(data)
    derived["kernels_at_full_depth"] = kernels_at_full_depth(derived["outside_kernels"], depths, units)
    derived["without_graphs"] = without_graphs_at_full_depth(data, depths, units, variants)
    derived["cached_over_target"] = cached_over_target(data, depths, units)
    derived["attention_keys"] = aligned_keys_at_full_depth(data)
    derived["key_tiles"] = key_tiles(data, variants, depths, units)
    return derived


def key_tiles(data: dict[str, Any], variants: dict[str, Any], depths: Sequence[str],
              units: dict[str, float]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per phase (and onnxruntime extrapolated to full depth): the rows topped up to whole key tiles against the
    same rows as kept, side by side: seconds, reference tokens, tiled / plain and that ratio's 5th-95th percentile
    over bootstrap resamples of both rows' timed calls (``tiled_over_plain_interval``: below 1 throughout, the
    top-up is faster beyond the runs' noise; above 1 throughout, slower)."""
    tile = data["setup"].get("key_tile") or 0
    if not tile:
        return {}
    suffix = f" tile {tile}"
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for phase, rows in data["rows"].items():
        table = _by_label(rows)
        for row in rows:
            plain = table.get(row["label"].removesuffix(suffix)) if row.get("tile") else None
            if plain and plain.get("seconds") and row.get("seconds"):
                result.setdefault(phase, {})[plain["label"]] = {
                    "plain_s": plain["seconds"], "tiled_s": row["seconds"], "tiled_over_plain": row["seconds"]
                    / plain["seconds"], "tiled_over_plain_interval": bootstrap_interval(
                        [row.get("samples_s"), plain.get("samples_s")], lambda tiled, as_kept: tiled / as_kept),
                    "plain_tokens": plain.get("ref_tokens"), "tiled_tokens": row.get("ref_tokens")}
    a, b, full = (units[d] for d in (*depths, "full"))

    def extrapolated_ratio(tiled_a: Any, tiled_b: Any, plain_a: Any, plain_b: Any) -> Any:
        return extrapolate(tiled_a, a, tiled_b, b, full) / extrapolate(plain_a, a, plain_b, b, full)
    for variant, entry in variants.items():
        ort_at = [_by_label(data["rows"].get(f"ort_{d}_{variant}", [])) for d in depths]
        for label, values in entry["rows"].items():
            tiled = entry["rows"].get(f"{label}{suffix}", {}).get("predicted_full_s")
            if tiled and values.get("predicted_full_s"):
                samples = [t.get(f"{label}{suffix}", {}).get("samples_s") for t in ort_at]
                samples += [t.get(label, {}).get("samples_s") for t in ort_at]
                result.setdefault(f"ort {variant} full (extrapolated)", {})[label] = {
                    "plain_s": values["predicted_full_s"], "tiled_s": tiled,
                    "tiled_over_plain": tiled / values["predicted_full_s"],
                    "tiled_over_plain_interval": bootstrap_interval(samples, extrapolated_ratio)}
    for phase, entry in data.get("phases", {}).items():  # kernel profiles: GPU ms of attention and of all kernels
        kernels = entry.get("kernels") or {}
        for label, plain in kernels.items():
            tiled = kernels.get(f"{label}{suffix}")
            if isinstance(plain, dict) and isinstance(tiled, dict) and plain.get("ms_per_category") is not None \
                    and tiled.get("ms_per_category") is not None:
                result.setdefault(phase, {}).setdefault(label, {}).update(
                    attention_ms=[plain["ms_per_category"].get("attention", 0.0),
                                  tiled["ms_per_category"].get("attention", 0.0)],
                    busy_ms=[plain.get("busy_ms"), tiled.get("busy_ms")])
    return result


def aligned_keys_at_full_depth(data: dict[str, Any]) -> dict[str, Any]:
    """What the persistent-cache call's attention would take with its keys rounded up to whole tiles, per call and
    over a full-depth generation (one attention per block and step), from the ``attention_keys`` sweep."""
    sweep = data.get("attention_keys")
    if not sweep:
        return {}
    config = CONFIGS[data["config"]]
    calls = (int(config["num_layers"]) + int(config["num_single_layers"])) * int(data["setup"]["steps"])
    change_ms = sweep["aligned_up_ms"] - sweep["keys_ms"]
    return {"keys": sweep["keys"], "aligned_up": sweep["aligned_up"], "up_over_keys": sweep["aligned_up_ms"]
            / sweep["keys_ms"], "change_per_call_ms": change_ms, "calls_at_full_depth": calls,
            "change_at_full_depth_ms": change_ms * calls}


def cached_over_target(data: dict[str, Any], depths: Sequence[str],
                       units: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """Per backend, the GPU time (ms, one generation) the persistent-cache call adds to the target-only call, by
    kernel category: at each profiled depth and, where both are profiled, extrapolated to full depth. Its only
    extra work is attention over the cached reference keys, so whatever else grows here (copies, elementwise
    kernels) is cost the cached path could shed; what attention adds is the price of the kept tokens."""
    hit = RowKey(data["setup"]["refs"], ACCEPTANCE_KEEP, True, cache_hit=True).label
    target_only = RowKey(0, ACCEPTANCE_KEEP, True).label
    deltas: dict[str, dict[str, float]] = {}
    for name, phase in data.get("phases", {}).items():
        kernels = phase.get("kernels") or {}
        base, cached = kernels.get(target_only), kernels.get(hit)
        if not all(isinstance(p, dict) and p.get("ms_per_category") is not None and p.get("busy_ms") is not None
                   for p in (base, cached)):
            continue
        categories = sorted(set(base["ms_per_category"]) | set(cached["ms_per_category"]))
        deltas[name] = {"busy": cached["busy_ms"] - base["busy_ms"],
                        **{c: cached["ms_per_category"].get(c, 0.0) - base["ms_per_category"].get(c, 0.0)
                           for c in categories}}
    first, second = depths[0], depths[1]
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name, delta in deltas.items():
        if name == f"torch_{first}":
            partner, backend = f"torch_{second}", "torch"
        elif name.startswith(f"ort_{first}_"):
            variant = name[len(f"ort_{first}_"):]
            partner, backend = f"ort_{second}_{variant}", f"ort {variant}"
        else:
            continue
        entry = {first: delta}
        if partner in deltas:
            entry[second] = deltas[partner]
            entry["full"] = {key: extrapolate(value, units[first], deltas[partner].get(key, 0.0), units[second],
                                              units["full"]) for key, value in delta.items()}
        result[backend] = entry
    return result


def without_graphs_at_full_depth(data: dict[str, Any], depths: Sequence[str], units: dict[str, float],
                                 ort: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant whose cached KV calls ran as CUDA graphs: its side rows with and without them, each extrapolated
    to full depth like the rows, and the speedup over the variant's own dense row either way."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    first, second = depths[0], depths[1]
    for variant, entry in ort.items():
        sides = [((data.get("phases", {}).get(f"ort_{d}_{variant}") or {}).get("without_graphs") or {}).get("rows")
                 or {} for d in (first, second)]
        for label, a in sides[0].items():
            b = sides[1].get(label)
            if b is None:
                continue
            full = {key: extrapolate(a[f"{key}_s"], units[first], b[f"{key}_s"], units[second], units["full"])
                    for key in ("on", "off")}
            values: dict[str, Any] = {"on_full_s": full["on"], "off_full_s": full["off"],
                                      "off_over_on_full": full["off"] / full["on"],
                                      "latents_equal": bool(a["latents_equal"] and b["latents_equal"])}
            dense = entry["rows"].get(_dense_label(a), {}).get("predicted_full_s")
            if dense:
                values.update(speedup_on=dense / full["on"], speedup_off=dense / full["off"])
            result.setdefault(variant, {})[label] = values
    return result


def kernels_at_full_depth(outside: dict[str, dict[str, dict[str, float]]], depths: Sequence[str],
                          units: dict[str, float]) -> dict[str, dict[str, dict[str, float]]]:
    """Per backend and profiled row, GPU busy time and time outside kernels, each extrapolated from the two
    depths to full depth like the row times, with what each adds per unit of depth: whether a row's extra time
    over another grows with the blocks (kernels, or per-block gaps between them) or is paid once per generation."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    first, second = depths[0], depths[1]
    partners = {f"torch_{first}": (f"torch_{second}", "torch")}
    for name in outside:
        if name.startswith(f"ort_{first}_"):
            variant = name[len(f"ort_{first}_"):]
            partners[name] = (f"ort_{second}_{variant}", f"ort {variant}")
    for name, (partner, backend) in partners.items():
        for label, at_first in outside.get(name, {}).items():
            at_second = outside.get(partner, {}).get(label)
            if at_second is not None:
                result.setdefault(backend, {})[label] = _split_at_full(at_first, at_second, units[first],
                                                                       units[second], units["full"])
    return result


def _split_at_full(a: dict[str, float], b: dict[str, float], units_a: float, units_b: float,
                   units_full: float) -> dict[str, float]:
    per_unit = units_b - units_a
    return {"busy_full_ms": extrapolate(a["busy_ms"], units_a, b["busy_ms"], units_b, units_full),
            "outside_full_ms": extrapolate(a["outside_kernels_ms"], units_a, b["outside_kernels_ms"], units_b,
                                           units_full),
            "busy_per_unit_ms": (b["busy_ms"] - a["busy_ms"]) / per_unit,
            "outside_per_unit_ms": (b["outside_kernels_ms"] - a["outside_kernels_ms"]) / per_unit}


def outside_kernels(data: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per profiled phase and row, in ms of one generation: the row's median time, the GPU's busy time (kernel
    profile), and what is left, the time outside GPU kernels. Where every run waited for the device (PyTorch has no
    runs; onnxruntime with ``sync == "run"``), the rest splits at the time inside the runs into ``idle_in_runs_ms``
    (a run starting on an idle GPU, its final wait) and ``outside_runs_ms`` (host feeds, step graphs, uploads);
    with one wait per image a run returns once queued, so that split means nothing and is left out."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for name, phase in data.get("phases", {}).items():
        rows = _by_label(data["rows"].get(name, []))
        for label, profile in (phase.get("kernels") or {}).items():
            row = rows.get(label, {})
            if not isinstance(profile, dict) or profile.get("busy_ms") is None or not row.get("seconds"):
                continue
            entry = {"row_ms": 1e3 * row["seconds"], "busy_ms": profile["busy_ms"]}
            entry["outside_kernels_ms"] = entry["row_ms"] - entry["busy_ms"]
            if row.get("in_session_s") is not None and phase.get("sync", "run") == "run":
                in_runs = 1e3 * (row["in_session_s"] + (row.get("in_steps_s") or 0.0))
                entry["idle_in_runs_ms"] = in_runs - entry["busy_ms"]
                entry["outside_runs_ms"] = entry["row_ms"] - in_runs
            result.setdefault(name, {})[label] = entry
    return result


def acceptance(data: dict[str, Any]) -> dict[str, Any]:
    """Issue 8's GPU criteria with measured values; ``passed`` is None where nothing was measured, and every
    criterion only means something on a GPU at the real setup (klein-9b, 1024^2, 512 text tokens, 4 steps)."""
    derived, rows = data["derived"], data["rows"]
    most = data["setup"]["refs"]
    kv_label = f"refs {most} keep {ACCEPTANCE_KEEP:g} kv on"
    hit_label = f"refs {most} keep {ACCEPTANCE_KEEP:g} kv cached"
    torch_speedups = derived["speedups"].get("torch_full", {})
    criteria: dict[str, Any] = {}

    def criterion(name: str, value: float | None, op: str, target: float, **extra: Any) -> None:
        passed = None if value is None else (value >= target if op == ">=" else value <= target)
        criteria[name] = {"value": value, "target": f"{op} {target:g}", "passed": passed, **extra}

    def speedup(name: str, values: dict[str, float], intervals: dict[str, list[float]], label: str,
                target: float) -> None:
        interval = intervals.get(label)
        # Whether the target holds across the run's own timing noise, not only at the medians.
        clears = None if interval is None else interval[0] >= target
        criterion(name, values.get(label), ">=", target, interval_90=interval, clears_within_noise=clears)

    # With a key tile, the same two rows with the kept tokens topped up to whole tiles (more tokens, never fewer).
    tile = data["setup"].get("key_tile") or 0
    tiled = [("", kv_label, hit_label)] + ([(f", whole key tiles of {tile}", f"{kv_label} tile {tile}",
                                             f"{hit_label} tile {tile}")] if tile else [])
    torch_intervals = derived.get("torch_full_speedup_intervals", {})
    for suffix, kv, hit in tiled:
        speedup(f"torch: speedup 6 refs keep 0.10 + KV{suffix}", torch_speedups, torch_intervals, kv,
                TARGETS["speedup_kv"])
        speedup(f"torch: speedup persistent cache{suffix}", torch_speedups, torch_intervals, hit,
                TARGETS["speedup_cached"])
    for variant, entry in derived["ort"].items():
        predicted, intervals = entry["predicted_full_speedups"], entry.get("predicted_full_speedup_intervals", {})
        for suffix, kv, hit in tiled:
            speedup(f"ort {variant}: speedup 6 refs keep 0.10 + KV{suffix} (extrapolated)", predicted, intervals, kv,
                    TARGETS["speedup_kv"])
            speedup(f"ort {variant}: speedup persistent cache{suffix} (extrapolated)", predicted, intervals, hit,
                    TARGETS["speedup_cached"])
        for key in [f"ratio_{d}" for d in data["depths"]] + ["ratio_full"]:
            ratios = {label: r[key] for label, r in entry["rows"].items() if key in r}
            worst = max(ratios.items(), key=lambda item: item[1]) if ratios else (None, None)
            criterion(f"ort {variant}: onnxruntime / PyTorch, worst row, {key[6:]}", worst[1], "<=",
                      TARGETS["ort_over_torch"], row=worst[0], rows=len(ratios))
    generation = {row["label"]: row for row in rows.get("torch_full", [])}.get(kv_label, {}).get("seconds")
    for strategy, entry in (data.get("selection") or {}).items():
        if generation:
            overhead = entry["select_s"] + entry["pack_s"]
            criterion(f"selection + packing share ({strategy})", overhead / generation, "<=",
                      TARGETS["selection_share"], seconds=overhead)
    return criteria


# -- text and picture ------------------------------------------------------------------------------------------

def summary_lines(data: dict[str, Any]) -> list[str]:
    environment = data.get("environment", {})
    lines = [f"== bench gpu: {data['config']} on {environment.get('device', data['device'])}, {data['precision']}, "
             f"{data['setup']['target_px']}px target, {data['setup']['refs']} x {data['setup']['ref_px']}px refs, "
             f"{data['setup']['text_tokens']} text tokens, {data['setup']['steps']} steps =="]
    phases = list(data["rows"])
    if phases:
        labels = list(dict.fromkeys(r["label"] for rows in data["rows"].values() for r in rows))
        width = max([26, *map(len, labels)])
        lines.append(f"{'row':{width}s}" + "".join(f"{p[:16]:>17s}" for p in phases))
        for label in labels:
            cells = []
            for phase in phases:
                row = _by_label(data["rows"][phase]).get(label, {})
                cells.append(f"{row['seconds']:>16.3f}s" if row.get("seconds") else f"{'-':>17s}")
            lines.append(f"{label:{width}s}" + "".join(cells))
    for variant, entry in data["derived"].get("ort", {}).items():
        for label, values in entry["rows"].items():
            shown = " ".join(f"{k}={v:.3g}" for k, v in values.items())
            lines.append(f"ort {variant} {label}: {shown}")
    for name, phase in data.get("phases", {}).items():  # the side-by-side measurements of each onnxruntime phase
        waits = phase.get("waits_per_run") or {}
        for label, row in (waits.get("rows") or {}).items():
            lines.append(f"{name} {label}: a wait after every run {row['run_s']:.3f}s, one per image "
                         f"{row['image_s']:.3f}s ({row['run_over_image']:.3f}x), latents "
                         f"{'equal' if row['latents_equal'] else 'DIFFER'}")
        probe = phase.get("cuda_graphs") or {}
        if probe:
            how = "captured" if probe.get("capture") else "fixed addresses, no capture (CPU)"
            lines.append(f"{name} CUDA graphs ({how}): KV row first {probe['first_s']:.3f}s, then "
                         f"{probe['second_s']:.3f}s; latents {'equal' if probe['ordinary_equal'] else 'DIFFER'} "
                         f"(rel diff {probe['rel_diff']:.2g}), replay {'equal' if probe['replay_equal'] else 'DIFFERS'}")
        if phase.get("cuda_graphs_error"):
            lines.append(f"{name} CUDA graphs failed, rows ran without: {phase['cuda_graphs_error'][:200]}")
        for label, row in ((phase.get("without_graphs") or {}).get("rows") or {}).items():
            lines.append(f"{name} {label}: without CUDA graphs {row['off_s']:.3f}s, with {row['on_s']:.3f}s "
                         f"({row['off_over_on']:.3f}x), latents {'equal' if row['latents_equal'] else 'DIFFER'}")
        host = phase.get("host_steps") or {}
        if host.get("status") == "done":
            lines.append(f"{name} {host['row']}: host steps {host['host_steps_s']:.3f}s, device steps "
                         f"{host['device_steps_s']:.3f}s ({host['host_over_device']:.3f}x), latents "
                         f"{'equal' if host['latents_equal'] else 'DIFFER'}")
    for name, entries in data["derived"].get("outside_kernels", {}).items():
        for label, entry in entries.items():
            split = "" if "idle_in_runs_ms" not in entry else (
                f" ({entry['idle_in_runs_ms']:.1f} idle inside runs, {entry['outside_runs_ms']:.1f} outside them)")
            lines.append(f"{name} {label}: {entry['row_ms']:.1f} ms = {entry['busy_ms']:.1f} GPU busy + "
                         f"{entry['outside_kernels_ms']:.1f} outside kernels{split}")
    for backend, entries in data["derived"].get("kernels_at_full_depth", {}).items():
        for label, entry in entries.items():
            lines.append(f"{backend} {label} at full depth (extrapolated): {entry['busy_full_ms']:.1f} ms GPU busy "
                         f"({entry['busy_per_unit_ms']:+.1f} per unit) + {entry['outside_full_ms']:.1f} outside "
                         f"kernels ({entry['outside_per_unit_ms']:+.1f} per unit)")
    for backend, entry in data["derived"].get("cached_over_target", {}).items():
        where = [d for d in (*data["depths"], "full") if d in entry]
        parts = [f"{key} " + " · ".join(f"{entry[d].get(key, 0.0):+.1f}" for d in where)
                 for key in entry[where[0]] if key != "busy"]
        lines.append(f"{backend} persistent cache over target only, GPU ms at {' · '.join(where)}"
                     f"{' (extrapolated)' if 'full' in where else ''}: busy "
                     + " · ".join(f"{entry[d]['busy']:+.1f}" for d in where) + " = " + ", ".join(parts))
    for variant, entries in data["derived"].get("without_graphs", {}).items():
        for label, entry in entries.items():
            speedups_shown = "" if "speedup_on" not in entry else (
                f"; over dense {entry['speedup_on']:.2f}x with, {entry['speedup_off']:.2f}x without")
            lines.append(f"ort {variant} {label} at full depth (extrapolated): with CUDA graphs "
                         f"{entry['on_full_s']:.3f}s, without {entry['off_full_s']:.3f}s "
                         f"({entry['off_over_on_full']:.3f}x){speedups_shown}")
    if data.get("attention_keys"):
        lines += key_sweep_lines(data["attention_keys"])
        aligned = data["derived"]["attention_keys"]
        lines.append(f"  at full depth ({aligned['calls_at_full_depth']} attention calls per persistent-cache call): "
                     f"{aligned['change_at_full_depth_ms']:+.1f} ms with {aligned['aligned_up']} keys instead of "
                     f"{aligned['keys']}")
    tile = data["setup"].get("key_tile")
    for phase, entries in data["derived"].get("key_tiles", {}).items():
        for label, entry in entries.items():
            tokens = "" if entry.get("tiled_tokens") is None else (
                f" ({entry['tiled_tokens']} against {entry['plain_tokens']} reference tokens)")
            if "tiled_s" in entry:
                spread = entry.get("tiled_over_plain_interval")
                spread = "" if not spread else f" [{spread[0]:.3f}-{spread[1]:.3f}]"
                lines.append(f"{phase} {label}: whole key tiles of {tile} {entry['tiled_s']:.3f}s, as kept "
                             f"{entry['plain_s']:.3f}s ({entry['tiled_over_plain']:.3f}x{spread}){tokens}")
            if "attention_ms" in entry:
                (plain, tiled), (busy, busy_tiled) = entry["attention_ms"], entry["busy_ms"]
                lines.append(f"{phase} {label}, one generation's GPU time: attention {tiled:.1f} ms with whole key "
                             f"tiles of {tile}, {plain:.1f} ms as kept; all kernels {busy_tiled:.1f} against "
                             f"{busy:.1f} ms")
    for label, check in data["derived"].get("torch_extrapolation_check", {}).items():
        lines.append(f"extrapolation check (PyTorch) {label}: predicted {check['predicted_s']:.3f}s, measured "
                     f"{check['measured_s']:.3f}s ({100 * check['error']:+.1f} %)")
    lines.append("-- acceptance --")
    for name, entry in data["acceptance"].items():
        value = "not measured" if entry["value"] is None else f"{entry['value']:.4g}"
        verdict = {True: "PASS", False: "FAIL", None: "-"}[entry["passed"]]
        noise = ""
        if entry.get("interval_90"):
            low, high = entry["interval_90"]
            where = "" if entry["clears_within_noise"] else (
                ": straddles the target" if entry["passed"] or high >= float(entry["target"].split()[1])
                else ": below the target")
            noise = f", 90 % of resamples {low:.4g}-{high:.4g}{where}"
        lines.append(f"{verdict:4s} {name}: {value} (target {entry['target']}{noise})")
    for skipped in data["skipped"]:
        lines.append(f"skipped {skipped['what']}: {skipped['reason']}")
    return lines


def plot_png(data: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gaps = [(f"{name} {label}", entry) for name, entries in data["derived"].get("outside_kernels", {}).items()
            for label, entry in entries.items()]
    panels = 3 if gaps else 2
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.6), dpi=100)
    left, right = axes[0], axes[1]
    torch_speedups = data["derived"]["speedups"].get("torch_full", {})
    series = {"PyTorch full depth": torch_speedups}
    for variant, entry in data["derived"].get("ort", {}).items():
        series[f"onnxruntime {variant} (extrapolated)"] = entry["predicted_full_speedups"]
    labels = list(dict.fromkeys(label for values in series.values() for label in values))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        left.bar([i + index * width for i in range(len(labels))], [values.get(label, 0.0) for label in labels],
                 width, label=name)
    left.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=30, ha="right", fontsize=7)
    for target in (TARGETS["speedup_kv"], TARGETS["speedup_cached"]):
        left.axhline(target, color="gray", linestyle=":", linewidth=1)
    left.set_ylabel("speedup over dense (same refs)")
    left.legend(fontsize=7)
    for variant, entry in data["derived"].get("ort", {}).items():
        keys = [f"ratio_{d}" for d in data["depths"]] + ["ratio_full"]
        for label, values in entry["rows"].items():
            points = [(i, values[k]) for i, k in enumerate(keys) if k in values]
            if points:
                right.plot([p[0] for p in points], [p[1] for p in points], marker="o", linewidth=1,
                           label=f"{variant}: {label}")
        right.set_xticks(range(len(keys)), [k[6:] for k in keys])
    right.axhline(1.0, color="gray", linestyle=":", linewidth=1)
    right.set_ylabel("onnxruntime / PyTorch time")
    if right.get_legend_handles_labels()[0]:  # no onnxruntime row yet: nothing to name
        right.legend(fontsize=5, ncol=2)
    if gaps:  # where one generation's time goes: GPU kernels, and everything else
        gap_axis = axes[2]
        names = [name for name, _ in gaps]
        busy = [entry["busy_ms"] for _, entry in gaps]
        gap_axis.barh(names, busy, label="GPU busy")
        gap_axis.barh(names, [entry["outside_kernels_ms"] for _, entry in gaps], left=busy,
                      label="outside GPU kernels")
        gap_axis.tick_params(axis="y", labelsize=6)
        gap_axis.set_xlabel("ms per generation (profiled rows)")
        gap_axis.legend(fontsize=7)
    environment = data.get("environment", {})
    figure.suptitle(f"bench gpu — {data['config']}, {environment.get('device', data['device'])}, "
                    f"{data['precision']}", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _is_user_error(error: BaseException) -> bool:
    from sparse_context.runtime.errors import SparseContextError

    return isinstance(error, SparseContextError)
