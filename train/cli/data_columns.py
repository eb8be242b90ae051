"""The columns a `--data` spec will have, read from file headers in a fraction of a second, before `datasets` loads it.

`available_columns(spec)` answers for local data only, and only where the answer is certain: csv headers, JSON (lines)
keys, parquet / arrow schemas, webdataset member suffixes, an imagefolder's metadata file or class subfolders. It
returns `None` for anything else (a Hub dataset, a URL, compressed or very large JSON files, an unusual layout); then
`load_image_text_dataset` checks the columns when it loads, as it always does. Standard library only, plus pyarrow
(a `datasets` dependency) for parquet and arrow files.
"""

import csv
import glob
import json
import os
import re
import tarfile
from pathlib import Path

import pyarrow
import pyarrow.ipc
import pyarrow.parquet

# What `datasets` makes of a suffix (`training/data.py` maps the same suffixes to builders).
TABULAR_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".arrow", ".txt")
WEBDATASET_SUFFIX = ".tar"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
GLOB_CHARACTERS = ("*", "?", "[")
MAX_JSON_BYTES = 64 * 2**20  # JSON is parsed whole; larger files are left to the loader
MAX_FOLDER_ENTRIES = 20_000  # a folder walk stops (and answers None) beyond this many files
WEBDATASET_SAMPLE_MEMBERS = 64


def data_files(spec: str) -> list[str] | None:
    """The local files a file or glob spec names (sorted; `[]` when it matches nothing), or `None` when `spec` is not
    a file spec (a folder, a URL, a Hub dataset name)."""
    if "://" in spec or os.path.isdir(spec):
        return None
    is_glob = any(character in spec for character in GLOB_CHARACTERS)
    if not (is_glob or os.path.isfile(spec) or _suffix(spec) in TABULAR_SUFFIXES + (WEBDATASET_SUFFIX,)):
        return None
    return sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))


def available_columns(spec: str) -> set[str] | None:
    """The columns `load_image_text_dataset(spec)` will have, or `None` when that cannot be told cheaply and surely."""
    if os.path.isdir(spec):
        return folder_columns(Path(spec))
    files = data_files(spec)
    return union_of_columns(files) if files else None


def union_of_columns(files: list[str]) -> set[str] | None:
    columns = set()
    for path in files:
        found = file_columns(Path(path))
        if found is None:
            return None
        columns |= found
    return columns


def file_columns(path: Path) -> set[str] | None:
    """The columns of one data file, by its suffix; `None` for a suffix or content this module does not read."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as file:
            return set(next(csv.reader(file), []))
    if suffix in (".json", ".jsonl"):
        return _json_columns(path)
    if suffix == ".txt":
        return {"text"}
    if suffix in (".parquet", ".arrow"):
        return _arrow_columns(path)
    if suffix == WEBDATASET_SUFFIX:
        return _webdataset_columns(path)
    return None


def folder_columns(folder: Path) -> set[str] | None:
    """A folder as `datasets` reads it: an imagefolder (metadata columns, or `image` and `label` from class
    subfolders) or a folder of data files (their columns, all splits together)."""
    metadata, tables, image_dirs = [], [], set()
    for count, path in enumerate(folder.rglob("*")):
        if count > MAX_FOLDER_ENTRIES:
            return None
        if path.name in METADATA_NAMES:
            metadata.append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            image_dirs.add(path.parent)
        elif path.suffix.lower() in TABULAR_SUFFIXES + (WEBDATASET_SUFFIX,):
            tables.append(str(path))
    if metadata:
        columns = union_of_columns([str(path) for path in metadata])
        return None if columns is None else {_imagefolder_column(name) for name in columns}
    if image_dirs:  # labels from the class subfolders when there are several at one depth
        depths = {len(directory.relative_to(folder).parts) for directory in image_dirs}
        return {"image", "label"} if len(image_dirs) > 1 and len(depths) == 1 else {"image"}
    return union_of_columns(tables) if tables else None


def _imagefolder_column(name: str) -> str:
    """`file_name` -> `image`, `thumb_file_name` -> `thumb`: how an imagefolder names its metadata's path columns."""
    if name == "file_name" or name.endswith("_file_name"):
        return name[: -len("_file_name")] or "image"
    return name


def _json_columns(path: Path) -> set[str] | None:
    if path.stat().st_size > MAX_JSON_BYTES:
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:  # JSON lines
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            return None
    if isinstance(rows, dict):  # one object of columns
        return set(rows) if all(isinstance(value, list) for value in rows.values()) else None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        return None
    return {key for row in rows for key in row}


def _arrow_columns(path: Path) -> set[str] | None:
    try:
        if path.suffix.lower() == ".parquet":
            return set(pyarrow.parquet.read_schema(path).names)
        with path.open("rb") as file:  # `datasets` writes arrow files as IPC streams
            return set(pyarrow.ipc.open_stream(file).schema.names)
    except (OSError, pyarrow.ArrowException):  # an unreadable file is the loader's to report
        return None


def _webdataset_columns(path: Path) -> set[str] | None:
    """`__key__`, `__url__` and the field suffixes of the first members (`0.jpg` -> `jpg`, `0.cls.txt` -> `cls.txt`)."""
    columns = {"__key__", "__url__"}
    try:
        with tarfile.open(path, "r|*") as archive:
            for count, member in enumerate(archive):
                if count >= WEBDATASET_SAMPLE_MEMBERS:
                    break
                match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member.name)
                if member.isfile() and match:
                    columns.add(match.group(2))
    except (OSError, tarfile.TarError):
        return None
    return columns


def _suffix(spec: str) -> str:
    return os.path.splitext(spec.lower())[1]
