"""One flag style for every `proclip` command (standard library and PyYAML only: the fast checks use it too).

- Long flags take dashes or underscores alike: `--max-steps` = `--max_steps`, `--caption-column` = `--caption_column`
  (`proclip train` gets both from `HfArgumentParser`; the argparse verbs from `FlagParser`). `--help` shows dashes.
- `--caption-column` means the same in every command: repeat the flag or list several after it; each value is one
  column, never split.
- `--config` files (`proclip train`) name the same flags, dashes or underscores alike.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from ..training.registry import DEFAULT_CAPTION_COLUMN


class FlagParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose long flags take underscores for dashes (`--caption_column` = `--caption-column`).

    Subparsers made by `add_subparsers` are of this class too, so every verb behaves alike. A word is rewritten only
    when its dashed form is one of this parser's flags, so the error for an unknown flag quotes it as typed.
    """

    def parse_known_args(self, args=None, namespace=None):
        words = sys.argv[1:] if args is None else args
        return super().parse_known_args([self._dashed(word) for word in words], namespace)

    def _dashed(self, word: str) -> str:
        candidate = dashed_flag(word)
        return candidate if candidate.partition("=")[0] in self._option_string_actions else word


def progress_bars_enabled() -> bool:
    """False under `--no-progress` (which sets tqdm's TQDM_DISABLE while the command runs, `cli.main`)."""
    return os.environ.get("TQDM_DISABLE") != "1"


def dashed_flag(word: str) -> str:
    """`--max_steps` -> `--max-steps`, `--caption_column=a_b` -> `--caption-column=a_b`; other words unchanged."""
    if not word.startswith("--"):
        return word
    flag, separator, value = word.partition("=")
    return flag.replace("_", "-") + separator + value


def add_caption_column_argument(parser: argparse.ArgumentParser, help: str, default_help: str = DEFAULT_CAPTION_COLUMN):
    """`--caption-column COLUMN [COLUMN ...]`, repeatable, into `args.caption_column` (a list, or `None` if absent)."""
    parser.add_argument(
        "--caption-column", action="extend", nargs="+", metavar="COLUMN",
        help=f"{help} Repeat the flag or list several after it; each value is one column (default: {default_help}).",
    )


def add_image_source_arguments(parser: argparse.ArgumentParser):
    """`--allow-paths-outside-data` and `--allow-remote-images`: the opt-ins to images that are not plain paths inside
    the data folder (`training.data.ImageSourceRule`), alike in every command that reads images."""
    parser.add_argument("--allow-paths-outside-data", action="store_true",
                        help="read image paths that leave the data folder (absolute paths elsewhere, ../); by default "
                        "those rows are skipped and counted")
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="fetch images given as URLs (http://, s3://, file://, local://, ...); by default, and "
                        "always with HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set, those rows are skipped and counted")


def flag_key(name: str) -> str:
    """`--max-steps` / `max_steps` / `max-steps` -> `max_steps`, the attribute a flag fills."""
    return name.lstrip("-").replace("-", "_")


def read_config_file(path: str | os.PathLike) -> dict:
    """Flags from a YAML (`.yaml`/`.yml`) or JSON file: `{flag: value}`, dashes or underscores (`out` = output_dir)."""
    path = Path(path)
    text = path.read_text()
    values = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of flag names to values.")
    values = {flag_key(k): v for k, v in values.items()}
    if "out" in values:
        values["output_dir"] = values.pop("out")
    return values
