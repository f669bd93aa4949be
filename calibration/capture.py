"""Calibration data capture: the generator's denoising loop over a calibration set, recording what the ``full``
and ``kv`` graphs are fed at sampled steps (sparse and dense references, KV extract and cached steps).

The recording wraps the onnxruntime backend of the unquantized export, so the recorded arrays are the graph's
inputs as the engines will see them: same RoPE tables, same K/V layout, same reference-token counts per bucket.
Records are sharded ``.npz`` files (one per sample and graph) with ``capture.json`` describing them; the folder is
written under a temporary name and renamed when complete, and is reused while its key matches.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from sparse_context.calibration.dataset import CalibrationSet, SampleSpec, draw_samples
from sparse_context.calibration.errors import CalibrationConfigError, CalibrationError
from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import KV_INPUT_FAMILIES, layer_name, split_layers
from sparse_context.runtime.errors import PromptTruncatedWarning, bad_value
from sparse_context.runtime.files import replace_folder

CAPTURE_MANIFEST = "capture.json"
CAPTURE_FORMAT = 2  # 2: the kv graph's cached K/V recorded per layer (export format 6)
CACHED_TOKENS_OF = layer_name(KV_INPUT_FAMILIES[0], 0)  # the input whose token axis counts a call's cached tokens
KINDS = {"full": ("full",), "kv": ("extract", "cached")}  # the steps each graph runs
FLAG_SAMPLES = "--calibration-samples"
FLAG_STRATEGIES = "--calibration-strategies"
Progress = Callable[[str, int, int], None]


def graph_feeds(graph: str, dims: Any, dtype: Any, target: np.ndarray, target_ids: np.ndarray,
                refs: np.ndarray | None, ref_ids: np.ndarray | None, text: np.ndarray, text_ids: np.ndarray,
                timestep: float, cached: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The input arrays of one call of the ``full`` or ``kv`` graph, as the onnxruntime backend binds them:
    RoPE of ``[text, target, refs]`` (full) or ``[text, target]`` plus the references' own (kv)."""
    num_refs = 0 if ref_ids is None else int(ref_ids.shape[0])
    cast = lambda array: np.ascontiguousarray(array, dtype=dtype)
    rope = lambda *ids: rope_cos_sin(np.concatenate(ids, axis=0), dims.axes_dims_rope, dims.rope_theta)
    no_ids = np.zeros((0, 4), np.int64)
    feeds = {"target": cast(target), "text": cast(text), "timestep": np.array([timestep], np.float32),
             "refs": cast(refs) if num_refs else np.zeros((1, 0, dims.in_channels), dtype)}
    if graph == "full":
        feeds["rope_cos"], feeds["rope_sin"] = rope(text_ids, target_ids, ref_ids if num_refs else no_ids)
        return feeds
    feeds["rope_cos"], feeds["rope_sin"] = rope(text_ids, target_ids)
    feeds["ref_rope_cos"], feeds["ref_rope_sin"] = rope(ref_ids if num_refs else no_ids)
    empty = np.zeros((dims.num_layers, 1, 0, dims.heads, dims.head_dim), dtype)
    for family, stacked in zip(KV_INPUT_FAMILIES, cached if cached is not None else (empty, empty)):
        feeds.update(split_layers(family, cast(stacked)))  # one input per layer, as the graph takes them
    return feeds


def _cached_tokens(feeds: Mapping[str, np.ndarray]) -> int:
    """Cached reference tokens of one recorded call (0 for the full graph, which has no cache inputs)."""
    return int(feeds[CACHED_TOKENS_OF].shape[1]) if CACHED_TOKENS_OF in feeds else 0


