"""``sparse-context`` command line: parse, validate, call the library, print results. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from sparse_context.engines.streams import SYNC_MODES
from sparse_context.runtime.benchmark_selection import DEFAULT_GENERATION_S, GENERATION_FLAG
from sparse_context.runtime.errors import InputError, SparseContextError, bad_value
from sparse_context.runtime.files import atomic_write_bytes, check_output_folder, nearest_existing
from sparse_context.runtime.limits import (
    FLAG_GUIDANCE, FLAG_HEIGHT, FLAG_PROMPT, FLAG_SEED, FLAG_SELECTION_SEED, FLAG_STEPS, FLAG_WIDTH,
)
from sparse_context.runtime.progress import stderr_progress, stderr_warnings
from sparse_context.runtime.selection import ALLOCATION_CHOICES, STRATEGY_CHOICES
from sparse_context.runtime.tokens import KEY_TILE_FLAG

SPEED_REFS = [1, 2, 3, 4, 5, 6]  # `bench speed`; `bench engines` defaults to engine_benchmark.DEFAULT_REFS
# `generate` options that engines fix at build time (refused, or checked equal, with --engines)
FLAG_ENGINES = "--engines"
FLAG_MODEL = "--model"
FLAG_TRANSFORMER = "--transformer"
FLAG_LORA = "--lora"
FLAG_LORA_SCALE = "--lora-scale"
FLAG_DTYPE = "--dtype"
FLAG_DEVICE = "--device"
FLAG_SYNC = "--sync"
FLAG_CUDA_GRAPHS = "--cuda-graphs"
FLAG_REF = "--ref"
FLAG_MASK = "--mask"
FLAG_STRATEGY = "--strategy"
FLAG_KEEP = "--keep"
FLAG_TOKENS = "--tokens"
FLAG_KEY_TILE = KEY_TILE_FLAG  # the selection's own flag name: its errors name it
FLAG_OUT = "--out"
DEFAULT_GUIDANCE = 4.0  # classifier-free guidance of the base (non-distilled) models
# Output formats by file suffix (Pillow writes each); anything else is refused rather than written as PNG bytes.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _add_selection_arguments(parser: argparse.ArgumentParser, default_keep: float) -> None:
    parser.add_argument(FLAG_REF, action="append", default=[], metavar="IMAGE",
                        help="reference image (repeat for several, at most 10; default for `select`: the bundled "
                             "samples)")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(FLAG_KEEP, type=float, default=None,
                        help=f"keep fraction of reference tokens in (0, 1] (default {default_keep})")
    budget.add_argument(FLAG_TOKENS, type=int, default=None, help="token count instead of a fraction")
    parser.add_argument(FLAG_STRATEGY, choices=STRATEGY_CHOICES, default="edge",
                        help="edge: instruction editing; saliency: subject personalization (default edge)")
    parser.add_argument("--allocation", choices=ALLOCATION_CHOICES, default="per_reference",
                        help="budget per reference, or global (importance-weighted across references)")
    parser.add_argument(FLAG_MASK, action="append", default=None, metavar="IMAGE",
                        help="importance mask per reference for --strategy mask (grayscale image)")
    parser.add_argument(FLAG_SEED, type=int, default=0, help="0 to 2**63 - 1; for `select` the selection's seed "
                        f"(generate's {FLAG_SELECTION_SEED}), for `generate` the noise's")


def _masks(args: argparse.Namespace):
    if not args.mask:
        return None
    import numpy as np

    from sparse_context.runtime.images import load_image

    return [np.asarray(load_image(path, "mask image", FLAG_MASK).convert("L"), dtype=np.float32) / 255.0
            for path in args.mask]


def check_selection_options(args: argparse.Namespace, all_allowed: bool = False) -> None:
    """Every selection option is honoured or refused, before any image is decoded or any model loaded."""
    from sparse_context.runtime.limits import check_seed
    from sparse_context.runtime.tokens import MAX_REFERENCES, check_keep_fraction

    if len(args.ref) > MAX_REFERENCES:
        raise InputError(bad_value("number of reference images", len(args.ref), f"at most {MAX_REFERENCES}",
                                   f"fewer {FLAG_REF}"))
    for path in [*args.ref, *(args.mask or [])]:
        flag = FLAG_MASK if path in (args.mask or []) and path not in args.ref else FLAG_REF
        if not Path(path).is_file():
            what = "mask image file" if flag == FLAG_MASK else "reference image file"
            raise InputError(bad_value(what, path, "an existing image file", flag))
    if args.keep is not None:
        check_keep_fraction(args.keep, FLAG_KEEP)
    if args.tokens is not None and args.tokens < 1:
        raise InputError(bad_value("reference token count", args.tokens, "an integer >= 1", FLAG_TOKENS))
    check_seed(args.seed)
    if args.strategy == "mask" and not args.mask:
        raise InputError(bad_value(f"{FLAG_STRATEGY} mask", f"no {FLAG_MASK}", f"one {FLAG_MASK} IMAGE per reference",
                                   FLAG_MASK))
    if args.mask and args.strategy not in ("mask", "all" if all_allowed else "mask"):
        raise InputError(bad_value(f"{FLAG_MASK} with {FLAG_STRATEGY}", args.strategy,
                                   f"{FLAG_STRATEGY} mask (a mask is only read by that strategy)", FLAG_STRATEGY))


def check_output_file(file: str) -> Path:
    """``file`` has an image suffix we write in that format, is not a folder, and its folder is writable."""
    path = Path(file)
    nearest_existing(path, "output file", FLAG_OUT)
    if path.is_dir():
        raise InputError(bad_value("output file", file, "a file name (this is an existing folder)", FLAG_OUT))
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise InputError(bad_value("output file type", path.suffix or "(no suffix)",
                                   ", ".join(IMAGE_FORMATS) + " (written in that format)", FLAG_OUT))
    check_output_folder(str(path.parent))
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(bad_value("output file", file, "a file you can write", FLAG_OUT))
    return path


def save_image(path: Path, rgb) -> None:
    """Write the image in the format its suffix names, atomically."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format=IMAGE_FORMATS[path.suffix.lower()])
    atomic_write_bytes(path, buffer.getvalue())


