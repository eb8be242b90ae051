"""User errors of the `proclip` command: one or two lines on stderr and exit code 2; the traceback with `--debug`."""

import contextlib
import sys


class UsageError(Exception):
    """A mistake in a command line or in what it names: a path, a column, a model folder, a Hub id, a token.

    Args:
        problem: what is wrong (one line where possible).
        fix: the command or flag that fixes it (one line, optional).
    """

    def __init__(self, problem: str, fix: str | None = None):
        super().__init__(problem if fix is None else f"{problem}\n{fix}")
        self.problem, self.fix = problem, fix


@contextlib.contextmanager
def reported(command: str | None, debug: bool = False):
    """Print a `UsageError` raised inside as `proclip COMMAND: error: PROBLEM` (and its fix) on stderr and exit with
    code 2, as argparse does for a malformed line; with `debug`, let it propagate with its traceback."""
    try:
        yield
    except UsageError as error:
        if debug:
            raise
        print(f"{'proclip ' + command if command else 'proclip'}: error: {error.problem}", file=sys.stderr)
        if error.fix:
            print(error.fix, file=sys.stderr)
        raise SystemExit(2) from None
