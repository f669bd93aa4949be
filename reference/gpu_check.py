"""``sparse-context bench gpu``: the GPU check in one command, sized for a freshly lent GPU (<= 8 minutes).

Phases (``reference.gpu_plan`` estimates each; the report is rewritten after every row and phase, so a run killed at
any point leaves every finished row):

1. environment: device, free GPU memory, host memory and disk; stop early if the plan cannot fit.
2. selection: token selection + packing of 6 x 1024^2 numpy references at keep 0.10, on a quiet CPU.
   attention_keys: PyTorch's attention of the persistent-cache call (text + target queries over them and the kept
   tokens) beside its neighbouring key counts, rounded to whole key tiles (``attention_kernels.key_sweep``).
3. export workers start: each graph (``full``, ``kv``) of each reduced depth and attention variant is exported in
   its own process from the CPU (PyTorch cannot export from CUDA tensors, see the exporter), in parallel with the
   GPU phases. A worker still running when the budget ends is killed: the export lives inside the budget.
4. torch_full: PyTorch eager at full depth, the issue's rows first (:func:`gpu_plan.check_rows`).
5. torch_<depth>: the same rows at both reduced depths, with the weights the workers export (same seed, built on
   the CPU), and in bf16 at the first depth (fp16 vs bf16).
6. ort_<depth>_<variant>: our onnxruntime runtime (CUDA provider, I/O binding, pooled K/V) on those exports: a
   profiled probe call proves where every node ran, then the rows, each compared with PyTorch at the same depth.
7. the acceptance block: PyTorch speedups at full depth, onnxruntime extrapolated from two depths, onnxruntime /
   PyTorch per row at each depth, selection's share, and how well two depths predicted PyTorch's full depth.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sparse_context.reference.benchmark_configs import CONFIGS
from sparse_context.reference.engine_benchmark import (
    BenchInputs, CostModel, EngineBenchOptions, LoopRunner, RowKey, TimeBudget, compare_latents, read_only,
    time_select_and_pack,
)
from sparse_context.reference.gpu_plan import (
    ACCEPTANCE_KEEP, BUILD_SECONDS_PER_GB, CACHE_HIT_REPEAT_FACTOR, ORT_CACHE_HIT_REPEAT_FACTOR, ORT_OVER_TORCH_GUESS,
    RAM_PER_EXPORT_BYTES_PER_PARAM, SESSION_SECONDS, Geometry, GpuCheckOptions, attention_sweep_seconds,
    check_rows, depth_units, estimate_plan, export_variant, timed_calls, variant_export,
)
from sparse_context.reference.gpu_report import CheckReport
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.files import replace_folder

Event = Callable[[str], None]
SELECTION_STRATEGIES = ("uniform", "edge", "saliency")
SELECTION_REPEATS = 10
FOCUS_SKIP = "not asked for (--focus: the rows the speedup criteria rest on, nothing beside them)"
GRAPH_REL_TOLERANCE = 1e-3  # graph replays run the ordinary runs' kernels: any larger difference is a wrong replay
PROBE_BYTES = 4096  # a CPU node whose output is larger than this is real work, not shape arithmetic
# A profiled generation: CUPTI's slowdown of the call, and per row the profiler's start, stop and trace parsing.
# Run 9 skipped the d16 kernel profile: its estimate, from PyTorch's whole phase, was 45 s for three rows of ~0.3 s
# each, with less than 50 s left; estimated from those rows' own times it costs ~10 s.
PROFILE_SLOWDOWN = 3.0
PROFILE_ROW_S = 2.5


# -- the export workers ----------------------------------------------------------------------------------------

class ExportQueue:
    """Exports in child processes, ``workers`` at a time, started in order as slots free up (a thread pumps the
    queue). Each job's options equal the parent's later ``export_onnx`` call, which then finds the cached export."""

    def __init__(self, jobs: list[dict[str, Any]], workers: int, log_dir: Path, log: Event):
        self.jobs = jobs
        self.workers, self.log_dir, self.log = workers, log_dir, log
        self.state: dict[str, dict[str, Any]] = {job["name"]: {"status": "queued"} for job in jobs}
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump_forever, daemon=True)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def _pump_forever(self) -> None:
        while not self._stop.is_set():
            self.pump()
            self._stop.wait(0.25)

    def pump(self) -> None:
        with self._lock:
            for name, process in list(self._processes.items()):
                code = process.poll()
                if code is not None:
                    entry = self.state[name]
                    entry.update(status="done" if code == 0 else "failed", exit_code=code,
                                 seconds=time.perf_counter() - entry["started"])
                    if code:
                        entry["log_tail"] = _tail(self.log_dir / f"{name}.log")
                    self.log(f"export {name}: {entry['status']} in {entry['seconds']:.0f}s")
                    del self._processes[name]
            for job in self.jobs:
                if len(self._processes) >= self.workers:
                    break
                if self.state[job["name"]]["status"] == "queued":
                    self._launch(job)

    def _launch(self, job: dict[str, Any]) -> None:
        log_file = open(self.log_dir / f"{job['name']}.log", "w")
        command = [sys.executable, "-m", "sparse_context.reference.gpu_check", "--export-worker", json.dumps(job)]
        environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
        self._processes[job["name"]] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                                        env=environment, start_new_session=True)
        log_file.close()
        self.state[job["name"]].update(status="running", started=time.perf_counter())
        self.log(f"export {job['name']}: started")

    def wait(self, names: list[str], deadline: Callable[[], bool]) -> bool:
        """True when every named job finished well; False on a failure or when ``deadline()`` says stop."""
        while True:
            self.pump()
            states = [self.state[name]["status"] for name in names]
            if all(s == "done" for s in states):
                return True
            if any(s == "failed" for s in states) or deadline():
                return False
            time.sleep(0.25)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: {k: v for k, v in entry.items() if k != "started"} for name, entry in self.state.items()}

    def close(self) -> None:
        """Stop pumping and kill whatever still runs (the budget ended)."""
        self._stop.set()
        with self._lock:
            for name, process in self._processes.items():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, 9)
                process.wait()
                self.state[name].update(status="killed", seconds=time.perf_counter() - self.state[name]["started"])
            self._processes.clear()
            for entry in self.state.values():
                if entry["status"] == "queued":
                    entry["status"] = "not started"


def export_job(options: GpuCheckOptions, depth: str, variant: str, graph: str) -> dict[str, Any]:
    """The export of ``variant``'s ``graph`` at ``depth``, named by what it exports (mha-split-plain's full graph is
    mha-split's job)."""
    grid = Geometry.of(options, CONFIGS[options.config]).ref_grid_tokens
    source = export_variant(variant, graph)
    attention, projections, ref_stream = variant_export(source)
    return {"name": f"{depth}-{source}-{graph}", "graph": graph, "attention": attention, "projections": projections,
            "ref_stream": ref_stream,
            "precision": options.precision, "model_dir": str(model_folder(options, depth)),
            "out_dir": str(options.work / "onnx"), "max_ref_tokens": options.refs * grid,
            "target_px": options.target_px, "text_tokens": options.text_tokens}


