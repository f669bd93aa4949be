"""Attention alone at the check's sizes: onnxruntime's ``MultiHeadAttention`` per ``sdpa_kernel`` choice beside
PyTorch's ``scaled_dot_product_attention`` per backend.

Why: the persistent-cache call is the target-only call plus attention of its 4,608 queries over 2,460 more (cached)
keys. Its speedup over dense can only approach the FLOP ratio (9.8x for 6 references at keep 0.10) if that attention
runs as efficiently as the dense call's. This times each (queries, keys) pair of the check, in a chain of
``--chain`` attention calls per timed run (so per-call overhead does not count), and says which kernel wins.

    python -m sparse_context.reference.attention_kernels --out DIR        # on a GPU
    python -m sparse_context.reference.attention_kernels --device cpu --heads 2 --head-dim 16 --token-scale 0.01

onnxruntime kernel choice (``sdpa_kernel`` provider option, a bit mask): 0 its default order, 1 flash, 2 memory
efficient, 8 cuDNN flash; a choice the op cannot use falls back to the unfused kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

# (queries, keys) of the rows of `bench gpu` at klein-9b: 512 text + 4,096 target tokens; 6 x 410 kept references.
SHAPES = {"target only": (4608, 4608), "cached step": (4608, 7068), "extract, reference queries": (2460, 2460),
          "6 refs keep 0.10, no KV": (7068, 7068), "6 refs dense": (29184, 29184)}
ORT_KERNELS = {"default": 0, "flash": 1, "efficient": 2, "cudnn flash": 8}
TORCH_BACKENDS = ("default", "flash", "efficient", "cudnn")
KEY_TILE = 128  # keys per tile of the flash kernels the check's profiles show (cuDNN "64x128x128")
KEY_SWEEP_ROUNDS = 9
KEY_SWEEP_CHAIN = 8


def mha_chain_model(chain: int, heads: int, elem_type: int) -> bytes:
    """``chain`` contrib MultiHeadAttention nodes, each one's output the next one's query; key/value shared."""
    from onnx import helper

    nodes, query = [], "query"
    for index in range(chain):
        output = "output" if index == chain - 1 else f"q{index + 1}"
        nodes.append(helper.make_node("MultiHeadAttention", [query, "key", "value"], [output], name=f"mha{index}",
                                      domain="com.microsoft", num_heads=heads))
        query = output
    tensor = lambda name, tokens: helper.make_tensor_value_info(name, elem_type, [1, tokens, "width"])
    graph = helper.make_graph(nodes, "attention_chain", [tensor("query", "q"), tensor("key", "k"),
                                                        tensor("value", "k")], [tensor("output", "q")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model.SerializeToString()


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
    run()  # warm-up: kernel selection, workspace allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_torch(query, key, value, backend: str, chain: int, repeats: int) -> tuple[float, Any]:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
              "cudnn": SDPBackend.CUDNN_ATTENTION}.get(backend)
    sync = torch.cuda.synchronize if query.is_cuda else (lambda: None)
    result = {}

    def run() -> None:
        q = query
        for _ in range(chain):
            q = torch.nn.functional.scaled_dot_product_attention(q, key, value)
        sync()
        result["out"] = q

    if chosen is None:
        return _median_seconds(run, repeats), result["out"]
    with sdpa_kernel([chosen]):
        return _median_seconds(run, repeats), result["out"]


def time_ort(ort: Any, model: bytes, arrays: dict[str, np.ndarray], device: str, kernel: int,
             repeats: int) -> tuple[float, np.ndarray]:
    if device == "cuda":
        providers = [("CUDAExecutionProvider", {"sdpa_kernel": str(kernel)})]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(model, providers=providers)
    binding = session.io_binding()
    values = {name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in arrays.items()}
    for name, value in values.items():
        binding.bind_ortvalue_input(name, value)
    output = ort.OrtValue.ortvalue_from_shape_and_type(list(arrays["query"].shape), arrays["query"].dtype, device, 0)
    binding.bind_ortvalue_output("output", output)
    seconds = _median_seconds(lambda: session.run_with_iobinding(binding), repeats)
    return seconds, output.numpy()


def run(device: str = "cuda", heads: int = 32, head_dim: int = 128, token_scale: float = 1.0, chain: int = 8,
        repeats: int = 5, dtype: str = "fp16", log: Callable[[str], None] = print) -> dict[str, Any]:
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    np_dtype, elem = {"fp16": (np.float16, TensorProto.FLOAT16), "fp32": (np.float32, TensorProto.FLOAT)}[dtype]
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    width, rng = heads * head_dim, np.random.default_rng(0)
    model = mha_chain_model(chain, heads, elem)
    rows = []
    for label, (queries, keys) in SHAPES.items():
        queries, keys = max(1, round(queries * token_scale)), max(1, round(keys * token_scale))
        arrays = {"query": rng.standard_normal((1, queries, width)).astype(np_dtype),
                  "key": rng.standard_normal((1, keys, width)).astype(np_dtype),
                  "value": rng.standard_normal((1, keys, width)).astype(np_dtype)}
        flops = 4.0 * queries * keys * width * chain  # QK^T and PV, multiply-adds x 2
        heads_view = lambda a: torch.from_numpy(a).to(device).reshape(1, a.shape[1], heads, head_dim).transpose(1, 2)
        tensors = [heads_view(arrays[name]).to(torch_dtype) for name in ("query", "key", "value")]
        reference = None
        for backend in TORCH_BACKENDS if device == "cuda" else ("default",):
            entry = {"shape": label, "queries": queries, "keys": keys, "runtime": "torch", "kernel": backend}
            try:
                seconds, out = time_torch(*tensors, backend, chain, repeats)
                out = out.transpose(1, 2).reshape(1, queries, width).float().cpu().numpy()
                reference = out if reference is None else reference
                entry.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                             max_abs_diff=float(np.abs(out - reference).max()))
            except Exception as error:  # a backend this build or shape does not support
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append(entry)
            log(_line(entry))
        for name, kernel in ORT_KERNELS.items() if device == "cuda" else (("default", 0),):
            entry = {"shape": label, "queries": queries, "keys": keys, "runtime": "onnxruntime", "kernel": name}
            try:
                seconds, out = time_ort(ort, model, arrays, device, kernel, repeats)
                entry.update(ms=seconds * 1e3, tflops=flops / seconds / 1e12,
                             max_abs_diff=float(np.abs(out.astype(np.float32) - reference).max()))
            except Exception as error:
                entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            rows.append(entry)
            log(_line(entry))
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    return {"check": "attention kernels", "device": device_name, "dtype": dtype, "heads": heads,
            "head_dim": head_dim, "chain": chain, "repeats": repeats, "onnxruntime": ort.__version__,
            "torch": torch.__version__, "rows": rows}


def key_counts(queries: int, keys: int, tile: int = KEY_TILE) -> list[int]:
    """The key counts :func:`key_sweep` times for a call of ``queries`` queries over ``keys`` keys: ``queries``
    (target only: no cached keys), ``queries`` plus ``keys``' remainder modulo the tile (does a partial last tile
    cost by itself?), ``keys``, and ``keys`` rounded down and up to the tile and to half of it."""
    half = max(1, tile // 2)
    counts = {queries, queries + keys % tile, keys, keys // tile * tile, -(-keys // tile) * tile,
              keys // half * half, -(-keys // half) * half}
    return sorted(count for count in counts if count >= 1)


def key_sweep(queries: int, keys: int, heads: int, head_dim: int, device: str = "cuda", dtype: str = "fp16",
              chain: int = KEY_SWEEP_CHAIN, rounds: int = KEY_SWEEP_ROUNDS, tile: int = KEY_TILE) -> dict[str, Any]:
    """PyTorch's default attention (the kernel both backends ran in the check's profiles: cuDNN flash on an H200)
    for ``queries`` queries over each of :func:`key_counts`, ``chain`` calls per timed run.

    Why: in the H200 runs the cached call's attention (4,608 queries over 7,068 keys) ran at ~600 TFLOP/s against
    ~650 for target only (4,608 keys, 36 whole tiles of 128). If a partial last tile is what costs, rounding the kept
    tokens up to whole tiles buys time and tokens at once. The lengths are timed interleaved, ``rounds`` times in
    rotating order, so a clock that drifts over the sweep (power, heat) reaches every length alike."""
    import torch

    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    generator = torch.Generator(device="cpu").manual_seed(0)
    draw = lambda tokens: torch.randn((1, heads, tokens, head_dim), generator=generator).to(device, torch_dtype)  # noqa: E731
    query = draw(queries)
    counts = key_counts(queries, keys, tile)
    tensors = {count: (draw(count), draw(count)) for count in counts}
    sync = torch.cuda.synchronize if query.is_cuda else (lambda: None)

    def run(count: int) -> float:
        key, value = tensors[count]
        sync()
        start = time.perf_counter()
        q = query
        for _ in range(chain):
            q = torch.nn.functional.scaled_dot_product_attention(q, key, value)
        sync()
        return time.perf_counter() - start

    with torch.inference_mode():
        for count in counts:  # warm-up: kernel choice, plan builds, workspace
            run(count)
        samples: dict[int, list[float]] = {count: [] for count in counts}
        for turn in range(rounds):
            shift = turn % len(counts)
            for count in counts[shift:] + counts[:shift]:
                samples[count].append(run(count) / chain)
    rows = []
    for count in counts:
        seconds = statistics.median(samples[count])
        rows.append({"keys": count, "remainder": count % tile, "ms": seconds * 1e3,
                     "tflops": 4.0 * queries * count * heads * head_dim / seconds / 1e12,
                     "us_per_tile": seconds * 1e6 / -(-count // tile), "samples_ms": [s * 1e3 for s in samples[count]]})
    by_keys = {row["keys"]: row for row in rows}
    up, down = -(-keys // tile) * tile, keys // tile * tile
    return {"queries": queries, "keys": keys, "tile": tile, "heads": heads, "head_dim": head_dim, "dtype": dtype,
            "device": device, "chain": chain, "rounds": rounds, "rows": rows,
            "keys_ms": by_keys[keys]["ms"], "aligned_up": up, "aligned_up_ms": by_keys[up]["ms"],
            "aligned_down": down, "aligned_down_ms": by_keys[down]["ms"] if down in by_keys else None}


def key_sweep_lines(sweep: dict[str, Any]) -> list[str]:
    """One line per key count, then what rounding the call's keys up to whole tiles would change."""
    lines = [f"attention of {sweep['queries']} queries ({sweep['heads']} x {sweep['head_dim']}, {sweep['dtype']}), "
             f"median of {sweep['rounds']} interleaved runs of {sweep['chain']} calls:"]
    for row in sweep["rows"]:
        mark = " <- the call" if row["keys"] == sweep["keys"] else ""
        lines.append(f"  {row['keys']:7d} keys (remainder {row['remainder']:3d}) {row['ms']:8.3f} ms "
                     f"{row['tflops']:7.1f} TFLOP/s {row['us_per_tile']:7.2f} us per tile{mark}")
    up = sweep["aligned_up_ms"] / sweep["keys_ms"]
    lines.append(f"  {sweep['keys']} keys rounded up to {sweep['aligned_up']} (whole tiles of {sweep['tile']}): "
                 f"{up:.3f}x the time")
    return lines


