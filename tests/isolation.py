"""Run Python in a subprocess where this project cannot be imported: the world of a Hub user with remote code."""

import json
import os
import subprocess
import sys
import textwrap

BLOCK_PROJECT = textwrap.dedent(
    """
    import sys

    class _BlockProject:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("modeling_proclip", "configuration_proclip", "proclip_train"):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked: this is a world without ProCLIP)")

    sys.meta_path.insert(0, _BlockProject())
    try:
        import modeling_proclip
    except ImportError:
        pass
    else:
        raise SystemExit("the project is importable; the isolation is broken")
    """
)


def run_without_project(code: str, timeout: int = 300):
    """Run `code` with the project blocked; it must print one JSON document last. Returns that document."""
    script = BLOCK_PROJECT + textwrap.dedent(code)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        cwd="/",
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])
