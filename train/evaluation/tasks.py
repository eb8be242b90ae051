"""Evaluation tasks: zero-shot classification and image-text retrieval of a ProCLIP model, and caption retrieval
accuracy (CRA, LLM2CLIP's text-only protocol) of any text tower.

Data loads through training's loader (`training.data.load_image_text_dataset`) and images decode through training's
decoder (`decode_image`): `proclip eval --data` reads whatever `proclip train --data` reads. Images are embedded once,
each caption column once, through the model's own processor; the metrics are `metrics.py` (cosine similarity,
pessimistic ties, similarities in chunks). Rows whose image cannot be read, whose captions are all empty, or whose
label is missing are skipped and counted in the returned record; its `num_rows_evaluated` counts the rows scored.
"""

import logging
import os
from collections.abc import Sequence

import datasets
import torch

from modeling_proclip import (
    ProCLIPModel,
    ProCLIPProcessor,
    UnreadableImage,
    embed_images,
    embed_texts,
    image_embedder,
    text_embedder,
)

from ..training.captions import iter_row_captions
from ..training.data import load_image_text_dataset, split_names
from ..training.finite import require_finite_embeddings
from ..training.images import decode_image
from ..training.skips import TOO_FEW_CAPTIONS
from .metrics import (
    DEFAULT_CHUNK_SIZE,
    caption_retrieval_accuracy,
    class_embeddings,
    image_text_retrieval_recall,
    zeroshot_accuracy,
)
from .templates import OPENAI_IMAGENET_TEMPLATES
from .text_towers import TextTower, load_text_tower

logger = logging.getLogger(__name__)


class EvaluationDataError(ValueError):
    """Data that leaves nothing to score (no readable image, no class names); the message says why and what to do."""


RETRIEVAL_KS = (1, 5, 10)
ZEROSHOT_KS = (1, 5)
TIE_POLICY = "pessimistic: a wrong item scoring exactly as high as the best correct one is ranked ahead of it"


# -- data --------------------------------------------------------------------------------------------------------


def default_split(spec: str | os.PathLike) -> str:
    """The split evaluation reads when none is named: the only one, else `test`."""
    names = split_names(spec)
    return names[0] if len(names) == 1 else "test"


def load_eval_dataset(
    spec: str | os.PathLike,
    split: str | None = None,
    streaming: bool = False,
    max_samples: int | None = None,
    image_column: str | None = None,
    caption_columns: Sequence[str] = (),
    label_column: str | None = None,
    allow_paths_outside_data: bool = False,
    allow_remote_images: bool = False,
) -> tuple[datasets.Dataset, str, int | None]:
    """Load the rows to evaluate, through the loader training uses (`load_image_text_dataset`): any spec
    `proclip train --data` reads, images left undecoded, relative image paths resolved against their data file.

    Args:
        spec: a folder (imagefolder or data files), a file or glob (csv / jsonl / json / parquet / arrow / webdataset
            `.tar` shards), or a Hub dataset `name[:config]`.
        split: the split to use; by default the only one, else `test`.
        streaming: read the split as a stream and keep its first `max_samples` rows (all of them without it) in
            memory: a slice of a Hub dataset without downloading the rest.
        max_samples: evaluate only the first N rows.
        image_column, caption_columns, label_column: columns that must exist (the error lists the available ones).
        allow_paths_outside_data, allow_remote_images: keep rows whose image path leaves the data folder, or is a URL
            (`load_image_text_dataset`).

    Returns:
        `(dataset, split, num_rows)`: the rows to evaluate, the split's name, and how many rows the split holds
        (`None` when streaming: unknown without reading it all).
    """
    split = split or default_split(spec)
    dataset = load_image_text_dataset(
        spec, split=split, streaming=streaming, image_column=image_column, caption_columns=caption_columns,
        label_column=label_column, allow_paths_outside_data=allow_paths_outside_data,
        allow_remote_images=allow_remote_images,
    )
    if streaming:
        rows = dataset if max_samples is None else dataset.take(max_samples)
        return datasets.Dataset.from_list(list(rows), features=dataset.features), split, None
    num_rows = len(dataset)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, num_rows)))
    return dataset, split, num_rows


def _usable_captions(cell) -> tuple[list[str], int]:
    """The non-empty captions of a cell (a string or a list of strings), and how many empty ones were dropped."""
    captions = [cell] if isinstance(cell, str) or cell is None else list(cell)
    usable = [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]
    return usable, len(captions) - len(usable)


