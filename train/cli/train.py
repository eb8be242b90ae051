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
given on the command line win; `--help` lists ProCLIP's own options first, then TrainingArguments'. The output
folder is Hub-ready: `model.save_pretrained` + `processor.save_pretrained`, with the remote code, plus
`training_report.json` and `training_args.json`. It runs as is under `torchrun` and `accelerate launch`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import typing
from pathlib import Path

import torch.distributed as dist
from transformers import HfArgumentParser, TrainingArguments

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ..hub.build.init import has_untrained_adapter
from ..training.arguments import ProCLIPTrainingArguments
from ..training.cache import (
    DEFAULT_CACHE_FOLDER,
    EmbeddingCache,
    default_cache_dir,
    shard_paths,
)
from ..training.checkpoints import (
    CheckpointMismatchError,
    incomplete_reason,
    latest_complete_checkpoint,
)
from ..training.data import load_image_text_dataset
from ..training.finite import NonFiniteWeightsError
from ..training.packaged_towers import resolve_text_tower
from ..training.stage0 import train_stage0
from ..training.trainer import NonFiniteLossError, NoSamplesTrainedError, ProCLIPTrainer
from .errors import UsageError
from .flags import read_config_file

TRAIN_DESCRIPTION = (
    "Train one ProCLIP stage: 0 = caption-contrastive fine-tuning of the LLM (LLM2CLIP, optional), 1 = representation "
    "inheritance (text only), 2 = contrastive tuning with self-distillation."
)
# What each stage cannot run without (on the command line or in --config).
REQUIRED_OPTIONS = {"caption-contrastive": ("text", "data", "output_dir"), "inheritance": ("model", "data", "output_dir"),
                    "contrastive": ("model", "data", "output_dir")}


class TrainArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose `--help` shows the ProCLIP options (the `ProCLIPTrainingArguments` fields that
    `TrainingArguments` does not have) in a group of their own, before transformers' 600 lines."""

    def _add_dataclass_arguments(self, dtype):
        inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
        groups = {
            True: self.add_argument_group("ProCLIP options", "The curriculum, its data and its losses "
                                          "(training/arguments.py). Dashes or underscores alike."),
            False: self.add_argument_group("TrainingArguments options", "transformers' Trainer flags, with the "
                                           "recipe's defaults where ProCLIP changes them."),
        }
        type_hints = typing.get_type_hints(dtype)
        for field in dataclasses.fields(dtype):
            if field.init:
                field.type = type_hints[field.name]
                self._parse_dataclass_field(groups[field.name not in inherited], field)


TRAIN_USAGE = """proclip train --stage 1|2 --model DIR --data SPEC --out DIR [options]
       proclip train --stage 0 --text LLM --data SPEC --caption-column A --caption-column B --out DIR [options]
       proclip train --config run.yaml [options]"""


def build_train_argument_parser() -> HfArgumentParser:
    return TrainArgumentParser(ProCLIPTrainingArguments, prog="proclip train", usage=TRAIN_USAGE,
                               description=TRAIN_DESCRIPTION)


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
    try:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:  # `ProCLIPTrainingArguments.__post_init__` and TrainingArguments' own refusals
        parser.error(str(error))
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
    """The folder `--resume_from_checkpoint` names: a path as given (refused when incomplete), or for `True` (the flag
    without a value) the newest complete `checkpoint-*` folder in `--output_dir`, saying which and what it passed."""
    value = args.resume_from_checkpoint
    if value is None or str(value).lower() == "false":
        return None
    if str(value).lower() != "true":
        if not os.path.isdir(value):
            raise UsageError(f"--resume_from_checkpoint {value}: no such folder.",
                             "Name a checkpoint-* folder of an earlier run.")
        if (reason := incomplete_reason(value)) is not None:
            raise UsageError(f"--resume_from_checkpoint {value}: {reason}.",
                             "Name an earlier checkpoint, or give the flag alone to take the newest complete one.")
        return str(value)
    latest, passed = latest_complete_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else (None, [])
    if latest is None:
        found = f"no complete checkpoint-* folder ({'; '.join(passed)})" if passed else "no checkpoint-* folder"
        raise UsageError(f"--resume_from_checkpoint: {found} in {args.output_dir} to resume from.",
                         "Start without the flag, or name a checkpoint folder.")
    print(f"Resuming from {latest}" + (f" ({'; '.join(passed)})." if passed else "."), file=sys.stderr)
    return latest


def embedding_cache_for(args: ProCLIPTrainingArguments) -> EmbeddingCache | None:
    """The embedding cache to train with: `--cache_dir`, else the default folder next to the data when it has shards."""
    if not args.embedding_cache:
        return None
    folder = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.data)
    if folder is not None and shard_paths(folder):
        try:
            cache = EmbeddingCache(folder)
        except ValueError as error:  # a damaged shard, or one of another format or model: the message says what to do
            raise UsageError(str(error)) from error
        print(f"Using the embedding cache {cache}")
        return cache
    if args.cache_dir:
        raise UsageError(f"--cache_dir {args.cache_dir} holds no embedding cache.",
                         f"Fill it first: {embed_command_line(args)} --cache-dir {args.cache_dir}")
    if folder is not None:
        print(no_cache_note(folder, args), file=sys.stderr)
    return None


