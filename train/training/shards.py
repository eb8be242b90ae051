"""Embedding-cache shards on disk: written whole or not at all, checked before a single row is served.

A shard is a plain safetensors file (`keys` uint8 (N, 32), `llm` (N, H), optionally `teacher` (N, D); `cache.py` says
what they hold). What this module guarantees, and how:

- **Writers never share a file.** Each writer fills a temporary file of its own (created with O_EXCL under a name
  with its pid and random bytes, starting with `.` and ending in `.tmp`, so readers, which list `*.safetensors`,
  never see it). Its disk space
  is reserved up front (`posix_fallocate`), so a full disk fails before any embedding runs, not hours later.
- **Publication is atomic and never overwrites.** The finished file is hard-linked to its final name (`os.link`
  fails if the name exists), then the temporary name is removed. A hard link rather than a lock file: it needs no
  lock protocol, leaves no stale lock after a crash, and is atomic on local filesystems and NFS, where `fcntl.flock`
  is not reliable. When another writer published the same name first (same captions, same model), that shard is
  verified and kept. Filesystems without hard links (some FUSE mounts) fall back to `os.replace`, which is atomic
  too: a reader sees the old complete file or the new complete file.
- **Every shard carries a checksum.** `data_sha256` in the metadata is the sha256 of the data section, computed from
  the file as written (read back) before publication. Writers refuse non-finite rows (`cache.py`), so a published
  shard holds finite values only.
- **Every shard is checked when opened.** Always (O(1)): the header parses, the tensors are the expected names,
  dtypes and shapes, they tile the data section exactly, and the file is exactly that long (a truncated, zero-byte,
  garbage-header or wrong-dtype shard is refused, naming the file and the fix). The first time a file is opened
  (per inode, size and mtime): the sha256 of its data section is compared with `data_sha256` and every float is
  checked finite; a stamp `.<shard>.verified` then records that this very file was verified, so later opens skip
  the full read (3.4 s per GiB on this project's loaded 2-core machine, 7.6x a plain read: README, Guarantees).
  Shards are never modified after publication, so a changed file has a new inode, size, mtime or ctime and is
  verified again; the ctime catches in-place writes whose mtime was put back, since no process can set a ctime. A
  folder that cannot be written to is verified at every open.
- **Killed writers leave nothing for long.** Temporary names carry the host and pid; the next writer in the folder
  removes those of this host whose process is gone (`remove_stale_temporaries`).
- **A failed write leaves nothing behind.** The temporary file is removed on any error, even when closing it fails
  too (a full disk can fail the close of a file with unwritten data).
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import socket
import struct
from pathlib import Path

import numpy as np
import torch
from huggingface_hub.utils.sha import sha_fileobj

logger = logging.getLogger(__name__)

CACHE_FORMAT = "proclip-embedding-cache"
# 2: `data_sha256` in the metadata, finite values only. Version-1 shards carry no checksum and may hold the zeroed
# rows of two concurrent writers (issue 12), so they are refused rather than trusted.
CACHE_VERSION = "2"
KEY_SIZE = 32  # sha256 digest
KEYS_TABLE = "keys"
LLM_TABLE = "llm"
TEACHER_TABLE = "teacher"
DATA_SHA256 = "data_sha256"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_READ_CHUNK = 16 * 2**20
_PLACEHOLDER_SHA256 = "0" * 64
_HOST = socket.gethostname().replace(".", "-") or "host"
_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")

_SAFETENSORS_DTYPES = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.uint16),  # numpy has no bfloat16: rows are read as uint16 and viewed as bfloat16
    torch.uint8: ("U8", np.uint8),
}
_TORCH_DTYPE_BY_NAME = {name: dtype for dtype, (name, _) in _SAFETENSORS_DTYPES.items()}
FLOAT_DTYPE_NAMES = ("F32", "F16", "BF16")
# Hard links unsupported (EPERM on some FUSE mounts and SMB, EOPNOTSUPP/ENOTSUP, ENOSYS): publish by rename instead.
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EXDEV}


class StaleCacheError(ValueError):
    """An embedding cache made with another text tower (or teacher), or by another cache format version."""


class CorruptShardError(ValueError):
    """A cache shard that is damaged or not a shard at all: it is refused, never read."""

    def __init__(self, path: os.PathLike, problem: str):
        super().__init__(
            f"{path} is a damaged embedding cache shard ({problem}). Delete it and run `proclip embed` again: only "
            "the captions it held are embedded again."
        )
        self.path = Path(path)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, int]:
    """(header, byte offset of the data section) of a safetensors file (8-byte length, then JSON), read without the
    tensors: names, dtypes, shapes, offsets and `__metadata__`.

    Raises:
        ValueError: the file is too short, its header length does not fit in it, or the header is not a JSON object.
    """
    with open(path, "rb") as f:
        prefix = f.read(8)
        file_size = os.fstat(f.fileno()).st_size
        if len(prefix) < 8:
            raise ValueError(f"{path} is {file_size} bytes long, too short for a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        if size > min(MAX_HEADER_BYTES, file_size - 8):
            raise ValueError(f"{path}: its header length ({size} bytes) does not fit in the file ({file_size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: the safetensors header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return header, 8 + size


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one shard under a temporary name of its own; `publish()` makes it visible whole, `abort()` removes it.

    Args:
        path: the shard's final name (`*.safetensors`); its folder must exist.
        tensors: `{name: (shape, torch dtype)}` in file order.
        metadata: the safetensors `__metadata__` (strings); `data_sha256` is added by `publish()`.

    Raises:
        OSError: `ENOSPC` when the folder's disk cannot hold the whole shard (nothing is left behind).
    """

    def __init__(
        self, path: str | os.PathLike, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]
    ):
        self.path = Path(path)
        header: dict = {"__metadata__": {**metadata, DATA_SHA256: _PLACEHOLDER_SHA256}}
        self.offsets, self.row_bytes, self.dtypes = {}, {}, {}
        start = 0
        for name, (shape, dtype) in tensors.items():
            code, np_dtype = _SAFETENSORS_DTYPES[dtype]
            size = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, start + size]}
            self.offsets[name] = start
            self.row_bytes[name] = size // shape[0] if shape[0] else 0
            self.dtypes[name] = dtype
            start += size
        self.header = header
        self.data_size = start
        self.data_start = 8 + len(self._header_bytes())
        self.fd, self.tmp_path = exclusive_temporary_file(self.path)
        try:
            self._reserve(self.data_start + self.data_size)
            self._write_at(0, self._prefixed_header())
        except BaseException:
            self.abort()
            raise

    def _header_bytes(self) -> bytes:
        blob = json.dumps(self.header, separators=(",", ":")).encode("utf-8")
        return blob + b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned

    def _prefixed_header(self) -> bytes:
        blob = self._header_bytes()
        return struct.pack("<Q", len(blob)) + blob

    def _reserve(self, size: int) -> None:
        """Allocate the whole file now, so a full disk shows before any embedding runs."""
        try:
            os.posix_fallocate(self.fd, 0, size)  # Linux and the BSDs; macOS has none (AttributeError, below)
        except AttributeError:
            os.ftruncate(self.fd, size)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise OSError(
                    errno.ENOSPC, f"No space left in {self.path.parent} for a {size / 2**20:.1f} MiB cache shard: free "
                    "some space or give another --cache-dir",
                ) from error
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            os.ftruncate(self.fd, size)  # a filesystem without fallocate: a sparse file, filled as rows come

    def _write_at(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view, offset = view[written:], offset + written

    def write_rows(self, name: str, first_row: int, rows: torch.Tensor) -> None:
        """Write `rows` (already in the table's dtype) as rows `first_row ...` of tensor `name`, in any order."""
        rows = rows.detach().to("cpu", self.dtypes[name]).contiguous()
        offset = self.data_start + self.offsets[name] + first_row * self.row_bytes[name]
        self._write_at(offset, rows.reshape(-1).view(torch.uint8).numpy().tobytes())

    def publish(self) -> Path:
        """Checksum the data as it is on disk, write the checksum into the header, flush, and publish the file under
        `path` (see the module docstring). Returns `path`."""
        self.header["__metadata__"][DATA_SHA256] = data_sha256(self.fd, self.data_start)  # sized at creation
        header = self._prefixed_header()
        assert len(header) == self.data_start, "the checksum must not change the header's length"
        self._write_at(0, header)
        os.fsync(self.fd)
        fd, self.fd = self.fd, None
        os.close(fd)
        publish_file(self.tmp_path, self.path, self.header["__metadata__"][DATA_SHA256])
        return self.path

    def abort(self) -> None:
        """Close and remove the temporary file; safe to call twice, and after any error."""
        try:
            if self.fd is not None:
                fd, self.fd = self.fd, None
                os.close(fd)
        except OSError:  # a full disk may fail even the close; the descriptor is released all the same
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


def exclusive_temporary_file(path: Path) -> tuple[int, Path]:
    """`(read-write descriptor, path)` of a new file beside `path`, named `.<name>.<host>.<pid>.<random>.tmp` and
    created with O_EXCL (no other process can have opened it), with the permissions a plain `open()` gives (umask
    applies, unlike `tempfile.mkstemp`'s 0600: other users and ranks may read the cache)."""
    while True:
        tmp = path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that writers on this host left in `folder` when they were killed (their process is
    gone); a live writer's file, and another host's (a shared filesystem: its pids mean nothing here), are kept.

    Returns:
        The files removed.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY_NAME.match(tmp.name)
        if match is None or match["host"] != _HOST or _process_exists(int(match["pid"])):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    if removed:
        logger.warning("Removed %d temporary file(s) that killed writers left in %s", len(removed), folder)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def data_sha256(fd: int, data_start: int) -> str:
    """sha256 of an open file from `data_start` to its end (`huggingface_hub`'s chunked file hash)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        f.seek(data_start)
        return sha_fileobj(f).hex()


def _chunks(fd: int, start: int, size: int, chunk: int = _READ_CHUNK):
    """`(offset from start, bytes)` of a byte range of an open file; raises `EOFError` if the file ends early."""
    done = 0
    while done < size:
        data = os.pread(fd, min(chunk, size - done), start + done)
        if not data:
            raise EOFError(f"the file ends {size - done} bytes early")
        yield done, data
        done += len(data)


def publish_file(tmp_path: Path, path: Path, checksum: str) -> None:
    """Give the complete file `tmp_path` the name `path` without ever replacing a published shard, then drop
    `tmp_path`. If another writer published `path` first, theirs is verified and kept (ours is dropped)."""
    try:
        os.link(tmp_path, path)
    except FileExistsError:
        theirs = open_shard(path)  # verified: a damaged shard under this name is an error, not a success
        if theirs.metadata[DATA_SHA256] != checksum:
            logger.warning("%s was published by another writer with other values (non-deterministic embedding?); "
                           "keeping theirs", path)
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:
            raise
        os.replace(tmp_path, path)  # atomic too: a reader sees one complete file or the other
        return
    tmp_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


class Shard:
    """One published shard, checked (`open_shard`), its tensors memory-mapped on first use.

    Attributes:
        path, header, metadata, data_start, num_rows.
    """

    def __init__(self, path: Path, header: dict, data_start: int):
        self.path, self.header, self.data_start = path, header, data_start
        self.metadata = header["__metadata__"]
        self.num_rows = header[KEYS_TABLE]["shape"][0]
        self._map = None

    def tables(self) -> list[str]:
        """The tensor names, in file order."""
        return sorted((name for name in self.header if name != "__metadata__"),
                      key=lambda name: self.header[name]["data_offsets"][0])

    def array(self, name: str) -> np.ndarray:
        """The memory-mapped tensor `name` as a numpy array (bfloat16 as uint16)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        np_dtype = _SAFETENSORS_DTYPES[_TORCH_DTYPE_BY_NAME[info["dtype"]]][1]
        start, end = info["data_offsets"]
        return self._map[self.data_start + start : self.data_start + end].view(np_dtype).reshape(info["shape"])

    def rows(self, name: str, index: np.ndarray) -> torch.Tensor:
        values = torch.from_numpy(np.ascontiguousarray(self.array(name)[index]))
        if self.header[name]["dtype"] == "BF16":
            values = values.view(torch.bfloat16)
        return values

    def __getstate__(self):  # DataLoader workers re-open the memory map themselves
        state = dict(self.__dict__)
        state["_map"] = None
        return state


def open_shard(path: str | os.PathLike) -> Shard:
    """Open a published shard: check its structure (always) and its content (once per file; see the module docstring).

    Raises:
        CorruptShardError: the file is truncated, empty, not safetensors, has unexpected tensors or dtypes, misses
            its checksum or identity, or its data does not match the checksum or holds NaN / inf.
        StaleCacheError: a shard of another cache format version.
    """
    path = Path(path)
    try:
        header, data_start = read_safetensors_header(path)
    except ValueError as error:
        raise CorruptShardError(path, str(error).removeprefix(f"{path}: ").removeprefix(f"{path} ")) from error
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != CACHE_FORMAT:
        raise CorruptShardError(path, f"no `format: {CACHE_FORMAT}` metadata: not a ProCLIP embedding cache shard")
    if metadata.get("version") != CACHE_VERSION:
        raise StaleCacheError(
            f"{path} is an embedding cache shard of format version {metadata.get('version')}; this ProCLIP reads "
            f"version {CACHE_VERSION} (checksummed shards). Delete the old shards (or use a new --cache-dir) and run "
            "`proclip embed` again."
        )
    problem = _structure_problem(header, data_start, path.stat().st_size)
    if problem:
        raise CorruptShardError(path, problem)
    shard = Shard(path, header, data_start)
    if not _has_valid_stamp(shard):
        problem = content_problem(shard)
        if problem:
            raise CorruptShardError(path, problem)
        _write_stamp(shard)
    return shard


def _structure_problem(header: dict, data_start: int, file_size: int) -> str | None:
    """What is wrong with a shard's header against its file, or `None`: the O(1) check made at every open."""
    metadata = header["__metadata__"]
    checksum = metadata.get(DATA_SHA256)
    if not (isinstance(checksum, str) and len(checksum) == 64 and checksum != _PLACEHOLDER_SHA256):
        return f"no `{DATA_SHA256}` checksum in its metadata"
    names = [name for name in header if name != "__metadata__"]
    if KEYS_TABLE not in names or LLM_TABLE not in names or not set(names) <= {KEYS_TABLE, LLM_TABLE, TEACHER_TABLE}:
        return f"tensors {sorted(names)}; expected {KEYS_TABLE}, {LLM_TABLE} and optionally {TEACHER_TABLE}"
    for table in sorted(set(names) - {KEYS_TABLE}):
        if not all(isinstance(metadata.get(f"{table}_{key}"), str) for key in ("identity", "fingerprint")):
            return f"no `{table}_identity` / `{table}_fingerprint` in its metadata"
    expected_dtypes = {KEYS_TABLE: ("U8",), LLM_TABLE: FLOAT_DTYPE_NAMES, TEACHER_TABLE: FLOAT_DTYPE_NAMES}
    spans = []
    for name in names:
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") not in expected_dtypes[name]:
            dtype = info.get("dtype") if isinstance(info, dict) else info
            return f"tensor `{name}` has dtype {dtype!r}; expected {' or '.join(expected_dtypes[name])}"
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(n, int) and n >= 0 for n in shape)):
            return f"tensor `{name}` has shape {shape!r}; expected (rows, columns)"
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            return f"tensor `{name}` has data_offsets {offsets!r}"
        itemsize = np.dtype(_SAFETENSORS_DTYPES[_TORCH_DTYPE_BY_NAME[info["dtype"]]][1]).itemsize
        if offsets[1] - offsets[0] != shape[0] * shape[1] * itemsize:
            return f"tensor `{name}` spans {offsets[1] - offsets[0]} bytes for shape {shape}"
        spans.append(tuple(offsets))
    rows = {header[name]["shape"][0] for name in names}
    if len(rows) != 1 or header[KEYS_TABLE]["shape"][1] != KEY_SIZE:
        return "its tensors disagree on the number of rows, or its keys are not sha256 digests"
    spans.sort()
    if spans[0][0] != 0 or any(a[1] != b[0] for a, b in itertools.pairwise(spans)):
        return "its tensors do not tile the data section"
    if data_start + spans[-1][1] != file_size:
        return f"the file is {file_size} bytes long but its header describes {data_start + spans[-1][1]} (truncated?)"
    return None