class RecordingBackend:
    """A transformer backend that runs ``backend`` and hands ``sink(graph, kind, step, feeds, velocity)`` every
    call made at a step in ``steps`` (None: every step). Everything else is the wrapped backend's."""

    def __init__(self, backend: Any, sink: Callable[..., None], steps: Sequence[int] | None = None,
                 with_feeds: bool = True):
        self.backend = backend
        self.sink = sink
        self.with_feeds = with_feeds  # False: only velocities (the accuracy gate)
        self.steps = None if steps is None else frozenset(int(s) for s in steps)
        self.step = 0

    def __getattr__(self, name: str) -> Any:  # dims, manifests, release_static, ...
        return getattr(self.backend, name)

    def restart(self) -> None:
        """Call before each generation: steps count from 0 again."""
        self.step = 0

    def _record(self, graph: str, kind: str, velocity: Any, **arrays: Any) -> None:
        if self.steps is None or self.step in self.steps:
            feeds = graph_feeds(graph, self.backend.dims, self.backend.dtype, **arrays) if self.with_feeds else None
            self.sink(graph, kind, self.step, feeds, np.asarray(velocity))

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        velocity = self.backend.full(target, target_ids, refs, ref_ids, text, text_ids, timestep)
        graph = "full" if "full" in self.backend.sessions else "kv"  # no references and no full graph: kv runs it
        self._record(graph, "full" if graph == "full" else "extract", velocity, target=target,
                     target_ids=target_ids, refs=refs, ref_ids=ref_ids, text=text, text_ids=text_ids,
                     timestep=timestep)
        return velocity

    def kv_extract(self, target, target_ids, refs, ref_ids, text, text_ids, timestep):
        velocity, state = self.backend.kv_extract(target, target_ids, refs, ref_ids, text, text_ids, timestep)
        self._record("kv", "extract", velocity, target=target, target_ids=target_ids, refs=refs, ref_ids=ref_ids,
                     text=text, text_ids=text_ids, timestep=timestep)
        return velocity, state

    def kv_cached(self, target, target_ids, kv_state, text, text_ids, timestep):
        velocity = self.backend.kv_cached(target, target_ids, kv_state, text, text_ids, timestep)
        cached = (np.array(kv_state.keys), np.array(kv_state.values)) if self.with_feeds else None
        self._record("kv", "cached", velocity, target=target, target_ids=target_ids, refs=None, ref_ids=None,
                     text=text, text_ids=text_ids, timestep=timestep, cached=cached)
        return velocity

    def euler_step(self, latents, velocity, delta):
        self.step += 1
        return self.backend.euler_step(latents, velocity, delta)


@dataclass(frozen=True)
class CaptureOptions:
    """``samples`` generations per graph calibrate; ``holdout`` more are kept for the accuracy gate."""

    samples: int = 32
    holdout: int = 2
    strategies: tuple[str, ...] = ("saliency", "uniform")
    steps: tuple[int, ...] | None = None  # denoising steps to record; None: all
    num_steps: int = 4
    seed: int = 0

    def validate(self) -> "CaptureOptions":
        from sparse_context.runtime.selection import STRATEGY_CHOICES

        if not isinstance(self.samples, int) or self.samples < 1:
            raise CalibrationConfigError(bad_value("calibration samples", self.samples, "an integer >= 1",
                                                   FLAG_SAMPLES))
        if not isinstance(self.holdout, int) or self.holdout < 1:
            raise CalibrationConfigError(bad_value("held-out samples", self.holdout, "an integer >= 1"))
        allowed = [s for s in STRATEGY_CHOICES if s != "mask"]  # mask needs a mask per image
        if not self.strategies or any(s not in allowed for s in self.strategies):
            raise CalibrationConfigError(bad_value("calibration strategies", list(self.strategies),
                                                   ", ".join(allowed), FLAG_STRATEGIES))
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise CalibrationConfigError(bad_value("denoising steps", self.num_steps, "an integer >= 1"))
        if self.steps is not None and (not self.steps or any(not 0 <= s < self.num_steps for s in self.steps)):
            raise CalibrationConfigError(bad_value("recorded steps", list(self.steps),
                                                   f"indices in 0..{self.num_steps - 1}"))
        return self


