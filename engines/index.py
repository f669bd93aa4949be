"""``engines.json``: what ``build_engines.py`` built (backend, precision, weights, LoRA, bucket plan, one entry per
graph), read back into a frozen :class:`EnginesIndex` whose format version is checked before anything else, and
the factory that opens the transformer backend it describes."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from sparse_context.engines.buckets import BucketPlan
from sparse_context.engines.errors import (
    BackendOptionError, BuildOptionError, EnginesIndexError, ProfileError, rebuild_hint,
)
from sparse_context.engines.manifest import atomic_write_bytes
from sparse_context.runtime.errors import bad_value

ENGINES_FILE = "engines.json"
# 2: records the LoRA and transformer checkpoint, so options fixed at build time can be checked.
# 3: file paths relative to the engines folder (a folder can be moved or copied), the scheduler settings, the text
#    encoder and VAE parts, and the model files (tokenizer, scheduler) copied into the folder.
# 4: engines of export format 6, whose kv graph has one K/V input and output per layer (engines built from stacked
#    K/V bind tensors this runtime no longer feeds).
FORMAT_VERSION = 4
BACKENDS = ("trt", "ort-cuda", "ort-trt", "ort-cpu")
ORT_TRT_CACHE_OPTION = "trt_engine_cache_path"
DEVICE_BY_BACKEND = {"trt": "cuda", "ort-cuda": "cuda", "ort-trt": "cuda", "ort-cpu": "cpu"}


@dataclass(frozen=True)
class GraphEntry:
    """One exported graph and what was built from it."""

    onnx: str
    onnx_sha256: str
    profiles: tuple[Mapping[str, Any], ...]  # Profile.to_json() of each optimization profile
    reused_export: bool = False
    engine: str | None = None  # the TensorRT engine (backend trt)
    provider_options: Mapping[str, str] | None = None  # onnxruntime TensorRT EP options (backend ort-trt)

    @classmethod
    def from_json(cls, graph: str, data: Any) -> GraphEntry:
        if not isinstance(data, Mapping):
            raise EnginesIndexError(bad_value(f"{ENGINES_FILE} graph {graph!r}", type(data).__name__, "an object"))
        _require(data, ("onnx", "onnx_sha256", "profiles"), f"graph {graph!r}")
        profiles = data["profiles"]
        if not isinstance(profiles, list) or not all(isinstance(p, Mapping) for p in profiles):
            raise EnginesIndexError(bad_value(f"{ENGINES_FILE} graph {graph!r} profiles", type(profiles).__name__,
                                              "a list of profile objects"))
        options = data.get("provider_options")
        if options is not None and not isinstance(options, Mapping):
            raise EnginesIndexError(bad_value(f"{ENGINES_FILE} graph {graph!r} provider_options",
                                              type(options).__name__, "an object"))
        for key in ("onnx", "engine"):
            if data.get(key) is not None:
                inside_folder(str(data[key]), f"{ENGINES_FILE} graph {graph!r} {key}")
        return cls(onnx=str(data["onnx"]), onnx_sha256=str(data["onnx_sha256"]),
                   profiles=tuple(dict(p) for p in profiles),
                   reused_export=bool(data.get("reused_export")), engine=data.get("engine"), provider_options=options)

    def to_json(self) -> dict[str, Any]:
        entry = {"onnx": self.onnx, "onnx_sha256": self.onnx_sha256, "reused_export": self.reused_export,
                 "profiles": [dict(p) for p in self.profiles]}
        if self.engine is not None:
            entry["engine"] = self.engine
        if self.provider_options is not None:
            entry["provider_options"] = dict(self.provider_options)
        return entry


@dataclass(frozen=True)
class EnginesIndex:
    """The contents of ``engines.json``. Everything here was fixed at build time."""

    backend: str
    model_dir: str
    precision: str
    attention: str
    plan: BucketPlan
    graphs: Mapping[str, GraphEntry]
    providers: tuple[str, ...] = ()
    lora: str | None = None
    lora_sha256: str | None = None
    lora_scale: float = 1.0
    transformer_file: str | None = None
    parts: Mapping[str, GraphEntry] = field(default_factory=dict)  # text_encoder, vae_encoder, vae_decoder
    steps: Mapping[str, GraphEntry] = field(default_factory=dict)  # trt: euler, euler_noise, guidance engines
    files: Mapping[str, str] = field(default_factory=dict)  # model files copied in: relative path -> sha256
    calibration: Mapping[str, Any] | None = None  # int8/fp8: the accuracy gate's report (calibration.build)
    graph_optimization_level: str | None = None  # "basic" for Q/DQ graphs (see calibration.quantize)
    scheduler_config: Mapping[str, Any] | None = None  # the model folder's, so the engines run without it
    is_distilled: bool = True
    projections: str = "fused"  # export.graphs.projection_form of the transformer graphs (absent before: fused)
    ref_stream: str = "guarded"  # export.graphs.ref_stream_form of the kv graph (absent before: guarded)
    format: int = field(default=FORMAT_VERSION)
    folder: str = field(default="", compare=False)  # where engines.json was read; not written

    def path(self, relative: str) -> Path:
        """A path recorded in the index, inside the engines folder."""
        return Path(self.folder or ".") / inside_folder(relative, ENGINES_FILE)

    @property
    def device(self) -> str:
        """``"cuda"`` or ``"cpu"``: where these engines run."""
        return DEVICE_BY_BACKEND[self.backend]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("folder")
        data.update(plan=self.plan.to_json(), graphs={g: e.to_json() for g, e in self.graphs.items()},
                    parts={p: e.to_json() for p, e in self.parts.items()},
                    steps={p: e.to_json() for p, e in self.steps.items()}, files=dict(self.files),
                    providers=list(self.providers), build_args=list(self.plan.build_args()))
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = ENGINES_FILE) -> EnginesIndex:
        """Check the format version first, then every field; each problem names the file and the fix."""
        if not isinstance(data, Mapping):
            raise EnginesIndexError(bad_value(source, type(data).__name__, "a JSON object written by build_engines.py",
                                              "--engines"))
        version = data.get("format")
        if version != FORMAT_VERSION:
            raise EnginesIndexError(f"{source}: format {version!r}; this version reads format {FORMAT_VERSION}; "
                                    f"{rebuild_hint(_recorded_args(data, source))}")
        _require(data, ("backend", "model_dir", "precision", "attention", "plan", "graphs"), source, source)
        if data["backend"] not in BACKENDS:
            raise BuildOptionError(bad_value("engines backend", data["backend"], ", ".join(BACKENDS), "--backend"))
        if not isinstance(data["graphs"], Mapping) or not data["graphs"] or not set(data["graphs"]) <= {"full", "kv"}:
            raise EnginesIndexError(bad_value(f"{source} graphs", data["graphs"], "at least one of full, kv"))
        try:
            plan = BucketPlan.from_json(data["plan"])
        except ProfileError as error:
            raise EnginesIndexError(f"{source}: {error}") from error
        except (TypeError, KeyError, ValueError, AttributeError) as error:  # a plan of the wrong shape
            raise EnginesIndexError(f"{source}: plan is not the one build_engines.py writes ({error!r}); "
                                    f"{rebuild_hint(_recorded_args(data, source))}") from error
        scheduler = data.get("scheduler_config")
        if scheduler is not None and not isinstance(scheduler, Mapping):
            raise EnginesIndexError(bad_value(f"{source} scheduler_config", type(scheduler).__name__, "an object")
                                    + f"; {rebuild_hint(_recorded_args(data, source))}")

        def entries(table: Any) -> dict[str, GraphEntry]:  # each problem with the command that writes it right
            try:
                return {name: GraphEntry.from_json(name, entry) for name, entry in (table or {}).items()}
            except EnginesIndexError as error:
                raise EnginesIndexError(f"{error}; {rebuild_hint(_recorded_args(data, source))}") from None

        return cls(backend=data["backend"], model_dir=str(data["model_dir"]), precision=str(data["precision"]),
                   attention=str(data["attention"]), plan=plan, graphs=entries(data["graphs"]),
                   providers=tuple(data.get("providers") or ()), lora=data.get("lora"),
                   lora_sha256=data.get("lora_sha256"), lora_scale=float(data.get("lora_scale", 1.0)),
                   transformer_file=data.get("transformer_file"), scheduler_config=scheduler,
                   is_distilled=bool(data.get("is_distilled", True)),
                   parts=entries(data.get("parts")), steps=entries(data.get("steps")),
                   files={str(k): str(v) for k, v in (data.get("files") or {}).items()},
                   calibration=data.get("calibration"), graph_optimization_level=data.get("graph_optimization_level"),
                   projections=str(data.get("projections", "fused")),
                   ref_stream=str(data.get("ref_stream", "guarded")), format=int(version))

    @classmethod
    def read(cls, engines_dir: str | Path) -> EnginesIndex:
        """``engines.json`` of a folder; the paths it records are taken inside that folder, wherever it now is."""
        path = Path(engines_dir) / ENGINES_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise EnginesIndexError(bad_value("engines folder", str(engines_dir), f"a folder with {ENGINES_FILE} "
                                              "written by build_engines.py", "--engines")) from error
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            # there, but unreadable or cut short (a copy interrupted, an edit): not a folder without one
            raise EnginesIndexError(f"{path} is not readable JSON ({error}); copy the engines folder again or "
                                    f"rebuild it with build_engines.py (change it with --engines)") from error
        return replace(cls.from_json(data, str(path)), folder=str(Path(engines_dir).resolve()))

    def write(self, engines_dir: str | Path) -> Path:
        path = Path(engines_dir) / ENGINES_FILE
        atomic_write_bytes(path, json.dumps(self.to_json(), indent=2).encode())
        return path


def open_backend(index: EnginesIndex, memory: Any = None, device: str | None = None, sync: str | None = None,
                 cuda_graphs: bool = False) -> Any:
    """The transformer backend an index describes: TensorRT engines, or onnxruntime sessions with the recorded
    providers (the TensorRT EP gets its per-bucket profiles and engine cache). ``device``: ``"cpu"``,
    ``"cuda"`` or ``"cuda:N"``; it must be where the engines run (the GPU index is honoured). ``sync``: when
    onnxruntime waits for the device, ``"run"`` or ``"image"`` (see ``OrtTransformerBackend``); None:
    :func:`default_sync`. TensorRT engines always queue a generation on one stream and wait once. ``cuda_graphs``:
    replay cached KV calls as CUDA graphs (onnxruntime CUDA engines built with ``--ref-stream plain``; see
    :mod:`~sparse_context.engines.ort.graphs`)."""
    device_id = check_device(index, device)
    if cuda_graphs and index.backend != "ort-cuda":
        raise BackendOptionError(bad_value("CUDA graphs", f"on for engines built with --backend {index.backend}",
                                           "onnxruntime CUDA engines (build_engines.py --backend ort-cuda "
                                           "--ref-stream plain), or leave CUDA graphs off", "--cuda-graphs"))
    if index.backend == "trt" and sync not in (None, "image"):
        raise BackendOptionError(bad_value("synchronization", sync, "image, or leave it out: TensorRT engines "
                                           "queue a whole generation on one stream and wait once", "--sync"))
    if index.backend == "trt":
        from sparse_context.engines.trt.backend import TrtTransformerBackend

        return TrtTransformerBackend(index, memory=memory, device=device_id)
    from sparse_context.engines.ort.backend import OrtTransformerBackend

    providers: list[Any] = list(index.providers)
    entry = index.graphs.get("kv", index.graphs.get("full"))
    if entry.provider_options and providers and providers[0] == "TensorrtExecutionProvider":
        options = dict(entry.provider_options)
        if ORT_TRT_CACHE_OPTION in options:  # recorded inside the folder, so a moved folder keeps its cache
            options[ORT_TRT_CACHE_OPTION] = str(index.path(options[ORT_TRT_CACHE_OPTION]))
        providers[0] = (providers[0], options)
    full, kv = index.graphs.get("full"), index.graphs.get("kv")
    session_options = None
    if index.graph_optimization_level == "basic":  # Q/DQ graphs: see calibration.quantize
        from sparse_context.calibration.quantize import basic_session_options

        session_options = basic_session_options()
    return OrtTransformerBackend(full=index.path(full.onnx) if full else None, kv=index.path(kv.onnx) if kv else None,
                                 providers=providers, session_options=session_options, plan=index.plan,
                                 strict_shapes=index.backend == "ort-trt", device_id=device_id,
                                 expected_sha256={g: e.onnx_sha256 for g, e in index.graphs.items()},
                                 sync=sync or default_sync(index), cuda_graphs=cuda_graphs)


def default_sync(index: EnginesIndex) -> str:
    """When onnxruntime engines wait for their device unless told: once per image on onnxruntime CUDA (an H200 at
    klein-9b width ran the KV generation and its persistent-cache call 1.02-1.06x faster than with a wait after every
    run, latents bit-equal, `bench gpu`), after every run elsewhere (the CPU has nothing to queue; the TensorRT EP's
    stream option is untimed). Without cuda-python, which owns the stream, CUDA engines wait after every run and say
    so once."""
    if index.backend != "ort-cuda":
        return "run"
    from sparse_context.engines.streams import import_cudart

    try:
        import_cudart()
    except BackendOptionError:
        warnings.warn("cuda-python is not installed, so onnxruntime CUDA waits for the GPU after every run (slower); "
                      "install it (pip install sparse-context[onnxruntime-gpu]) for one wait per image, or pass "
                      "--sync run to choose this", RuntimeWarning, stacklevel=3)
        return "run"
    return "image"


def check_device(index: EnginesIndex, device: str | None) -> int:
    """The GPU index in ``device`` (0 if none given), after checking it names where the engines run."""
    if device is None:
        return 0
    kind, _, number = str(device).partition(":")
    if kind != index.device or (number and not number.isdigit()) or (kind == "cpu" and number):
        allowed = "cpu" if index.device == "cpu" else "cuda or cuda:N"
        raise BuildOptionError(bad_value("device", device, f"{allowed}: these engines were built for "
                                         f"--backend {index.backend}, which runs on {index.device}", "--device"))
    return int(number or 0)


def inside_folder(relative: str, where: str) -> str:
    """``relative`` if it names a path inside the engines folder; absolute paths and ``..`` are refused, so an
    index cannot make the runtime load files from elsewhere, and a moved or copied folder still loads."""
    parts = Path(relative).parts
    if not relative or Path(relative).is_absolute() or ".." in parts or (parts and parts[0].startswith("~")):
        raise EnginesIndexError(bad_value(where, relative, "a path relative to the engines folder, inside it",
                                          "--engines"))
    return relative


def _require(data: Mapping[str, Any], keys: tuple[str, ...], where: str, source: str | None = None) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise EnginesIndexError(f"{where}: missing {', '.join(missing)}; "
                                f"{rebuild_hint(_recorded_args(data, source))}")


def _recorded_args(data: Mapping[str, Any], source: str | None = None) -> tuple[str, ...]:
    """The ``build_engines.py`` arguments an index records, as far as it records them: model, weights, backend
    and precision, the plan's options, and ``--out`` the folder of ``source`` (its engines.json), so the rebuild
    command a refusal quotes runs as printed."""
    if not isinstance(data, Mapping):
        return ()
    words: list[str] = []
    for key, flag in (("model_dir", "--model"), ("transformer_file", "--transformer"), ("lora", "--lora"),
                      ("backend", "--backend"), ("precision", "--precision")):
        if isinstance(data.get(key), str) and data[key]:
            words += [flag, data[key]]
    if isinstance(data.get("lora"), str) and isinstance(data.get("lora_scale"), (int, float)) \
            and data["lora_scale"] != 1:
        words += ["--lora-scale", f"{data['lora_scale']:g}"]
    args = data.get("build_args")
    words += [str(a) for a in args] if isinstance(args, list) else []
    if source is not None and Path(source).name == ENGINES_FILE:
        words += ["--out", str(Path(source).parent)]
    return tuple(words)
