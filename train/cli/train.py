"""`proclip train` and `proclip embed`: run one curriculum stage, or fill the embedding cache.

    proclip embed --model DIR --data SPEC [--caption-column C ...] [--cache-dir DIR] [--bf16]
    proclip train --stage 1|2 --model DIR --data SPEC --out DIR [--teacher ID_OR_DIR] [--config FILE]
                  [any TrainingArguments flag, e.g. --per_device_train_batch_size 256 --bf16 --max_steps 1000]
    proclip train --stage 0 --text LLM --data SPEC --caption-column A --caption-column B --out DIR [...]
                  (LLM2CLIP's caption-contrastive fine-tuning of the LLM, before `proclip init`: see stage0.py)

`proclip train` parses a `ProCLIPArguments` dataclass together with transformers' `TrainingArguments`
(`HfArgumentParser`), so every Trainer flag works; `--config` reads the same flags from a YAML or JSON file, and flags
given on the command line win. The output folder is Hub-ready: `model.save_pretrained` + `processor.save_pretrained`,
with the remote code, plus `training_report.json`. It runs as is under `torchrun` and `accelerate launch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

TRAIN_DESCRIPTION = (
    "Train one ProCLIP stage: 1 = representation inheritance (text only), 2 = contrastive tuning. "
    "Stage 0 (`--stage 0 --text LLM`, options: `proclip train --stage 0 --help`) fine-tunes the LLM on caption pairs."
)
EMBED_DESCRIPTION = "Store the frozen LLM's pooled caption embeddings (and the stage-1 teacher's) for training."

# Recipe defaults for `proclip train` where they differ from TrainingArguments' (METHOD.md §5); flags override them.
TRAIN_DEFAULTS = {
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float < 1 is a fraction of the training steps
    "max_grad_norm": 5.0,
    "remove_unused_columns": False,
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 1000,
    "logging_steps": 10,
}


@dataclass
class ProCLIPArguments:
    """The ProCLIP options of `proclip train` (the rest are `TrainingArguments`)."""

    stage: str | None = field(
        default=None, metadata={"help": "1 (or inheritance) or 2 (or contrastive).", "choices": ["1", "2", "inheritance", "contrastive"]}
    )
    model: str | None = field(
        default=None, metadata={"help": "ProCLIP folder or Hub id to start from (`proclip init`, or stage 1's output)."}
    )
    data: str | None = field(
        default=None, metadata={"help": "Training data: a folder, a file or glob (csv/jsonl/parquet/arrow/txt/tar), or a Hub dataset name[:config]."}
    )
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of these flags; command-line flags win."})
    teacher: str | None = field(
        default=None, metadata={"help": "Stage 1: the CLIP checkpoint whose text encoder is the teacher (default: the model's vision_name_or_path)."}
    )
    image_column: str = field(default="image", metadata={"help": "Stage 2: the image column."})
    caption_column: list[str] | None = field(
        default=None,
        metadata={"help": "Caption column(s); repeat the flag or list several: one caption is drawn per sample (default: caption).", "action": "extend"},
    )
    noise_caption_column: str | None = field(
        default=None, metadata={"help": "Stage 1: a second caption view per sample that adds its own instance term."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split (slicing such as train[:10000] works)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set --max_steps)."})
    reduction: str = field(default="sum", metadata={"help": "Alignment terms summed (upstream) or averaged per row / pair.", "choices": ["sum", "mean"]})
    structure_form: str = field(
        default="upstream", metadata={"help": "Structure term: smooth-L1 of distances (upstream) or |squared-distance difference| (paper).", "choices": ["upstream", "paper"]}
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Stage 2: lambda, the weight of the self-distillation term.", "aliases": ["--lambda"]})
    ema_momentum: float = field(default=0.999, metadata={"help": "Stage 2: momentum of the EMA image teacher (1.0 = a frozen copy)."})
    embedding_cache: bool = field(default=True, metadata={"help": "Use the embedding cache when one exists (see `proclip embed`)."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Embedding cache folder (default: proclip_embedding_cache/ next to the data)."}
    )


def _normalise_key(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def read_config_file(path: str | os.PathLike) -> dict:
    """Flags from a YAML (`.yaml`/`.yml`) or JSON file: `{flag: value}`, dashes or underscores."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values.")
    return {_normalise_key(k): v for k, v in values.items()}


