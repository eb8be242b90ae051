"""Image-text data for training and evaluation: load one split of a dataset, images left undecoded.

`load_image_text_dataset(spec, ...)` reads anything `datasets.load_dataset` reads: a local folder (an imagefolder
   with `metadata.jsonl` / `metadata.csv` or class subfolders, or a folder of csv / jsonl / parquet files), a file or
   glob (`.csv`, `.jsonl`, `.json`, `.parquet`, `.arrow`, `.txt` captions only, `.tar` webdataset shards), or a Hub
   dataset (`name` or `name:config`), in memory-mapped or streaming mode. `proclip train`, `proclip embed`, stage 0
   and `proclip eval` all load through it. Images stay undecoded in the dataset (`datasets.Image(decode=False)`), so
   a corrupt file never breaks loading or iteration; `images.decode_image` decodes one value where it is used. A data
   file that is not UTF-8, holds a lone surrogate or no rows is refused in one line naming the file and line (bad text
   is a property of how the file was written, often all of it: skipping such rows would silently drop the non-ASCII
   captions); image paths that leave the local data folder, and image URLs, are dropped and counted unless allowed.

The rest of the data path has a module each: `images` (decode, CLIP's transform), `captions` (a row's captions,
texts in batches for embedding), `skips` (why a sample was dropped, and how many), `collators` (batches).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.compute as pc
from datasets.packaged_modules.folder_based_builder.folder_based_builder import (
    FolderBasedBuilder,
)

logger = logging.getLogger(__name__)

# Why the loader drops a row (counted in its warning; `skips` holds the reasons the collators skip a sample for).
PATH_OUTSIDE_DATA = "path_outside_data"  # an image path (absolute, or with ../) that leaves the data folder
REMOTE_IMAGE = "remote_image"  # an image given as a URL (any `scheme://`: http(s), s3, hf, file, local, zip, ...)

# File suffix -> `datasets` builder. Compression suffixes (.gz, .zst, ...) are looked through.
_BUILDER_BY_SUFFIX = {
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".txt": "text",
    ".tar": "webdataset",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_GLOB_CHARS = ("*", "?", "[")
_TEXT_BUILDERS = ("csv", "json", "text")
# One backslash escape of a JSON string: `\uXXXX`, or a backslash and one character (`\\`, `\n`, ...).
_JSON_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_MAX_LOGGED_PATHS = 5
_PATH_BATCH_ROWS = 10_000


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def _builder_for(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return _BUILDER_BY_SUFFIX.get(os.path.splitext(name)[1])


@dataclass(frozen=True)
class DataSpec:
    """Where training data lives, parsed from the one string a user gives (`proclip train DATA`).

    Attributes:
        kind: `"folder"` (a local directory), `"files"` (a local or remote file or glob) or `"hub"` (a Hub dataset).
        source: the string as given.
        builder: the `datasets` builder for `"files"` (`"csv"`, `"json"`, `"parquet"`, `"arrow"`, `"text"`,
            `"webdataset"`); `None` otherwise.
        files: the matched files for `"files"`, sorted; `()` otherwise.
        name, config: the Hub dataset and its configuration for `"hub"`.
    """

    kind: str
    source: str
    builder: str | None = None
    files: tuple[str, ...] = ()
    name: str | None = None
    config: str | None = None

    @classmethod
    def parse(cls, spec: str | os.PathLike) -> DataSpec:
        """An existing directory is a folder; a path with a known data suffix (or glob) is files; else a Hub name.

        Raises `FileNotFoundError` for a file path or glob that matches nothing, and `ValueError` for a suffix that
        is not a data format.
        """
        spec = os.fspath(spec)
        if os.path.isdir(spec):
            return cls(kind="folder", source=spec)
        is_remote = "://" in spec
        is_glob = any(char in spec for char in _GLOB_CHARS)
        if is_remote or is_glob or os.path.isfile(spec) or _builder_for(spec) is not None:
            files = (spec,) if is_remote else tuple(sorted(glob.glob(spec, recursive=True)))
            files = tuple(f for f in files if is_remote or os.path.isfile(f))
            if not files:
                raise FileNotFoundError(f"No data file matches {spec!r}.")
            builders = {_builder_for(f) for f in files}
            if None in builders or len(builders) != 1:
                known = ", ".join(sorted(_BUILDER_BY_SUFFIX))
                raise ValueError(
                    f"Cannot tell the data format of {spec!r} (matched: {', '.join(files[:5])}): use one kind of "
                    f"file among {known}, a folder, or a Hub dataset name."
                )
            return cls(kind="files", source=spec, builder=builders.pop(), files=files)
        name, _, config = spec.partition(":")
        return cls(kind="hub", source=spec, name=name, config=config or None)

    @property
    def root(self) -> str | None:
        """The local directory holding the data (where relative image paths and caches live); `None` for the Hub."""
        if self.kind == "folder":
            return os.path.abspath(self.source)
        if self.kind == "files" and "://" not in self.source:
            return os.path.abspath(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in self.files]))
        return None


def _resolve_paths(paths: list, base: str) -> list:
    """Relative local image paths -> paths under `base`; absolute paths, URLs and non-strings are kept."""
    join = posixpath.join if "://" in base else os.path.join
    return [
        join(base, p) if isinstance(p, str) and p and "://" not in p and not os.path.isabs(p) else p for p in paths
    ]


def _with_features(dataset):
    """A streaming dataset's features are often unknown until read; infer them from the first rows, so that columns
    can be checked and image columns cast. (`_resolve_features` is private, but it is how `datasets` does this.)"""
    if dataset.features is None and hasattr(dataset, "_resolve_features"):
        dataset = dataset._resolve_features()
    return dataset


def _column_names(dataset) -> list[str]:
    names = dataset.column_names
    if names is None:  # a streaming dataset whose features are unknown until read: look at the first row
        names = list(next(iter(dataset.take(1)), {}).keys())
    return list(names)


def _lone_surrogate_column(line: str) -> int | None:
    """1-based column of the first `\\uD800`-`\\uDFFF` escape of a line of JSON that is not half of a surrogate
    pair (such a string cannot be stored as UTF-8), or `None`."""
    high = None  # a high-surrogate escape waiting for its low half
    for match in _JSON_ESCAPE.finditer(line):
        body = match.group(1)
        code = int(body[1:], 16) if len(body) == 5 else None
        is_low = code is not None and 0xDC00 <= code <= 0xDFFF
        if high is not None:
            if not (is_low and match.start() == high.end()):
                return high.start() + 1
            high = None
        elif code is not None and 0xD800 <= code <= 0xDBFF:
            high = match
        elif is_low:
            return match.start() + 1
    return high.start() + 1 if high is not None else None


def data_file_problem(path: str, builder: str) -> str | None:
    """Why a local csv / json / text file cannot load, in one line naming the file, the line and the fix; `None` when
    this reading finds nothing: bytes that are not UTF-8, a JSON `\\u` escape that is a lone surrogate (half of an
    emoji cut in two), or no rows at all (a csv with only its header counts as none)."""
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return (
                    f"{path}, line {number}: byte {error.start + 1} (0x{raw[error.start]:02x}) is not UTF-8. Re-encode "
                    "the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8`) or remove the line."
                )
            column = _lone_surrogate_column(line) if builder == "json" else None
            if column is not None:
                return (
                    f"{path}, line {number}, column {column}: this \\u escape is half of a surrogate pair (an emoji cut "
                    "in two), which no UTF-8 text can hold. Repair or remove the line."
                )
            rows += bool(line.strip())
    if rows <= (builder == "csv"):
        return f"{path} holds no rows{' (only a header)' if rows else ''}: add rows, or leave the file out."
    return _json_syntax_problem(path) if builder == "json" else None


def _json_syntax_problem(path: str) -> str | None:
    """Where a UTF-8 `.json` / `.jsonl` file is not JSON, in one line naming the file, the 1-based line and column,
    what is wrong and the fix; `None` when it parses as one JSON document or as one JSON object per line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as error:
        if text.lstrip().startswith("["):  # one document (a list of rows) with an error in it
            return (f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg}). Repair the "
                    "file, or write one JSON object per line (.jsonl).")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            looks_csv = number == 1 and "," in line and not line.lstrip().startswith(("{", "["))
            what = "this looks like a CSV header; if the file is CSV, name it .csv" if looks_csv else \
                "repair or remove the line"
            return (f"{path}, line {number}, column {error.colno}: not a JSON object ({error.msg}): {what}. Each line "
                    'of a JSON Lines file is one object, e.g. {"image": "0001.jpg", "caption": "a cat"}.')
        if not isinstance(row, dict):
            return (f"{path}, line {number}: a JSON {type(row).__name__}, not an object: each line of a JSON Lines "
                    'file is one object, e.g. {"image": "0001.jpg", "caption": "a cat"}.')
    return None


