"""`proclip eval`: zero-shot classification and image-text retrieval of a saved ProCLIP model, and caption retrieval
accuracy (CRA, LLM2CLIP's text-only protocol) of any text tower: an LLM, a ProCLIP or a CLIP folder (see stage0.py).

Images are embedded once, each caption column once, through the model's own processor; the metrics are
[`proclip_train.metrics`] (cosine similarity, pessimistic ties, similarities in chunks). Rows whose image
cannot be read, whose captions are all empty, or whose label is missing are skipped and counted in the
results JSON, which also records the model, the data, the protocol and the command line.

Data SPEC: a local folder (loaded as `imagefolder`: class subfolders give a `label` column, a
`metadata.jsonl`/`metadata.csv` gives caption columns), a `.csv`/`.jsonl`/`.json`/`.parquet` file whose
image column holds paths relative to the file, or a Hub dataset `name[:config]`.
"""

import argparse
import datetime
import io
import json
import logging
import shlex
import sys
from importlib import metadata
from pathlib import Path

import datasets
import torch
from PIL import Image
from tqdm.auto import tqdm

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from .metrics import DEFAULT_CHUNK_SIZE, class_embeddings, image_text_retrieval_recall, zeroshot_accuracy
from .templates import OPENAI_IMAGENET_TEMPLATES, load_templates

logger = logging.getLogger(__name__)

RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)
TIE_POLICY = "pessimistic: a wrong item scoring exactly as high as the best correct one is ranked ahead of it"
_FILE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


# -- data --------------------------------------------------------------------------------------------------------


def load_eval_dataset(spec: str, split: str | None = None) -> tuple[datasets.Dataset, str, Path | None]:
    """Load the split to evaluate.

    Args:
        spec: a folder (imagefolder), a .csv/.jsonl/.json/.parquet file, or a Hub dataset `name[:config]`.
        split: the split to use; by default the only one, else `test`.

    Returns:
        `(dataset, split, base_dir)`: `base_dir` is where relative image paths are resolved (the folder, or the
        data file's folder; None for Hub datasets).
    """
    path = Path(spec)
    if path.is_dir():
        loaded, base_dir = datasets.load_dataset("imagefolder", data_dir=str(path)), path
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"{spec}: a data file must be one of {sorted(_FILE_BUILDERS)}")
        loaded, base_dir = datasets.load_dataset(builder, data_files=str(path)), path.parent
    else:
        name, _, config = spec.partition(":")
        loaded, base_dir = datasets.load_dataset(name, config or None), None
    if split is None:
        split = next(iter(loaded)) if len(loaded) == 1 else "test"
    if split not in loaded:
        raise ValueError(f"{spec} has no split {split!r}; it has {sorted(loaded)}. Pick one with --split.")
    return loaded[split], split, base_dir


def _open_image(value, base_dir: Path | None) -> Image.Image:
    """Decode one image cell: an undecoded `Image` feature ({"bytes", "path"}), a path string, or a PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict) and value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    else:
        location = value.get("path") if isinstance(value, dict) else value
        if not isinstance(location, str) or not location:
            raise ValueError(f"no image in cell {value!r}")
        location = Path(location)
        if not location.is_absolute() and base_dir is not None:
            location = base_dir / location
        image = Image.open(location)
    image.load()
    return image.convert("RGB")


def _usable_captions(cell) -> tuple[list[str], int]:
    """The non-empty captions of a cell (a string or a list of strings), and how many empty ones were dropped."""
    captions = [cell] if isinstance(cell, str) or cell is None else list(cell)
    usable = [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]
    return usable, len(captions) - len(usable)


# -- embeddings --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def embed_images(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    dataset: datasets.Dataset,
    image_column: str,
    rows: list[int],
    base_dir: Path | None = None,
    batch_size: int = 64,
    bf16: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Embed the readable images among `rows` of `dataset`.

    Returns:
        `(embeds, kept_rows)`: (N, D) float32 unnormalised embeddings on the model's device, and the dataset
        rows they belong to (`rows` minus unreadable images, in order).
    """
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    cells = dataset.select(rows).select_columns([image_column])
    embeds, kept_rows = [], []
    with tqdm(total=len(rows), desc="images", unit="img") as progress:
        for start, batch in zip(range(0, len(rows), batch_size), cells.iter(batch_size=batch_size)):
            images = []
            for row, cell in zip(rows[start : start + batch_size], batch[image_column]):
                try:
                    images.append(_open_image(cell, base_dir))
                except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                    logger.warning("Skipping row %d: unreadable image (%s)", row, error)
                    continue
                kept_rows.append(row)
            if images:
                pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(model.device)
                with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                    embeds.append(model.get_image_features(pixel_values=pixel_values).pooler_output.float())
            progress.update(len(batch[image_column]))
    if not embeds:
        raise ValueError("no readable image to evaluate")
    return torch.cat(embeds), kept_rows


