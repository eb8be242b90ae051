"""The `proclip` command.

A command line runs in two steps, so that a mistake costs a second rather than a model load:

1. `checks.check_command_line` reads the flags that name things (model folders and Hub ids, data and its columns,
   files, the Hub token of a real push) without importing torch, transformers or datasets, and refuses what cannot
   work;
2. `commands.build_parser` parses the whole line (argparse; `HfArgumentParser` for `proclip train`) and the command
   runs. `commands` imports every command's implementation, so it is loaded by name once step 1 has passed: the one
   import of this package made at call time (every module imports at its top).

A user error, found in either step, prints what is wrong and how to fix it (one or two lines) and exits with code 2,
no traceback; `--debug` anywhere on the line shows the traceback instead (`errors.py`). `--no-progress` anywhere on
the line silences every progress bar: ours, transformers' weight loading, datasets' and the Hub's.
"""

import contextlib
import importlib
import os
import sys

from .errors import reported

DEBUG_FLAG = "--debug"
NO_PROGRESS_FLAG = "--no-progress"
# tqdm (>= 4.66) reads TQDM_* variables as its defaults, which covers transformers' and our own bars.
QUIET_PROGRESS_ENVIRONMENT = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                              "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def build_parser():
    """The whole `proclip` argument parser (`commands.build_parser`)."""
    return _commands().build_parser()


def main(argv: list[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in words
    words = [word for word in words if word != DEBUG_FLAG]
    quiet = bool({NO_PROGRESS_FLAG, "--no_progress"} & set(words))
    with _environment(QUIET_PROGRESS_ENVIRONMENT if quiet else {}):
        if quiet:
            words = _without_progress_bars(words)
        with reported(words[0] if words and not words[0].startswith("-") else None, debug):
            _checks().check_command_line(words)
            args = build_parser().parse_args(words)
            args.func(args)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """`values` in `os.environ` while the command runs (tqdm, the Hub and the processes the command starts read them
    there), and the variables as they were afterwards: `main` called in a process that goes on (a test, a notebook)
    leaves its environment as it found it."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _without_progress_bars(words: list[str]) -> list[str]:
    """The line for the verb under `--no-progress` (which sets the environment that silences every progress bar of
    this process and of those it starts, before tqdm is imported: it reads it once):
    `proclip demo` keeps the flag (it passes it on), `proclip train` gets `--disable_tqdm true`, others drop it."""
    verb = words[0] if words else None
    if verb == "demo":
        return words
    words = [word for word in words if word not in (NO_PROGRESS_FLAG, "--no_progress")]
    return [*words, "--disable_tqdm", "true"] if verb == "train" else words


def _checks():
    """The fast checks; loaded by name, after `--no-progress` has set the environment that the Hub and tqdm read
    once, at import."""
    return importlib.import_module(f"{__name__}.checks")


def _commands():
    """The module that builds the whole parser: it imports every command's implementation (torch, transformers)."""
    return importlib.import_module(f"{__name__}.commands")
