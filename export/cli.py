"""Command-line layer of the export: parse, validate, call the library, print a short summary (the only prints)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sparse_context.export.exporter import DEFAULT_OPSET, ExportOptions, export_graphs
from sparse_context.export.graphs import ATTENTION_FORMS, PROJECTION_FORMS, REF_STREAM_FORMS
from sparse_context.export.spec import DEFAULT_MAX_REF_TOKENS, GRAPHS, PRECISIONS
from sparse_context.runtime.errors import SparseContextError, bad_value
from sparse_context.runtime.files import check_output_folder


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) (width x height in pixels)."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(bad_value("target size", text, "WIDTHxHEIGHT in pixels, e.g. 1024x1024")) \
            from None
    return width, height


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="local diffusers folder of FLUX.2-klein")
    parser.add_argument("--transformer", type=Path, help="single-file transformer checkpoint (.safetensors)")
    parser.add_argument("--lora", type=Path, help="LoRA (.safetensors) merged into the weights before export")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--graph", choices=(*GRAPHS, "both"), default="both",
                        help="full: dense [target, refs]; kv: one graph for KV extract + cached steps")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16")
    parser.add_argument("--attention", choices=ATTENTION_FORMS, default="matmul",
                        help="matmul: MatMul-Softmax-MatMul for TensorRT 10.3; fused: ONNX Attention for onnxruntime")
    parser.add_argument("--projections", choices=PROJECTION_FORMS, default="fused",
                        help="split: one matrix product per slice of each fused projection, so onnxruntime copies "
                        "no slices (same numbers up to summation order)")
    parser.add_argument("--ref-stream", choices=REF_STREAM_FORMS, default="guarded",
                        help="kv graph with --attention mha/fused: guarded (fused RoPE and attention for the "
                        "references, each behind an If on their count) or plain (elementwise RoPE and "
                        "MatMul-Softmax-MatMul for them: no If node in the graph; its extract step holds heads x "
                        "N x N scores for N new reference tokens)")
    parser.add_argument("--opset", type=int, help=f"default {DEFAULT_OPSET['matmul']} (matmul) / "
                        f"{DEFAULT_OPSET['fused']} (fused)")
    parser.add_argument("--max-ref-tokens", type=int, default=DEFAULT_MAX_REF_TOKENS,
                        help="largest number of reference tokens the graphs accept")
    parser.add_argument("--target-size", type=parse_size, nargs="+", default=[(1024, 1024)], metavar="WxH",
                        help="target image sizes the graphs must serve (bounds the target-token axis)")
    parser.add_argument("--out", type=Path, default=Path("onnx"), help="folder that holds the exports (and cache)")
    parser.add_argument("--validate", action="store_true", help="compare with PyTorch on onnxruntime CPU afterwards")


def _print_progress(stage: str, step: int, total: int) -> None:
    print(f"[export {step}/{total}] {stage}", file=sys.stderr, flush=True)


def run_export(args: argparse.Namespace) -> int:
    """Export as ``args`` ask; 0 on success, 2 on a user/model error (message on stderr)."""
    try:
        check_output_folder(args.out)  # before minutes of tracing
        graphs = GRAPHS if args.graph == "both" else (args.graph,)
        options = ExportOptions(model_dir=args.model, graph=graphs[0], precision=args.precision,
                                attention=args.attention, projections=args.projections,
                                ref_stream=args.ref_stream, opset=args.opset,
                                lora=args.lora,
                                lora_scale=args.lora_scale, transformer_file=args.transformer,
                                max_ref_tokens=args.max_ref_tokens, target_sizes=tuple(args.target_size),
                                out_dir=args.out).validate()
        results = export_graphs(options, graphs, progress=_print_progress)
        for result in results:
            manifest = result.manifest
            state = "reused" if result.reused else "written"
            print(f"{manifest['graph']:>4} graph {state}: {result.path}  (opset {manifest['opset']}, "
                  f"{manifest['precision']}, {manifest['attention']} attention, sha256 {manifest['onnx_sha256'][:12]})")
            if getattr(args, "validate", False):
                from sparse_context.reference.validate import validate_export_dir

                report = validate_export_dir(result.path, args.model, lora=args.lora, lora_scale=args.lora_scale,
                                             transformer_file=args.transformer)
                print("\n".join("    " + line for line in report.lines()))
    except SparseContextError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("interrupted: stopped before anything was published (outputs are written whole, then renamed)",
              file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-context-export", description=__doc__)
    add_export_arguments(parser)
    return run_export(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