@torch.inference_mode()
def embed_texts(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    texts: list[str],
    batch_size: int = 64,
    bf16: bool = False,
    desc: str = "texts",
) -> torch.Tensor:
    """Embed `texts`, longest first (similar lengths share a batch, so little padding; memory peaks early).

    Returns:
        (M, D) float32 unnormalised embeddings on the model's device, in the order of `texts`.
    """
    order = sorted(range(len(texts)), key=lambda index: len(texts[index]), reverse=True)
    embeds = torch.empty(len(texts), model.config.projection_dim, device=model.device)
    with tqdm(total=len(texts), desc=desc, unit="text") as progress:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = processor(text=[texts[index] for index in indices], return_tensors="pt").to(model.device)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
                features = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            embeds[torch.tensor(indices, device=model.device)] = features.pooler_output.float()
            progress.update(len(indices))
    return embeds


# -- tasks -------------------------------------------------------------------------------------------------------


def evaluate_retrieval(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    dataset: datasets.Dataset,
    image_column: str,
    caption_columns: list[str],
    base_dir: Path | None = None,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bf16: bool = False,
) -> dict:
    """Image→text and text→image R@1/5/10 for each caption column, against one set of image embeddings.

    A column holding one caption per row is scored 1:1 (long-text protocol); a column holding lists is scored
    with several captions per image (Flickr30k / COCO: an image→text hit is any of its captions in the top K).
    A row takes part only if its image is readable and every column has a non-empty caption for it, so all
    columns are scored on the same images.

    Returns:
        `{"data": {columns, skipped rows, dropped empty captions}, "protocol": ..., "metrics": {column: {...}}}`.
    """
    captions = {column: [_usable_captions(cell) for cell in dataset[column]] for column in caption_columns}
    with_captions = [row for row in range(len(dataset)) if all(captions[column][row][0] for column in caption_columns)]
    image_embeds, rows = embed_images(model, processor, dataset, image_column, with_captions, base_dir, batch_size, bf16)

    protocol = {"similarity": "cosine", "ks": list(RETRIEVAL_KS), "ties": TIE_POLICY, "caption_columns": {}}
    metrics = {}
    for column in caption_columns:
        per_image = [captions[column][row][0] for row in rows]
        texts = [caption for image_captions in per_image for caption in image_captions]
        text_image_ids = torch.arange(len(rows)).repeat_interleave(torch.tensor([len(c) for c in per_image]))
        text_embeds = embed_texts(model, processor, texts, batch_size, bf16, desc=column)
        one_to_one = len(texts) == len(rows)
        protocol["caption_columns"][column] = (
            "1:1" if one_to_one else "several captions per image: an image->text hit is any of its captions in the top K"
        )
        metrics[column] = {
            "num_images": len(rows),
            "num_captions": len(texts),
            **image_text_retrieval_recall(image_embeds, text_embeds, text_image_ids, RETRIEVAL_KS, chunk_size),
        }
    data = {
        "image_column": image_column,
        "caption_columns": caption_columns,
        "skipped_rows": {
            "empty_caption": len(dataset) - len(with_captions),
            "unreadable_image": len(with_captions) - len(rows),
        },
        "dropped_empty_captions": sum(captions[column][row][1] for column in caption_columns for row in rows),
    }
    return {"data": data, "protocol": protocol, "metrics": metrics}


def class_names_and_labels(dataset: datasets.Dataset, label_column: str) -> tuple[list[str], list[int | None]]:
    """Class names and each row's class index (None when missing), from a `ClassLabel` or a string column.

    Names from a string column are sorted. Underscores become spaces ("golden_retriever" → "golden retriever"),
    since folder names are the usual source and prompts read better without them.
    """
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        labels = [label if label is not None and 0 <= label < len(names) else None for label in dataset[label_column]]
    elif isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        values = [value.strip() if isinstance(value, str) else "" for value in dataset[label_column]]
        names = sorted({value for value in values if value})
        index = {name: position for position, name in enumerate(names)}
        labels = [index.get(value) for value in values]
    else:
        raise ValueError(f"--label-column {label_column!r} must be a ClassLabel or a column of class names; it is {feature}")
    return [name.replace("_", " ") for name in names], labels