def cmd_select(args: argparse.Namespace) -> int:
    import numpy as np

    from sparse_context.runtime.images import sample_images
    from sparse_context.runtime.overlay import draw_selection, save_png, selection_grid_png
    from sparse_context.runtime.selection import select_references

    check_selection_options(args, all_allowed=True)
    out = check_output_folder(args.out)
    refs = args.ref or [str(p) for p in sample_images().values()]
    keep = args.keep if args.keep is not None or args.tokens is not None else 0.10
    strategies = STRATEGY_CHOICES if args.strategy == "all" else (args.strategy,)
    if args.strategy == "all" and not args.mask:
        strategies = tuple(s for s in strategies if s != "mask")
        print(f"note: strategy mask skipped (it needs {FLAG_MASK})", file=sys.stderr)
    rows, labels, summary = [], [], {}
    for strategy in strategies:
        selections = select_references(refs, strategy=strategy, keep_fraction=None if args.tokens else keep,
                                       token_count=args.tokens, allocation=args.allocation, seed=args.seed,
                                       masks=_masks(args) if strategy == "mask" else None)
        overlays = [draw_selection(np.asarray(s.image), s.indices, s.grid) for s in selections]
        for index, (selection, overlay) in enumerate(zip(selections, overlays)):
            save_png(out / f"select_{strategy}_ref{index}.png", overlay)
            print(f"{strategy:9s} ref{index}: kept {selection.indices.size:5d} / {selection.available:5d} tokens "
                  f"({selection.keep_fraction:.3f})")
        rows.append(overlays)
        labels.append([f"{strategy}: {s.indices.size}/{s.available}" for s in selections])
        summary[strategy] = [s.indices.tolist() for s in selections]
    selection_grid_png(out / "selections.png", rows, labels)
    atomic_write_bytes(out / "selections.json", json.dumps(summary).encode())
    print(f"overlays: {out}/selections.png")
    return 0


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def cmd_generate(args: argparse.Namespace) -> int:
    import numpy as np

    check_generate_options(args)
    out = check_output_file(args.out)

    if args.engines is not None:  # torch-free: every step runs on the engines folder
        from sparse_context.engines.pipeline import EnginePipeline

        check_engine_options(args)
        generator = EnginePipeline.from_engines(args.engines, device=args.device, sync=args.sync,
                                                cuda_graphs=args.cuda_graphs)
    else:
        check_torch_device(args.device)
        from sparse_context.reference.generator import SparseContextGenerator  # torch: after the checks
        from sparse_context.reference.tiny import tiny_model_dir

        generator = SparseContextGenerator.from_pretrained(
            tiny_model_dir() if args.model is None else args.model, lora=args.lora,
            lora_scale=1.0 if args.lora_scale is None else args.lora_scale, transformer_file=args.transformer,
            dtype=_dtype(args.dtype or "fp32"), device=args.device or "cpu")
    use_kv = generator.prefers_kv if args.kv is None else args.kv
    if args.guidance is not None and generator.is_distilled:
        print(f"warning: {FLAG_GUIDANCE} {args.guidance:g} has no effect: this model is guidance-distilled (one "
              f"transformer call per step, no negative prompt); leave {FLAG_GUIDANCE} out", file=sys.stderr)
    result = generator.generate(
        args.prompt, args.ref, keep_fraction=args.keep if args.keep is not None else 1.0, token_count=args.tokens,
        strategy=args.strategy, allocation=args.allocation, masks=_masks(args), use_kv=use_kv, height=args.height,
        width=args.width, num_steps=args.steps,
        guidance_scale=DEFAULT_GUIDANCE if args.guidance is None else args.guidance, seed=args.seed,
        selection_seed=args.selection_seed, key_tile=args.key_tile, on_step=stderr_progress("denoise"))
    save_image(out, np.asarray(result.image))
    timings = " ".join(f"{k}={v:.3f}s" for k, v in result.timings.items())
    print(f"reference tokens: {result.ref_tokens} of {result.ref_tokens_available} | kv={'on' if use_kv else 'off'}"
          f" | {timings}")
    print(f"image: {args.out}")
    return 0


