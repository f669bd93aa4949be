"""Issue 4's GPU check in one command: one random-weight FLUX.2-klein transformer timed on PyTorch and on our
onnxruntime runtime, side by side, inside a time budget.

Steps of :func:`benchmark_engines`: 1. build the transformer (seeded random weights; cost does not depend on them,
NOTES §1); 2. time token selection + packing on real photos; 3. export the ``full`` and ``kv`` graphs from CPU
tensors (from CUDA the exporter fails on ``aten._fused_rms_norm``, NOTES §3), cached in the work folder; 4. time
``runtime.sampler.denoise`` on PyTorch for references x keep fraction x KV, the persistent-cache second call and
the target-only limit; 5. free the PyTorch weights, so the GPU holds one copy; 6. open the onnxruntime sessions;
7. time the same rows on the same inputs there and compare final latents; 8. the acceptance block.

Rows run in priority order, the acceptance rows first. Before each one its cost is estimated from the rows
measured so far (the largest seconds per token-step seen, and the densest row runs first, so estimates are upper
bounds); a row that would not fit in the budget is skipped and listed, never started.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sparse_context.reference.benchmark_configs import CONFIGS, KLEIN_SCHEDULER
from sparse_context.reference.engine_report import (
    ACCEPTANCE_KEEP, REL_ERROR_FLAG, acceptance, correctness, selection_shares, speedup_limits,
)
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.files import replace_folder
from sparse_context.runtime.packing import pack_references
from sparse_context.runtime.sampler import Conditioning, denoise
from sparse_context.runtime.schedule import flow_match_schedule
from sparse_context.runtime.tokens import (
    MAX_REFERENCES, check_keep_fraction, grid_position_ids, kept_token_count, text_position_ids, token_grid,
)

BACKEND_CHOICES = ("ort-cuda", "ort-cpu")
PRECISION_CHOICES = ("fp32", "fp16")  # numpy feeds and onnxruntime CPU have no bfloat16 (NOTES §3)
DEFAULT_REFS = (1, 3, 6)
DEFAULT_KEEPS = (1.0, 0.25, 0.10, 0.05)
DEFAULT_BUDGET_S = 540.0  # the device check runs under a 600 s command limit
SELECTION_STRATEGIES = ("edge", "saliency")
SELECTION_REPEATS = 5
# Guesses, used until measured; the report shows each next to the measured value so later runs can tune them.
HOST_IO_GUESS = 3.0  # budget estimate: a host-I/O repeat of a row, as a multiple of its device-I/O wall time
ORT_OVER_TORCH_GUESS = 1.5  # NOTES §3b measured up to 1.29 with fused attention
SESSION_SECONDS = (2.0, 3.0)  # per session: fixed + per GB of weights (load, graph optimisation, upload)
Event = Callable[[str], None]


@dataclass(frozen=True)
class EngineBenchOptions:
    config: str = "tiny"
    refs: tuple[int, ...] = DEFAULT_REFS
    keeps: tuple[float, ...] = DEFAULT_KEEPS
    target_px: int = 512
    ref_px: int = 512
    text_tokens: int = 64
    steps: int = 4
    repeats: int = 3
    device: str = "cpu"
    precision: str = "fp32"
    backend: str | None = None  # None: ort-cuda on a CUDA device, ort-cpu on the CPU
    budget_s: float = DEFAULT_BUDGET_S
    seed: int = 0
    work_dir: Path | None = None  # None: <cache>/engine-bench; exports there are reused by later runs

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("ort-cuda" if str(self.device).startswith("cuda") else "ort-cpu")

    @property
    def measured_keeps(self) -> tuple[float, ...]:
        """``keeps`` plus 1.0 (dense: every speedup's baseline) and 0.10 (the acceptance rows), largest first."""
        return tuple(sorted({1.0, ACCEPTANCE_KEEP, *(float(k) for k in self.keeps)}, reverse=True))

    @property
    def ref_grid(self) -> int:
        return token_grid(self.ref_px, self.ref_px)[0]

    def validate(self) -> EngineBenchOptions:
        """Raise InputError naming the flag of the first option out of range; no side effects."""
        if self.config not in CONFIGS:
            raise InputError(bad_value("benchmark config", self.config, ", ".join(CONFIGS), "--config"))
        if not self.refs or any(not _is_int(r) or not 1 <= r <= MAX_REFERENCES for r in self.refs):
            raise InputError(bad_value("reference counts", list(self.refs), f"integers in 1..{MAX_REFERENCES}",
                                       "--refs"))
        for keep in self.keeps:
            check_keep_fraction(keep, "--keeps")
        for flag, value, low, high in (("--target-px", self.target_px, 64, None), ("--ref-px", self.ref_px, 64, 1024)):
            if not _is_int(value) or value % 16 or value < low or (high and value > high):
                allowed = f"a multiple of 16 in {low}..{high}" if high else f"a multiple of 16, at least {low}"
                raise InputError(bad_value("image size in px", value, allowed, flag))
        for flag, value, low in (("--text-tokens", self.text_tokens, 2), ("--steps", self.steps, 1),
                                 ("--repeats", self.repeats, 1), ("--seed", self.seed, 0)):
            if not _is_int(value) or value < low:
                raise InputError(bad_value(flag.lstrip("-").replace("-", " "), value, f"an integer >= {low}", flag))
        if self.precision not in PRECISION_CHOICES:
            raise InputError(bad_value("precision", self.precision, " or ".join(PRECISION_CHOICES), "--dtype"))
        device = str(self.device)
        if device != "cpu" and not device.startswith("cuda"):
            raise InputError(bad_value("device", device, "cpu, cuda or cuda:N", "--device"))
        if self.resolved_backend not in BACKEND_CHOICES:
            raise InputError(bad_value("backend", self.backend, ", ".join(BACKEND_CHOICES), "--backend"))
        if (self.resolved_backend == "ort-cuda") != device.startswith("cuda"):
            raise InputError(bad_value(f"backend for --device {device}", self.resolved_backend,
                                       "ort-cuda with a CUDA device, ort-cpu with cpu (like for like)", "--backend"))
        if not self.budget_s > 0:
            raise InputError(bad_value("time budget in seconds", self.budget_s, "a number > 0", "--budget-s"))
        return self


@dataclass(frozen=True)
class RowKey:
    """One timed configuration. ``cache_hit``: a second call reusing the K/V of the KV row before it. ``tile``: the
    kept tokens topped up so the attention's keys fill whole tiles of that many (``--key-tile``; 0: as kept)."""

    refs: int
    keep: float
    kv: bool
    cache_hit: bool = False
    tile: int = 0

    @property
    def label(self) -> str:
        if self.refs == 0:
            return "target only"
        return f"refs {self.refs} keep {self.keep:g} " + ("kv cached" if self.cache_hit else
                                                           "kv on" if self.kv else "kv off") + \
            (f" tile {self.tile}" if self.tile else "")

    @property
    def kv_row(self) -> RowKey:
        """The KV row whose K/V this row's cache hit reuses (itself for a KV row)."""
        return RowKey(self.refs, self.keep, True, tile=self.tile)

    @property
    def dense(self) -> RowKey:
        return RowKey(self.refs, 1.0, False)


def planned_rows(options: EngineBenchOptions) -> list[RowKey]:
    """Every row in run order: the acceptance rows, the target-only limit, then the rest (most references first).
    A cache-hit row always follows its KV row, whose K/V it reuses."""
    most = max(options.refs)
    first = [RowKey(most, 1.0, False), RowKey(most, ACCEPTANCE_KEEP, True), RowKey(most, ACCEPTANCE_KEEP, True, True),
             RowKey(0, 1.0, False)]
    rest = [RowKey(refs, keep, kv, hit) for refs in sorted(set(options.refs), reverse=True)
            for keep in options.measured_keeps for kv, hit in ((False, False), (True, False), (True, True))]
    return first + [row for row in rest if row not in first]


class TimeBudget:
    """Seconds left of the budget, and whether estimated work fits. ``clock`` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds, self.clock, self.started = float(seconds), clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, estimate: float | None, reserve: float = 0.0) -> bool:
        """Work without an estimate yet (a backend's first row) runs while anything is left after ``reserve``."""
        return self.left() - reserve > (estimate or 0.0)


class CostModel:
    """Seconds per token-step on one backend: the largest rate seen, so estimates err on the long side."""

    def __init__(self) -> None:
        self.rate: float | None = None

    def observe(self, token_steps: int, seconds: float) -> None:
        self.rate = max(self.rate or 0.0, seconds / max(token_steps, 1))

    def estimate(self, token_steps: int) -> float | None:
        return None if self.rate is None else self.rate * token_steps


@dataclass
class BenchInputs:
    """One set of random inputs for both backends: float32 arrays holding values exact at the benchmark
    precision, so PyTorch and onnxruntime see the same numbers."""

    options: EngineBenchOptions
    latents: np.ndarray  # (1, N_t, C)
    target_ids: np.ndarray  # (N_t, 4)
    text: np.ndarray  # (1, L, D)
    text_ids: np.ndarray  # (L, 4)
    grids: list[np.ndarray]  # max(refs) x (C, rows, cols) reference latents
    schedule: Any
    kept: dict[tuple, list[np.ndarray] | None] = field(default_factory=dict)  # (refs, keep[, tile])

    @classmethod
    def create(cls, options: EngineBenchOptions, channels: int, text_dim: int) -> BenchInputs:
        rng = np.random.default_rng(options.seed)
        exact = (lambda a: a.astype(np.float16).astype(np.float32)) if options.precision == "fp16" else (lambda a: a)
        rows = cols = options.target_px // 16
        grid = options.ref_grid
        latents = exact(rng.standard_normal((1, rows * cols, channels), dtype=np.float32))
        text = exact(rng.standard_normal((1, options.text_tokens, text_dim), dtype=np.float32))
        grids = [exact(rng.standard_normal((channels, grid, grid), dtype=np.float32)) for _ in range(max(options.refs))]
        inputs = cls(options, latents, grid_position_ids(rows, cols), text, text_position_ids(options.text_tokens),
                     grids, flow_match_schedule(options.steps, rows * cols, KLEIN_SCHEDULER))
        for refs in options.refs:  # random kept tokens, the same on both backends
            for keep in options.measured_keeps:
                picks = np.random.default_rng((options.seed, refs, round(keep * 1e6)))
                count = kept_token_count(grid * grid, keep)
                inputs.kept[(refs, keep)] = None if keep == 1.0 else [
                    np.sort(picks.choice(grid * grid, count, replace=False)) for _ in range(refs)]
        return inputs

    def kept_for(self, row: RowKey) -> list[np.ndarray] | None:
        """Kept flat indices per reference of ``row`` (None: every token). A row with a key tile keeps its plain
        row's tokens and, per reference, the extra ones ``allocate_budget`` tops up, drawn from the rest."""
        plain = self.kept[(row.refs, row.keep)]
        if not row.tile or plain is None:
            return plain
        key = (row.refs, row.keep, row.tile)
        if key not in self.kept:
            from sparse_context.runtime.selection import allocate_budget

            grid = self.options.ref_grid ** 2
            counts = allocate_budget([np.ones(grid, np.float32)] * row.refs, token_count=int(plain[0].size),
                                     key_tile=row.tile, other_keys=self.options.text_tokens + self.latents.shape[1])
            picks = np.random.default_rng((self.options.seed, row.refs, round(row.keep * 1e6), row.tile))
            self.kept[key] = [np.sort(np.concatenate([kept, picks.choice(np.setdiff1d(np.arange(grid), kept),
                                                                         count - kept.size, replace=False)]))
                              for kept, count in zip(plain, counts, strict=True)]
        return self.kept[key]

    def ref_tokens(self, row: RowKey) -> int:
        if not row.refs:
            return 0
        kept = self.kept_for(row) if row.tile else None
        return sum(k.size for k in kept) if kept is not None else \
            row.refs * kept_token_count(self.options.ref_grid ** 2, row.keep)

    def token_steps(self, row: RowKey) -> int:
        """Tokens through the transformer over all calls of a row (warm-up included): the cost model's unit."""
        base, steps = self.options.text_tokens + self.latents.shape[1], self.options.steps
        if row.cache_hit or not row.refs:
            per_call = steps * base
        elif row.kv:  # references pass through the first (extract) step only
            per_call = steps * base + self.ref_tokens(row)
        else:
            per_call = steps * (base + self.ref_tokens(row))
        return per_call * (self.options.repeats + 1)


def read_only(array: np.ndarray) -> np.ndarray:
    """The engine runtime's inputs as an application holding them would pass them: unchanging, so a prompt's cast
    and its device copy outlive the generation (``engines.feeds``), as PyTorch's inputs sit on its device in its
    dtype before the clock starts."""
    view = array.view()
    view.flags.writeable = False
    return view


class LoopRunner:
    """Times ``denoise`` on one backend with the shared inputs; holds the K/V of the last KV row until its
    cache-hit row ran (K/V of 6 dense 1024² references at 9B are ~13 GB)."""

    def __init__(self, backend: Any, inputs: BenchInputs, convert: Callable[[np.ndarray], Any],
                 sync: Callable[[], None] = lambda: None):
        self.backend, self.inputs, self.sync = backend, inputs, sync
        self.conditioning = Conditioning(convert(inputs.text), inputs.text_ids)
        self.latents = convert(inputs.latents)
        self.grids = [convert(grid) for grid in inputs.grids]
        self._kv: tuple[RowKey, Any] | None = None
        self.session_seconds: float | None = None  # of the last row run
        self.step_seconds: float | None = None  # of the last row run: inside the step graphs (device steps)
        self.samples: list[float] = []  # every timed call of the last row run, in order

    def has_state_for(self, row: RowKey) -> bool:
        return self._kv is not None and self._kv[0] == row.kv_row

    def run(self, row: RowKey, repeats: int | None = None) -> tuple[float, float, np.ndarray]:
        """(median seconds over repeats, wall seconds of every call incl. warm-up, final latents as float32).
        ``repeats=0``: one untimed call (its seconds are its wall time), e.g. under a profiler."""
        kv_state = self._kv[1] if row.cache_hit and self.has_state_for(row) else None
        if row.cache_hit and kv_state is None:  # planned_rows puts every cache-hit row after its KV row
            raise RuntimeError(f"{row.label}: its KV row has not run on this backend")
        self._kv = None  # drop a stale cache before allocating the next one
        refs = ref_ids = None
        if row.refs:
            packed = pack_references(self.grids[:row.refs], self.inputs.kept_for(row))
            refs, ref_ids = packed.tokens[None], packed.position_ids  # (1, N_r, C), (N_r, 4)
        repeats = self.inputs.options.repeats if repeats is None else repeats
        with _collector_paused():
            return self._timed_calls(row, repeats, refs, ref_ids, kv_state)

    def _timed_calls(self, row: RowKey, repeats: int, refs: Any, ref_ids: Any,
                     kv_state: Any) -> tuple[float, float, np.ndarray]:
        times, in_session, in_steps, started = [], [], [], time.perf_counter()
        for attempt in range(repeats + 1):  # the first call warms kernels and allocators
            latents = state = None  # at most one K/V cache alive at a time
            self.sync()
            start, session_start = time.perf_counter(), getattr(self.backend, "session_seconds", None)
            steps_start = getattr(self.backend, "step_seconds", None)
            latents, state = denoise(self.backend, self.latents, self.inputs.target_ids, self.conditioning,
                                     self.inputs.schedule, refs, ref_ids, use_kv=row.kv, kv_state=kv_state)
            self.sync()
            if not repeats:
                times.append(time.perf_counter() - start)
            if attempt:
                times.append(time.perf_counter() - start)
                if session_start is not None:
                    in_session.append(self.backend.session_seconds - session_start)
                if steps_start is not None:
                    in_steps.append(self.backend.step_seconds - steps_start)
        # Seconds inside the engine's own runs and inside the step graphs' runs (onnxruntime backends), medians like
        # the row: the rest of the row is the loop's host work (feeds, uploads, copies, waits between runs).
        self.session_seconds = statistics.median(in_session) if in_session else None
        self.step_seconds = statistics.median(in_steps) if in_steps else None
        self.samples = list(times)
        if row.kv and row.refs:
            self._kv = (row.kv_row, state)
        return statistics.median(times), time.perf_counter() - started, _as_float32(latents)

    def release(self) -> None:
        self._kv = None


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cycle collector off while a row is timed (as ``timeit`` does): a collection landing inside one call
    is host time the engine did not spend. Collected once before; reference counting still frees every buffer."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def benchmark_engines(options: EngineBenchOptions, on_event: Event | None = None) -> dict[str, Any]:
    """Run the whole check (module doc) and return the report; ``on_event`` receives one line per step."""
    import torch

    from sparse_context.reference.benchmark import build_transformer

    options = options.validate()
    log = on_event or (lambda line: None)
    budget = TimeBudget(options.budget_s)
    _check_environment(options)
    phases: dict[str, float] = {}
    skipped: list[dict[str, Any]] = []

    def skip(what: str, backend: str, estimate: float | None = None, reason: str | None = None,
             reserve: float = 0.0) -> None:
        skipped.append(_skip(what, backend, estimate, budget, reason, reserve))
        log(f"skipped {backend:11s} {what}: {skipped[-1]['reason']}")

    def attempt(what: str, backend: str, action: Callable[[], Any]) -> Any:
        # One failing piece (out of memory at the densest KV row, an operator a provider lacks, a full disk) is
        # reported as skipped with its error, not fatal: a single GPU run must still return every other number.
        try:
            return action()
        except Exception as error:  # torch, onnxruntime and the exporter raise many unrelated types
            skip(what, backend, reason=f"failed: {type(error).__name__}: {str(error).strip()[:300]}")
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            return None

    dtype = {"fp32": torch.float32, "fp16": torch.float16}[options.precision]
    cuda = str(options.device).startswith("cuda")
    plan = planned_rows(options)

    # 1. The transformer and the shared inputs
    with _phase(phases, "build", log):
        model = build_transformer(options.config, options.device, dtype, seed=options.seed)
    weight_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    inputs = BenchInputs.create(options, int(model.config.in_channels), int(model.config.joint_attention_dim))

    # 2. Token selection + packing on real photos
    with _phase(phases, "selection", log):
        selection = time_selection(options, inputs.grids)

    # 3. ONNX export, from CPU tensors; reused from the work folder when cached
    exports = None
    if budget.fits(None):
        with _phase(phases, "export", log):
            exports = attempt("ONNX export (full, kv)", "export", partial(export_graphs, model, options, log))
    else:
        skip("ONNX export (full, kv)", "export")
    session_estimate = 2 * (SESSION_SECONDS[0] + SESSION_SECONDS[1] * weight_gb) if exports else 0.0

    # 4. PyTorch rows; each keeps room for its onnxruntime twin and the session start
    from sparse_context.reference.torch_backend import TorchTransformerBackend

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runner = LoopRunner(TorchTransformerBackend(model), inputs,
                        lambda a: torch.from_numpy(a).to(options.device, dtype), sync)
    measured: dict[RowKey, dict[str, Any]] = {row: {} for row in plan}
    torch_latents: dict[RowKey, np.ndarray] = {}
    ort_share = ORT_OVER_TORCH_GUESS if exports else 0.0
    reserve, cost = session_estimate, CostModel()
    with _phase(phases, "torch_bench", log):
        for row in plan:
            estimate = cost.estimate(inputs.token_steps(row))
            needed = None if estimate is None else estimate * (1 + ort_share)
            if row.cache_hit and not runner.has_state_for(row):
                skip(row.label, "torch", reason="its KV row did not run")
            elif not budget.fits(needed, reserve):
                skip(row.label, "torch", needed, reserve=reserve)
            elif (outcome := attempt(row.label, "torch", partial(runner.run, row))) is not None:
                seconds, wall, torch_latents[row] = outcome
                cost.observe(inputs.token_steps(row), wall)
                reserve += ort_share * wall
                measured[row].update(torch_s=seconds, torch_wall_s=wall)
                log(f"torch        {row.label:28s} {seconds:8.3f}s  ({budget.left():.0f}s of budget left)")
        runner.release()

    # 5. One copy of the weights on the GPU: drop PyTorch's before onnxruntime uploads its own
    with _phase(phases, "free_torch", log):
        del runner, model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    # 6. onnxruntime sessions
    ort_backend, providers_used, ort_problem = None, {}, None
    if exports is None:
        ort_problem = "no ONNX export (see the export entry)"
    elif not any("torch_s" in entry for entry in measured.values()):
        ort_problem = "no row measured on PyTorch"
        skip("onnxruntime sessions", "sessions", session_estimate, ort_problem)
    elif not budget.fits(session_estimate):
        ort_problem = "budget"
        skip("onnxruntime sessions", "sessions", session_estimate)
    else:
        with _phase(phases, "sessions", log):
            ort_backend = attempt("onnxruntime sessions", "sessions", partial(open_backend, exports, options))
        providers_used = {graph: list(s.get_providers()) for graph, s in getattr(ort_backend, "sessions", {}).items()}
        wanted = _providers(options)[0]
        if ort_backend is None:
            ort_problem = "the sessions did not open (see the sessions entry)"
        elif any(wanted not in used for used in providers_used.values()):
            ort_problem = f"onnxruntime fell back to {providers_used} instead of {wanted}"
            ort_backend = None

    # 7. The same rows on onnxruntime, compared with PyTorch's latents
    if ort_backend is not None:
        runner = LoopRunner(ort_backend, inputs, read_only)
        cost = CostModel()
        with _phase(phases, "ort_bench", log):
            for row in plan:
                entry = measured[row]
                estimate = cost.estimate(inputs.token_steps(row))
                if estimate is None and "torch_wall_s" in entry:
                    estimate = ORT_OVER_TORCH_GUESS * entry["torch_wall_s"]
                if "torch_s" not in entry:
                    skip(row.label, "onnxruntime", reason="not measured on PyTorch")
                elif row.cache_hit and not runner.has_state_for(row):
                    skip(row.label, "onnxruntime", reason="its KV row did not run")
                elif not budget.fits(estimate):
                    skip(row.label, "onnxruntime", estimate)
                elif (outcome := attempt(row.label, "onnxruntime", partial(runner.run, row))) is not None:
                    seconds, wall, latents = outcome
                    cost.observe(inputs.token_steps(row), wall)
                    entry.update(ort_s=seconds, ort_wall_s=wall, **compare_latents(torch_latents[row], latents))
                    log(f"onnxruntime  {row.label:28s} {seconds:8.3f}s  ({budget.left():.0f}s of budget left)")
            runner.release()
    else:
        for row in plan:
            skip(row.label, "onnxruntime", reason=f"onnxruntime not run: {ort_problem}")

    # 7b. What device buffers buy: the acceptance rows again with inputs, outputs and K/V in host memory, which
    #     makes onnxruntime copy them in and out on every call, as a plain session.run does (on a CPU both are
    #     the same memory, so there the ratio only checks the path).
    io_binding: dict[str, dict[str, float]] = {}
    if ort_backend is not None:
        with _phase(phases, "ort_host_io", log):
            ort_backend.set_io_device("cpu")
            runner = LoopRunner(ort_backend, inputs, read_only)
            for row in [r for r in plan if r.refs == max(options.refs) and r.keep in (1.0, 0.1)]:
                entry = measured[row]
                if "ort_s" not in entry or (row.cache_hit and not runner.has_state_for(row)):
                    continue
                if not budget.fits(HOST_IO_GUESS * entry["ort_wall_s"]):
                    skip(row.label, "onnxruntime host I/O", HOST_IO_GUESS * entry["ort_wall_s"])
                elif (outcome := attempt(row.label, "onnxruntime host I/O", partial(runner.run, row))) is not None:
                    io_binding[row.label] = {"host_io_s": outcome[0], "device_io_s": entry["ort_s"],
                                             "host_over_device": outcome[0] / entry["ort_s"]}
                    log(f"onnxruntime  {row.label:28s} {outcome[0]:8.3f}s with host I/O")
            runner.release()
            ort_backend.set_io_device(ort_backend.device)
    phases["total"] = budget.elapsed()

    # 8. The report
    rows = [_row_entry(row, measured, inputs) for row in plan]
    result = {
        "config": options.config, "device": _device_name(options.device), "backend": options.resolved_backend,
        "providers": list(_providers(options)), "providers_used": providers_used, "precision": options.precision,
        "attention": _attention(options), "target_px": options.target_px, "ref_px": options.ref_px,
        "text_tokens": options.text_tokens, "steps": options.steps, "repeats": options.repeats,
        "refs": list(options.refs), "keeps": list(options.measured_keeps), "seed": options.seed,
        "budget_s": options.budget_s, "weights_gb": weight_gb, "versions": _versions(),
        "phases_s": phases, "estimates": {"sessions_s": session_estimate, "ort_over_torch": ORT_OVER_TORCH_GUESS},
        "exports": {graph: {"path": str(r.path), "reused": r.reused, "opset": r.manifest.get("opset")}
                    for graph, r in (exports or {}).items()},
        "ort_problem": ort_problem, "io_binding": io_binding, "rows": rows, "limits": speedup_limits(rows),
        "skipped": skipped,
    }
    result["selection"] = selection_shares(selection, rows, max(options.refs))
    result["correctness"] = correctness(rows, max(options.refs))
    result["acceptance"] = acceptance(result)
    return result


# -- steps -----------------------------------------------------------------------------------------------------

def time_selection(options: EngineBenchOptions, grids: list[np.ndarray]) -> dict[str, dict[str, Any]]:
    """Median seconds of ``select_references`` (keep 0.10) on ``len(grids)`` bundled photos at the reference size,
    and of ``pack_references`` of the reference latents with those selections, per strategy."""
    from PIL import Image

    from sparse_context.runtime.images import load_image, sample_images

    photos = list(sample_images().values())
    size = (options.ref_px, options.ref_px)
    images = [load_image(photos[i % len(photos)]).resize(size, Image.Resampling.LANCZOS) for i in range(len(grids))]
    return time_select_and_pack(images, grids, SELECTION_STRATEGIES, options.seed, SELECTION_REPEATS)


def time_select_and_pack(references: list[Any], grids: list[np.ndarray], strategies: tuple[str, ...], seed: int,
                         repeats: int) -> dict[str, dict[str, Any]]:
    """Per strategy: median seconds of ``select_references`` on ``references`` at keep 0.10 and of
    ``pack_references`` of ``grids`` with those selections, over ``repeats`` calls after a warm-up."""
    from sparse_context.runtime.selection import select_references

    timings = {}
    for strategy in strategies:
        select_s, pack_s = [], []
        for attempt in range(repeats + 1):
            start = time.perf_counter()
            selections = select_references(references, strategy=strategy, keep_fraction=ACCEPTANCE_KEEP, seed=seed)
            middle = time.perf_counter()
            packed = pack_references(grids, [s.indices for s in selections])
            if attempt:
                select_s.append(middle - start)
                pack_s.append(time.perf_counter() - middle)
        timings[strategy] = {"references": len(grids), "ref_tokens": packed.num_tokens,
                             "select_s": statistics.median(select_s), "pack_s": statistics.median(pack_s)}
    return timings


def write_model_folder(model: Any, options: EngineBenchOptions) -> Path:
    """A minimal diffusers folder for the exporter: ``model_index.json``, ``transformer/config.json`` and
    ``transformer/random_weights.json`` saying how the weights were drawn, so the export cache key changes with
    them. No weights: the in-memory transformer is exported."""
    import torch

    folder = _work_dir(options) / f"model-{options.config}-seed{options.seed}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{folder.name}-", dir=folder.parent))
    try:  # written whole, then renamed into place: the exporter keys its cache on random_weights.json
        (staging / "transformer").mkdir()
        (staging / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline",
                                                              "transformer": ["diffusers", "Flux2Transformer2DModel"]}))
        model.save_config(staging / "transformer")
        # Weights come from torch's generator on the build device: another device or torch draws other numbers.
        recipe = {"config": options.config, "seed": options.seed, "device_type": torch.device(options.device).type,
                  "torch": torch.__version__, "built_by": "sparse_context.reference.benchmark.build_transformer"}
        (staging / "transformer" / "random_weights.json").write_text(json.dumps(recipe, sort_keys=True))
        replace_folder(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def export_graphs(model: Any, options: EngineBenchOptions, log: Event) -> dict[str, Any]:
    """``{"full": ExportResult, "kv": ExportResult}``, exported from the CPU and cached in the work folder."""
    from sparse_context.export.exporter import ExportOptions, export_onnx, is_cached

    model_dir = write_model_folder(model, options)
    graph_options = [ExportOptions(model_dir=model_dir, graph=graph, precision=options.precision,
                                   attention=_attention(options),
                                   max_ref_tokens=max(options.refs) * options.ref_grid ** 2,
                                   target_sizes=((options.target_px, options.target_px),),
                                   text_tokens=options.text_tokens, out_dir=_work_dir(options) / "onnx")
                     for graph in ("full", "kv")]
    device = next(model.parameters()).device
    moved = device.type != "cpu" and not all(is_cached(o) for o in graph_options)
    if moved:
        model.to("cpu")
    try:
        results = {}
        for graph_option in graph_options:
            progress = lambda stage, step, total, g=graph_option.graph: log(f"export {g}: {stage} {step}/{total}")
            results[graph_option.graph] = export_onnx(graph_option, progress, transformer=model)
    finally:
        if moved:
            model.to(device)
    return results


def open_backend(exports: dict[str, Any], options: EngineBenchOptions) -> Any:
    """Our onnxruntime backend over both graphs, held to the bucket plan of this run's rows."""
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    plan = BucketPlan(keep_fractions=options.measured_keeps, max_refs=max(options.refs),
                      ref_resolution=Resolution(options.ref_px, options.ref_px),
                      target_resolutions=(Resolution(options.target_px, options.target_px),),
                      text_tokens=options.text_tokens)
    return OrtTransformerBackend(full=exports["full"].path, kv=exports["kv"].path, providers=_providers(options),
                                 plan=plan)


def compare_latents(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """Max abs difference of final latents, and relative to the reference's largest magnitude."""
    if not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return {"max_abs_diff": None, "rel_diff": None, "finite": False, "flagged": True}
    max_abs = float(np.abs(candidate - reference).max())
    rel = max_abs / (float(np.abs(reference).max()) or 1.0)
    return {"max_abs_diff": max_abs, "rel_diff": rel, "finite": True, "flagged": rel > REL_ERROR_FLAG}


# -- report ----------------------------------------------------------------------------------------------------

def _row_entry(row: RowKey, measured: dict[RowKey, dict[str, Any]], inputs: BenchInputs) -> dict[str, Any]:
    entry, dense = measured[row], measured.get(row.dense, {})
    torch_s, ort_s = entry.get("torch_s"), entry.get("ort_s")
    ratio = lambda a, b: a / b if a and b else None
    return {"label": row.label, "refs": row.refs, "keep": row.keep, "kv": row.kv, "cache_hit": row.cache_hit,
            "ref_tokens": inputs.ref_tokens(row), "torch_s": torch_s, "ort_s": ort_s,
            "ort_over_torch": ratio(ort_s, torch_s), "speedup_torch": ratio(dense.get("torch_s"), torch_s),
            "speedup_ort": ratio(dense.get("ort_s"), ort_s),
            **{key: entry.get(key) for key in ("max_abs_diff", "rel_diff", "finite", "flagged")}}


# -- helpers ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _phase(phases: dict[str, float], name: str, log: Event) -> Iterator[None]:
    log(f"{name} ...")
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = time.perf_counter() - start
        log(f"{name} done in {phases[name]:.1f}s")


def _skip(what: str, backend: str, estimate: float | None, budget: TimeBudget, reason: str | None = None,
          reserve: float = 0.0) -> dict[str, Any]:
    if reason is None:
        left = f"{max(budget.left(), 0.0):.1f}s of the budget left"
        kept = f", {reserve:.0f}s of it kept for onnxruntime" if reserve else ""
        reason = (f"estimated {estimate:.1f}s, " if estimate is not None else "") + left + kept
    return {"what": what, "backend": backend, "estimate_s": estimate, "left_s": budget.left(), "reason": reason}


def _check_environment(options: EngineBenchOptions) -> None:
    """Fail before any work when the device or onnxruntime's provider for ``--backend`` is missing."""
    import torch

    if str(options.device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(bad_value("device", options.device, "cpu (torch sees no CUDA GPU here)", "--device"))
    try:
        import onnxruntime
    except ImportError as error:
        raise InputError(f"onnxruntime is not installed ({error}); pip install .[onnx] for --backend ort-cpu, "
                         "onnxruntime-gpu for ort-cuda (the README's GPU check says how on an offline host)") from error
    available = onnxruntime.get_available_providers()
    wanted = _providers(options)[0]
    if wanted not in available:
        raise InputError(bad_value("backend", options.resolved_backend, f"one whose provider this onnxruntime has "
                                   f"({', '.join(available)}); for ort-cuda install onnxruntime-gpu "
                                   "(the README's GPU check)", "--backend"))


def _providers(options: EngineBenchOptions) -> tuple[str, ...]:
    from sparse_context.engines.ort.loader import PROVIDERS

    return PROVIDERS[options.resolved_backend]


def _attention(options: EngineBenchOptions) -> str:
    from sparse_context.engines.build import ATTENTION_BY_BACKEND

    return ATTENTION_BY_BACKEND[options.resolved_backend]


def _work_dir(options: EngineBenchOptions) -> Path:
    from sparse_context.reference.tiny import default_cache_dir

    return Path(options.work_dir) if options.work_dir is not None else default_cache_dir() / "engine-bench"


def _as_float32(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # torch
        return array.detach().float().cpu().numpy()
    if hasattr(array, "numpy") and not isinstance(array, np.ndarray):  # onnxruntime OrtValue
        array = array.numpy()
    return np.asarray(array, dtype=np.float32)


def _versions() -> dict[str, str]:
    import diffusers
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _device_name(device: str) -> str:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
