"""`proclip train`: run one curriculum stage.

    proclip train --stage 1|2 --model DIR --data SPEC --out DIR [--teacher ID_OR_DIR] [--config FILE]
                  [any TrainingArguments flag, e.g. --per_device_train_batch_size 256 --bf16 --max_steps 1000]
    proclip train --stage 0 --text LLM --data SPEC --caption-column A --caption-column B --out DIR [...]
                  (LLM2CLIP's caption-contrastive fine-tuning of the LLM, before `proclip init`: training/stage0.py)

`--resume_from_checkpoint` without a value resumes from the latest checkpoint in `--out`. A run whose loss turns NaN
(without `--skip_nonfinite_steps`), that trained on no sample, or whose weights are not finite exits with code 1 and
one message, and saves nothing.

`proclip train` parses `ProCLIPTrainingArguments` (every stage option beside transformers' `TrainingArguments`) with
`HfArgumentParser`, so every Trainer flag works; `--config` reads the same flags from a YAML or JSON file, and flags
given on the command line win. The output folder is Hub-ready: `model.save_pretrained` + `processor.save_pretrained`,
with the remote code, plus `training_report.json` and `training_args.json`. It runs as is under `torchrun` and
`accelerate launch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import yaml
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ..training.arguments import ProCLIPTrainingArguments
from ..training.cache import EmbeddingCache, default_cache_dir, shard_paths
from ..training.checkpoints import CheckpointMismatchError, NonFiniteWeightsError
from ..training.data import load_image_text_dataset
from ..training.stage0 import train_stage0
from ..training.trainer import NonFiniteLossError, NoSamplesTrainedError, ProCLIPTrainer

TRAIN_DESCRIPTION = (
    "Train one ProCLIP stage: 0 = caption-contrastive fine-tuning of the LLM (LLM2CLIP, optional), 1 = representation "
    "inheritance (text only), 2 = contrastive tuning with self-distillation."
)
# What each stage cannot run without (on the command line or in --config).
REQUIRED_OPTIONS = {"caption-contrastive": ("text", "data", "output_dir"), "inheritance": ("model", "data", "output_dir"),
                    "contrastive": ("model", "data", "output_dir")}


def _normalise_key(key: str) -> str:
    return key.lstrip("-").replace("-", "_")


def read_config_file(path: str | os.PathLike) -> dict:
    """Flags from a YAML (`.yaml`/`.yml`) or JSON file: `{flag: value}`, dashes or underscores (`out` = output_dir)."""
    path = Path(path)
    text = path.read_text()
    values = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values.")
    values = {_normalise_key(k): v for k, v in values.items()}
    if "out" in values:
        values["output_dir"] = values.pop("out")
    return values


def build_train_argument_parser() -> HfArgumentParser:
    return HfArgumentParser(ProCLIPTrainingArguments, prog="proclip train", description=TRAIN_DESCRIPTION)


def parse_train_args(argv: list[str]) -> ProCLIPTrainingArguments:
    """`ProCLIPTrainingArguments` from command-line words, with `--config` file values as defaults."""
    parser = build_train_argument_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    config = read_config_file(known.config) if known.config else {}
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(ProCLIPTrainingArguments)})
    if unknown:
        parser.error(f"unknown option(s) in {known.config}: {', '.join(unknown)}")
    list_values = {k: config.pop(k) for k in list(config) if isinstance(config[k], list)}
    parser.set_defaults(**config)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    changes = {key: value for key, value in list_values.items() if getattr(args, key) in (None, [])}
    if changes:  # a list flag on the command line replaces the file's list
        args = dataclasses.replace(args, **changes)
    if args.stage is None:
        parser.error("--stage is required (0, 1 or 2; on the command line or in --config)")
    missing = [name for name in REQUIRED_OPTIONS[args.stage] if getattr(args, name) is None]
    if missing:
        flags = ", ".join("--out" if name == "output_dir" else f"--{name}" for name in missing)
        parser.error(f"stage {args.stage} needs {flags} (on the command line or in --config)")
    return args


def checkpoint_to_resume(args: ProCLIPTrainingArguments) -> str | None:
    """The folder `--resume_from_checkpoint` names: a path as given, or for `True` (the flag without a value) the
    latest `checkpoint-*` folder in `--output_dir`, as transformers' example scripts resolve it. Exits with code 2 and
    one line when there is none."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() == "false":
        return None
    if str(value).lower() != "true":
        if not os.path.isdir(value):
            _fail(f"--resume_from_checkpoint {value}: no such folder; name a checkpoint-* folder of an earlier run.")
        return str(value)
    latest = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if latest is None:
        _fail(f"--resume_from_checkpoint: no checkpoint-* folder in {args.output_dir} to resume from; start without "
              "the flag, or name a checkpoint folder.")
    return latest


def _fail(message: str, code: int = 2) -> None:
    print(f"proclip train: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def embedding_cache_for(args: ProCLIPTrainingArguments) -> EmbeddingCache | None:
    """The embedding cache to train with: `--cache_dir`, else the default folder next to the data when it has shards."""
    if not args.embedding_cache:
        return None
    folder = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data)
    if folder is not None and shard_paths(folder):
        try:
            cache = EmbeddingCache(folder)
        except ValueError as error:  # a damaged shard, or one of another format or model: the message says what to do
            print(f"proclip train: error: {error}", file=sys.stderr)
            raise SystemExit(2) from error
        print(f"Using the embedding cache {cache}")
        return cache
    if args.cache_dir:
        raise SystemExit(f"--cache_dir {args.cache_dir} holds no embedding cache; run `proclip embed` first.")
    return None


def run_train(args: ProCLIPTrainingArguments) -> ProCLIPTrainer:
    """Load the model, data, cache and teacher; train stage 1 or 2; save the Hub-ready folder. Returns the trainer."""
    processor = ProCLIPProcessor.from_pretrained(args.model)
    model = ProCLIPModel.from_pretrained(args.model)
    dataset = load_image_text_dataset(
        args.data,
        split=args.split,
        streaming=args.streaming,
        image_column=args.image_column if args.stage == "contrastive" else None,
        caption_columns=args.caption_columns,
        noise_caption_column=args.noise_caption_column,
        allow_paths_outside_data=args.allow_paths_outside_data,
    )
    trainer = ProCLIPTrainer(
        model, args, train_dataset=dataset, processing_class=processor, embedding_cache=embedding_cache_for(args)
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


def train_command(argv: list[str]) -> None:
    args = parse_train_args(argv)
    args = dataclasses.replace(args, resume_from_checkpoint=checkpoint_to_resume(args))
    try:
        if args.stage == "caption-contrastive":
            train_stage0(args)
        else:
            run_train(args)
    except CheckpointMismatchError as error:  # the wrong --model or stage for this checkpoint: the user's to fix
        _fail(str(error))
    except (NonFiniteLossError, NonFiniteWeightsError, NoSamplesTrainedError) as error:  # a failed run, explained
        _fail(str(error), code=1)


def add_train_parser(subparsers) -> None:
    """Register `proclip train`; its flags are parsed by `HfArgumentParser` (`proclip train --help` lists them)."""
    parser = subparsers.add_parser(
        "train", help=TRAIN_DESCRIPTION, description=TRAIN_DESCRIPTION, add_help=False, prefix_chars="\0"
    )
    # Every word after `train` goes to HfArgumentParser, which knows the TrainingArguments flags.
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: train_command(args.argv))


__all__ = ["add_train_parser", "parse_train_args", "run_train"]