def content_problem(shard: Shard) -> str | None:
    """Read the whole data section once: `None` if its sha256 is the stored `data_sha256` and every float is finite;
    else what is wrong."""
    digest = hashlib.sha256()
    with open(shard.path, "rb") as f:
        for name in shard.tables():
            info = shard.header[name]
            start, end = info["data_offsets"]
            np_dtype = _SAFETENSORS_DTYPES[_TORCH_DTYPE_BY_NAME[info["dtype"]]][1]
            row_bytes = (end - start) // max(info["shape"][0], 1)
            try:
                for offset, chunk in _chunks(f.fileno(), shard.data_start + start, end - start):
                    digest.update(chunk)
                    if info["dtype"] in FLOAT_DTYPE_NAMES:
                        bad = _first_non_finite(np.frombuffer(chunk, dtype=np_dtype), info["dtype"])
                        if bad is not None:
                            row = (offset + bad * np.dtype(np_dtype).itemsize) // row_bytes
                            return f"NaN or inf in `{name}`, row {row}"
            except EOFError as error:
                return str(error)
    if digest.hexdigest() != shard.metadata[DATA_SHA256]:
        return "its data does not match its sha256 checksum: the file was changed or damaged after it was written"
    return None


def _first_non_finite(values: np.ndarray, dtype_name: str) -> int | None:
    """Index of the first NaN / inf element, or `None`. bfloat16 arrives as uint16: all exponent bits set is NaN/inf."""
    finite = (values & 0x7F80) != 0x7F80 if dtype_name == "BF16" else np.isfinite(values)
    if finite.all():
        return None
    return int(np.argmin(finite))


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.verified")


