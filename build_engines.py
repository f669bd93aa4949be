"""build_engines.py: one command from a diffusers folder (+ LoRA) to ready engines.

    python build_engines.py --model /models/FLUX.2-klein-9B --lora sc.safetensors --backend trt --precision bf16
    python build_engines.py --demo                      # the embedded tiny model, onnxruntime CPU
    python build_engines.py --model /models/FLUX.2-klein-9B --precision fp8 --calibration my_set/   # H100
    python build_engines.py --demo --precision int8 --calibration-samples 8

Export is reused when cached; one optimization profile per sparsity bucket (and per KV step); the text encoder and
VAE beside the transformer (profiles from the reference area, the target resolutions and the text tokens); the
tokenizer and scheduler files copied in, so the folder alone runs `sparse-context generate --engines`; a manifest
beside every engine. This file only parses, validates and calls ``sparse_context.engines.build``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Sequence


def build_parser() -> argparse.ArgumentParser:
    from sparse_context.calibration.build import add_calibration_arguments
    from sparse_context.engines.buckets import add_bucket_arguments
    from sparse_context.engines.build import (
        FLAG_BACKEND, FLAG_GRAPHS, FLAG_LORA, FLAG_LORA_SCALE, FLAG_MODEL, FLAG_OUT, FLAG_PRECISION, FLAG_PROJECTIONS,
        FLAG_REF_STREAM, FLAG_TRANSFORMER, PROJECTIONS, REF_STREAMS,
    )
    from sparse_context.engines.index import BACKENDS

    parser = argparse.ArgumentParser(prog="build_engines.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(FLAG_MODEL, type=Path, help="local diffusers folder of FLUX.2-klein")
    parser.add_argument("--demo", action="store_true", help="use the embedded tiny model (fp32, onnxruntime CPU)")
    parser.add_argument(FLAG_TRANSFORMER, type=Path, help="single-file transformer checkpoint (.safetensors)")
    parser.add_argument(FLAG_LORA, type=Path, help="LoRA .safetensors merged before export")
    parser.add_argument(FLAG_LORA_SCALE, type=float, default=1.0)
    parser.add_argument(FLAG_BACKEND, choices=BACKENDS, default=None, help="default: trt (ort-cpu with --demo)")
    parser.add_argument(FLAG_PRECISION, choices=("fp32", "fp16", "bf16", "int8", "fp8"), default=None,
                        help="default: fp16 (fp32 with --demo); int8/fp8 calibrate and quantize (see below)")
    parser.add_argument(FLAG_GRAPHS, nargs="+", choices=("full", "kv"), default=["full", "kv"])
    parser.add_argument(FLAG_PROJECTIONS, choices=PROJECTIONS, default=None,
                        help="fused QKV/MLP projections as diffusers writes them, or split: one product per slice "
                        "(no Split copies in onnxruntime; same numbers up to summation order; not with int8/fp8). "
                        "Default: split for ort-cuda (0.83-0.91x PyTorch eager on an H200 against 0.91-0.97x), "
                        "fused otherwise")
    parser.add_argument(FLAG_REF_STREAM, choices=REF_STREAMS, default="guarded",
                        help="ort-cuda: the kv graph's reference RoPE and attention behind If guards (guarded) or "
                        "elementwise RoPE and MatMul attention without them (plain; not yet timed on a GPU; only for "
                        "plans whose largest KV extract keeps the unfused scores under 2 GiB per layer, e.g. keep "
                        "fractions up to 0.10)")
    parser.add_argument("--workspace-gb", type=float, default=None, help="TensorRT builder memory limit")
    parser.add_argument(FLAG_OUT, type=Path, default=Path("engines_out"), help="engines folder (default engines_out)")
    add_bucket_arguments(parser)
    add_calibration_arguments(parser)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    from sparse_context.calibration.build import QUANTIZED_PRECISIONS, options_from_args, summary_lines
    from sparse_context.engines.buckets import plan_from_args
    from sparse_context.engines.build import (
        FLAG_PRECISION, BuildRequest, build_engines, check_backend_precision, check_out_folder, check_weight_files,
    )
    from sparse_context.runtime.errors import SparseContextError, bad_value
    from sparse_context.runtime.limits import check_lora_scale
    from sparse_context.runtime.progress import stderr_warnings

    args = build_parser().parse_args(argv)
    # SIGTERM (a service stop, a scheduler's timeout) unwinds like an exception, so the export's staging folder and
    # the folder lock are cleaned up; kill -9 cannot be caught: the next build removes what it left.
    main_thread = threading.current_thread() is threading.main_thread()  # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        if args.demo:
            from sparse_context.reference.tiny import TINY_MAX_SEQUENCE_LENGTH, tiny_model_dir

            args.text_tokens = TINY_MAX_SEQUENCE_LENGTH
        elif args.model is None:
            raise SparseContextError(bad_value("model", None, "a local diffusers folder", "--model (or --demo)"))
        plan = plan_from_args(args)  # everything is checked before the tiny model is built
        backend = args.backend or ("ort-cpu" if args.demo else "trt")
        precision = args.precision or ("fp32" if args.demo else "fp16")
        check_backend_precision(backend, precision)
        check_weight_files(args.lora, args.transformer)
        check_out_folder(args.out)
        check_lora_scale(args.lora_scale)
        model = tiny_model_dir() if args.demo else args.model
        request = BuildRequest(
            model_dir=Path(model), backend=backend, plan=plan, out_dir=args.out, precision=precision,
            lora=args.lora, lora_scale=args.lora_scale, transformer_file=args.transformer, graphs=tuple(args.graphs),
            workspace_bytes=int(args.workspace_gb * 2**30) if args.workspace_gb else None,
            calibration=options_from_args(args, args.demo, reference_generator) if precision in QUANTIZED_PRECISIONS
            else None, projections=args.projections, ref_stream=args.ref_stream).validate()
        default = "the --demo default" if args.demo else "the default for a model folder"
        chosen = "given" if args.precision else default
        print(f"[build] precision {precision} ({chosen}; change it with {FLAG_PRECISION})", file=sys.stderr, flush=True)

        def progress(stage: str, done: int, total: int) -> None:
            print(f"[build] {stage} {done}/{total}", file=sys.stderr, flush=True)

        with stderr_warnings():  # a calibration prompt cut to the text tokens: one line
            index = build_engines(request, progress)
    except SparseContextError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; staging folders were removed on the way out
        print("interrupted: stopped before anything was published (outputs are written whole, then renamed)",
              file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if index.calibration is not None:
        print("\n".join(summary_lines(index.calibration)))
    for graph, entry in {**index.graphs, **index.parts, **index.steps}.items():
        print(f"{graph}: {len(entry.profiles)} profiles, {'reused' if entry.reused_export else 'new'} export, "
              f"{entry.engine or entry.onnx}")
    print(f"model files (tokenizer, scheduler): {len(index.files)} copied into {args.out}")
    print(f"backend {index.backend}, precision {index.precision}: {args.out}/engines.json")
    return 0


def reference_generator(model_dir: Path, backend: Any) -> Any:
    """The PyTorch generator's text encoder, VAE and token selection around ``backend`` (calibration runs the
    exported graphs through it)."""
    from sparse_context.reference.generator import SparseContextGenerator
    from sparse_context.export.loading import load_generator_parts

    return SparseContextGenerator(backend=backend, **load_generator_parts(model_dir, with_transformer=False))


if __name__ == "__main__":
    raise SystemExit(main())