def build_train_argument_parser(arguments_class=None, defaults=None):
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(
        (arguments_class or ProCLIPArguments, TrainingArguments), prog="proclip train", description=TRAIN_DESCRIPTION
    )
    parser.add_argument("--out", dest="output_dir", help="Where the trained model goes (same as --output_dir).")
    parser.set_defaults(**(TRAIN_DEFAULTS if defaults is None else defaults))
    return parser


def parse_train_args(argv: list[str], arguments_class=None, required=("stage", "model", "data"), defaults=None):
    """`(ProCLIPArguments, TrainingArguments)` from command-line words, with `--config` file values as defaults.

    `arguments_class` / `required` / `defaults` replace `ProCLIPArguments`, its required flags and `TRAIN_DEFAULTS`
    (stage 0 parses its own options this way).
    """
    arguments_class = arguments_class or ProCLIPArguments
    parser = build_train_argument_parser(arguments_class, defaults)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    config = read_config_file(known.config) if known.config else {}
    from transformers import TrainingArguments

    valid = {f.name for f in dataclasses.fields(arguments_class)} | {f.name for f in dataclasses.fields(TrainingArguments)}
    unknown = sorted(set(config) - valid)
    if unknown:
        parser.error(f"unknown option(s) in {known.config}: {', '.join(unknown)}")
    list_values = {k: config.pop(k) for k in list(config) if isinstance(config[k], list)}
    parser.set_defaults(**config)
    options, training_args = parser.parse_args_into_dataclasses(args=argv)
    for key, value in list_values.items():  # a list flag on the command line replaces the file's list
        holder = options if hasattr(options, key) else training_args
        if getattr(holder, key) in (None, []):
            setattr(holder, key, value)
    for name in required:
        if getattr(options, name) is None:
            parser.error(f"--{name} is required (on the command line or in --config)")
    if options.caption_column is None:
        options.caption_column = ["caption"]
    return options, training_args


def run_train(options, training_args):
    """Load the model, data, cache and teacher; train one stage; save the Hub-ready folder. Returns the trainer."""
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    from ..training.cache import EmbeddingCache, default_cache_dir, shard_paths
    from ..training.data import load_training_dataset
    from ..training.trainer import ProCLIPTrainer, stage_name

    stage = stage_name(options.stage)
    if stage == "contrastive" and options.noise_caption_column is not None:
        raise SystemExit("--noise_caption_column is a stage-1 option.")
    processor = ProCLIPProcessor.from_pretrained(options.model)
    model = ProCLIPModel.from_pretrained(options.model)
    dataset = load_training_dataset(
        options.data,
        split=options.split,
        streaming=options.streaming,
        image_column=options.image_column if stage == "contrastive" else None,
        caption_columns=options.caption_column,
        noise_caption_column=options.noise_caption_column,
    )
    cache = None
    if options.embedding_cache:
        folder = Path(options.cache_dir) if options.cache_dir else default_cache_dir(options.data)
        if folder is not None and shard_paths(folder):
            cache = EmbeddingCache(folder)
            print(f"Using the embedding cache {cache}")
        elif options.cache_dir:
            raise SystemExit(f"--cache_dir {options.cache_dir} holds no embedding cache; run `proclip embed` first.")

    trainer = ProCLIPTrainer(
        model,
        training_args,
        stage=stage,
        train_dataset=dataset,
        processing_class=processor,
        caption_columns=options.caption_column,
        image_column=options.image_column,
        noise_caption_column=options.noise_caption_column,
        embedding_cache=cache,
        teacher=options.teacher,
        reduction=options.reduction,
        structure_form=options.structure_form,
        distill_weight=options.distill_weight,
        ema_momentum=options.ema_momentum,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        with open(os.path.join(training_args.output_dir, "proclip_arguments.json"), "w") as f:
            json.dump(dataclasses.asdict(options), f, indent=2)
    return trainer


def train_command(argv: list[str]) -> None:
    from ..training.stage0 import is_stage0_command, stage0_train_command

    if is_stage0_command(argv):
        stage0_train_command(argv)
        return
    options, training_args = parse_train_args(argv)
    run_train(options, training_args)


def add_train_parser(subparsers) -> None:
    """Register `proclip train`; its flags are parsed by `HfArgumentParser` (`proclip train --help` lists them)."""
    parser = subparsers.add_parser(
        "train", help=TRAIN_DESCRIPTION, description=TRAIN_DESCRIPTION, add_help=False, prefix_chars="\0"
    )
    # Every word after `train` goes to HfArgumentParser, which knows the TrainingArguments flags.
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: train_command(args.argv))


