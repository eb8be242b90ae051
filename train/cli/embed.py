"""`proclip embed`: store the frozen LLM's pooled caption embeddings (and the stage-1 teacher's) for training.

    proclip embed --model DIR --data SPEC [--caption-column C ...] [--cache-dir DIR] [--bf16]

Under `torchrun` every rank embeds its share of the captions into a shard of its own.
"""

from __future__ import annotations

import argparse
import errno
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ..training.cache import build_embedding_cache, default_cache_dir
from ..training.captions import iter_captions
from ..training.data import load_image_text_dataset
from ..training.registry import DEFAULT_CAPTION_COLUMN
from ..training.stages import load_clip_text_teacher
from .errors import UsageError
from .flags import add_caption_column_argument, progress_bars_enabled

EMBED_DESCRIPTION = "Store the frozen LLM's pooled caption embeddings (and the stage-1 teacher's) for training."


def _distributed_place() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun / accelerate environment (1 process without one)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def embed_command(args) -> None:
    """`proclip embed`; a damaged or stale cache, NaN embeddings, bad data or a full disk exit 2 with one message."""
    try:
        _embed(args)
    except (ValueError, FileNotFoundError) as error:  # CorruptShardError, StaleCacheError, NonFiniteEmbeddingError,
        raise UsageError(str(error)) from error  # and the data's: a missing column or split, an empty file
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise UsageError(str(error), "Free some space, or give --cache-dir on another disk.") from error


def _embed(args) -> None:
    rank, world_size, local_rank = _distributed_place()
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data)
    if cache_dir is None:
        raise UsageError("The data is a Hub dataset: the embedding cache needs a folder.", "Give one with --cache-dir.")
    caption_columns = args.caption_column or [DEFAULT_CAPTION_COLUMN]
    try:  # before any tower loads
        dataset = load_image_text_dataset(args.data, split=args.split, caption_columns=caption_columns,
                                          noise_caption_column=args.noise_caption_column)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    processor = ProCLIPProcessor.from_pretrained(args.model)
    model = ProCLIPModel.from_pretrained(args.model).to(device)
    teacher = teacher_tokenizer = None
    if not args.no_teacher:
        teacher_name = args.teacher or model.config.vision_name_or_path
        if teacher_name is None:
            raise UsageError("The model's config names no CLIP checkpoint to take the stage-1 teacher from.",
                             "Give one with --teacher, or store the LLM embeddings alone with --no-teacher.")
        teacher = load_clip_text_teacher(teacher_name).to(device)
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name)
    captions = iter_captions(dataset, caption_columns, args.noise_caption_column)
    path = build_embedding_cache(
        model, processor.tokenizer, captions, cache_dir, teacher=teacher, teacher_tokenizer=teacher_tokenizer,
        batch_size=args.batch_size, dtype=getattr(torch, args.dtype), bf16=args.bf16, rank=rank,
        world_size=world_size, progress=rank == 0 and progress_bars_enabled(),
    )
    print(f"Wrote {path}" if path else f"Every caption is already in {cache_dir}.")


def add_embed_parser(subparsers) -> None:
    """Register `proclip embed`."""
    parser = subparsers.add_parser("embed", help=EMBED_DESCRIPTION, description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ProCLIP folder or Hub id (its frozen LLM embeds the captions).")
    parser.add_argument("--data", required=True, help="The training data, as for `proclip train`.")
    add_caption_column_argument(parser, "A caption column to embed.")
    parser.add_argument("--noise-caption-column", help="Stage 1's second caption view, embedded too.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--cache-dir", help="cache folder (default: proclip_embedding_cache/ inside a data folder, or in "
                        "the folder of a data file: --data pairs/ -> pairs/proclip_embedding_cache/, --data "
                        "dir/captions.jsonl -> dir/proclip_embedding_cache/); `proclip train` looks there too")
    parser.add_argument("--teacher", help="Stage-1 teacher CLIP checkpoint (default: the model's vision_name_or_path).")
    parser.add_argument("--no-teacher", action="store_true", help="Store the LLM embeddings only (stage 2 needs no more).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="Storage dtype.")
    parser.add_argument("--bf16", action="store_true", help="Run the towers under bfloat16 autocast.")
    parser.add_argument("--device", help="Default: this process's GPU under torchrun, else the CPU.")
    parser.set_defaults(func=embed_command)