def export_options(job: dict[str, Any]) -> Any:
    from sparse_context.export.exporter import ExportOptions

    return ExportOptions(model_dir=Path(job["model_dir"]), graph=job["graph"], precision=job["precision"],
                         attention=job["attention"], projections=job.get("projections", "fused"),
                         ref_stream=job.get("ref_stream", "guarded"),
                         max_ref_tokens=job["max_ref_tokens"],
                         target_sizes=((job["target_px"], job["target_px"]),), text_tokens=job["text_tokens"],
                         out_dir=Path(job["out_dir"]))


def run_export_job(job: dict[str, Any], log: Event) -> Any:
    """Export one graph of a depth's model folder (the exporter loads its weights), or find it cached."""
    from sparse_context.export.exporter import export_onnx

    progress = lambda stage, step, total: log(f"export {job['name']}: {stage} {step}/{total}")
    return export_onnx(export_options(job), progress)


def reusable_bytes(options: GpuCheckOptions) -> int:
    """Bytes in ``options.work`` that this run would reuse rather than write: the complete model folders of its
    depths, and the complete exports (manifest present, this exporter's format) whose graph, forms and model
    configuration are one of the run's jobs. An export of the same job with other inputs (another seed's weights,
    a larger reference bound) also matches; the exporter then writes a new one beside it, so this is an estimate
    that errs towards running, and a full disk stops that export with an error in the report."""
    from sparse_context.export.manifest import FORMAT_VERSION
    from sparse_context.export.manifest import MANIFEST

    def tree(folder: Path) -> int:
        return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())

    total = 0
    jobs = set()
    for depth in options.ladder:
        folder = model_folder(options, depth)
        if (folder / "model_index.json").is_file():
            total += tree(folder)
        layers = _shape_key(CONFIGS[options.depth_config(depth)])
        for variant in options.variants:
            for graph in ("full", "kv"):
                job = export_job(options, depth, variant, graph)
                jobs.add((graph, job["precision"], job["attention"], job["projections"], job["ref_stream"], layers))
    for manifest_path in sorted((options.work / "onnx").glob(f"*/{MANIFEST}")):
        try:
            manifest = json.loads(manifest_path.read_text())
            model = manifest["model_config"]
            key = (manifest["graph"], manifest["precision"], manifest["attention"], manifest["projections"],
                   manifest["ref_stream"], _shape_key(model))
            current = manifest["versions"]["format"] == str(FORMAT_VERSION)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged or foreign: the exporter replaces it
        if current and key in jobs:
            total += tree(manifest_path.parent)
    return total


def profile_estimate(row_seconds: list[float | None], phase_wall_s: float) -> float:
    """Seconds to profile one generation of each row: ``PROFILE_SLOWDOWN`` times its timed seconds, plus
    ``PROFILE_ROW_S``. A row that was not timed is guessed as before run 9, from ``phase_wall_s`` (the PyTorch
    phase's wall time at the depth: nine rows, warm-ups included): twice an average row's share."""
    guess = 2.0 * phase_wall_s / 9
    return sum((guess if s is None else PROFILE_SLOWDOWN * s) + PROFILE_ROW_S for s in row_seconds)


def _shape_key(config: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(config[name]) for name in ("num_layers", "num_single_layers", "num_attention_heads",
                                                "attention_head_dim"))


def model_folder(options: GpuCheckOptions, depth: str) -> Path:
    return options.work / f"model-{options.depth_config(depth)}-seed{options.seed}-{options.precision}"


def write_model_folder(options: GpuCheckOptions, depth: str) -> Path:
    """A diffusers folder (``model_index.json`` + ``transformer/``) with the depth's seeded random weights, drawn
    on the device (fast) and saved as safetensors: the exporter loads it like any user's folder, and PyTorch loads
    the same file, so both run identical weights. Written to a staging folder and renamed when complete."""
    import tempfile

    import torch

    from sparse_context.reference.benchmark import build_transformer

    folder = model_folder(options, depth)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{folder.name}-", dir=folder.parent))
    try:
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[options.precision]
        model = build_transformer(options.depth_config(depth), options.device, dtype, seed=options.seed)
        model.save_pretrained(staging / "transformer", safe_serialization=True)
        del model
        index = {"_class_name": "Flux2KleinPipeline", "transformer": ["diffusers", "Flux2Transformer2DModel"]}
        (staging / "model_index.json").write_text(json.dumps(index))
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


# -- the check -------------------------------------------------------------------------------------------------

def run_gpu_check(options: GpuCheckOptions, on_event: Event | None = None) -> dict[str, Any]:
    """The whole check (module doc); returns the report, also written to ``options.out`` after every step."""
    options = options.validate()
    log = on_event or (lambda line: None)
    budget = TimeBudget(options.budget_s)
    report = CheckReport(options, Path(options.out), log)
    checker = _Check(options, budget, report, log)
    try:
        checker.run()
    finally:
        checker.close()
        report.finish()
    return report.data


