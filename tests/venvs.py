"""The outside environments the integration tests run a checkpoint in: isolated virtual environments with other
transformers versions (and optimum), for the remote code a checkpoint folder carries, and transformers.js from npm.

`bash scripts/setup.sh --tests` (what CI runs) builds them all before the suite, through `python tests/venvs.py`;
a test that finds one missing builds it on first use.

Each environment is built on first use and kept under `$PROCLIP_CACHE/venvs` (default `~/.cache/proclip/venvs`),
one folder per requirement set, so later runs start at once. It holds its own transformers, tokenizers,
huggingface_hub, ... from PyPI, and no ProCLIP. torch is NOT installed again: a `.pth` file adds a folder of links to
this Python's own torch and the distributions torch imports (`torch_layer`), so every environment runs the very same
torch build as the tests' own Python (outputs comparable to 1e-5) and a cold build costs a pip install of a few small
wheels instead of unpacking torch three times.
"""

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import missing_requirement
from packaging.requirements import Requirement
from proclip_train.training.packaged_towers import cache_root

# What the remote code of a folder imports besides torch and transformers (PIL), pinned by nothing else.
REMOTE_CODE_REQUIREMENTS = ("pillow",)
# The versions the deploying tools run: the Endpoints toolkit's pin and the newest 4.57 (what optimum installs).
TRANSFORMERS_VERSIONS = ("4.51.3", "4.57.6")
# optimum's ONNX Runtime classes, in their own environment: optimum-onnx installs transformers 4.57.
OPTIMUM_REQUIREMENTS = ("optimum-onnx[onnxruntime]", *REMOTE_CODE_REQUIREMENTS)
ENVIRONMENTS = (*((f"transformers=={version}", *REMOTE_CODE_REQUIREMENTS) for version in TRANSFORMERS_VERSIONS),
                OPTIMUM_REQUIREMENTS)
MARKER_FILE = "proclip-venv.json"


def venvs_root() -> Path:
    return cache_root() / "venvs"


def requirement_closure(name: str) -> list[importlib.metadata.Distribution]:
    """The installed distribution `name` and everything it requires (no extras), each once."""
    seen, queue, found = set(), [name], []
    while queue:
        requirement = Requirement(queue.pop())
        key = requirement.name.lower().replace("_", "-")
        if key in seen or (requirement.marker is not None and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(requirement.name)
        found.append(dist)
        queue.extend(dist.requires or [])
    return found


def torch_layer() -> Path:
    """A folder of symbolic links to this Python's torch and the distributions it needs (packages, modules and their
    `.dist-info`, so pip counts them as installed), built once per torch build."""
    dists = requirement_closure("torch")
    key = hashlib.sha256(
        json.dumps([sys.version, *(f"{d.metadata['Name']}=={d.version}@{d.locate_file('')}" for d in dists)]).encode()
    ).hexdigest()[:12]
    layer = venvs_root() / f"torch-{importlib.metadata.version('torch')}-{key}"
    if layer.is_dir():
        return layer
    venvs_root().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=venvs_root()))
    for dist in dists:
        tops = {Path(str(path)).parts[0] for path in dist.files or ()}
        for top in sorted(tops - {"..", "__pycache__"}):
            target = Path(dist.locate_file(top))
            if target.exists() and not (scratch / top).exists():
                (scratch / top).symlink_to(target)
    return _publish(scratch, layer)


def _publish(scratch: Path, final: Path) -> Path:
    """Move a finished build into place (another process may have finished first: keep theirs)."""
    try:
        os.replace(scratch, final)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


def venv_python(requirements: tuple[str, ...], timeout: float = 900) -> Path:
    """The interpreter of an isolated environment with `requirements` installed (pip specifiers) besides this
    Python's torch; built on first use, then reused. Raises `RuntimeError` with pip's output when the build fails."""
    layer = torch_layer()
    key = hashlib.sha256(json.dumps([str(layer), sorted(requirements)]).encode()).hexdigest()[:12]
    label = "-".join(r.replace("==", "-").replace(">=", "-") for r in requirements[:1])
    final = venvs_root() / f"{label}-{key}"
    python = final / "bin" / "python"
    if (final / MARKER_FILE).is_file():
        return python
    scratch = Path(tempfile.mkdtemp(prefix=".building-", dir=venvs_root()))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(scratch)], check=True, timeout=timeout)
    site = subprocess.run(
        [str(scratch / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(site, "proclip-torch-layer.pth").write_text(f"{layer}\n")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(scratch / "bin" / "python"), "install", "--quiet",
         *requirements],
        capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise RuntimeError(f"pip could not build the environment for {requirements}:\n{result.stderr[-3000:]}")
    (scratch / MARKER_FILE).write_text(json.dumps(
        {"requirements": list(requirements), "torch_layer": str(layer), "build_s": round(time.perf_counter() - start)}
    ))
    # The interpreter finds its environment from where it lies, so the folder can move (bin/'s scripts cannot: unused).
    return _publish(scratch, final) / "bin" / "python"


def venv_python_or_skip(requirements: tuple[str, ...]) -> Path:
    """`venv_python(requirements)`; an environment that cannot be built (no package index) skips the calling test
    locally and fails it under `CI=true`."""
    try:
        return venv_python(requirements)
    except RuntimeError as error:
        missing_requirement(str(error))


def transformers_js_modules(version: str) -> Path:
    """The node_modules folder of `@huggingface/transformers` `version`, installed from npm into $PROCLIP_NPM_CACHE
    (default ~/.cache/proclip/npm)/transformers-js-<version> once. `--ignore-scripts`: onnxruntime-node's postinstall
    would download binaries that its package already ships for CPUs. Raises `RuntimeError` when npm fails."""
    cache = Path(os.environ.get("PROCLIP_NPM_CACHE") or Path.home() / ".cache" / "proclip" / "npm")
    prefix = cache / f"transformers-js-{version}"
    package = prefix / "node_modules" / "@huggingface" / "transformers" / "package.json"
    if not package.is_file():
        prefix.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            ["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund", "--prefix", str(prefix),
             f"@huggingface/transformers@{version}"],
            capture_output=True, text=True, timeout=600,
        )
        if result.returncode != 0:
            raise RuntimeError(f"npm could not install @huggingface/transformers@{version}:\n{result.stderr[-3000:]}")
    if json.loads(package.read_text())["version"] != version:
        raise RuntimeError(f"{prefix} holds another @huggingface/transformers than {version}; delete it")
    return prefix / "node_modules"


def prepare() -> None:
    """Build every environment the integration tests use (what `scripts/setup.sh --tests` runs before the suite)."""
    from proclip_train.hub.export.transformers_js import TRANSFORMERS_JS_VERSION

    for requirements in ENVIRONMENTS:
        start = time.perf_counter()
        python = venv_python(requirements)
        print(f"{' '.join(requirements)}: {python} ({time.perf_counter() - start:.0f} s)")
    if shutil.which("npm") is None:
        print("npm is missing: the transformers.js tests will be skipped (failed under CI=true)", file=sys.stderr)
        return
    start = time.perf_counter()
    modules = transformers_js_modules(TRANSFORMERS_JS_VERSION)
    print(f"@huggingface/transformers@{TRANSFORMERS_JS_VERSION}: {modules} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    prepare()