def _file_identity(path: Path) -> dict:
    """What changes whenever the file's bytes do. The change time (ctime) is in it because no process can set it:
    writing in place and putting the mtime back with `os.utime` still moves the ctime to now."""
    stat = path.stat()
    return {"device": stat.st_dev, "inode": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ctime_ns": stat.st_ctime_ns}


def _has_valid_stamp(shard: Shard) -> bool:
    """Whether this very file (device, inode, size, mtime, ctime) was verified before with this checksum."""
    try:
        stamp = json.loads(_stamp_path(shard.path).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {**_file_identity(shard.path), DATA_SHA256: shard.metadata[DATA_SHA256]}


def _write_stamp(shard: Shard) -> None:
    """Record that the file was verified (atomically); a folder that cannot be written to is verified every time."""
    stamp = _stamp_path(shard.path)
    text = json.dumps({**_file_identity(shard.path), DATA_SHA256: shard.metadata[DATA_SHA256]})
    tmp = None
    try:
        fd, tmp = exclusive_temporary_file(stamp)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, stamp)
    except OSError as error:
        logger.info("Cannot record the verification of %s (%s): it is verified at every open", shard.path, error)
        if tmp is not None:
            tmp.unlink(missing_ok=True)


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "CorruptShardError",
    "Shard",
    "ShardWriter",
    "StaleCacheError",
    "content_problem",
    "open_shard",
    "publish_file",
    "read_safetensors_header",
    "remove_stale_temporaries",
]
