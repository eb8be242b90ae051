"""Run Python in a subprocess where this project cannot be imported: the world of a Hub user with remote code."""

import json
import sys
import textwrap

from proclip_train.hub.publish.push import output_tail, run_python_without_project


def run_without_project(code: str, timeout: int = 300, args=(), python=sys.executable):
    """Run `code` (with `args` in `sys.argv`, by this interpreter or `python`, another environment's) with the project
    blocked; it must print one JSON document last. Returns that document."""
    result = run_python_without_project(textwrap.dedent(code), args, timeout=timeout, python=python)
    if result.returncode != 0:
        raise AssertionError(f"isolated run by {python} failed:\n{output_tail(result.stderr, 60)}")
    return json.loads(result.stdout.strip().splitlines()[-1])