def _load_explained(load: Callable[[], Any], files: Sequence[str]):
    """`load()`; when it fails and one of `files` (local, uncompressed csv / json / text) shows why, a `ValueError`
    that says so in one line (`data_file_problem`) instead of the `datasets` traceback.

    pyarrow's JSON reader stores bytes that are not UTF-8 as they are, and the row fails only when read, mid-epoch:
    a loaded JSON dataset's strings are therefore validated here (one pass over the table, in C)."""
    try:
        dataset = load()
        if isinstance(dataset, datasets.Dataset) and any(_builder_for(path) == "json" for path in files):
            dataset.data.table.validate(full=True)
        return dataset
    except Exception as error:
        for path in files:
            builder = _builder_for(path)
            local = "://" not in path and not path.lower().endswith(_COMPRESSION_SUFFIXES)
            problem = data_file_problem(path, builder) if builder in _TEXT_BUILDERS and local else None
            if problem:
                raise ValueError(problem) from error
        if "corresponds to no data" in str(error):  # `datasets`' words for a split of 0 rows, e.g. a JSON `[]`
            raise ValueError(f"{', '.join(files)} holds no rows: add rows, or leave the file out.") from error
        raise


def _load_files(spec: DataSpec, split, streaming, image_column, cache_dir, load_kwargs):
    """Load data files grouped by folder, so that relative image paths resolve against their own file's folder."""
    groups: dict[str, list[str]] = {}
    for path in spec.files:
        base = path.rsplit("/", 1)[0] if "://" in path else os.path.dirname(os.path.abspath(path))
        groups.setdefault(base, []).append(path)
    parts = []
    for base, files in groups.items():
        part = _load_explained(
            lambda files=files: _with_features(datasets.load_dataset(
                spec.builder, data_files=files, split=split, streaming=streaming, cache_dir=cache_dir, **load_kwargs
            )),
            files,
        )
        if image_column is not None and image_column in _column_names(part):
            features = part.features
            feature = None if features is None else features.get(image_column)
            if feature is None or (isinstance(feature, datasets.Value) and "string" in feature.dtype):
                # Path strings -> `{"bytes": None, "path": resolved}` rows of an `Image(decode=False)` column. Done in
                # the map itself: a streaming dataset does not re-encode rows when cast after a map.
                if features is not None:
                    features = features.copy()
                    features[image_column] = datasets.Image(decode=False)
                part = part.map(
                    lambda paths, base=base: {
                        image_column: [{"bytes": None, "path": p} for p in _resolve_paths(paths, base)]
                    },
                    batched=True,
                    input_columns=[image_column],
                    features=features,
                    **({} if streaming else {"desc": "Resolving image paths"}),
                )
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _builder_kwargs(load_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The `load_dataset` arguments that also apply to `load_dataset_builder` / `get_dataset_split_names`."""
    return {k: v for k, v in load_kwargs.items() if k in ("token", "revision", "storage_options")}


def _local_split_names(spec: DataSpec, folder_builder) -> list[str]:
    """Files hold one split, `"train"`; a folder, the splits its file names give (`train/`, `test.csv`, ...)."""
    return ["train"] if spec.kind == "files" else [str(name) for name in folder_builder.config.data_files]


def split_names(spec: str | os.PathLike | DataSpec, cache_dir: str | None = None, **load_kwargs) -> list[str]:
    """The splits a data spec holds: `["train"]` for files, the splits of a folder's file names (`train/`,
    `test.csv`, ...), or those `datasets.get_dataset_split_names` lists for a Hub dataset."""
    if not isinstance(spec, DataSpec):
        spec = DataSpec.parse(spec)
    kwargs = _builder_kwargs(load_kwargs)
    if spec.kind == "hub":
        return list(datasets.get_dataset_split_names(spec.name, spec.config, cache_dir=cache_dir, **kwargs))
    builder = datasets.load_dataset_builder(spec.source, cache_dir=cache_dir, **kwargs) if spec.kind == "folder" else None
    return _local_split_names(spec, builder)


def load_image_text_dataset(
    spec: str | os.PathLike | DataSpec,
    split: str = "train",
    streaming: bool = False,
    image_column: str | None = None,
    caption_columns: str | Sequence[str] = (),
    noise_caption_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
    allow_paths_outside_data: bool = False,
    allow_remote_images: bool = False,
    **load_kwargs,
) -> datasets.Dataset | datasets.IterableDataset:
    """Load one split of image-text data with its images left undecoded: what training and evaluation read.

    Args:
        spec: a local folder (imagefolder with `metadata.jsonl` / `metadata.csv` or class subfolders, or csv / json /
            parquet files), a file or glob (`.csv`, `.json`, `.jsonl`, `.parquet`, `.arrow`, `.txt`, `.tar`
            webdataset shards; relative image paths are resolved against the folder of the file that lists them), or
            a Hub dataset `name` / `name:config`. See `DataSpec.parse`.
        split: the split to read (for files, everything is `"train"`; see `split_names`). Slicing like
            `"train[:1000]"` works; for files in several folders it applies to each folder's files.
        streaming: return an `IterableDataset` that reads as it goes (data larger than the disk).
        image_column: the column with images (an `Image` feature, a path, bytes or `{"bytes", "path"}`); `None`
            for captions-only data (stage 0 and 1). For webdataset shards it is the file suffix, e.g. `"jpg"`.
        caption_columns: the caption column(s) that must exist; each holds a string or a list of strings.
        noise_caption_column: stage 1's optional second caption view, checked like the others.
        label_column: zero-shot evaluation's class column, checked like the others.
        cache_dir: `datasets` cache directory.
        allow_paths_outside_data: keep rows whose image path leaves the local data folder (`DataSpec.root`): an
            absolute path elsewhere, or `../` out of it. By default such rows are dropped and counted in a warning,
            so a table cannot make training or evaluation read any file the user can read.
        allow_remote_images: keep rows whose image is a URL (any `scheme://`, `file://` and fsspec's `local://`
            included: fsspec resolves those against the working directory, not the data folder); they are fetched
            when decoded. By default, and always when offline (`HF_DATASETS_OFFLINE` / `HF_HUB_OFFLINE`), such rows
            are dropped and counted in a warning, so a table cannot make a run fetch what it names.
        **load_kwargs: passed to `datasets.load_dataset` (e.g. `revision`, `token`, `num_proc`, `delimiter`).

    Returns:
        A `datasets.Dataset` (or `IterableDataset` when streaming) with every column kept and every `Image` column
        cast to `Image(decode=False)`: rows hold `{"bytes", "path"}`, and `decode_image` decodes them where they are
        used (the collators count the ones that fail). Keep the raw columns through the `Trainer` with
        `remove_unused_columns=False`.

    Raises:
        ValueError: a requested column or split is missing (the message lists the available ones); a data file is
            not UTF-8 or holds a lone surrogate (the message names the file and line); the split holds no rows.
    """
    if not isinstance(spec, DataSpec):
        spec = DataSpec.parse(spec)
    caption_columns = (caption_columns,) if isinstance(caption_columns, str) else tuple(caption_columns)

    split_name = split.split("[")[0]
    builder = None
    if spec.kind == "folder":
        builder = datasets.load_dataset_builder(spec.source, cache_dir=cache_dir, **_builder_kwargs(load_kwargs))
    if spec.kind != "hub":  # a Hub dataset's splits cost a request: `datasets` names a missing one itself
        available_splits = _local_split_names(spec, builder)
        if split_name not in available_splits:
            raise ValueError(
                f"{spec.source!r} has no split {split_name!r}; it has {', '.join(available_splits)}. Pick one with "
                "--split."
            )
    if spec.kind == "hub":
        dataset = datasets.load_dataset(
            spec.name, spec.config, split=split, streaming=streaming, cache_dir=cache_dir, **load_kwargs
        )
    elif spec.kind == "folder":
        if isinstance(builder, FolderBasedBuilder):
            dataset = _load_explained(
                lambda: datasets.load_dataset(
                    spec.source, split=split, streaming=streaming, cache_dir=cache_dir, **load_kwargs
                ),
                [str(f) for f in builder.config.data_files.get(split_name, [])],
            )
        else:  # a folder of data files: load them as files, so image paths resolve against each file's folder
            files = tuple(builder.config.data_files[split_name])
            files_spec = DataSpec(kind="files", source=spec.source, builder=builder.name, files=files)
            split = "train" + split[len(split_name) :]
            dataset = _load_files(files_spec, split, streaming, image_column, cache_dir, load_kwargs)
    else:
        dataset = _load_files(spec, split, streaming, image_column, cache_dir, load_kwargs)

    dataset = _with_features(dataset)
    available = _column_names(dataset)
    requested = [(image_column, "image column")] if image_column is not None else []
    requested += [(name, "caption column") for name in caption_columns]
    requested += [(name, role) for name, role in ((noise_caption_column, "noise caption column"),
                                                  (label_column, "label column")) if name is not None]
    missing = [f"{role} {name!r}" for name, role in requested if name not in available]
    if spec.kind == "folder" and image_column is not None and image_column not in available and "file_name" in available:
        raise ValueError(  # `datasets` names an imagefolder's image column only when the images are there
            f"the images of {spec.source!r} are missing: its metadata names them in file_name, but the folder holds "
            "no image files. Put the images in the folder, at the paths file_name gives (relative to the metadata "
            "file)."
        )
    if missing:
        raise ValueError(
            f"{' and '.join(missing)} not found in {spec.source!r}. Available columns: {', '.join(available)}."
        )

    # Never decode while loading or iterating: a corrupt file must reach the collator, which counts and drops it.
    features = dataset.features or {}
    to_cast = [name for name, feature in features.items() if isinstance(feature, datasets.Image) and feature.decode]
    if image_column is not None and not isinstance(features.get(image_column), datasets.Image):
        to_cast.append(image_column)
    for name in to_cast:
        dataset = dataset.cast_column(name, datasets.Image(decode=False))
    refused: Counter = Counter()
    rule = ImageSourceRule(spec.root, allow_paths_outside_data, allow_remote_images)
    if image_column is not None and not rule.allows_everything:
        dataset, refused = _rows_with_allowed_images(dataset, image_column, rule)
    if not streaming and len(dataset) == 0:
        why = "".join(f" once the {count} rows whose {rule.why(reason)} are left out ({rule.fix(reason)})"
                      for reason, count in refused.items() if count)
        raise ValueError(f"{spec.source!r} (split {split!r}) holds no rows{why}: give data with at least one row.")
    return dataset


def is_url(path: str | None) -> bool:
    """Whether an image value's path is a URL (`scheme://...`, fsspec's `a::b` chains included), which `datasets`
    opens through fsspec (`http`, `s3`, `hf`, `zip`, and `file` / `local`, which it resolves against the working
    directory) rather than as a path on this disk."""
    return bool(path) and "://" in path


def image_path_inside(path: str | None, root: str) -> bool:
    """Whether a local image path stays inside the folder `root` once made absolute against it and normalised (`..`
    resolved lexically; symlinks inside the folder are the folder owner's and are followed). A missing path counts
    as inside (it fails to decode and is counted then); a URL never does (`is_url`)."""
    if not path:
        return True
    if is_url(path):
        return False
    full = os.path.normpath(os.path.join(root, path))
    return full == root or full.startswith(root.rstrip(os.sep) + os.sep)


def offline() -> bool:
    """Whether this process must not use the network: `HF_DATASETS_OFFLINE` or `HF_HUB_OFFLINE` is set."""
    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE)


@dataclass(frozen=True)
class ImageSourceRule:
    """Which image values a run may read: embedded bytes always; a plain path when it stays inside `root` (the local
    data folder; `None` for a Hub dataset, whose paths are its own cache) or `allow_outside`; a URL only when
    `allow_remote` and not `offline()`."""

    root: str | None
    allow_outside: bool = False
    allow_remote: bool = False

    @property
    def allows_everything(self) -> bool:
        return (self.allow_outside or self.root is None) and self.allow_remote and not offline()

    def refusal(self, path: str | None, has_bytes: bool) -> str | None:
        """Why an image value is not read (`PATH_OUTSIDE_DATA`, `REMOTE_IMAGE`), or `None` when it may be."""
        if has_bytes:
            return None
        if is_url(path):
            return None if self.allow_remote and not offline() else REMOTE_IMAGE
        inside = self.allow_outside or self.root is None or image_path_inside(path, self.root)
        return None if inside else PATH_OUTSIDE_DATA

    def why(self, reason: str) -> str:
        """What the rows refused for `reason` have, in words for the user."""
        if reason == PATH_OUTSIDE_DATA:
            return f"image path leaves the data folder {self.root} (an absolute path elsewhere, or ../)"
        return "image is a URL (http://, s3://, file://, local://, ...)"

    def fix(self, reason: str) -> str:
        """How to read the rows refused for `reason`, in words for the user."""
        if reason == PATH_OUTSIDE_DATA:
            return "pass --allow-paths-outside-data to read them"
        if self.allow_remote:
            return "HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set, and nothing is fetched offline"
        return "pass --allow-remote-images to fetch them"


class _AllowedImages:
    """Filter predicate over a batch of image values (`{"bytes", "path"}` dicts, path strings, or an arrow column of
    the dicts): keep those `rule` allows; count the others by reason and log the first ones."""

    def __init__(self, rule: ImageSourceRule):
        self.rule = rule
        self.refused: Counter = Counter()

    def __call__(self, column) -> list[bool] | pa.Array:
        if isinstance(column, pa.ChunkedArray):  # arrow batches: read the paths without touching any image bytes
            paths = pc.struct_field(column, "path").to_pylist()
            embedded = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
        else:
            paths = [value.get("path") if isinstance(value, Mapping) else value for value in column]
            embedded = [isinstance(value, Mapping) and value.get("bytes") is not None for value in column]
        reasons = [self.rule.refusal(path, has_bytes) for path, has_bytes in zip(paths, embedded)]
        for path, reason in zip(paths, reasons):
            if reason is not None and self.refused.total() < _MAX_LOGGED_PATHS:
                logger.warning("Skipping a sample (%s): %s", reason, path)
            self.refused[reason] += reason is not None
        keep = [reason is None for reason in reasons]
        return pa.array(keep) if isinstance(column, pa.ChunkedArray) else keep


def _rows_with_allowed_images(dataset, image_column: str, rule: ImageSourceRule):
    """`(dataset without the rows whose image `rule` refuses, Counter of refused rows by reason)`; a streaming dataset
    drops them as it reads (the counter is empty: unknown until read). The paths are read in arrow batches, without
    decoding or copying any image, and counted here rather than by a cached `filter`, so every run warns."""
    predicate = _AllowedImages(rule)
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.filter(predicate, batched=True, input_columns=[image_column]), Counter()
    keep = []
    for batch in dataset.select_columns([image_column]).with_format("arrow").iter(batch_size=_PATH_BATCH_ROWS):
        keep += predicate(batch.column(image_column)).to_pylist()
    if predicate.refused.total():
        dataset = dataset.select([row for row, kept in enumerate(keep) if kept])
    for reason, count in predicate.refused.items():
        if count:
            logger.warning("Skipped %d of %d rows (%s): their %s; %s.", count, len(keep), reason, rule.why(reason),
                           rule.fix(reason))
    return dataset, predicate.refused


__all__ = [
    "PATH_OUTSIDE_DATA",
    "REMOTE_IMAGE",
    "DataSpec",
    "ImageSourceRule",
    "data_file_problem",
    "image_path_inside",
    "is_url",
    "load_image_text_dataset",
    "split_names",
]