# -- embeddings --------------------------------------------------------------------------------------------------


def embed_image_rows(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    dataset: datasets.Dataset,
    image_column: str,
    rows: list[int],
    batch_size: int = 64,
    bf16: bool = False,
) -> tuple[torch.Tensor, list[int]]:
    """Embed the readable images among `rows` of `dataset` through the embedding service (`embed_images`), each
    decoded by training's `decode_image`; an unreadable one skips its row (logged), never the whole run.

    Returns:
        `(embeds, kept_rows)`: (N, D) float32 unnormalised embeddings on the model's device, and the dataset
        rows they belong to (`rows` minus unreadable images, in order).
    """
    feature = dataset.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:  # decode row by row, so one bad file skips one row
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    cells = dataset.select(rows).select_columns([image_column])
    try:
        embedded = embed_images(
            range(len(rows)), processor.image_processor, image_embedder(model), batch_size=batch_size,
            read=lambda index: decode_image(cells[index][image_column]), skip_unreadable=True, device=model.device,
            bf16=bf16, progress=True,
        )
    except UnreadableImage as error:  # every one of them
        raise EvaluationDataError(
            f"None of the {len(rows)} images to evaluate could be read ({error}).\n"
            "Check the image column and that the files it names exist and are images."
        ) from error
    for index, why in embedded.unreadable.items():
        logger.warning("Skipping row %d: unreadable image (%s)", rows[index], why)
    kept_rows = [rows[index] for index in embedded.kept]
    require_finite_embeddings(embedded.embeds, "The image embeddings", rows=kept_rows)
    return embedded.embeds, kept_rows


def embed_joint_texts(
    model: ProCLIPModel, processor: ProCLIPProcessor, texts: list[str], batch_size: int = 64, bf16: bool = False
) -> torch.Tensor:
    """The model's joint-space text embeddings (`get_text_features`) of `texts` through the embedding service.

    Returns:
        (M, D) float32 unnormalised embeddings on the model's device, in the order of `texts`.
    """
    embeds = embed_texts(texts, processor.tokenizer, text_embedder(model), batch_size=batch_size, device=model.device,
                         bf16=bf16, progress=True)
    require_finite_embeddings(embeds, "The text embeddings")
    return embeds


# -- tasks -------------------------------------------------------------------------------------------------------