def evaluate_zeroshot(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    templates: list[str] | tuple[str, ...] = OPENAI_IMAGENET_TEMPLATES,
    base_dir: Path | None = None,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bf16: bool = False,
) -> dict:
    """Zero-shot top-1/top-5 and per-class accuracy with a template ensemble.

    Each class vector is the normalised mean of the normalised embeddings of every template filled with the
    class name; each image is scored against every class by cosine.

    Returns:
        `{"data": {columns, skipped rows}, "protocol": ..., "metrics": {...}}`.
    """
    names, labels = class_names_and_labels(dataset, label_column)
    labelled = [row for row, label in enumerate(labels) if label is not None]
    image_embeds, rows = embed_images(model, processor, dataset, image_column, labelled, base_dir, batch_size, bf16)

    prompts = [template.format(name) for name in names for template in templates]
    prompt_embeds = embed_texts(model, processor, prompts, batch_size, bf16, desc="class prompts")
    classes = class_embeddings(prompt_embeds.reshape(len(names), len(templates), -1))
    result = zeroshot_accuracy(
        image_embeds, classes, torch.tensor([labels[row] for row in rows]), ZEROSHOT_KS, chunk_size
    )
    result["per_class_top1_accuracy"] = dict(zip(names, result["per_class_top1_accuracy"]))
    return {
        "protocol": {
            "similarity": "cosine",
            "ks": list(ZEROSHOT_KS),
            "ties": TIE_POLICY,
            "class_vectors": "normalize(mean over templates of normalize(text embedding))",
            "num_templates": len(templates),
            "class_names": names,
        },
        "metrics": {"num_images": len(rows), "num_classes": len(names), **result},
        "data": {
            "image_column": image_column,
            "label_column": label_column,
            "skipped_rows": {"missing_label": len(dataset) - len(labelled), "unreadable_image": len(labelled) - len(rows)},
        },
    }


# -- command line ------------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run_eval(args: argparse.Namespace) -> dict:
    """Run `proclip eval` from parsed arguments; write and return the results."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset, split, base_dir = load_eval_dataset(args.data, args.split)
    num_rows = len(dataset)
    if args.max_samples is not None:
        dataset = dataset.select(range(min(args.max_samples, len(dataset))))

    common = dict(base_dir=base_dir, batch_size=args.batch_size, chunk_size=args.chunk_size, bf16=args.bf16)
    if args.task == "caption-retrieval":  # text only, any text tower
        from ..training.stage0 import evaluate_caption_retrieval, load_text_tower

        tower = load_text_tower(args.model, device=device)
        outcome = evaluate_caption_retrieval(tower, dataset, args.caption_column or ["caption"], args.batch_size, args.bf16)
        return _write_results(args, outcome, split, num_rows, dataset, device)
    processor = ProCLIPProcessor.from_pretrained(args.model)
    model = ProCLIPModel.from_pretrained(args.model).to(device).eval()
    if args.task == "retrieval":
        outcome = evaluate_retrieval(
            model, processor, dataset, args.image_column, args.caption_column or ["caption"], **common
        )
    else:
        templates = load_templates(args.templates) if args.templates else OPENAI_IMAGENET_TEMPLATES
        outcome = evaluate_zeroshot(model, processor, dataset, args.image_column, args.label_column, templates, **common)
        outcome["protocol"]["templates"] = str(args.templates) if args.templates else "openai_imagenet_80"
    return _write_results(args, outcome, split, num_rows, dataset, device)


def _write_results(args: argparse.Namespace, outcome: dict, split: str, num_rows: int, dataset, device) -> dict:
    model_path = Path(args.model)
    results = {
        "task": args.task,
        "model": str(model_path.resolve()) if model_path.exists() else args.model,
        "data": {
            "spec": str(Path(args.data).resolve()) if Path(args.data).exists() else args.data,
            "split": split,
            "num_rows": num_rows,
            "num_rows_evaluated": len(dataset),
            **outcome["data"],
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
    parser.add_argument("--data", required=True, metavar="SPEC", help="folder, .csv/.jsonl/.json/.parquet file, or name[:config]")
    parser.add_argument("--split", help="dataset split (default: the only split, else 'test')")
    parser.add_argument("--image-column", default="image")
    parser.add_argument(
        "--caption-column", action="append",
        help="retrieval: a column of captions (a string or a list of strings per row); repeat to score several "
        "columns (e.g. short, long, per language) against the same image embeddings (default: caption). "
        "caption-retrieval: two columns (the first's caption queries among the second's), or one list column",
    )
    parser.add_argument("--label-column", default="label", help="zeroshot: a ClassLabel column or a column of class names")
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
