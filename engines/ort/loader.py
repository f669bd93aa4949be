"""onnxruntime sessions for exported graphs: execution providers, their options, and the sessions themselves.

``onnxruntime`` is imported on use, so the package imports without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sparse_context.engines.errors import BackendOptionError, EngineCorruptError
from sparse_context.export.manifest import check_format, onnx_path, verify_export
from sparse_context.runtime.errors import bad_value

# Providers per engines backend, first choice first (onnxruntime falls back along the list per node).
PROVIDERS = {"ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
             "ort-trt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
             "ort-cpu": ("CPUExecutionProvider",)}
NO_SYNC_AFTER_RUN = "disable_synchronize_execution_providers"  # onnxruntime's run option: no stream wait at the end
DEVICE_BY_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                      "CPUExecutionProvider": "cpu"}


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BackendOptionError("onnxruntime is not installed; `pip install sparse-context[onnxruntime]`") from None
    return onnxruntime


def provider_name(provider: Any) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


def providers_device(providers: Sequence[Any]) -> str:
    """``"cuda"`` or ``"cpu"``: where the first provider runs (and so where the I/O buffers live)."""
    if not providers:
        raise BackendOptionError(bad_value("execution providers", list(providers), "at least one"))
    first = provider_name(providers[0])
    if first not in DEVICE_BY_PROVIDER:
        raise BackendOptionError(bad_value("execution provider", first, ", ".join(DEVICE_BY_PROVIDER)))
    return DEVICE_BY_PROVIDER[first]


def check_providers_available(ort: Any, providers: Sequence[Any]) -> None:
    """The first provider must be in this onnxruntime: otherwise onnxruntime would only warn and run every node on
    the CPU, while the I/O buffers are asked for on the GPU."""
    first, available = provider_name(providers[0]), list(ort.get_available_providers())
    if first not in available:
        package = "onnxruntime-gpu (pip install sparse-context[onnxruntime-gpu])" if first != "CPUExecutionProvider" \
            else "onnxruntime"
        raise BackendOptionError(bad_value("execution provider", first, f"one this onnxruntime has: {available}; "
                                           f"install {package}, or build engines for the CPU "
                                           "(build_engines.py --backend ort-cpu)", "--backend"))


def with_default_options(providers: Sequence[Any], device_id: int = 0, stream: int | None = None) -> list[Any]:
    """CUDA EP defaults for this workload: the chosen device, and an arena that grows by what is asked (the K/V
    buffers are large and long-lived; the default doubling strategy would reserve up to twice that). The TensorRT
    EP gets the device too. ``stream``: a CUDA stream handle both GPU providers then run on, instead of streams of
    their own (``engines.streams``)."""
    result: list[Any] = []
    shared = {} if stream is None else {"has_user_compute_stream": "1", "user_compute_stream": str(int(stream))}
    for provider in providers:
        name = provider_name(provider)
        options = dict(provider[1]) if isinstance(provider, (tuple, list)) else {}
        if name == "CUDAExecutionProvider":
            options = {"device_id": str(device_id), "arena_extend_strategy": "kSameAsRequested", **options, **shared}
        elif name == "TensorrtExecutionProvider":
            options = {"device_id": str(device_id), **options, **shared}
        result.append((name, options) if options else name)
    return result


def ort_trt_provider_options(profiles: Sequence[Any], cache_dir: Path) -> dict[str, str]:
    """onnxruntime TensorRT EP options: every profile's shapes (a repeated name starts another profile) and an
    engine cache, so engines are built once per bucket set and reused."""
    def shapes(which: int) -> str:
        return ",".join(f"{name}:{'x'.join(str(d) for d in ranges[which])}"
                        for profile in profiles for name, ranges in profile.shapes)

    return {"trt_profile_min_shapes": shapes(0), "trt_profile_opt_shapes": shapes(1),
            "trt_profile_max_shapes": shapes(2), "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache_dir), "trt_timing_cache_enable": "True"}


def graph_exports(full: str | Path | None, kv: str | Path | None,
                  expected_sha256: dict[str, str] | None = None) -> dict[str, tuple[Path, dict[str, Any]]]:
    """{graph: (model.onnx, its export manifest)}, each checked to be an export of that graph whose files match
    the sizes and checksums of its manifest (and ``expected_sha256[graph]``, the checksum recorded at build)."""
    if full is None and kv is None:
        raise BackendOptionError(bad_value("ONNX graphs", "none", "a full graph, a KV graph or both"))
    exports: dict[str, tuple[Path, dict[str, Any]]] = {}
    for graph, given in (("full", full), ("kv", kv)):
        if given is None:
            continue
        path = onnx_path(given)
        manifest = verify_export(path, (expected_sha256 or {}).get(graph))
        check_format(manifest, path)
        if manifest.get("graph") != graph:
            raise BackendOptionError(bad_value(f"{graph} graph", str(path), f"an export of the {graph} graph "
                                               f"(this one is '{manifest.get('graph')}')"))
        exports[graph] = (path, manifest)
    return exports


def session_from_onnx(path: Path, providers: Sequence[Any], session_options: Any = None) -> Any:
    """An ``InferenceSession`` on ``providers`` (as given: apply :func:`with_default_options` first)."""
    ort = import_onnxruntime()
    try:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=list(providers))
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types for unreadable models
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EngineCorruptError(f"onnxruntime could not load {path}: {first_line[:300]} (export it again, e.g. "
                                 "rerun build_engines.py)") from error
