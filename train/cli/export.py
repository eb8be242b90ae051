"""`proclip export`: a saved ProCLIP folder's towers as ONNX files (`--format onnx`, see
`proclip_train.hub.export.onnx`), or a folder for transformers.js (`--format transformers.js`, see
`proclip_train.hub.export.transformers_js`)."""

import argparse
import sys

from ..hub.export import onnx as hub_export
from ..hub.export.onnx import (
    DEFAULT_OPSET,
    INT8_WARN_COSINE,
    QUANTIZATIONS,
    ExportError,
    OnnxExportOptions,
    OnnxExportReport,
    ParityError,
    export_onnx,
)
from ..hub.export.transformers_js import (
    DEFAULT_DTYPES,
    DTYPE_SUFFIXES,
    TransformersJsOptions,
    TransformersJsReport,
    export_transformers_js,
)
from ..training.finite import NonFiniteError
from ..training.saved_weights import WeightsConfigMismatch
from .errors import UsageError


def run_export(args: argparse.Namespace) -> OnnxExportReport | TransformersJsReport:
    if args.format == "transformers.js" and args.out is None:
        raise UsageError("--format transformers.js writes a new folder: name it with --out (the checkpoint is left as "
                         "it is)", "e.g. proclip export --format transformers.js --model my-proclip --out my-proclip-web")
    if args.format != "transformers.js" and args.out is not None:
        raise UsageError(f"--out is for --format transformers.js; --format {args.format} writes into the checkpoint's "
                         "onnx/ folder", f"Drop --out: proclip export --format {args.format} --model DIR")
    if args.format == "transformers.js" and args.quantize:
        raise UsageError("--quantize is for --format onnx; with --format transformers.js choose files with --dtype",
                         f"e.g. --dtype {','.join(DTYPE_SUFFIXES)}")
    try:
        if args.format == "transformers.js":
            dtypes = tuple(name.strip() for name in args.dtype.split(",") if name.strip())
            options = TransformersJsOptions(dtypes=dtypes, opset=args.opset, atol=args.atol)
            report = export_transformers_js(args.model, args.out, options)
        else:
            options = OnnxExportOptions(opset=args.opset, quantize=args.quantize, atol=args.atol)
            report = export_onnx(args.model, options)
    except (ExportError, NonFiniteError, WeightsConfigMismatch) as error:
        raise UsageError(str(error)) from error
    except ParityError as error:
        kept = (f"{args.out} holds the files that failed it" if args.out
                else f"Nothing was written: {args.model}/onnx is as it was")
        print(f"proclip export: {error}\n{kept}.", file=sys.stderr)
        raise SystemExit(1) from error
    for path in report.files:
        print(f"  {path.stat().st_size / 2**20:9.1f} MiB  {path}")
    for name, diff in report.max_abs_diff.items():
        print(f"{name}: max |ONNX Runtime - PyTorch| = {diff:.2e} (atol {args.atol:g})")
    if args.format == "transformers.js":
        print(f"transformers.js loads {report.default_dtype} when no dtype is given (config.json)")
    for name, cosine in report.min_cosine.items():
        print(f"{name}: min cosine to PyTorch = {cosine:.5f}")
        if cosine < INT8_WARN_COSINE:
            print(f"warning: {name} loses accuracy (cosine {cosine:.3f} < {INT8_WARN_COSINE}): measure it on your data "
                  "before using it; the fp32 file of that tower beside the other's int8 one is an option", file=sys.stderr)
    return report


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip export` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "export",
        help="write a saved ProCLIP folder's towers as ONNX files (onnx/ inside the folder) for ONNX Runtime, or a "
             "folder for transformers.js",
        description=hub_export.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", required=True, choices=("onnx", "transformers.js"), help="the export format")
    parser.add_argument("--model", required=True,
                        help="the saved ProCLIP folder; --format onnx writes into its onnx/ folder")
    parser.add_argument("--out",
                        help="--format transformers.js: the new folder to write (the model folder is only read)")
    parser.add_argument("--dtype", default=",".join(DEFAULT_DTYPES),
                        help="--format transformers.js: the transformers.js dtypes to write, comma-separated, of "
                             f"{', '.join(DTYPE_SUFFIXES)} (default {','.join(DEFAULT_DTYPES)}: what it picks in Node "
                             "and in browsers)")
    parser.add_argument("--quantize", choices=sorted(QUANTIZATIONS),
                        help="--format onnx: also write int8 variants (*_int8.onnx: ONNX Runtime dynamic quantization)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest |ONNX Runtime - PyTorch| allowed on the fp32 check batch (default 1e-4)")
    parser.set_defaults(func=run_export)
    return parser
