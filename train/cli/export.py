"""`proclip export --format onnx`: a saved ProCLIP folder's towers as ONNX files (see `proclip_train.hub.export`)."""

import argparse
import sys

from ..hub import export as hub_export
from ..hub.export import (
    DEFAULT_OPSET,
    INT8_WARN_COSINE,
    QUANTIZATIONS,
    ExportError,
    OnnxExportOptions,
    OnnxExportReport,
    ParityError,
    export_onnx,
)
from ..training.finite import NonFiniteError
from ..training.saved_weights import WeightsConfigMismatch
from .errors import UsageError


def run_export(args: argparse.Namespace) -> OnnxExportReport:
    options = OnnxExportOptions(opset=args.opset, quantize=args.quantize, atol=args.atol)
    try:
        report = export_onnx(args.model, options)
    except (ExportError, NonFiniteError, WeightsConfigMismatch) as error:
        raise UsageError(str(error)) from error
    except ParityError as error:
        print(f"proclip export: {error}\nNothing was written: {args.model}/onnx is as it was.", file=sys.stderr)
        raise SystemExit(1) from error
    for path in report.files:
        print(f"  {path.stat().st_size / 2**20:9.1f} MiB  {path}")
    for name, diff in report.max_abs_diff.items():
        print(f"{name}: max |ONNX Runtime - PyTorch| = {diff:.2e} (atol {options.atol:g})")
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
        help="write a saved ProCLIP folder's towers as ONNX files (onnx/ inside the folder) for ONNX Runtime",
        description=hub_export.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", required=True, choices=("onnx",), help="the export format")
    parser.add_argument("--model", required=True, help="the saved ProCLIP folder; the files go to its onnx/ folder")
    parser.add_argument("--quantize", choices=sorted(QUANTIZATIONS),
                        help="also write int8 variants (*_int8.onnx: ONNX Runtime dynamic quantization)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest |ONNX Runtime - PyTorch| allowed on the fp32 check batch (default 1e-4)")
    parser.set_defaults(func=run_export)
    return parser