class _Check:
    def __init__(self, options: GpuCheckOptions, budget: TimeBudget, report: CheckReport, log: Event):
        import torch

        self.torch = torch
        self.options, self.budget, self.report, self.log = options, budget, report, log
        self.dtype = {"fp16": torch.float16, "fp32": torch.float32}[options.precision]
        self.rows = check_rows(options.refs, options.key_tile, options.focus)
        self.full_config = CONFIGS[options.config]
        self.geometry = Geometry.of(options, self.full_config)
        self.rate: float | None = None  # measured FLOP/s on PyTorch (the slowest row's)
        self.latents: dict[tuple[str, RowKey], np.ndarray] = {}
        self.torch_wall: dict[str, float] = {}  # per depth: wall seconds of every PyTorch row (warm-ups included)
        self.queue: ExportQueue | None = None

    # 1.
    def run(self) -> None:
        options = self.options
        with self.report.phase("environment"):
            self.report.data["environment"] = self._environment()
        options = self.options  # the environment may have dropped variants the disk cannot hold
        bench = EngineBenchOptions(config=options.config, refs=tuple(sorted({1, 3, options.refs})),
                                   keeps=(1.0, ACCEPTANCE_KEEP), target_px=options.target_px,
                                   ref_px=min(options.ref_px, 1024), text_tokens=options.text_tokens,
                                   steps=options.steps, repeats=options.repeats, device=options.device,
                                   precision=options.precision, backend="ort-cuda" if options.cuda else "ort-cpu",
                                   seed=options.seed).validate()
        self.inputs = BenchInputs.create(bench, int(self.full_config["in_channels"]),
                                         int(self.full_config["joint_attention_dim"]))
        with self.report.phase("selection"):
            self.report.data["selection"] = time_selection(options, self.inputs.grids[:options.refs])
        if options.focus:
            self.report.skip("attention_keys", "phase", FOCUS_SKIP)
        elif self._fits_phase("attention_keys", attention_sweep_seconds(options, self.full_config)):
            with self.report.phase("attention_keys"):
                self.report.data["attention_keys"] = self._attention_keys()
        with self.report.phase("weights") as phase:
            for depth in options.ladder:
                with _timed(phase, f"{depth}_s"):
                    write_model_folder(options, depth)
            self._free()
        jobs = list({job["name"]: job for job in (export_job(options, depth, variant, graph)
                                                  for variant in options.variants for depth in options.ladder
                                                  for graph in ("full", "kv"))}.values())  # shared exports once
        self.report.data["exports"] = {job["name"]: {} for job in jobs}
        if options.workers:
            self.queue = ExportQueue(jobs, self._workers_that_fit(), options.work / "logs", self.log)
            self.report.exports_snapshot = self.queue.snapshot
            self.queue.start()
        if not options.full:
            self.report.skip("torch_full", "phase", "not asked for (--no-full)")
        elif self._fits_phase("torch_full", self._torch_estimate(self.full_config, build=True)):
            self.torch_phase("full", options.config)
        for depth in options.ladder:
            config = options.depth_config(depth)
            if self._fits_phase(f"torch_{depth}", self._torch_estimate(CONFIGS[config], build=True)):
                self.torch_phase(depth, config)
        if options.bf16 and options.precision == "fp16" and options.cuda:
            depth = options.ladder[0]
            if self._fits_phase(f"torch_bf16_{depth}", self._torch_estimate(CONFIGS[options.depth_config(depth)])):
                self.torch_phase(depth, options.depth_config(depth), dtype=self.torch.bfloat16)
        for variant in options.variants:
            for depth in options.ladder:
                self.ort_phase(depth, variant)

    def close(self) -> None:
        if self.queue is not None:
            self.queue.close()

    def _attention_keys(self) -> dict[str, Any]:
        """The persistent-cache call's attention (text + target queries over them and the kept tokens) against its
        neighbouring key counts (``attention_kernels.key_sweep``): is a partial last key tile what the cached call's
        attention pays beyond its FLOPs?"""
        from sparse_context.reference.attention_kernels import key_sweep

        queries, keys = self.geometry.cached_attention(self.options.refs)
        config = self.full_config
        return key_sweep(queries, keys, int(config["num_attention_heads"]), int(config["attention_head_dim"]),
                         self.options.device, self.options.precision)

    # 2. Estimates and the budget
    def _torch_estimate(self, config: dict[str, Any], build: bool = False) -> float:
        rate = self.rate or _assumed_rate(self.options)
        flops = sum(self.geometry.call_flops(row, config, self.options.steps) for row in self.rows)
        seconds = (self.options.repeats + 1) * flops / rate
        return seconds + (BUILD_SECONDS_PER_GB * self.geometry.weights_gb(config) if build else 0.0)

    def _fits_phase(self, name: str, estimate: float) -> bool:
        # A phase may start while its first row fits: rows that would not fit are skipped one by one.
        if self.budget.left() > min(estimate, 0.25 * estimate + 5.0):
            return True
        self.report.skip(name, "phase", f"estimated {estimate:.0f}s, {max(self.budget.left(), 0):.0f}s left")
        return False

    def _workers_that_fit(self) -> int:
        """Export workers that host memory allows beside this process (each holds its depth's weights ~3x)."""
        available = _meminfo_bytes("MemAvailable")
        largest = max(depth_units(CONFIGS[self.options.depth_config(d)]) for d in self.options.ladder)
        per_worker = RAM_PER_EXPORT_BYTES_PER_PARAM * 1.1 * largest * self.geometry.unit_params + 2e9
        fit = self.options.workers if available is None else max(1, int((available - 8e9) // per_worker))
        workers = min(self.options.workers, fit)
        self.report.data["environment"]["export_workers"] = {"asked": self.options.workers, "used": workers,
                                                             "per_worker_gb": per_worker / 1e9}
        return workers

    # 3. PyTorch
    def torch_phase(self, depth: str, config: str, dtype: Any = None) -> None:
        from sparse_context.reference.benchmark import build_transformer
        from sparse_context.reference.torch_backend import TorchTransformerBackend

        torch, options = self.torch, self.options
        dtype = dtype or self.dtype
        tag = "bf16" if dtype == torch.bfloat16 and dtype != self.dtype else ""
        name = f"torch_{tag + '_' if tag else ''}{depth}"
        with self.report.phase(name) as phase:
            if depth == "full":
                model = build_transformer(config, options.device, dtype, seed=options.seed)
            else:  # the weights the exports hold
                from diffusers import Flux2Transformer2DModel

                model = Flux2Transformer2DModel.from_pretrained(str(model_folder(options, depth)),
                                                                subfolder="transformer", torch_dtype=dtype,
                                                                local_files_only=True).to(options.device).eval()
            phase["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
            sync = torch.cuda.synchronize if options.cuda else (lambda: None)
            runner = LoopRunner(TorchTransformerBackend(model), self.inputs,
                                lambda a: torch.from_numpy(a).to(options.device, dtype), sync)
            timed: dict[RowKey, float] = {}
            for row, seconds, wall, latents in self._rows(name, runner):
                timed[row] = seconds
                flops = self.geometry.call_flops(row, CONFIGS[config], options.steps)
                if not tag:
                    self.torch_wall[depth] = self.torch_wall.get(depth, 0.0) + wall
                    self.latents[(depth, row)] = latents
                    measured = flops / seconds
                    self.rate = measured if self.rate is None else min(self.rate, measured)
                self.report.row(name, row, seconds=seconds, wall_s=wall, ref_tokens=self.inputs.ref_tokens(row),
                                tflops=flops / seconds / 1e12, finite=bool(np.isfinite(latents).all()),
                                samples_s=runner.samples)
            if not tag and depth != "full":  # both reduced depths: busy and outside-kernel time extrapolate apart
                phase["kernels"] = self._kernel_profiles(runner, sync, depth, timed)
            runner.release()
            del runner, model
            self._free()

    def _rows(self, phase: str, runner: LoopRunner) -> Iterator[tuple[RowKey, float, float, np.ndarray]]:
        """(row, median seconds, wall seconds, final latents) of every row that fits the budget and runs; the
        cost of later rows is estimated from the ones before (the densest runs first)."""
        cost = CostModel()
        for row in self.rows:
            estimate = cost.estimate(self.inputs.token_steps(row))  # at the default repeats: scaled to this row's
            if estimate is not None:
                estimate *= (self.repeats_for(row, phase) + 1) / (self.options.repeats + 1)
            outcome = self._row(phase, row, runner, estimate)
            if outcome is not None:
                cost.observe(self.inputs.token_steps(row) * (self.repeats_for(row, phase) + 1)
                             // (self.options.repeats + 1), outcome[1])
                yield (row, *outcome)

    def repeats_for(self, row: RowKey, phase: str | None = None) -> int:
        """Timed calls of a row. The persistent-cache row gets three times as many, six times in the onnxruntime
        phases (``phase`` "ort_..."): the whole criterion it decides rests there on the small difference between
        two depths of a ~0.1 s call, which the extrapolation multiplies, and its calls are the cheapest of the
        check. With whole-key-tile rows it shares them with its topped-up twin (:func:`gpu_plan.timed_calls`).
        Side rows (no ``phase``) keep three, for the row as kept."""
        factor = ORT_CACHE_HIT_REPEAT_FACTOR if phase is not None and phase.startswith("ort_") \
            else CACHE_HIT_REPEAT_FACTOR
        return timed_calls(row, self.options.repeats, factor, self.options.key_tile if phase is not None else 0)

    def _row(self, phase: str, row: RowKey, runner: LoopRunner, estimate: float | None) -> Any:
        if row.cache_hit and not runner.has_state_for(row):
            self.report.skip(f"{phase}: {row.label}", "row", "its KV row did not run")
            return None
        if not self.budget.fits(estimate):
            guess = "no estimate yet" if estimate is None else f"estimated {estimate:.1f}s"
            self.report.skip(f"{phase}: {row.label}", "row", f"{guess}, {max(self.budget.left(), 0):.1f}s left")
            return None
        try:
            outcome = runner.run(row, repeats=self.repeats_for(row, phase))
        except Exception as error:  # out of memory, a provider's kernel error: report it, keep the other rows
            self.report.skip(f"{phase}: {row.label}", "row", f"failed: {type(error).__name__}: {str(error)[:300]}")
            self._free()
            return None
        self.log(f"{phase:18s} {row.label:26s} {outcome[0]:8.3f}s  ({self.budget.left():.0f}s of budget left)")
        return outcome

    # 4. onnxruntime
    def ort_phase(self, depth: str, variant: str) -> None:
        name = f"ort_{depth}_{variant}"
        config = CONFIGS[self.options.depth_config(depth)]
        if not any((depth, row) in self.latents for row in self.rows):
            self.report.skip(name, "phase", f"PyTorch did not run at {depth}: nothing to compare with")
            return
        gb = self.geometry.weights_gb(config)
        sessions = 2 * (SESSION_SECONDS[0] + SESSION_SECONDS[1] * gb)
        # The rows as PyTorch ran them at this depth, times the guessed ratio, plus the probe (about one row).
        estimate = sessions + ORT_OVER_TORCH_GUESS * 1.2 * self.torch_wall.get(depth, 0.0)
        jobs = [export_job(self.options, depth, variant, graph) for graph in ("full", "kv")]
        if self.queue is not None:
            ready = self.queue.wait([job["name"] for job in jobs], lambda: self.budget.left() < sessions + 5.0)
            if not ready:
                states = {job["name"]: self.queue.state[job["name"]]["status"] for job in jobs}
                self.report.skip(name, "phase", f"exports not ready: {states}")
                return
        if not self._fits_phase(name, estimate):
            return
        with self.report.phase(name) as phase:
            exports = {}
            for job in jobs:
                with _timed(phase, f"export_{job['graph']}_s"):
                    exports[job["graph"]] = run_export_job(job, self.log)
            phase["exports"] = {g: {"path": str(r.path), "reused": r.reused, "ops": r.manifest.get("ops")}
                                for g, r in exports.items()}
            graphs = self.options.graphs_for(variant)
            with _timed(phase, "sessions_s"):
                backend, profile_dir = self._open(exports, name, phase, graphs)
            phase["providers_used"] = {g: list(s.get_providers()) for g, s in backend.sessions.items()}
            with _timed(phase, "probe_s"):
                phase["placement"] = self._probe_with_fallbacks(backend, phase, name)
            runner = LoopRunner(backend, self.inputs, read_only)
            if backend.graphs is not None:
                with _timed(phase, "graphs_probe_s"):
                    captured = self._probe_graphs(backend, runner, name, phase)
                if not captured:  # new sessions and stream, without graphs, unprofiled; the old ones freed first
                    runner.release()
                    runner = backend = None
                    self._free()
                    with _timed(phase, "sessions_again_s"):
                        backend, _ = self._reopen(exports, name, phase)
                    runner = LoopRunner(backend, self.inputs, read_only)
            timed: dict[RowKey, tuple[float, np.ndarray]] = {}
            for row, seconds, wall, latents in self._rows(name, runner):
                timed[row] = (seconds, latents)
                reference = self.latents.get((depth, row))
                compared = {"finite": bool(np.isfinite(latents).all())}
                if reference is not None:  # PyTorch at the same depth, same weights and inputs
                    compared.update(compare_latents(reference, latents), finite=compared["finite"])
                self.report.row(name, row, seconds=seconds, wall_s=wall, ref_tokens=self.inputs.ref_tokens(row),
                                in_session_s=runner.session_seconds, in_steps_s=runner.step_seconds,
                                samples_s=runner.samples, **compared)
            # Side measurements: a failure is recorded in its entry, and the phase's rows and the check go on.
            phase["host_steps"] = self._side(name, "host_steps", self._host_steps, backend, runner, timed)
            phase["waits_per_run"] = self._side(name, "waits_per_run", self._waits_per_run, backend, runner, timed)
            if graphs:
                phase["without_graphs"] = self._side(name, "without_graphs", self._without_graphs, backend, runner,
                                                     timed)
            if backend.graphs is not None:  # graphs made, calls replayed, calls past the limit, copies
                phase["cuda_graph_stats"] = asdict(backend.graphs.stats)
            phase["kernels"] = self._kernel_profiles(runner, lambda: None, depth,  # both depths, as for PyTorch
                                                     {row: seconds for row, (seconds, _) in timed.items()})
            runner.release()
            del runner, backend
            shutil.rmtree(profile_dir, ignore_errors=True)
            self._free()

    def _kernel_profiles(self, runner: LoopRunner, sync: Callable[[], None], depth: str,
                         seconds: dict[RowKey, float]) -> dict[str, Any]:
        """GPU kernel time per category for one generation of the target-only row, the acceptance KV row and its
        persistent-cache call (``reference.kernel_profile``): where the cached call's time over target-only goes.
        Profiled at both depths, so GPU busy time and the time outside kernels extrapolate to full depth apart.
        With a key tile, also the tiled KV row and its cache hit: the attention kernels' time with whole tiles.
        ``seconds``: the phase's timed rows, from which the profiles' cost is estimated."""
        from sparse_context.reference.kernel_profile import profile_kernels

        if self.options.focus:
            return {"status": "skipped", "reason": FOCUS_SKIP}
        rows = [RowKey(0, 1.0, False), RowKey(self.options.refs, ACCEPTANCE_KEEP, True),
                RowKey(self.options.refs, ACCEPTANCE_KEEP, True, cache_hit=True)]
        if self.options.key_tile:
            rows += [RowKey(self.options.refs, ACCEPTANCE_KEEP, True, tile=self.options.key_tile),
                     RowKey(self.options.refs, ACCEPTANCE_KEEP, True, cache_hit=True, tile=self.options.key_tile)]
        if not self.options.cuda:
            return {"status": "skipped", "reason": "kernel times need CUPTI on a GPU"}
        estimate = profile_estimate([seconds.get(row) for row in rows], self.torch_wall.get(depth, 0.0))
        if not self.budget.fits(estimate):
            return {"status": "skipped", "reason": "does not fit the budget", "estimate_s": estimate}
        profiles = {}
        try:
            for row in rows:
                profiles[row.label] = profile_kernels(lambda row=row: runner.run(row, repeats=0), sync)
        except Exception as error:  # the profiler's own failure must not cost the phase its rows
            profiles["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        return profiles

    def _host_steps(self, backend: Any, runner: LoopRunner, timed: dict[RowKey, tuple[float, np.ndarray]]
                    ) -> dict[str, Any]:
        """The acceptance KV row again with the Euler step on the host (velocity copied out, latents copied in,
        numpy float16 arithmetic): what keeping latents on the device buys, measured side by side."""
        row = RowKey(self.options.refs, ACCEPTANCE_KEEP, True)
        if not backend.device_steps:
            return {"status": "skipped", "reason": "device steps failed in the probe: every row ran host steps"}
        if row not in timed or not self.budget.fits(2.0 * (self.options.repeats + 1) * timed[row][0]):
            return {"status": "skipped", "reason": "the device-step row did not run or does not fit the budget"}
        device_s, device_latents = timed[row]
        backend.device_steps = False
        try:
            seconds, _, latents = runner.run(row)
        finally:
            backend.device_steps = True
        self.log(f"host steps         {row.label:26s} {seconds:8.3f}s  (device steps {device_s:.3f}s)")
        return {"status": "done", "row": row.label, "host_steps_s": seconds, "device_steps_s": device_s,
                "host_over_device": seconds / device_s, "device_steps_sync": backend.sync,
                "latents_equal": bool(np.array_equal(latents, device_latents))}

    def _waits_per_run(self, backend: Any, runner: LoopRunner, timed: dict[RowKey, tuple[float, np.ndarray]]
                       ) -> dict[str, Any]:
        """The acceptance KV row and its persistent-cache call again on the same sessions, with onnxruntime waiting
        for the GPU after every run (its default, ``--sync run``) instead of once per image: what queueing a whole
        generation on one stream buys, side by side, and whether the latents are the same."""
        if self.options.sync == "run":
            return {"status": "skipped", "reason": "--sync run: the rows already waited after every run"}
        if backend.sync != "image":
            return {"status": "skipped", "reason": "the rows already waited after every run (see sync_error)"}
        skipped, results = self._rerun(runner, timed, lambda: backend.set_sync("run"),
                                       lambda: backend.set_sync("image"), "waits per run", "one wait per image")
        if skipped:
            return {"status": "skipped", "reason": skipped}
        return {"status": "done", "rows": {row.label: {"run_s": seconds, "image_s": image_s,
                                                       "run_over_image": seconds / image_s, "samples_s": samples,
                                                       "latents_equal": equal}
                                           for row, seconds, image_s, samples, equal in results}}

    def _rerun(self, runner: LoopRunner, timed: dict[RowKey, tuple[float, np.ndarray]], change: Callable[[], None],
               undo: Callable[[], None], what: str, before: str) -> tuple[str | None, list[tuple[Any, ...]]]:
        """The acceptance KV row and its persistent-cache call again on the same sessions with ``change`` in force
        (``undo`` afterwards, also on failure): (why skipped or None, [(row, seconds, the timed row's seconds,
        samples, latents equal)]). The KV row runs first: the cache-hit call reuses its K/V."""
        rows = [RowKey(self.options.refs, ACCEPTANCE_KEEP, True),
                RowKey(self.options.refs, ACCEPTANCE_KEEP, True, cache_hit=True)]
        if any(row not in timed for row in rows):
            return "the rows did not run", []
        if not self.budget.fits(1.5 * sum((self.repeats_for(row) + 1) * timed[row][0] for row in rows)):
            return "does not fit the budget", []
        results = []
        change()
        try:
            for row in rows:
                seconds, _, latents = runner.run(row, repeats=self.repeats_for(row))
                before_s, before_latents = timed[row]
                results.append((row, seconds, before_s, runner.samples,
                                bool(np.array_equal(latents, before_latents))))
                self.log(f"{what:18s} {row.label:26s} {seconds:8.3f}s  ({before} {before_s:.3f}s)")
        finally:
            undo()
        return None, results

    def _open(self, exports: dict[str, Any], name: str, phase: dict[str, Any], graphs: bool = False,
              profile: bool = True) -> tuple[Any, Path]:
        """Sessions on one stream of the backend's own, queued runs and one wait per image (``sync="image"``);
        if they cannot be made (no cuda-python, a provider refusing the stream), the default waits after every run,
        and the phase says why. ``graphs``: the kv session with CUDA graphs (on the CPU, the same fixed-address
        calls without capture), turned off until :meth:`_probe_graphs`; if onnxruntime refuses them, without, and
        the phase says why. ``profile``: onnxruntime profiles every node until the probe ends it."""
        import onnxruntime as ort

        from sparse_context.engines.buckets import BucketPlan, Resolution
        from sparse_context.engines.ort.backend import OrtTransformerBackend
        from sparse_context.engines.ort.graphs import CachedCallGraphs
        from sparse_context.engines.ort.loader import PROVIDERS

        options = self.options
        profile_dir = options.work / "profiles" / name
        profile_dir.mkdir(parents=True, exist_ok=True)
        session_options = ort.SessionOptions()
        session_options.enable_profiling = profile  # ended after the probe call: the timed rows run unprofiled
        session_options.profile_file_prefix = str(profile_dir / "ort")
        plan = BucketPlan(keep_fractions=(1.0, ACCEPTANCE_KEEP), max_refs=options.refs,
                          ref_resolution=Resolution(options.ref_px, options.ref_px),
                          target_resolutions=(Resolution(options.target_px, options.target_px),),
                          text_tokens=options.text_tokens, key_tile=options.key_tile)  # tiled rows: keep0.10's
        providers = PROVIDERS["ort-cuda" if options.cuda else "ort-cpu"]
        given = dict(full=exports["full"].path, kv=exports["kv"].path, providers=providers, plan=plan,
                     session_options=session_options)
        capture = graphs and options.cuda

        def backend_with(**extra: Any) -> Any:
            made = OrtTransformerBackend(**given, **extra)
            if graphs and not capture:
                made.graphs = CachedCallGraphs(made, capture=False)
            if made.graphs is not None:
                made.set_cuda_graphs(False)  # the placement probe runs every node ordinarily, profiled
            return made

        sync = {} if options.sync == "run" else {"sync": "image"}
        if capture:
            try:
                return backend_with(**sync, cuda_graphs=True), profile_dir
            except Exception as error:  # onnxruntime's own error types (a node it will not capture)
                phase["cuda_graphs_error"] = f"{type(error).__name__}: {str(error)[:500]}"
                self.log(f"{name}: cuda_graphs_error ({phase['cuda_graphs_error']}); retrying without CUDA graphs")
        if not sync:
            return backend_with(), profile_dir
        try:
            return backend_with(sync="image"), profile_dir
        except Exception as error:  # a provider's or cuda-python's own error types
            phase["sync_error"] = f"{type(error).__name__}: {str(error)[:500]}"
            self.log(f"{name}: sync_error ({phase['sync_error']}); retrying with a wait after every run")
            return backend_with(), profile_dir

    def _probe_graphs(self, backend: Any, runner: LoopRunner, name: str, phase: dict[str, Any]) -> bool:
        """The acceptance KV row once without graphs, then twice with (capture, then replay), latents compared.
        False if a graph call failed: the caller makes the sessions (and their stream) again without graphs, so the
        rows still run, and the phase says why. Graphs that ran but gave other latents (beyond
        :data:`GRAPH_REL_TOLERANCE`), or that no call used, are turned off on these sessions, saying why."""
        row = RowKey(self.options.refs, ACCEPTANCE_KEEP, True)
        entry: dict[str, Any] = {"capture": bool(backend.graphs.capture)}
        phase["cuda_graphs"] = entry
        try:
            _, _, ordinary = runner.run(row, repeats=0)
            backend.set_cuda_graphs(True)
            _, entry["first_s"], captured = runner.run(row, repeats=0)
            _, entry["second_s"], replayed = runner.run(row, repeats=0)
            if backend.graphs.error:  # a graph call failed; the backend ran it ordinarily and turned graphs off
                raise RuntimeError(backend.graphs.error)
        except Exception as error:  # onnxruntime's or CUDA's own error types
            phase["cuda_graphs_error"] = f"{type(error).__name__}: {str(error)[:500]}"
            self.log(f"{name}: cuda_graphs_error ({phase['cuda_graphs_error']}); new sessions without CUDA graphs")
            return False
        entry.update(ordinary_equal=bool(np.array_equal(ordinary, captured)),
                     replay_equal=bool(np.array_equal(captured, replayed)),
                     rel_diff=max(compare_latents(ordinary, captured)["rel_diff"],
                                  compare_latents(ordinary, replayed)["rel_diff"]),
                     stats=asdict(backend.graphs.stats))
        if not entry["stats"]["calls"]:
            phase["cuda_graphs_off"] = "no call went through a graph (the probe fell back to host I/O?)"
        elif entry["rel_diff"] > GRAPH_REL_TOLERANCE:
            phase["cuda_graphs_off"] = (f"graph latents differ from ordinary runs by {entry['rel_diff']:.2g} "
                                        f"(relative; allowed {GRAPH_REL_TOLERANCE:g})")
        if "cuda_graphs_off" in phase:
            backend.set_cuda_graphs(False)
            self.log(f"{name}: CUDA graphs off: {phase['cuda_graphs_off']}")
            return True
        self.log(f"{name}: CUDA graphs {'captured' if entry['capture'] else 'fixed addresses (no capture)'}: "
                 f"first {entry['first_s']:.3f}s, then {entry['second_s']:.3f}s; latents "
                 f"{'equal' if entry['ordinary_equal'] else 'close'} to ordinary runs (rel diff "
                 f"{entry['rel_diff']:.2g})")
        return True

    def _reopen(self, exports: dict[str, Any], name: str, phase: dict[str, Any]) -> tuple[Any, Path]:
        """Sessions without graphs after a failed capture; a failure here fails this phase only (not the check,
        as an engine error of the package would)."""
        try:
            return self._open(exports, name, phase, graphs=False, profile=False)
        except Exception as error:  # out of memory, or anything the provider raises
            raise RuntimeError(f"sessions without CUDA graphs after a failed capture: {type(error).__name__}: "
                               f"{str(error)[:300]}") from None

    def _side(self, name: str, what: str, measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
        """``measure(*args)``, a side measurement of a phase; if it fails, its entry says so and the phase (and
        the check) go on."""
        if self.options.focus:
            return {"status": "skipped", "reason": FOCUS_SKIP}
        try:
            return measure(*args)
        except Exception as error:  # a provider's kernel, CUDA or the package's own errors
            reason = f"{type(error).__name__}: {str(error)[:300]}"
            self.log(f"{name} {what} failed: {reason}")
            return {"status": "failed", "reason": reason}

    def _without_graphs(self, backend: Any, runner: LoopRunner, timed: dict[RowKey, tuple[float, np.ndarray]]
                        ) -> dict[str, Any]:
        """The acceptance KV row and its persistent-cache call again on the same sessions with CUDA graphs off:
        what replaying the cached calls buys, side by side, and whether the latents are the same."""
        if backend.graphs is None or not backend.graphs.enabled:
            return {"status": "skipped", "reason": "CUDA graphs are off (see cuda_graphs_error or cuda_graphs_off)"}
        skipped, results = self._rerun(runner, timed, lambda: backend.set_cuda_graphs(False),
                                       lambda: backend.set_cuda_graphs(True), "without graphs", "with CUDA graphs")
        if skipped:
            return {"status": "skipped", "reason": skipped}
        return {"status": "done", "capture": bool(backend.graphs.capture),
                "rows": {row.label: {"refs": row.refs, "off_s": seconds, "on_s": graphs_s,
                                     "off_over_on": seconds / graphs_s, "samples_s": samples, "latents_equal": equal}
                         for row, seconds, graphs_s, samples, equal in results}}

    def _probe_with_fallbacks(self, backend: Any, phase: dict[str, Any], name: str) -> dict[str, Any]:
        """The probe with one wait per image, device steps and device buffers; if it fails, again waiting after
        every run, then with host steps, then with host I/O (measure something rather than nothing, and say what
        failed)."""
        fallbacks = (("sync_error", "a wait after every run", lambda: backend.set_sync("run")),
                     ("device_steps_error", "host steps", lambda: setattr(backend, "device_steps", False)),
                     ("device_io_error", "host I/O", lambda: backend.set_io_device("cpu")))
        if backend.sync == "run":
            fallbacks = fallbacks[1:]
        for error_key, instead, fall_back in fallbacks:
            try:
                return self._probe(backend, phase)
            except Exception as error:  # a provider's kernel or binding error
                phase[error_key] = f"{type(error).__name__}: {str(error)[:500]}"
                self.log(f"{name}: {error_key} ({phase[error_key]}); retrying with {instead}")
                fall_back()
        return self._probe(backend, phase)

    def _probe(self, backend: Any, phase: dict[str, Any]) -> dict[str, Any]:
        """One dense call through the full graph and one keep-0.10 KV call through the kv graph, profiled; then
        where every node ran (provider per node from onnxruntime's own profile, not ``get_providers()``)."""
        from sparse_context.runtime.packing import pack_references
        from sparse_context.runtime.sampler import denoise

        inputs, most = self.inputs, self.options.refs
        for keep, use_kv in ((1.0, False), (ACCEPTANCE_KEEP, True)):
            packed = pack_references(inputs.grids[:most], inputs.kept_for(RowKey(most, keep, use_kv)))
            conditioning = LoopRunner(backend, inputs, read_only).conditioning
            denoise(backend, inputs.latents, inputs.target_ids, conditioning, inputs.schedule, packed.tokens[None],
                    packed.position_ids, use_kv=use_kv)
        on_cpu = backend.device == "cpu"
        phase.update(io=backend.io_device, device_steps=backend.device_steps, sync=backend.sync)
        return {graph: summarize_profile(Path(session.end_profiling()), expect_cpu=on_cpu)
                for graph, session in backend.sessions.items()}

    def _free(self) -> None:
        gc.collect()
        if self.options.cuda:
            self.torch.cuda.empty_cache()

    def _environment(self) -> dict[str, Any]:
        torch, options = self.torch, self.options
        environment: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                       "cpus": os.cpu_count(), "ram_available_gb": _gb(_meminfo_bytes("MemAvailable"))}
        with contextlib.suppress(ImportError):
            import onnxruntime

            environment["onnxruntime"] = onnxruntime.__version__
            environment["ort_providers"] = onnxruntime.get_available_providers()
        options.work.mkdir(parents=True, exist_ok=True)
        environment["disk_free_gb"] = shutil.disk_usage(options.work).free / 1e9
        if options.cuda:
            if not torch.cuda.is_available():
                raise InputError(bad_value("device", options.device, "cpu (torch sees no CUDA GPU here)",
                                           "--device"))
            free, total = torch.cuda.mem_get_info(torch.device(options.device))
            environment.update(device=torch.cuda.get_device_name(torch.device(options.device)),
                               gpu_free_gb=free / 1e9, gpu_total_gb=total / 1e9)
            if "CUDAExecutionProvider" not in environment.get("ort_providers", []):
                raise InputError("onnxruntime has no CUDAExecutionProvider here: install onnxruntime-gpu "
                                 "(see the README's GPU check for an offline host), or run with --device cpu")
        else:
            environment["device"] = f"cpu ({torch.get_num_threads()} threads)"
        per_variant = sum(2 * self.geometry.weights_gb(CONFIGS[options.depth_config(d)]) for d in options.ladder)
        folders = per_variant / 2
        environment["exports_gb"] = folders + per_variant * len(options.variants)
        # What an earlier run left in the same work folder is reused, not written again: a rerun on the machine
        # that holds the first run's exports needs no more room than the first.
        environment["reused_gb"] = reusable_bytes(options) / 1e9
        usable = environment["disk_free_gb"] + environment["reused_gb"]
        room = int((usable / 1.1 - folders) // per_variant)
        if room < 1:
            reused = f", counting the {environment['reused_gb']:.1f} GB this run would reuse from the folder" \
                if environment["reused_gb"] else ""
            raise InputError(bad_value("free disk for the model folders and exports in GB",
                                       round(environment["disk_free_gb"], 1),
                                       f"at least {(folders + per_variant) * 1.1:.0f}{reused}", "--work-dir"))
        if room < len(options.variants):  # keep the first variants; say which ones the disk cannot hold
            for variant in options.variants[room:]:
                self.report.skip(f"variant {variant}", "phase", f"disk: {usable:.0f} GB free or reused "
                                 f"holds {room} variant(s) of {per_variant:.0f} GB")
            self.options = options = replace(options, variants=options.variants[:room])
        plan = estimate_plan(options, environment.get("gpu_total_gb"))
        environment["plan"] = [asdict(p) for p in plan.phases]
        self.log("\n".join(plan.lines()))
        return environment


# -- selection -------------------------------------------------------------------------------------------------

def time_selection(options: GpuCheckOptions, grids: list[np.ndarray]) -> dict[str, Any]:
    """Median seconds of ``select_references`` on ``len(grids)`` numpy references of the reference size (the bundled
    photos resized, as an application holding decoded frames would pass them) plus ``pack_references`` of the
    reference latents, per strategy, at keep 0.10."""
    import cv2

    from sparse_context.runtime.images import sample_images

    photos = list(sample_images().values())
    size = (options.ref_px, options.ref_px)
    arrays = []
    for index in range(len(grids)):
        bgr = cv2.imread(str(photos[index % len(photos)]), cv2.IMREAD_COLOR)
        arrays.append(np.ascontiguousarray(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)[:, :, ::-1]))
    return time_select_and_pack(arrays, grids, SELECTION_STRATEGIES, options.seed, SELECTION_REPEATS)


# -- onnxruntime's profile -------------------------------------------------------------------------------------

HEAVY_OPS = {"MatMul", "Gemm", "MultiHeadAttention", "Attention", "Softmax", "LayerNormalization",
             "SimplifiedLayerNormalization", "RMSNormalization", "Conv", "FusedMatMul"}


def summarize_profile(path: Path, expect_cpu: bool = False) -> dict[str, Any]:
    """Nodes per provider, CPU nodes doing real work (heavy ops, or outputs over ``PROBE_BYTES``; not counted when
    the session runs on the CPU anyway), memcpy nodes, and time per op type, from one onnxruntime profile file."""
    events = json.loads(path.read_text())
    per_provider: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    fallbacks: dict[str, dict[str, Any]] = {}
    op_time: dict[str, float] = {}
    memcpy = {"nodes": 0, "us": 0.0}
    runs = {"count": 0, "run_ms": 0.0, "node_ms": 0.0}
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs["count"] += 1
            runs["run_ms"] += float(event.get("dur", 0)) / 1e3
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        node, provider, op = event["name"][:-len("_kernel_time")], args.get("provider", "?"), args.get("op_name", "?")
        if (node, provider) not in seen:
            seen.add((node, provider))
            per_provider[provider] = per_provider.get(provider, 0) + 1
        if op.startswith("Memcpy"):
            memcpy["nodes"] += 1
            memcpy["us"] += float(event.get("dur", 0))
        if provider == "CPUExecutionProvider" and not expect_cpu:
            output_bytes = int(args.get("output_size", 0) or 0)
            if op in HEAVY_OPS or output_bytes > PROBE_BYTES:
                fallbacks[node] = {"op": op, "output_bytes": output_bytes}
        runs["node_ms"] += float(event.get("dur", 0)) / 1e3
        if provider != "CPUExecutionProvider" or expect_cpu:
            op_time[op] = op_time.get(op, 0.0) + float(event.get("dur", 0))
    total = sum(op_time.values()) or 1.0
    top = sorted(op_time.items(), key=lambda item: -item[1])[:10]
    shown = dict(sorted(fallbacks.items(), key=lambda item: -item[1]["output_bytes"])[:20])
    # On the CUDA EP a node's time is its host side (launches are asynchronous): node_ms close to run_ms means
    # the host, not the GPU, sets the pace.
    return {"nodes_per_provider": per_provider, "cpu_fallback_count": len(fallbacks), "cpu_fallbacks": shown,
            "memcpy": memcpy, "runs": runs,
            "top_ops": [{"op": op, "share": us / total, "ms": us / 1e3} for op, us in top]}


# -- helpers ---------------------------------------------------------------------------------------------------

def _assumed_rate(options: GpuCheckOptions) -> float:
    from sparse_context.reference.gpu_plan import EFFECTIVE_TFLOPS

    return EFFECTIVE_TFLOPS["cuda" if options.cuda else "cpu"] * 1e12


@contextlib.contextmanager
def _timed(entry: dict[str, Any], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        entry[key] = time.perf_counter() - start


def _meminfo_bytes(field_name: str) -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _gb(value: float | None) -> float | None:
    return None if value is None else value / 1e9


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _worker_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--export-worker":
        print("usage: python -m sparse_context.reference.gpu_check --export-worker JOB_JSON", file=sys.stderr)
        return 2
    job = json.loads(argv[1])
    started = time.perf_counter()
    result = run_export_job(job, lambda line: print(f"{time.perf_counter() - started:7.1f}s {line}", flush=True))
    print(f"exported {result.path} ({'reused' if result.reused else 'new'})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
