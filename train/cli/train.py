"""`proclip train`: run one curriculum stage.

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
from collections.abc import Sequence
from pathlib import Path

import yaml
from transformers import HfArgumentParser, TrainingArguments

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ..training.arguments import (
    STAGE0_NAMES,
    TRAIN_DEFAULTS,
    ProCLIPArguments,
    Stage0Arguments,
    stage0_training_defaults,
)
from ..training.cache import EmbeddingCache, default_cache_dir, shard_paths
from ..training.data import load_training_dataset
from ..training.stage0 import train_stage0
from ..training.stages import stage_name
from ..training.trainer import ProCLIPTrainer

TRAIN_DESCRIPTION = (
    "Train one ProCLIP stage: 1 = representation inheritance (text only), 2 = contrastive tuning. "
    "Stage 0 (`--stage 0 --text LLM`, options: `proclip train --stage 0 --help`) fine-tunes the LLM on caption pairs."
)

def _normalise_key(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def read_config_file(path: str | os.PathLike) -> dict:
    """Flags from a YAML (`.yaml`/`.yml`) or JSON file: `{flag: value}`, dashes or underscores."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values.")
    return {_normalise_key(k): v for k, v in values.items()}


def build_train_argument_parser(arguments_class=None, defaults=None):
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
# `proclip train --stage 0 ...`: LLM2CLIP's caption-contrastive fine-tuning of the LLM (training/stage0.py)
# ---------------------------------------------------------------------------------------------------------------------


def is_stage0_command(argv: Sequence[str]) -> bool:
    """Whether `proclip train` words ask for stage 0 (`--stage 0`, here or in the `--config` file)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    stage = known.stage
    if stage is None and known.config:
        stage = read_config_file(known.config).get("stage")
    return str(stage) in STAGE0_NAMES


def stage0_train_command(argv: Sequence[str]) -> Path:
    """`proclip train --stage 0 --text LLM --data SPEC --caption-column A --caption-column B --out DIR [...]`."""
    options, training_args = parse_train_args(
        list(argv), Stage0Arguments, required=("text", "data"), defaults=stage0_training_defaults()
    )
    return train_stage0(options, training_args)


__all__ = ["add_train_parser", "parse_train_args", "run_train"]

