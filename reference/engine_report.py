"""The report of ``bench engines`` (:mod:`sparse_context.reference.engine_benchmark`): derived figures, issue 4's
acceptance block, ``engines.json`` + ``engines.png`` and the text summary. Works on the plain result dict only
(no torch), so a report can be re-rendered from a saved ``engines.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ACCEPTANCE_KEEP = 0.10
REL_ERROR_FLAG = 5e-2  # fp16 end to end through every layer and step: report, flag only gross disagreement
# Where issue 4's targets are defined; elsewhere pass/fail is reported but means nothing.
ACCEPTANCE_SETUP = dict(config="klein-9b", target_px=1024, ref_px=1024, text_tokens=512, steps=4, refs=6)


def find_row(rows: list[dict[str, Any]], refs: int, keep: float, kv: bool, cache_hit: bool = False) -> dict[str, Any]:
    return next((r for r in rows if (r["refs"], r["keep"], r["kv"], r["cache_hit"]) == (refs, keep, kv, cache_hit)),
                {})


def speedup_limits(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Dense n references over target only, per backend: the ceiling of any speedup at n references."""
    target = find_row(rows, 0, 1.0, False)
    limits = {}
    for refs in sorted({r["refs"] for r in rows if r["refs"]}):
        dense = find_row(rows, refs, 1.0, False)
        limits[str(refs)] = {name: (dense[f"{name}_s"] / target[f"{name}_s"]
                                    if dense.get(f"{name}_s") and target.get(f"{name}_s") else None)
                             for name in ("torch", "ort")}
    return limits


def selection_shares(selection: dict[str, Any], rows: list[dict[str, Any]], most_refs: int) -> dict[str, Any]:
    """Adds to each strategy's timings its share of (selection + packing + generation) at ``most_refs``
    references, keep 0.10 + KV, per backend."""
    generation = find_row(rows, most_refs, ACCEPTANCE_KEEP, True)
    for entry in selection.values():
        seconds = entry["select_s"] + entry["pack_s"]
        for name in ("torch", "ort"):
            generated = generation.get(f"{name}_s")
            entry[f"share_{name}"] = seconds / (seconds + generated) if generated else None
    return {"keep": ACCEPTANCE_KEEP, "against": generation.get("label"),
            "strategies": selection}


def correctness(rows: list[dict[str, Any]], most_refs: int) -> dict[str, Any]:
    """onnxruntime vs PyTorch final latents of the acceptance rows, and every row flagged anywhere."""
    checked = [r for r in rows if r["refs"] == most_refs and r["keep"] == ACCEPTANCE_KEEP]
    return {"rel_flag": REL_ERROR_FLAG, "rows": [{k: r[k] for k in ("label", "max_abs_diff", "rel_diff", "flagged")}
                                                 for r in checked],
            "flagged_anywhere": [r["label"] for r in rows if r.get("flagged")]}


def acceptance(result: dict[str, Any]) -> dict[str, Any]:
    """Issue 4's criteria, each with its measured value and pass/fail (None: not measured)."""
    rows, most = result["rows"], max(result["refs"])
    kv_row = find_row(rows, most, ACCEPTANCE_KEEP, True)
    cached_row = find_row(rows, most, ACCEPTANCE_KEEP, True, True)
    ratios = [r for r in rows if r["ort_over_torch"] is not None]
    shares = [s[f"share_{name}"] for s in result["selection"]["strategies"].values() for name in ("torch", "ort")
              if s[f"share_{name}"] is not None]
    criteria = [
        _criterion("kv_speedup_ort", f"refs {most} keep 0.1 + KV over dense, onnxruntime", ">=", 8.0,
                   kv_row.get("speedup_ort")),
        _criterion("persistent_speedup_ort", f"refs {most} keep 0.1, persistent-cache call over dense, onnxruntime",
                   ">=", 9.5, cached_row.get("speedup_ort")),
        _criterion("ort_over_torch", "onnxruntime / PyTorch time, worst configuration", "<=", 1.0,
                   max((r["ort_over_torch"] for r in ratios), default=None),
                   failing=[r["label"] for r in ratios if r["ort_over_torch"] > 1.0]),
        _criterion("selection_share", f"selection + packing share of generation at refs {most} (worst strategy "
                   "and backend)", "<=", 0.02, max(shares, default=None)),
    ]
    setup = dict(config=result["config"], target_px=result["target_px"], ref_px=result["ref_px"],
                 text_tokens=result["text_tokens"], steps=result["steps"], refs=most)
    return {"criteria": criteria, "passed": all(c["pass"] for c in criteria),
            "meaningful": setup == ACCEPTANCE_SETUP and "cuda" in result["providers"][0].lower(),
            "note": "pass/fail only means something on a GPU at klein-9b, 1024² target and references, 512 text "
                    f"tokens, 4 steps, 6 references (this run: {setup} on {result['device']})"}


def _criterion(name: str, what: str, op: str, target: float, value: float | None, **extra: Any) -> dict[str, Any]:
    passed = None if value is None else (value >= target if op == ">=" else value <= target)
    return {"name": name, "what": what, "target": f"{op} {target:g}", "value": value, "pass": passed, **extra}


