"""`proclip eval`: zero-shot classification and image-text retrieval of a saved ProCLIP model, and caption retrieval
accuracy (CRA, LLM2CLIP's text-only protocol) of any text tower: an LLM, a ProCLIP or a CLIP folder.

The tasks are `proclip_train.evaluation.tasks` (cosine similarity, pessimistic ties, similarities in chunks); rows
whose image cannot be read, whose captions are all empty, or whose label is missing are skipped and counted in the
results JSON, which also records the model, the data, the protocol and the command line.

Data SPEC: anything `proclip train --data` reads, through the same loader: a local folder (an imagefolder: class
subfolders give a `label` column, a `metadata.jsonl`/`metadata.csv` gives caption columns; or a folder of data
files), a file or glob of `.csv`/`.jsonl`/`.json`/`.parquet`/`.arrow` files (image paths relative to the file that
lists them) or of webdataset `.tar` shards (columns are the file suffixes: `--image-column jpg --caption-column txt`),
or a Hub dataset `name[:config]`; `--streaming` reads only the rows it evaluates.
"""

import argparse
import datetime
import json
import os
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ..evaluation.metrics import DEFAULT_CHUNK_SIZE
from ..evaluation.tasks import (
    EvaluationDataError,
    evaluate_caption_retrieval,
    evaluate_retrieval,
    evaluate_zeroshot,
    load_eval_dataset,
)
from ..evaluation.templates import OPENAI_IMAGENET_TEMPLATES, load_templates
from ..evaluation.text_towers import load_text_tower
from ..training.data import DataSpec
from ..training.finite import NonFiniteError, require_finite_folder
from ..training.saved_weights import WeightsConfigMismatch, require_weights_fit_config
from ..training.registry import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, DEFAULT_LABEL_COLUMN
from .errors import UsageError
from .flags import add_caption_column_argument, add_image_source_arguments


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_eval(args: argparse.Namespace) -> dict:
    """Run `proclip eval` from parsed arguments; write and return the results."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    caption_columns = args.caption_column or [DEFAULT_CAPTION_COLUMN]
    columns = {
        "zeroshot": dict(image_column=args.image_column, label_column=args.label_column),
        "retrieval": dict(image_column=args.image_column, caption_columns=caption_columns),
        "caption-retrieval": dict(caption_columns=caption_columns),
    }[args.task]
    try:
        dataset, split, num_rows = load_eval_dataset(
            args.data, args.split, args.streaming, args.max_samples, **columns,
            allow_paths_outside_data=args.allow_paths_outside_data, allow_remote_images=args.allow_remote_images,
        )
    except (FileNotFoundError, ValueError) as error:  # a wrong path, format, split or column: the user's to fix
        raise UsageError(str(error)) from error

    try:
        return _write_results(args, _evaluate(args, dataset, caption_columns, device), split, num_rows, device)
    except (EvaluationDataError, NonFiniteError, WeightsConfigMismatch) as error:  # nothing to score, a broken model
        raise UsageError(str(error)) from error


def _evaluate(args: argparse.Namespace, dataset, caption_columns: list[str], device) -> dict:
    """The task's outcome (`evaluate_*`), after refusing a model folder whose weights are not finite."""
    if os.path.isdir(args.model):
        require_finite_folder(args.model)
        if args.task != "caption-retrieval":
            require_weights_fit_config(args.model)
    common = dict(batch_size=args.batch_size, chunk_size=args.chunk_size, bf16=args.bf16)
    if args.task == "caption-retrieval":  # text only, any text tower
        tower = load_text_tower(args.model, device=device)
        return evaluate_caption_retrieval(tower, dataset, caption_columns, args.batch_size, args.bf16)
    processor = ProCLIPProcessor.from_pretrained(args.model)
    model = ProCLIPModel.from_pretrained(args.model).to(device).eval()
    if args.task == "retrieval":
        return evaluate_retrieval(model, processor, dataset, args.image_column, caption_columns, **common)
    templates = load_templates(args.templates) if args.templates else OPENAI_IMAGENET_TEMPLATES
    return evaluate_zeroshot(model, processor, dataset, args.image_column, args.label_column, templates, **common)


def _write_results(args: argparse.Namespace, outcome: dict, split: str, num_rows: int | None, device) -> dict:
    model_path = Path(args.model)
    local_data = os.path.exists(args.data) or DataSpec.parse(args.data).kind == "files"
    results = {
        "task": args.task,
        "model": str(model_path.resolve()) if model_path.exists() else args.model,
        "data": {
            "spec": os.path.abspath(args.data) if local_data else args.data,
            "split": split,
            "num_rows": num_rows,
            **outcome["data"],  # with num_rows_evaluated: the rows scored, after the skipped ones
        },
        "protocol": outcome["protocol"],
        "metrics": outcome["metrics"],
        "settings": {"device": str(device), "bf16": args.bf16, "batch_size": args.batch_size, "chunk_size": args.chunk_size},
        "command": shlex.join(sys.argv),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {package: _version(package) for package in ("proclip", "torch", "transformers", "datasets")},
    }
    text = json.dumps(results, indent=2, ensure_ascii=False)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        _print_summary(results)
        print(f"results written to {args.out}")
    else:
        print(text)
    return results


def _print_summary(results: dict) -> None:
    metrics = results["metrics"]
    groups = metrics.items() if results["task"] == "retrieval" else [(results["task"], metrics)]
    for name, values in groups:
        scores = ", ".join(f"{key} {value:.4f}" for key, value in values.items() if isinstance(value, float))
        print(f"{name}: {scores}")


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip eval` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot classification or image-text retrieval of a saved ProCLIP model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a saved ProCLIP folder (model and processor); caption-retrieval: "
                        "any text tower (an LLM or encoder folder, a stage-0 output, a ProCLIP or a CLIP folder)")
    parser.add_argument("--task", required=True, choices=("zeroshot", "retrieval", "caption-retrieval"))
    parser.add_argument("--data", required=True, metavar="SPEC", help="what `proclip train --data` reads: a folder, a "
                        "file or glob (.csv/.jsonl/.json/.parquet/.arrow, webdataset .tar), or a Hub name[:config]")
    parser.add_argument("--split", help="dataset split (default: the only split, else 'test')")
    parser.add_argument("--streaming", action="store_true",
                        help="read the split as a stream, only as far as --max-samples rows (all without it)")
    parser.add_argument("--image-column", default=DEFAULT_IMAGE_COLUMN)
    add_image_source_arguments(parser)
    add_caption_column_argument(
        parser, "retrieval: a column of captions (a string or a list of strings per row); several are scored (e.g. "
        "short, long, per language) against the same image embeddings. caption-retrieval: two columns (the first's "
        "caption queries among the second's), or one list column.",
    )
    parser.add_argument("--label-column", default=DEFAULT_LABEL_COLUMN,
                        help="zeroshot: a ClassLabel column or a column of class names")
    parser.add_argument("--templates", type=Path, help="zeroshot: a file with one template per line, '{}' for the class name "
                        "(default: OpenAI's 80 ImageNet templates)")
    parser.add_argument("--out", type=Path, help="results JSON (default: print it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="queries scored at once; similarities held: chunk size x gallery size")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the towers")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N rows (quick checks)")
    parser.set_defaults(func=run_eval)
    return parser