def check_generate_options(args: argparse.Namespace) -> None:
    """Everything about a generate request that can be checked before loading a model."""
    from sparse_context.runtime.limits import (
        DEFAULT_SIDE_PIXELS, check_guidance, check_lora_scale, check_output_size, check_prompt, check_selection_seed,
        check_steps,
    )

    from sparse_context.runtime.tokens import check_key_tile

    check_prompt(args.prompt)
    check_selection_options(args)
    check_selection_seed(args.selection_seed)
    check_key_tile(args.key_tile, FLAG_KEY_TILE)
    check_steps(args.steps)
    if args.guidance is not None:
        check_guidance(args.guidance)
    if args.lora_scale is not None:
        check_lora_scale(args.lora_scale)
        if args.lora is None and args.engines is None:  # it would be ignored: the same image as without it
            raise InputError(bad_value("LoRA scale", args.lora_scale, f"set only with {FLAG_LORA} (there is no LoRA "
                                       "to scale)", f"{FLAG_LORA}, or drop {FLAG_LORA_SCALE}"))
    if args.width is not None or args.height is not None:
        check_output_size(DEFAULT_SIDE_PIXELS if args.width is None else args.width,
                          DEFAULT_SIDE_PIXELS if args.height is None else args.height)
    if args.device is not None:
        kind, _, number = args.device.partition(":")
        if kind not in ("cpu", "cuda") or (number and (kind == "cpu" or not number.isdigit())):
            raise InputError(bad_value("device", args.device, "cpu, cuda or cuda:N", FLAG_DEVICE))
    if args.sync is not None and args.engines is None:
        raise InputError(bad_value("synchronization", args.sync, "set only with --engines (onnxruntime engines "
                                   "wait for their device after every run or once per image)", FLAG_SYNC))
    if args.cuda_graphs and args.engines is None:
        raise InputError(bad_value("CUDA graphs", "on without engines", "set only with --engines (onnxruntime CUDA "
                                   "engines replay their cached KV calls as CUDA graphs)", FLAG_CUDA_GRAPHS))
    for flag, value in ((FLAG_ENGINES, args.engines), (FLAG_MODEL, args.model), (FLAG_TRANSFORMER, args.transformer),
                        (FLAG_LORA, args.lora)):
        if value is not None and not value.strip():  # an unset $VARIABLE in a deploy script: never "not given"
            raise InputError(bad_value(f"{flag} path", value, "a path (leave the flag out for the default)", flag))
    if args.engines is not None:
        if not Path(args.engines).is_dir():
            raise InputError(bad_value("engines folder", args.engines, "an existing folder from build_engines.py",
                                       FLAG_ENGINES))
        return  # model, LoRA and transformer are compared with the engines' own (check_engine_options)
    from sparse_context.export.model_folder import check_safetensors, read_model_index, read_settings

    if args.model is not None:
        read_model_index(args.model)
        read_settings(args.model)
    for flag, value, what in ((FLAG_TRANSFORMER, args.transformer, "transformer checkpoint"),
                              (FLAG_LORA, args.lora, "LoRA file")):
        if value is not None:
            if not Path(value).is_file():
                raise InputError(bad_value(what, value, "an existing .safetensors file", flag))
            check_safetensors(Path(value), what, flag)