def write_engine_report(result: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``engines.json`` and ``engines.png`` in ``out_dir``, each written atomically."""
    from sparse_context.engines.manifest import atomic_write_bytes

    out_dir = Path(out_dir)
    json_path = atomic_write_bytes(out_dir / "engines.json", json.dumps(result, indent=2).encode())
    png_path = atomic_write_bytes(out_dir / "engines.png", plot_png(result))
    return json_path, png_path


def plot_png(result: dict[str, Any]) -> bytes:
    """Speedup over dense vs references per backend (with the target-only limit), and ONNX/PyTorch per row."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["refs"]]
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=100, gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for axis, (name, title) in zip(axes[:2], (("torch", "PyTorch"), ("ort", "onnxruntime"))):
        for color, keep in enumerate(result["keeps"]):  # colour: keep fraction; line style: KV mode
            for kv, hit, style in ((False, False, "--"), (True, False, "-"), (True, True, ":")):
                series = [r for r in rows if (r["keep"], r["kv"], r["cache_hit"]) == (keep, kv, hit)
                          and r[f"speedup_{name}"] is not None]
                if series and not (keep == 1.0 and not kv):
                    axis.plot([r["refs"] for r in series], [r[f"speedup_{name}"] for r in series], style, marker="o",
                              color=f"C{color}",
                              label=f"keep {keep:g}" + (" KV cached" if hit else " KV" if kv else ""))
        limit = [(int(n), v[name]) for n, v in result["limits"].items() if v[name]]
        if limit:
            axis.plot(*zip(*limit), color="gray", linestyle="-.", label="limit (target only)")
        axis.set(title=f"{title}: speedup over dense", xlabel="references", ylabel="speedup (same refs)",
                 xticks=sorted(int(n) for n in result["limits"]))
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=6, ncol=2)
    ratios = [r for r in result["rows"] if r["ort_over_torch"] is not None]
    axes[2].bar(range(len(ratios)), [r["ort_over_torch"] for r in ratios],
                color=["tab:red" if r["ort_over_torch"] > 1.0 else "tab:green" for r in ratios])
    axes[2].axhline(1.0, color="black", linewidth=0.8)
    axes[2].set_xticks(range(len(ratios)), [r["label"] for r in ratios], rotation=80, fontsize=6)
    axes[2].set(title="onnxruntime / PyTorch time (<= 1 wanted)", ylabel="ratio")
    figure.suptitle(f"{result['config']} on {result['device']}, {result['precision']}, {result['steps']} steps, "
                    f"target {result['target_px']}², refs {result['ref_px']}², {result['backend']}", fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")
    finally:
        plt.close(figure)
    return buffer.getvalue()


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The report as text: the rows table, selection, phases, skipped work and the acceptance block."""
    number = lambda value, spec: "-" if value is None else format(value, spec)
    lines = [f"{'configuration':28s} {'ref tok':>7s} {'torch s':>8s} {'ort s':>8s} {'ort/torch':>9s} "
             f"{'x torch':>7s} {'x ort':>7s} {'rel err':>8s}"]
    for r in result["rows"]:
        lines.append(f"{r['label']:28s} {r['ref_tokens']:7d} {number(r['torch_s'], '8.3f')} "
                     f"{number(r['ort_s'], '8.3f')} {number(r['ort_over_torch'], '9.2f')} "
                     f"{number(r['speedup_torch'], '7.2f')} {number(r['speedup_ort'], '7.2f')} "
                     f"{number(r['rel_diff'], '8.1e')}{'  FLAGGED' if r['flagged'] else ''}")
    for strategy, s in result["selection"]["strategies"].items():
        lines.append(f"selection {strategy:9s} {s['references']} refs: select {s['select_s'] * 1e3:.1f} ms + pack "
                     f"{s['pack_s'] * 1e3:.1f} ms; share of generation torch {number(s['share_torch'], '.2%')}, "
                     f"ort {number(s['share_ort'], '.2%')}")
    for label, io in result.get("io_binding", {}).items():
        lines.append(f"I/O binding {label:28s} host buffers {io['host_io_s']:.3f}s, device buffers "
                     f"{io['device_io_s']:.3f}s: {io['host_over_device']:.2f}x")
    lines.append("phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in result["phases_s"].items()))
    if result["ort_problem"]:
        lines.append(f"onnxruntime not measured: {result['ort_problem']}")
    for s in result["skipped"]:
        lines.append(f"skipped ({s['backend']}): {s['what']}: {s['reason']}")
    acceptance_block = result["acceptance"]
    lines.append(f"acceptance ({acceptance_block['note']}):")
    for c in acceptance_block["criteria"]:
        verdict = {True: "pass", False: "FAIL", None: "not measured"}[c["pass"]]
        lines.append(f"  {c['name']:24s} {number(c['value'], '.3g'):>8s} (want {c['target']}) {verdict}  {c['what']}")
    return lines
