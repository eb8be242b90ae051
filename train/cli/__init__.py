"""The `proclip` command.

A command line runs in two steps, so that a mistake costs a second rather than a model load:

1. `checks.check_command_line` reads the flags that name things (model folders and Hub ids, data and its columns,
   files, the Hub token of a real push) without importing torch, transformers or datasets, and refuses what cannot
   work;
2. `commands.build_parser` parses the whole line (argparse; `HfArgumentParser` for `proclip train`) and the command
   runs. `commands` imports every command's implementation, so it is loaded by name once step 1 has passed: the one
   import of this package made at call time (every module imports at its top).

A user error, found in either step, prints what is wrong and how to fix it (one or two lines) and exits with code 2,
no traceback; `--debug` anywhere on the line shows the traceback instead (`errors.py`).
"""

import importlib
import sys

from .checks import check_command_line
from .errors import reported

DEBUG_FLAG = "--debug"


def build_parser():
    """The whole `proclip` argument parser (`commands.build_parser`)."""
    return _commands().build_parser()


def main(argv: list[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in words
    words = [word for word in words if word != DEBUG_FLAG]
    with reported(words[0] if words and not words[0].startswith("-") else None, debug):
        check_command_line(words)
        args = build_parser().parse_args(words)
        args.func(args)


def _commands():
    """The module that builds the whole parser: it imports every command's implementation (torch, transformers)."""
    return importlib.import_module(f"{__name__}.commands")