def check_torch_device(device: str | None) -> None:
    """A CUDA device asked of the PyTorch path exists here."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        allowed = f"cpu or cuda:0..{count - 1}" if count else "cpu (PyTorch sees no CUDA GPU here)"
        raise InputError(bad_value("device", device, allowed, FLAG_DEVICE))


def check_engine_options(args: argparse.Namespace) -> None:
    """Options the engines fixed at build time must be absent or equal to what was built; otherwise one error
    lists each difference with the build_engines.py command that would build engines for it."""
    from sparse_context.engines.build import build_command
    from sparse_context.engines.errors import FixedAtBuildError
    from sparse_context.engines.index import EnginesIndex, check_device
    from sparse_context.runtime.fingerprints import file_sha256

    index = EnginesIndex.read(args.engines)
    check_device(index, args.device)  # before torch and the text encoder are loaded
    folder = Path(args.engines)

    def same_file(given: str, built: str | None) -> bool:
        return built is not None and Path(given).resolve() == Path(built).resolve()

    def rebuild(suffix: str, **changes) -> str:
        return build_command(index, folder.with_name(f"{folder.name}-{suffix}"), **changes)

    problems = []
    if args.model is not None and not same_file(args.model, index.model_dir):
        problems.append(f"{FLAG_MODEL} {args.model}: the engines were built from {index.model_dir}; for this model "
                        f"build: {rebuild('model', model=args.model)}")
    if args.transformer is not None and not same_file(args.transformer, index.transformer_file):
        built = f"with {index.transformer_file}" if index.transformer_file else "without a transformer checkpoint"
        problems.append(f"{FLAG_TRANSFORMER} {args.transformer}: the engines were built {built}; build: "
                        f"{rebuild('transformer', transformer=args.transformer)}")
    scale = index.lora_scale if args.lora_scale is None else args.lora_scale
    same_lora_bytes = (args.lora is not None and index.lora_sha256 is not None and Path(args.lora).is_file()
                       and file_sha256(args.lora) == index.lora_sha256)
    lora_differs = args.lora is not None and not (same_file(args.lora, index.lora) or same_lora_bytes)
    if lora_differs:
        built = f"with the LoRA {index.lora}" if index.lora else "without a LoRA"
        problems.append(f"{FLAG_LORA} {args.lora}: the engines were built {built}; build: "
                        f"{rebuild('lora', lora=args.lora, lora_scale=scale)}")
    elif args.lora_scale is not None and args.lora_scale != index.lora_scale:
        if index.lora is None:
            problems.append(f"{FLAG_LORA_SCALE} {args.lora_scale:g}: the engines were built without a LoRA, so "
                            f"there is nothing to scale (give {FLAG_LORA} and build engines with it)")
        else:
            problems.append(f"{FLAG_LORA_SCALE} {args.lora_scale:g}: the engines were built with the LoRA at scale "
                            f"{index.lora_scale:g}; build: {rebuild('lora-scale', lora_scale=args.lora_scale)}")
    if args.dtype is not None and args.dtype != index.precision:
        problems.append(f"{FLAG_DTYPE} {args.dtype}: the engines were built in {index.precision}; build: "
                        f"{rebuild(args.dtype, precision=args.dtype)}")
    if problems:
        raise FixedAtBuildError(f"{FLAG_ENGINES} {args.engines} fixes these options at build time:\n  "
                                + "\n  ".join(problems))


def cmd_demo(args: argparse.Namespace) -> int:
    from sparse_context.reference.demo import run_demo

    check_output_folder(args.out)
    report = run_demo(args.out, keep_fraction=args.keep, steps=args.steps, seed=args.seed,
                      progress=stderr_progress)
    photos = len(next(iter(report["selection"].values()))["kept"])
    print(f"token selection at keep {args.keep:g} ({photos} sample photos) -> {args.out}/selections.png")
    for strategy, entry in report["selection"].items():
        print(f"  {strategy:9s} kept {sum(entry['kept']):5d} of {sum(entry['available']):5d} tokens, "
              f"{entry['ms_per_reference']:.1f} ms per reference")
    print("generation (tiny FLUX.2-klein, CPU):")
    for mode, entry in report["generation"].items():
        print(f"  {mode:9s} reference tokens {entry['ref_tokens']:5d} of {entry['ref_tokens_available']:5d} | "
              f"transformer {entry['transformer_seconds']:.2f}s ({entry['transformer_speedup']:.2f}x vs dense) | "
              f"total {entry['total_seconds']:.2f}s | {entry['image']}")
    return 0


def require_torch(command: str) -> None:
    """The benchmarks time PyTorch (or build their weights with it): say so, not ModuleNotFoundError, where the
    install is the runtime-only one."""
    import importlib

    try:
        importlib.import_module("torch")
    except ImportError as error:
        raise InputError(f"{command} runs PyTorch (the reference it measures against, and the model's weights): "
                         f"torch is not installed here ({error}); install the [torch] extra, e.g. "
                         f"pip install 'sparse-context[torch,onnx]', or use the README's set-up") from None


def cmd_bench_engines(args: argparse.Namespace) -> int:
    from sparse_context.reference.engine_benchmark import DEFAULT_REFS, EngineBenchOptions, benchmark_engines
    from sparse_context.reference.engine_report import summary_lines, write_engine_report

    options = EngineBenchOptions(
        config=args.config, refs=tuple(args.refs or DEFAULT_REFS), keeps=tuple(args.keeps), target_px=args.target_px,
        ref_px=args.ref_px, text_tokens=args.text_tokens, steps=args.steps, repeats=args.repeats, device=args.device,
        precision=args.dtype, backend=args.backend, budget_s=args.budget_s, seed=args.seed,
        work_dir=Path(args.work_dir) if args.work_dir else None).validate()
    require_torch("bench engines")
    result = benchmark_engines(options, on_event=lambda line: print(line, file=sys.stderr, flush=True))
    print("\n".join(summary_lines(result)))
    json_path, png_path = write_engine_report(result, args.out)
    print(f"wrote {json_path} and {png_path}")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from sparse_context.reference.gpu_plan import (
        DEFAULT_KEY_TILE, DEFAULT_VARIANTS, GpuCheckOptions, estimate_plan,
    )

    options = GpuCheckOptions(
        config=args.config, depths=tuple(args.depths) if args.depths else None,
        variants=tuple(args.variants or DEFAULT_VARIANTS), refs=max(args.refs), target_px=args.target_px,
        ref_px=args.ref_px, text_tokens=args.text_tokens, steps=args.steps, repeats=args.repeats,
        device=args.device, precision=args.dtype, budget_s=args.budget_s, seed=args.seed, out=Path(args.out),
        work_dir=Path(args.work_dir) if args.work_dir else None, export_workers=args.export_workers,
        bf16=not args.no_bf16, full=not args.no_full, gpu_memory_gb=args.gpu_memory_gb,
        sync=args.sync or "image", cuda_graphs=not args.no_cuda_graphs,
        key_tile=DEFAULT_KEY_TILE if args.key_tile is None else args.key_tile, focus=args.focus).validate()
    if args.dry_run:
        print("\n".join(estimate_plan(options).lines()))
        return 0
    require_torch("bench gpu")
    from sparse_context.reference.gpu_check import run_gpu_check

    run_gpu_check(options, on_event=lambda line: print(line, flush=True))
    print(f"wrote {Path(args.out) / 'gpu_check.json'} and {Path(args.out) / 'gpu_check.png'}")
    return 0


# Per-command defaults of the shared `bench` options (None in the parser): the GPU check runs the real sizes.
BENCH_DEFAULTS = {
    "default": dict(config="tiny", refs=None, target_px=512, ref_px=512, text_tokens=64, repeats=3, device="cpu",
                    dtype="fp32", budget_s=540.0, out="out/bench"),
    "gpu": dict(config="klein-9b", refs=[6], target_px=1024, ref_px=1024, text_tokens=512, repeats=2,
                device="cuda", dtype="fp16", budget_s=480.0, out="out/gpu-check"),
}


def cmd_bench(args: argparse.Namespace) -> int:
    for name, value in BENCH_DEFAULTS.get(args.what, BENCH_DEFAULTS["default"]).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.what == "gpu":
        return cmd_bench_gpu(args)
    if args.what == "engines":
        return cmd_bench_engines(args)
    if args.what == "select":
        from sparse_context.runtime.benchmark_selection import (
            benchmark_references, benchmark_selection, summary_lines, write_selection_report,
        )

        references = benchmark_references(references=max(args.refs) if args.refs else 6,
                                          generation_s=args.generation_s,
                                          on_progress=stderr_progress("bench select"))
        per_reference = benchmark_selection(threads=args.threads)
        print(json.dumps(per_reference, indent=2))
        print("\n".join(summary_lines(references)))
        path = write_selection_report({"per_reference": per_reference, "references": references}, args.out)
        print(f"wrote {path}")
        return 0
    require_torch(f"bench {args.what}")
    from sparse_context.reference.benchmark import benchmark_speed, write_speed_report

    def show(row):
        print(f"refs {row.refs} keep {row.keep:<5g} kv {'on ' if row.kv else 'off'} ref tokens {row.ref_tokens:6d} "
              f"{row.seconds:8.3f}s  {row.speedup:5.2f}x vs dense", flush=True)

    result = benchmark_speed(config=args.config, refs=args.refs or SPEED_REFS, keeps=args.keeps,
                             target_px=args.target_px, ref_px=args.ref_px, text_tokens=args.text_tokens,
                             steps=args.steps, repeats=args.repeats, device=args.device, dtype=_dtype(args.dtype),
                             on_row=show)
    print(f"target only (the limit): {result['target_only_seconds']:.3f}s on {result['device']}")
    json_path, png_path = write_speed_report(result, args.out)
    print(f"wrote {json_path} and {png_path}")
    return 0


def build_parser(with_export: bool = True) -> argparse.ArgumentParser:
    """The whole command line; ``with_export=False`` lists `export` without its options, whose module imports
    torch (seconds): other commands then check their input before anything heavy is imported."""
    parser = argparse.ArgumentParser(prog="sparse-context", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    select = commands.add_parser("select", help="choose reference tokens and write overlay PNGs")
    _add_selection_arguments(select, default_keep=0.10)
    select.set_defaults(strategy="all")
    select._option_string_actions["--strategy"].choices = STRATEGY_CHOICES + ("all",)
    select.add_argument(FLAG_OUT, default="out/select", help="folder for overlays (default out/select)")
    select.set_defaults(func=cmd_select)

    generate = commands.add_parser("generate", help="generate an image (PyTorch, or engines with --engines)")
    generate.add_argument(FLAG_MODEL, help="local diffusers folder of FLUX.2-klein (default: the embedded tiny "
                          "model; with --engines: the folder the engines were built from)")
    generate.add_argument(FLAG_ENGINES, help="engines folder from build_engines.py: text encoder, transformer and "
                          "VAE run there (TensorRT or onnxruntime, no torch needed); model, LoRA and precision are "
                          "the ones it was built with")
    generate.add_argument(FLAG_TRANSFORMER, help="single-file transformer .safetensors replacing the folder's")
    generate.add_argument(FLAG_LORA, help="LoRA .safetensors merged into the transformer")
    generate.add_argument(FLAG_LORA_SCALE, type=float, default=None, help="LoRA scale (default 1)")
    generate.add_argument(FLAG_PROMPT, required=True, help="at most 2048 characters")
    _add_selection_arguments(generate, default_keep=1.0)
    generate.add_argument(FLAG_SELECTION_SEED, type=int, default=0,
                          help="seed of the selection's random parts (random, the uniform lattice's shift, ties), "
                          f"apart from {FLAG_SEED}: a new {FLAG_SEED} keeps the kept tokens, so the reference K/V "
                          "cache still hits (default 0)")
    generate.add_argument(FLAG_KEY_TILE, type=int, default=None, metavar="N",
                          help="keep more reference tokens, never fewer, so the attention's keys (text + target + "
                          "kept) fill whole tiles of N keys: a last partial tile costs the kernel about a whole one "
                          "(128: the key tile at head size 128; 0: off; default: with --engines, what they were "
                          "built with, else off)")
    kv = generate.add_mutually_exclusive_group()
    kv.add_argument("--kv", dest="kv", action="store_true", default=None, help="reuse reference K/V (KV cache)")
    kv.add_argument("--no-kv", dest="kv", action="store_false")
    generate.add_argument(FLAG_STEPS, type=int, default=4, help="denoising steps, 1 to 200 (default 4)")
    generate.add_argument(FLAG_GUIDANCE, type=float, default=None, help=f"CFG scale, 0 to 100 (base models only; "
                          f"default {DEFAULT_GUIDANCE:g}; a distilled model ignores it and says so)")
    generate.add_argument(FLAG_WIDTH, type=int, help="output width: a multiple of 16 px up to 4096, at most 4 "
                          "megapixels with --height (neither given: the first reference's size, else 1024x1024; "
                          "one given: the other side is 1024)")
    generate.add_argument(FLAG_HEIGHT, type=int, help="output height, as --width")
    generate.add_argument(FLAG_DEVICE, default=None, help="cpu, cuda or cuda:N (default: cpu; with --engines: "
                          "the engines' device, whose GPU index may be chosen)")
    generate.add_argument(FLAG_SYNC, choices=SYNC_MODES, default=None,
                          help="with --engines on onnxruntime: wait for the device after every run (run) or queue "
                          "the whole generation on one CUDA stream and wait once (image). Default: image on "
                          "ort-cuda engines when cuda-python is installed, run otherwise")
    generate.add_argument(FLAG_CUDA_GRAPHS, action="store_true",
                          help="with --engines on onnxruntime CUDA: replay the KV graph's cached calls (every step of "
                          "a persistent-cache hit, steps 2+ of a KV generation) as CUDA graphs; the engines must be "
                          "built with --ref-stream plain")
    generate.add_argument(FLAG_DTYPE, choices=("fp32", "fp16", "bf16"), default=None,
                          help="default: fp32 (with --engines: the engines' precision)")
    generate.add_argument(FLAG_OUT, default="out/generated.png",
                          help="image file: .png, .jpg, .jpeg or .webp, written in that format")
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="the main job on the embedded tiny model, end to end")
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--keep", type=float, default=0.10)
    demo.add_argument("--steps", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    bench = commands.add_parser("bench", help="benchmarks: `gpu` (the GPU check: PyTorch vs onnxruntime, full depth "
                                "and reduced depths, in one budget), `speed` (PyTorch backend), `engines` (PyTorch vs "
                                "onnxruntime at one depth) or `select`")
    bench.add_argument("what", choices=("gpu", "speed", "engines", "select"))
    bench.add_argument("--config", default=None,
                       help="tiny | klein-4b | klein-9b (default: klein-9b for gpu, tiny otherwise)")
    bench.add_argument("--refs", type=int, nargs="+", default=None,
                       help="reference counts (default: 1 2 3 4 5 6 for speed, 1 3 6 for engines; gpu and select: "
                       "the largest given, default 6)")
    bench.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.25, 0.10, 0.05])
    bench.add_argument("--target-px", type=int, default=None, help="default 1024 for gpu, 512 otherwise")
    bench.add_argument("--ref-px", type=int, default=None, help="default 1024 for gpu, 512 otherwise")
    bench.add_argument("--text-tokens", type=int, default=None, help="default 512 for gpu, 64 otherwise")
    bench.add_argument("--steps", type=int, default=4)
    bench.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 2 for gpu, else 3)")
    bench.add_argument("--device", default=None, help="default cuda for gpu, cpu otherwise")
    bench.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                       help="default fp16 for gpu, fp32 otherwise")
    bench.add_argument("--depths", nargs=2, default=None,
                       help="`gpu`: the two reduced depths (default: d4 d8; tiny: d2 d4)")
    bench.add_argument("--variants", nargs="+", default=None,
                       help="`gpu`: onnxruntime graph variants, first one first: mha, fused, mha-split (mha with "
                       "the fused projections split into one product per slice), mha-split-plain (its kv graph "
                       "without If nodes: --ref-stream plain; its cached calls run as CUDA graphs) "
                       "(default: mha-split mha-split-plain)")
    bench.add_argument("--export-workers", type=int, default=None,
                       help="`gpu`: export processes beside the GPU phases (default 3 on cuda, 2 on cpu; 0 = in-process)")
    bench.add_argument("--no-bf16", action="store_true", help="`gpu`: skip the PyTorch bf16 row set")
    bench.add_argument("--no-full", action="store_true",
                       help="`gpu`: skip PyTorch at full depth (a shorter run comparing the two reduced depths)")
    bench.add_argument("--focus", action="store_true",
                       help="`gpu`: time only the rows the speedup criteria rest on (6 refs dense, keep 0.10 + KV and "
                       "its persistent-cache call, and their whole-key-tile twins), without the key sweep, side "
                       "measurements and kernel profiles: a second call on a warm machine spends its budget on "
                       "samples")
    bench.add_argument("--no-cuda-graphs", action="store_true",
                       help="`gpu`: run the plain kv graph's cached calls without CUDA graphs (by default they are "
                       "replayed as CUDA graphs and also timed without, side by side)")
    bench.add_argument(FLAG_SYNC, choices=SYNC_MODES, default=None,
                       help="`gpu`: onnxruntime rows wait for the GPU once per image (image, the default; the KV "
                       "row and its persistent-cache call are also timed waiting after every run) or after every run")
    bench.add_argument(FLAG_KEY_TILE, type=int, default=None, metavar="N",
                       help="`gpu`: also time 6 refs at keep 0.10 + KV and its persistent-cache call with the kept "
                       "tokens topped up so the attention's keys fill whole tiles of N (default 128; 0: not)")
    bench.add_argument("--dry-run", action="store_true", help="`gpu`: print the plan with estimated seconds and stop")
    bench.add_argument("--gpu-memory-gb", type=float, default=None,
                       help="`gpu --dry-run`: plan for a GPU of this size (default 80)")
    bench.add_argument("--threads", type=int, default=1,
                       help="OpenCV threads for `select`'s per-reference timing")
    bench.add_argument(GENERATION_FLAG, type=float, default=DEFAULT_GENERATION_S,
                       help="`select`: seconds of the generation that selection + packing of the references may "
                       "take 2%% of (default 0.80: 6 refs at keep 0.10 with KV, FLUX.2-klein-9B on an H200)")
    bench.add_argument("--backend", choices=("ort-cuda", "ort-cpu"), default=None,
                       help="onnxruntime backend for `engines` (default: ort-cuda with --device cuda, else ort-cpu)")
    bench.add_argument("--budget-s", type=float, default=None,
                       help="`gpu`/`engines`: seconds for the whole run (default 480 / 540); work that would not "
                            "fit is skipped and listed")
    bench.add_argument("--work-dir", default=None,
                       help="`engines`: folder for the ONNX exports, reused by later runs (default: the cache dir)")
    bench.add_argument("--seed", type=int, default=0, help="`engines`: seed of weights and inputs")
    bench.add_argument("--out", default=None, help="report folder (default out/gpu-check for gpu, else out/bench)")
    bench.set_defaults(func=cmd_bench)

    _add_optional_commands(commands, with_export)
    return parser


def _add_optional_commands(commands, with_export: bool = True) -> None:
    """Commands whose modules may be absent in a partial checkout are added when importable."""
    if not with_export:
        commands.add_parser("export", help="export the transformer to ONNX")
        return
    try:
        from sparse_context.export.cli import add_export_arguments, run_export
    except ImportError:
        return
    export = commands.add_parser("export", help="export the transformer to ONNX")
    add_export_arguments(export)
    export.set_defaults(func=run_export)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(with_export="export" in argv).parse_args(argv)
    with stderr_warnings():
        try:
            return int(args.func(args) or 0)
        except SparseContextError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
            print("interrupted: stopped before anything was published (outputs are written whole, then renamed)",
                  file=sys.stderr)
            return 130


if __name__ == "__main__":
    raise SystemExit(main())
