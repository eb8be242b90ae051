"""Folders that appear whole or not at all: write into a hidden folder beside the target, rename it into place when
everything written has passed its checks, remove it otherwise (an exception, Ctrl-C, a failed check).

`proclip export` writes its files so (a failed parity check used to leave 528 MB of NaN ONNX files in `onnx/`, which
`proclip push` would have uploaded). The hidden name (`.<target>.partial-*`) is one `proclip push` never uploads, and
a process killed mid-write leaves only such a folder, never a half-written target.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield a new, empty folder beside `target` to write into. When the block ends normally, it replaces `target`
    (renames within one folder: `target` is at every moment the old folder or the new one, whole); when it raises,
    it is removed and `target` is left as it was.

    Raises:
        PermissionError / OSError: the folder that holds `target` cannot be written (e.g. read-only); nothing changed.
    """
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a success


__all__ = ["staged_folder"]