def caches_near(folder: Path) -> list[Path]:
    """Embedding caches (folders with shards) that `proclip embed` on a neighbouring data path would have written:
    in the data folder's parent and in its subfolders."""
    base = folder.parent
    candidates = [base.parent / DEFAULT_CACHE_FOLDER, *sorted(base.glob(f"*/{DEFAULT_CACHE_FOLDER}"))]
    return [candidate for candidate in candidates if candidate != folder and shard_paths(candidate)]


def no_cache_note(folder: Path, args: ProCLIPTrainingArguments) -> str:
    """Two lines: where the cache was looked for (nothing there), what that costs, and the command that fixes it."""
    head = (f"proclip train: note: no embedding cache in {folder}, where `proclip embed --data {args.data}` writes "
            "one: the frozen text tower embeds every caption at every step (for an LLM, most of each step's time).")
    nearby = caches_near(folder)
    if nearby:
        return f"{head}\nA cache exists in {nearby[0]}: pass --cache-dir {nearby[0]} if it holds these captions."
    return f"{head}\nBuild it first: {embed_command_line(args)}"


def embed_command_line(args: ProCLIPTrainingArguments) -> str:
    """The `proclip embed` line that caches this run's captions."""
    columns = "".join(f" --caption-column {column}" for column in args.caption_columns or [])
    return f"proclip embed --model {args.model} --data {args.data}{columns}"


def run_train(args: ProCLIPTrainingArguments) -> ProCLIPTrainer:
    """Load the data, cache, model and teacher; train stage 1 or 2; save the Hub-ready folder. Returns the trainer."""
    try:  # the data first: a wrong column or split fails before any tower loads
        dataset = load_image_text_dataset(
            args.data,
            split=args.split,
            streaming=args.streaming,
            image_column=args.image_column if args.stage == "contrastive" else None,
            caption_columns=args.caption_columns,
            noise_caption_column=args.noise_caption_column,
            allow_paths_outside_data=args.allow_paths_outside_data,
            allow_remote_images=args.allow_remote_images,
        )
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    if args.stage == "contrastive" and not args.from_scratch_adapter and has_untrained_adapter(args.model):
        print(f"proclip train: warning: the adapter in {args.model} never had stage 1, so this stage 2 is direct "
              "alignment (LLM2CLIP's), which loses held-out classes in the demo (BENCHMARKS.md).\nRun `proclip train "
              "--stage 1` on it first, or pass --from-scratch-adapter if direct alignment is meant.", file=sys.stderr)
    cache = embedding_cache_for(args)
    processor = ProCLIPProcessor.from_pretrained(args.model)
    model = ProCLIPModel.from_pretrained(args.model)
    trainer = ProCLIPTrainer(model, args, train_dataset=dataset, processing_class=processor, embedding_cache=cache)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)
    return trainer


def train_command(argv: list[str]) -> None:
    args = parse_train_args(argv)
    args = dataclasses.replace(args, resume_from_checkpoint=checkpoint_to_resume(args))
    out_existed = args.output_dir is not None and os.path.exists(args.output_dir)
    try:
        if args.stage == "caption-contrastive":
            args.text = resolve_text_tower(args.text)  # `smollm2` / `minilm` name the packaged real models
            train_stage0(args)
        else:
            run_train(args)
        if dist.is_available() and dist.is_initialized():
            # Leave together: rank 0 still writes the folder when the others are done, and a rank that tore its
            # process group down meanwhile was once aborted (SIGABRT) in a loaded two-rank FSDP run here.
            dist.barrier()
    except CheckpointMismatchError as error:  # the wrong --model or stage for this checkpoint: the user's to fix
        raise UsageError(str(error)) from error
    except (NonFiniteLossError, NonFiniteWeightsError, NoSamplesTrainedError) as error:  # a failed run, explained
        print(f"proclip train: error: {error}", file=sys.stderr)
        raise SystemExit(1) from error
    except KeyboardInterrupt:
        print(f"proclip train: interrupted (Ctrl-C); {_after_interrupt(Path(args.output_dir or '.'), out_existed)}",
              file=sys.stderr)
        raise SystemExit(130) from None  # 128 + SIGINT, as a shell reports a process Ctrl-C stopped
    finally:
        # Under torchrun: left to the interpreter's exit, gloo's threads can be killed mid-flight (SIGABRT,
        # "terminate called without an active exception") and a finished rank then fails the whole run.
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _after_interrupt(out: Path, existed: bool) -> str:
    """Clean up after Ctrl-C and say what is left: an --out this run created that holds no file is removed (so that
    running the command again starts afresh, as it would); saved checkpoints stay, with how to resume from them."""
    if not out.is_dir():
        return "nothing was saved."
    if not existed and not any(path.is_file() for path in out.rglob("*")):
        shutil.rmtree(out)
        return f"removed {out}, which this run had created and which held nothing yet."
    checkpoint, _ = latest_complete_checkpoint(out)
    if checkpoint is None:
        return f"{out} holds no checkpoint of this run; nothing to resume from."
    return f"{out} keeps {Path(checkpoint).name}: add --resume_from_checkpoint to the command to go on from it."


def add_train_parser(subparsers) -> None:
    """Register `proclip train`; its flags are parsed by `HfArgumentParser` (`proclip train --help` lists them)."""
    parser = subparsers.add_parser(
        "train", help=TRAIN_DESCRIPTION, description=TRAIN_DESCRIPTION, add_help=False, prefix_chars="\0"
    )
    # Every word after `train` goes to HfArgumentParser, which knows the TrainingArguments flags.
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: train_command(args.argv))


__all__ = ["add_train_parser", "parse_train_args", "run_train"]
