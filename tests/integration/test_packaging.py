"""The wheel `pip install` builds from pyproject.toml: every file the package reads at run time is in it, and
setuptools builds it without warnings about packages it would ignore (`scripts/setup.sh` showed them to every new
user)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_the_run_time_files_without_setuptools_warnings(tmp_path):
    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info next to pyproject.toml
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("configuration_proclip", "modeling_proclip", "train", "model_cards"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path),
         str(source)], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "would be ignored" not in output and "absent from the `packages` configuration" not in output
    (wheel,) = tmp_path.glob("proclip-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        "proclip_train/model_cards/proclip.md": ROOT / "model_cards" / "proclip.md",
        **{f"proclip_train/demo/released_teacher/{p.name}": p
           for p in (ROOT / "train" / "demo" / "released_teacher").iterdir()},
        **{f"proclip_train/evaluation/metrics_modules/{p.parent.name}/{p.name}": p
           for p in (ROOT / "train" / "evaluation" / "metrics_modules").glob("*/*.py")},
    }  # fmt: skip
    assert len(shipped) > 4 and set(shipped) <= names, sorted(set(shipped) - names)