@dataclass
class Capture:
    """A complete capture folder and its manifest."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def records(self, graph: str, split: str = "calibration") -> list[dict[str, Any]]:
        """Record descriptions of ``graph`` in ``split`` ("calibration" or "holdout"), in capture order."""
        return [r for r in self.manifest["records"] if r["graph"] == graph and r["split"] == split]

    def feeds(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        prefix = f"{record['record']:03d}/"
        with np.load(self.folder / record["shard"]) as shard:
            return {name[len(prefix):]: shard[name] for name in shard.files if name.startswith(prefix)}

    def iter_feeds(self, graph: str, split: str = "calibration") -> Iterator[dict[str, np.ndarray]]:
        for record in self.records(graph, split):
            yield self.feeds(record)

    def holdout_samples(self) -> list[SampleSpec]:
        """The held-out samples, their references read from the capture folder (it travels with them)."""
        samples = []
        for data in self.manifest["samples"]:
            if data["split"] == "holdout":
                local = tuple(str(self.folder / r) for r in data.get("local_references", data["references"]))
                samples.append(replace(SampleSpec.from_json(data), references=local))
        return samples


def read_capture(folder: str | Path) -> Capture | None:
    """The capture in ``folder`` if it is complete (manifest present, every shard with its recorded size)."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / CAPTURE_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != CAPTURE_FORMAT:
        return None
    for name, size in manifest.get("shards", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    return Capture(folder, manifest)


def capture_key(fingerprint: Mapping[str, str], calibration_set: CalibrationSet, samples: Sequence[SampleSpec],
                options: CaptureOptions, plan_json: Mapping[str, Any]) -> str:
    blob = {"format": CAPTURE_FORMAT, "fingerprint": dict(fingerprint), "set": calibration_set.digest(),
            "samples": [s.to_json() for s in samples], "options": options.__dict__, "plan": dict(plan_json)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def reference_images(spec: SampleSpec, size: tuple[int, int]) -> list[Any]:
    """The sample's references resized to the plan's reference resolution, so token counts land in a bucket."""
    from PIL import Image

    from sparse_context.runtime.images import load_image

    return [load_image(path).resize(size, Image.Resampling.LANCZOS) for path in spec.references]


def run_sample(generator: Any, spec: SampleSpec, graph: str, ref_size: tuple[int, int], num_steps: int,
               output_type: str = "latent") -> Any:
    """One generation of ``spec`` on the ``graph`` path (full: dense or sparse; kv: extract then cached)."""
    width, height = spec.target_size
    return generator.generate(spec.prompt, reference_images(spec, ref_size), keep_fraction=spec.keep_fraction,
                              strategy=spec.strategy, use_kv=graph == "kv", height=height, width=width,
                              num_steps=num_steps, seed=spec.seed, output_type=output_type)


def counting_cuts(cut: set[str], prompt: str, run: Callable[[], Any]) -> Any:
    """``run()`` with a cut prompt's warning noted in ``cut`` instead of shown on every generation (other warnings
    are shown as usual); :func:`warn_cut_prompts` then says it once."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PromptTruncatedWarning)
        result = run()
    for warning in caught:
        if issubclass(warning.category, PromptTruncatedWarning):
            cut.add(prompt)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return result


def warn_cut_prompts(what: str, cut: set[str], prompts: set[str]) -> None:
    if cut:
        warnings.warn(f"{what}: {len(cut)} of {len(prompts)} prompts have more tokens than the text encoder reads "
                      "and were cut, as generation cuts them", PromptTruncatedWarning, stacklevel=3)


def capture(make_generator: Callable[[], Any], backend: Any, plan: Any, calibration_set: CalibrationSet,
            options: CaptureOptions, out_root: str | Path, graphs: Sequence[str] = ("full", "kv"),
            progress: Progress | None = None) -> Capture:
    """Record the graph inputs of ``options.samples + options.holdout`` generations per graph into
    ``out_root/capture-<key>``, or return the complete capture already there.

    ``make_generator()``: a SparseContextGenerator (text encoder, VAE), called only when something is captured;
    its backend is replaced by a recording of ``backend`` (the onnxruntime backend of the unquantized export)."""
    options = options.validate()
    targets = [(r.width_px, r.height_px) for r in plan.target_resolutions]
    ref_size = (plan.ref_resolution.width_px, plan.ref_resolution.height_px)
    samples = draw_samples(calibration_set, options.samples + options.holdout, plan.keep_fractions,
                           options.strategies, targets, plan.max_refs, options.seed)
    fingerprint = {graph: m["onnx_sha256"] for graph, m in backend.manifests.items()}
    key = capture_key(fingerprint, calibration_set, samples, options, plan.to_json())
    final = Path(out_root) / f"capture-{key[:16]}"
    found = read_capture(final)
    if found is not None and found.key == key:
        return found

    Path(out_root).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{final.name}-", dir=out_root))
    pending: list[tuple[str, str, int, dict[str, np.ndarray]]] = []
    recorder = RecordingBackend(backend, lambda g, kind, step, feeds, _: pending.append((g, kind, step, feeds)),
                                options.steps)
    generator = replace_backend(make_generator(), recorder)
    records, shards = [], {}
    total = len(samples) * len(graphs)
    cut: set[str] = set()
    try:
        for done, (spec, graph) in enumerate(((s, g) for s in samples for g in graphs), start=1):
            split = "calibration" if spec.index < options.samples else "holdout"
            recorder.restart()
            pending.clear()
            result = counting_cuts(cut, spec.prompt, lambda: run_sample(generator, spec, graph, ref_size,
                                                                       options.num_steps))
            shard = f"{graph}-{spec.index:04d}.npz"
            arrays = {}
            for number, (recorded_graph, kind, step, feeds) in enumerate(pending):
                arrays.update({f"{number:03d}/{name}": value for name, value in feeds.items()})
                records.append({"graph": recorded_graph, "kind": kind, "step": step, "sample": spec.index,
                                "split": split, "shard": shard, "record": number,
                                "ref_tokens": int(feeds["refs"].shape[1]),
                                "cached_tokens": _cached_tokens(feeds),
                                "ref_tokens_available": int(result.ref_tokens_available)})
            np.savez(staging / shard, **arrays)
            shards[shard] = (staging / shard).stat().st_size
            if progress is not None:
                progress("calibration capture", done, total)
        warn_cut_prompts("calibration capture", cut, {s.prompt for s in samples})
        manifest = {
            "format": CAPTURE_FORMAT, "key": key, "model_fingerprint": fingerprint, "graphs": list(graphs),
            "sample_count": options.samples, "holdout_count": options.holdout, "seed": options.seed,
            "steps": list(options.steps) if options.steps is not None else list(range(options.num_steps)),
            "num_steps": options.num_steps, "strategies": list(options.strategies),
            "buckets": [{"name": b.name, "keep_fraction": b.keep_fraction, "ref_tokens": [b.min_ref_tokens,
                                                                                          b.max_ref_tokens]}
                        for b in plan.buckets],
            "calibration_set": {"source": calibration_set.source, "sha256": calibration_set.digest()},
            "samples": [{**s.to_json(), "split": "calibration" if s.index < options.samples else "holdout",
                         **({"local_references": _keep_references(s, staging)} if s.index >= options.samples
                            else {})} for s in samples],
            "records": records, "shards": shards, "cut_prompts": sorted(cut),
        }
        (staging / CAPTURE_MANIFEST).write_text(json.dumps(manifest, indent=1))
        replace_folder(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Capture(final, manifest)


def _keep_references(spec: SampleSpec, folder: Path) -> list[str]:
    """Copy a held-out sample's reference images into the capture (the gate reads them wherever it runs)."""
    names = []
    for path in spec.references:
        data = Path(path).read_bytes()
        name = f"holdout/{hashlib.sha256(data).hexdigest()[:16]}{Path(path).suffix.lower()}"
        (folder / "holdout").mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
        names.append(name)
    return names


def replace_backend(generator: Any, backend: Any) -> Any:
    """A shallow copy of ``generator`` running ``backend`` (text encoder and VAE shared)."""
    import copy

    twin = copy.copy(generator)
    twin.backend = backend
    return twin


def check_capture_matches(found: Capture, backend: Any) -> Capture:
    """A capture given with --calibration must come from the same unquantized graphs."""
    fingerprint = {graph: m["onnx_sha256"] for graph, m in backend.manifests.items()}
    recorded = found.manifest.get("model_fingerprint", {})
    mismatched = [g for g in fingerprint if recorded.get(g) != fingerprint[g]]
    if mismatched:
        raise CalibrationError(bad_value(f"capture {found.folder}", f"recorded for other {mismatched} graphs",
                                         "a capture of the same model, LoRA and export options (or a calibration "
                                         "set folder, which is captured anew)", "--calibration"))
    return found