# ---------------------------------------------------------------------------------------------------------------------
# proclip embed
# ---------------------------------------------------------------------------------------------------------------------


def iter_captions(dataset, caption_columns, noise_caption_column=None, batch_size: int = 1000):
    """Every caption a collator could draw: non-blank strings of the caption columns (and the noise column)."""
    from ..training.data import iter_row_captions

    columns = list(caption_columns) + ([noise_caption_column] if noise_caption_column else [])
    for captions in iter_row_captions(dataset, columns, batch_size):
        yield from captions


def _distributed_place() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun / accelerate environment (1 process without one)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def embed_command(args) -> None:
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    from ..training.cache import build_embedding_cache, default_cache_dir
    from ..training.data import load_training_dataset
    from ..training.trainer import load_clip_text_teacher

    rank, world_size, local_rank = _distributed_place()
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data)
    if cache_dir is None:
        raise SystemExit("The data is a Hub dataset: give --cache-dir for the embedding cache.")
    processor = ProCLIPProcessor.from_pretrained(args.model)
    model = ProCLIPModel.from_pretrained(args.model).to(device)
    teacher = teacher_tokenizer = None
    if not args.no_teacher:
        from transformers import AutoTokenizer

        teacher_name = args.teacher or model.config.vision_name_or_path
        if teacher_name is None:
            raise SystemExit("The model's config names no CLIP checkpoint: give --teacher, or --no-teacher.")
        teacher = load_clip_text_teacher(teacher_name).to(device)
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_name)
    dataset = load_training_dataset(
        args.data, split=args.split, caption_columns=args.caption_column or ["caption"],
        noise_caption_column=args.noise_caption_column,
    )
    captions = iter_captions(dataset, args.caption_column or ["caption"], args.noise_caption_column)
    path = build_embedding_cache(
        model, processor.tokenizer, captions, cache_dir, teacher=teacher, teacher_tokenizer=teacher_tokenizer,
        batch_size=args.batch_size, dtype=getattr(torch, args.dtype), bf16=args.bf16, rank=rank,
        world_size=world_size, progress=rank == 0,
    )
    print(f"Wrote {path}" if path else f"Every caption is already in {cache_dir}.")


def add_embed_parser(subparsers) -> None:
    """Register `proclip embed`."""
    parser = subparsers.add_parser("embed", help=EMBED_DESCRIPTION, description=EMBED_DESCRIPTION)
    parser.add_argument("--model", required=True, help="ProCLIP folder or Hub id (its frozen LLM embeds the captions).")
    parser.add_argument("--data", required=True, help="The training data, as for `proclip train`.")
    parser.add_argument("--caption-column", action="extend", nargs="+", help="Caption column(s) (default: caption).")
    parser.add_argument("--noise-caption-column", help="Stage 1's second caption view, embedded too.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--cache-dir", help="Cache folder (default: proclip_embedding_cache/ next to the data).")
    parser.add_argument("--teacher", help="Stage-1 teacher CLIP checkpoint (default: the model's vision_name_or_path).")
    parser.add_argument("--no-teacher", action="store_true", help="Store the LLM embeddings only (stage 2 needs no more).")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="Storage dtype.")
    parser.add_argument("--bf16", action="store_true", help="Run the towers under bfloat16 autocast.")
    parser.add_argument("--device", help="Default: this process's GPU under torchrun, else the CPU.")
    parser.set_defaults(func=embed_command)


__all__ = ["ProCLIPArguments", "add_embed_parser", "add_train_parser", "parse_train_args", "run_train"]