def _line(entry: dict[str, Any]) -> str:
    where = f"{entry['shape']:28s} {entry['queries']:6d} x {entry['keys']:6d}  {entry['runtime']:11s} " \
            f"{entry['kernel']:12s}"
    if "error" in entry:
        return f"{where} failed: {entry['error']}"
    return f"{where} {entry['ms']:9.3f} ms {entry['tflops']:7.1f} TFLOP/s  diff {entry['max_abs_diff']:.2e}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sparse_context.reference.attention_kernels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--token-scale", type=float, default=1.0, help="scale every token count (CPU tests)")
    parser.add_argument("--chain", type=int, default=8, help="attention calls per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="fp16", choices=("fp16", "fp32"))
    parser.add_argument("--out", type=Path, default=None, help="folder for attention_kernels.json")
    parser.add_argument("--key-sweep", type=int, nargs=2, metavar=("QUERIES", "KEYS"), default=None,
                        help="time only PyTorch's attention of QUERIES queries over KEYS keys and its tile-aligned "
                             "neighbours (key_sweep), e.g. 4608 7068 for the check's persistent-cache call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda":  # onnxruntime prints which kernel each node used
        os.environ.setdefault("ORT_ENABLE_ATTENTION_KERNEL_DEBUG_INFO", "1")
    if args.key_sweep is not None:
        queries, keys = args.key_sweep
        if queries < 1 or keys < 1:
            print(f"--key-sweep: got {queries} {keys}, need two positive token counts", file=sys.stderr)
            return 2
        report = key_sweep(queries, keys, args.heads, args.head_dim, args.device, args.dtype, args.chain)
        for line in key_sweep_lines(report):
            print(line, flush=True)
    else:
        report = run(args.device, args.heads, args.head_dim, args.token_scale, args.chain, args.repeats, args.dtype,
                     log=lambda line: print(line, flush=True))
    if args.out is not None:
        from sparse_context.runtime.files import atomic_write_bytes

        atomic_write_bytes(args.out / "attention_kernels.json", json.dumps(report, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