def evaluate_retrieval(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    dataset: datasets.Dataset,
    image_column: str,
    caption_columns: list[str],
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
        `{"data": {rows scored, columns, skipped rows, dropped empty captions}, "protocol": ..., "metrics":
        {column: {...}}}`.
    """
    captions = {column: [_usable_captions(cell) for cell in dataset[column]] for column in caption_columns}
    with_captions = [row for row in range(len(dataset)) if all(captions[column][row][0] for column in caption_columns)]
    image_embeds, rows = embed_image_rows(model, processor, dataset, image_column, with_captions, batch_size, bf16)

    protocol = {"similarity": "cosine", "ks": list(RETRIEVAL_KS), "ties": TIE_POLICY, "caption_columns": {}}
    metrics = {}
    for column in caption_columns:
        per_image = [captions[column][row][0] for row in rows]
        texts = [caption for image_captions in per_image for caption in image_captions]
        text_image_ids = torch.arange(len(rows)).repeat_interleave(torch.tensor([len(c) for c in per_image]))
        text_embeds = embed_joint_texts(model, processor, texts, batch_size, bf16)
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
        "num_rows_evaluated": len(rows),
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
    elif all(value is None for value in dataset[label_column]):
        raise EvaluationDataError(f"--label-column {label_column!r} is empty: none of its {len(dataset)} rows has a "
                                  "class name.\nFill it with class names, or name another column with --label-column.")
    else:
        kind = getattr(feature, "dtype", feature)
        raise EvaluationDataError(f"--label-column {label_column!r} holds {kind} values, not class names.\n"
                                  "Give a column of class names (strings) or a ClassLabel column.")
    return [name.replace("_", " ") for name in names], labels


def evaluate_zeroshot(
    model: ProCLIPModel,
    processor: ProCLIPProcessor,
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    templates: list[str] | tuple[str, ...] = OPENAI_IMAGENET_TEMPLATES,
    batch_size: int = 64,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bf16: bool = False,
) -> dict:
    """Zero-shot top-1/top-5 and per-class accuracy with a template ensemble.

    Each class vector is the normalised mean of the normalised embeddings of every template filled with the
    class name; each image is scored against every class by cosine.

    Returns:
        `{"data": {rows scored, columns, skipped rows}, "protocol": ..., "metrics": {...}}`.
    """
    names, labels = class_names_and_labels(dataset, label_column)
    if len(names) == 1:
        logger.warning("Zero-shot with one class (%r): every image is assigned to it, so top-1 accuracy is 1.0 by "
                       "construction and measures nothing. Give --label-column two classes or more.", names[0])
    labelled = [row for row, label in enumerate(labels) if label is not None]
    image_embeds, rows = embed_image_rows(model, processor, dataset, image_column, labelled, batch_size, bf16)

    prompts = [template.format(name) for name in names for template in templates]
    prompt_embeds = embed_joint_texts(model, processor, prompts, batch_size, bf16)
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
            # The set's name when it is OpenAI's; else the templates themselves (a card shows what was used).
            "templates": "openai_imagenet_80" if tuple(templates) == OPENAI_IMAGENET_TEMPLATES else list(templates),
            "class_names": names,
        },
        "metrics": {"num_images": len(rows), "num_classes": len(names), **result},
        "data": {
            "num_rows_evaluated": len(rows),
            "image_column": image_column,
            "label_column": label_column,
            "skipped_rows": {"missing_label": len(dataset) - len(labelled), "unreadable_image": len(labelled) - len(rows)},
        },
    }


# -- caption retrieval accuracy (LLM2CLIP's text-only protocol) -----------------------------------------------


def text_tower_caption_retrieval_accuracy(
    text_tower: TextTower | str | os.PathLike,
    captions_a: Sequence[str],
    captions_b: Sequence[str],
    batch_size: int = 64,
    bf16: bool = False,
    **tower_options,
) -> float:
    """CRA of a text tower: each `captions_a[i]` queries among all of `captions_b`; top-1 accuracy (ties count against
    the query). The two lists hold two captions of the same N images, in the same order.

    Args:
        text_tower: a loaded `TextTower`, or anything `load_text_tower` reads (then `tower_options` go to it:
            `device`, `pooling`, `bidirectional`, ...).
    """
    if len(captions_a) != len(captions_b):
        raise ValueError(f"captions_a has {len(captions_a)} captions but captions_b has {len(captions_b)}")
    tower = text_tower if isinstance(text_tower, TextTower) else load_text_tower(text_tower, **tower_options)
    embeds = tower.embed(list(captions_a) + list(captions_b), batch_size, bf16)
    # Caption k of image i: both lists list the images in order, so each image's first caption is its `captions_a`.
    return caption_retrieval_accuracy(embeds, torch.arange(len(captions_a)).repeat(2))


def caption_pairs(dataset, caption_columns: Sequence[str]) -> tuple[list[str], list[str], int]:
    """The first two non-blank captions of each row, read across `caption_columns` in order (a list-valued column
    counts each of its strings): `(first captions, second captions, rows without two)`."""
    first, second, skipped = [], [], 0
    for captions in iter_row_captions(dataset, caption_columns):
        if len(captions) < 2:
            skipped += 1
            continue
        first.append(captions[0])
        second.append(captions[1])
    return first, second, skipped


def evaluate_caption_retrieval(
    tower: TextTower, dataset, caption_columns: Sequence[str], batch_size: int = 64, bf16: bool = False
) -> dict:
    """`proclip eval --task caption-retrieval`: CRA of one text tower on a dataset's caption pairs.

    With two caption columns, each row's caption in the first queries among all rows' captions in the second; with
    one list-valued column, the first two captions of each row. Rows without two non-blank captions are skipped.

    Returns:
        `{"data": {...}, "protocol": {...}, "metrics": {"num_images", "caption_retrieval_accuracy"}}`.
    """
    first, second, skipped = caption_pairs(dataset, caption_columns)
    if not first:
        raise ValueError(f"no row has two non-blank captions in {list(caption_columns)}")
    accuracy = text_tower_caption_retrieval_accuracy(tower, first, second, batch_size, bf16)
    return {
        "data": {
            "num_rows_evaluated": len(first), "caption_columns": list(caption_columns),
            "skipped_rows": {TOO_FEW_CAPTIONS: skipped},
        },
        "protocol": {
            "query": "each image's first caption", "gallery": "every image's second caption", "top_k": 1,
            "similarity": "cosine", "ties": TIE_POLICY, "text_tower": {"kind": tower.kind, **tower.settings},
        },
        "metrics": {"num_images": len(first), "caption_retrieval_accuracy": accuracy},
    }
