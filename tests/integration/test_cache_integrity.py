"""Embedding-cache integrity (issue 12, items 1 and 2): non-finite rows are never written, a damaged shard is never
read, two writers never clobber each other, and a full disk leaves nothing behind."""

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import datasets
import pytest
import torch
from conftest import missing_requirement
from proclip_train.cli import main
from proclip_train.training import shards
from proclip_train.training.cache import (
    CorruptShardError,
    EmbeddingCache,
    NonFiniteEmbeddingError,
    StaleCacheError,
    build_embedding_cache,
)
from proclip_train.training.shards import (
    ShardWriter,
    publish_file,
    read_safetensors_header,
)
from safetensors import safe_open

from modeling_proclip import ProCLIPModel

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green", "white") for s in ("cat", "dog", "car", "tree") for b in ("grey", "black")]  # fmt: skip
REFUSAL = "Delete it and run `proclip embed` again"


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory, model, processor):
    """One shard of the tiny model's embeddings of CAPTIONS (tests damage copies of it)."""
    folder = tmp_path_factory.mktemp("good")
    return build_embedding_cache(model, processor.tokenizer, CAPTIONS, folder, batch_size=8, progress=False)


def expected_rows(model, processor, captions):
    with torch.no_grad():
        encoded = processor.tokenizer(captions, padding=True, return_tensors="pt")
        return model.get_llm_embeddings(encoded["input_ids"], encoded["attention_mask"])


def leftovers(folder):
    """Temporary files a writer left in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# -- item 1: non-finite rows -------------------------------------------------------------------------------------------


def poisoned_model(tiny_proclip_dir, processor, word):
    """The tiny model whose LLM embeds the token of `word` as NaN: only captions with that word come out NaN."""
    poisoned = ProCLIPModel.from_pretrained(tiny_proclip_dir).eval()
    (token,) = processor.tokenizer(f" {word}", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        poisoned.text_model.embed_tokens.weight[token] = float("nan")
    return poisoned


def test_a_nan_row_is_never_written_and_its_captions_are_named(tmp_path, tiny_proclip_dir, processor):
    poisoned = poisoned_model(tiny_proclip_dir, processor, "dog")
    folder = tmp_path / "cache"
    with pytest.raises(NonFiniteEmbeddingError, match="gave NaN or inf") as refused:
        build_embedding_cache(poisoned, processor.tokenizer, CAPTIONS, folder, batch_size=64, progress=False)
    message = str(refused.value)
    dogs = [c for c in CAPTIONS if " dog " in c]
    assert f"for {len(dogs)} of {len(CAPTIONS)} captions" in message and f"and {len(dogs) - 5} more" in message
    assert sum(repr(c) in message for c in dogs) == 5 and not any(repr(c) in message for c in CAPTIONS if c not in dogs)
    assert list(folder.iterdir()) == []  # no shard, no temporary file

    # The command says the same in one message, exit code 2.
    saved = tmp_path / "poisoned"
    poisoned.save_pretrained(saved)
    processor.save_pretrained(saved)
    data = tmp_path / "captions.jsonl"
    datasets.Dataset.from_dict({"caption": CAPTIONS}).to_json(data)
    with pytest.raises(SystemExit) as exit_info:
        main(["embed", "--model", str(saved), "--data", str(data), "--cache-dir", str(folder), "--no-teacher"])
    assert exit_info.value.code == 2 and list(folder.iterdir()) == []


def test_rows_are_checked_in_the_storage_dtype(tmp_path, tiny_proclip_dir, processor):
    """Finite in float32 but past float16's 65504: refused when stored as float16, fine as float32."""
    loud = ProCLIPModel.from_pretrained(tiny_proclip_dir).eval()
    with torch.no_grad():
        loud.text_model.norm.weight[0] = 1e7
    with pytest.raises(NonFiniteEmbeddingError, match="stored as float16"):
        build_embedding_cache(
            loud, processor.tokenizer, CAPTIONS, tmp_path / "f16", dtype=torch.float16, progress=False
        )
    assert build_embedding_cache(loud, processor.tokenizer, CAPTIONS, tmp_path / "f32", progress=False) is not None


# -- item 2: damaged shards are refused at open --------------------------------------------------------------------


def rewrite_header(path, change):
    """Rewrite a safetensors file with `change(header)` applied to its header, data untouched."""
    header, start = read_safetensors_header(path)
    data = path.read_bytes()[start:]
    change(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def zero_bytes(path):
    path.write_bytes(b"")


def garbage_header(path):
    path.write_bytes(struct.pack("<Q", 40) + os.urandom(40) + path.read_bytes()[48:])


def huge_header_length(path):  # what made safetensors readers raise MemoryError
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])


def wrong_dtype(path):  # what made the old reader raise KeyError: 'I64'
    rewrite_header(path, lambda header: header["llm"].update(dtype="I64"))


def wrong_shape(path):  # what made training fail in a reshape
    rewrite_header(path, lambda header: header["llm"].update(shape=[header["llm"]["shape"][0], 7]))


def zeroed_rows(path):
    """What two old writers sharing one temporary file left behind: the right size, rows of zeros."""
    header, start = read_safetensors_header(path)
    llm_start, llm_end = header["llm"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[start + llm_start : start + llm_start + (llm_end - llm_start) // 2] = bytes((llm_end - llm_start) // 2)
    path.write_bytes(bytes(data))


def one_flipped_bit(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10
    path.write_bytes(bytes(data))


def no_checksum(path):
    rewrite_header(path, lambda header: header["__metadata__"].pop("data_sha256"))


DAMAGES = {
    "truncated": (truncate, "truncated"),
    "zero-byte": (zero_bytes, "0 bytes long"),
    "garbage-header": (garbage_header, "not JSON"),
    "huge-header-length": (huge_header_length, "does not fit in the file"),
    "wrong-dtype": (wrong_dtype, "dtype 'I64'"),
    "wrong-shape": (wrong_shape, "spans"),
    "zeroed-rows": (zeroed_rows, "does not match its sha256"),
    "one-flipped-bit": (one_flipped_bit, "does not match its sha256"),
    "no-checksum": (no_checksum, "no `data_sha256`"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_shard_is_refused_at_open_naming_the_file_and_the_fix(tmp_path, good_shard, damage):
    damage_file, problem = DAMAGES[damage]
    path = tmp_path / good_shard.name
    shutil.copyfile(good_shard, path)
    damage_file(path)
    with pytest.raises(CorruptShardError) as refused:
        EmbeddingCache(tmp_path)
    assert str(refused.value).startswith(f"{path} is a damaged embedding cache shard (")
    assert problem in str(refused.value) and REFUSAL in str(refused.value)


def test_training_refuses_a_damaged_cache_with_exit_code_2(tmp_path, good_shard, tiny_proclip_dir, capsys):
    """The zeroed rows two old writers left were served as valid embeddings; now `proclip train` stops at once."""
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copyfile(good_shard, cache / good_shard.name)
    zeroed_rows(cache / good_shard.name)
    data = tmp_path / "captions.jsonl"
    datasets.Dataset.from_dict({"caption": CAPTIONS}).to_json(data)
    with pytest.raises(SystemExit) as refused:
        main(["train", "--stage", "1", "--model", str(tiny_proclip_dir), "--data", str(data), "--out",
              str(tmp_path / "out"), "--cache_dir", str(cache), "--use_cpu", "--max_steps", "1"])  # fmt: skip
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert refused.value.code == 2 and error.startswith(f"proclip train: error: {cache / good_shard.name} is a damaged")
    assert not (tmp_path / "out").exists()


def test_a_shard_holding_nan_is_refused_at_open_even_with_a_valid_checksum(tmp_path, good_shard):
    """A shard another tool wrote, NaN row included, checksum right: still refused, naming the row."""
    with safe_open(str(good_shard), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        metadata = {k: v for k, v in f.metadata().items() if k != "data_sha256"}
    tensors["llm"][5, 3] = float("nan")
    writer = ShardWriter(tmp_path / good_shard.name, {k: (v.shape, v.dtype) for k, v in tensors.items()}, metadata)
    for name, values in tensors.items():
        writer.write_rows(name, 0, values)
    writer.publish()
    with pytest.raises(CorruptShardError, match=r"NaN or inf in `llm`, row 5\)"):
        EmbeddingCache(tmp_path)


def test_a_version_1_shard_is_refused_as_stale(tmp_path, good_shard):
    path = tmp_path / good_shard.name
    shutil.copyfile(good_shard, path)
    rewrite_header(path, lambda header: header["__metadata__"].update(version="1"))
    with pytest.raises(StaleCacheError, match="format version 1.*run `proclip embed` again"):
        EmbeddingCache(tmp_path)


def test_a_shard_is_read_whole_once_then_again_only_when_the_file_changes(tmp_path, good_shard, monkeypatch):
    path = tmp_path / good_shard.name
    shutil.copyfile(good_shard, path)
    full_reads = []
    real = shards.content_problem
    monkeypatch.setattr(shards, "content_problem", lambda shard: full_reads.append(shard.path) or real(shard))
    EmbeddingCache(tmp_path)
    EmbeddingCache(tmp_path)
    assert full_reads == [path] and (tmp_path / f".{path.name}.verified").is_file()

    zeroed_rows(path)  # same size, same inode: the new mtime gives it away
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    with pytest.raises(CorruptShardError, match="does not match its sha256"):
        EmbeddingCache(tmp_path)
    assert full_reads == [path, path]


def test_an_in_place_finite_change_with_its_mtime_put_back_is_caught_at_the_next_open(tmp_path, good_shard):
    """Issue 25.6: one float changed in place by a finite amount, size, inode and mtime restored (what fooled the stamp
    keyed on them): the ctime moved, so the shard is read whole again and refused for its checksum."""
    path = tmp_path / good_shard.name
    shutil.copyfile(good_shard, path)
    EmbeddingCache(tmp_path)  # verified and stamped
    header, data_start = read_safetensors_header(path)
    stat = path.stat()
    with open(path, "r+b") as f:
        offset = data_start + header["llm"]["data_offsets"][0]
        f.seek(offset)
        value = struct.unpack("<f", f.read(4))[0]
        f.seek(offset)
        f.write(struct.pack("<f", value + 0.5))  # finite: no NaN scan would see it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_size, stat.st_ino,
                                                                                  stat.st_mtime_ns)
    with pytest.raises(CorruptShardError, match="does not match its sha256"):
        EmbeddingCache(tmp_path)


def test_the_next_writer_removes_what_killed_writers_left(tmp_path, tiny_proclip_dir):
    """Issue 25.8: a `proclip embed` killed mid-write leaves its hidden, pre-allocated temporary shard; the next
    `proclip embed` in the folder removes it (its process is gone) and keeps a live writer's."""
    data = tmp_path / "captions.jsonl"
    datasets.Dataset.from_dict({"caption": CAPTIONS}).to_json(data)
    cache = tmp_path / "cache"
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = shards._HOST
        cache.mkdir()
        dead_tmp = cache / f".shard-x.safetensors.{host}.{killed.pid}.0123abcd.tmp"
        live_tmp = cache / f".shard-y.safetensors.{host}.{live.pid}.4567cdef.tmp"
        other_host = cache / f".shard-z.safetensors.elsewhere.{killed.pid}.89abcdef.tmp"
        for tmp in (dead_tmp, live_tmp, other_host):
            tmp.write_bytes(b"\0" * 4096)
        killed.kill()
        killed.wait()
        main(["embed", "--model", str(tiny_proclip_dir), "--data", str(data), "--cache-dir", str(cache), "--no-teacher"])
        assert leftovers(cache) == sorted([live_tmp.name, other_host.name])
    finally:
        live.kill()
        live.wait()


# -- item 2: writers ---------------------------------------------------------------------------------------------------

# Runs `proclip embed` in this process after holding every writer, once it has written its first rows, until all
# `count` writers have: the interleaving that made two old writers truncate each other's shared temporary file.
GATED_EMBED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from proclip_train.cli import main
    from proclip_train.training import cache

    gate, count, argv = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    writer = getattr(cache, "ShardWriter", None) or getattr(cache, "_ShardWriter")
    write_rows = writer.write_rows

    def gated_write_rows(self, *args, **kwargs):
        write_rows(self, *args, **kwargs)
        if not (gate / str(os.getpid())).exists():
            (gate / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(list(gate.iterdir())) < count and time.time() < deadline:
                time.sleep(0.05)

    writer.write_rows = gated_write_rows
    main(argv)
    """
)


def test_two_concurrent_embed_processes_publish_one_verified_shard(tmp_path, tiny_proclip_dir, model, processor):
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_dict({"caption": CAPTIONS}).to_json(data / "captions.jsonl")
    gate = tmp_path / "gate"
    gate.mkdir()
    argv = ["embed", "--model", str(tiny_proclip_dir), "--data", str(data / "captions.jsonl"), "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    runs = [
        subprocess.Popen([sys.executable, "-c", GATED_EMBED, str(gate), "2", *argv], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [run.communicate(timeout=600) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
        assert "other values" not in err  # the second writer found the first's shard equal to its own
    assert len(list(gate.iterdir())) == 2  # both wrote rows at the same time

    folder = data / "proclip_embedding_cache"
    (shard,) = folder.glob("*.safetensors")
    assert {out.strip().splitlines()[-1] for out, _ in outputs} == {f"Wrote {shard}"}
    assert leftovers(folder) == []
    cache = EmbeddingCache(folder)  # verified: checksum and finite values
    assert len(cache) == len(CAPTIONS) and cache.has_teacher

    main(argv)  # a rerun finds every caption and serves the right rows
    assert list(folder.glob("*.safetensors")) == [shard]
    rows, found = EmbeddingCache(folder).lookup(CAPTIONS[::-1])
    assert bool(found.all())
    torch.testing.assert_close(rows, expected_rows(model, processor, CAPTIONS[::-1]), rtol=1e-4, atol=1e-5)


def test_a_shard_published_under_the_same_name_first_is_verified_and_kept(tmp_path, good_shard):
    ours = tmp_path / ".ours.tmp"
    shutil.copyfile(good_shard, ours)
    theirs = tmp_path / good_shard.name
    shutil.copyfile(good_shard, theirs)
    checksum = read_safetensors_header(good_shard)[0]["__metadata__"]["data_sha256"]
    publish_file(ours, theirs, checksum)
    assert not ours.exists() and theirs.read_bytes() == good_shard.read_bytes()

    shutil.copyfile(good_shard, ours)
    truncate(theirs)
    with pytest.raises(CorruptShardError, match="truncated"):
        publish_file(ours, theirs, checksum)


def test_a_shard_gets_the_permissions_a_plain_file_gets(good_shard):
    """Readable by the other users of a shared cache (a private 0600 temporary file would not be)."""
    umask = os.umask(0)
    os.umask(umask)
    assert good_shard.stat().st_mode & 0o777 == 0o666 & ~umask


def test_without_hard_links_a_shard_is_published_by_rename(tmp_path, model, processor, monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = build_embedding_cache(model, processor.tokenizer, CAPTIONS, tmp_path, progress=False)
    assert leftovers(tmp_path) == [] and len(EmbeddingCache(tmp_path)) == len(CAPTIONS) and path.is_file()


def test_a_write_failing_with_enospc_leaves_nothing_even_if_closing_fails(tmp_path, model, processor, monkeypatch):
    """Fault injection: the third write (after the header and the keys) hits ENOSPC, and so does closing the file."""
    real_pwrite, real_close, writes = os.pwrite, os.close, []

    def full_disk_pwrite(fd, data, offset):
        writes.append(fd)
        if len(writes) >= 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    def full_disk_close(fd):
        real_close(fd)  # Linux releases the descriptor even when close reports an error
        if fd in writes:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk_pwrite)
    monkeypatch.setattr(os, "close", full_disk_close)
    with pytest.raises(OSError) as failed:
        build_embedding_cache(model, processor.tokenizer, CAPTIONS, tmp_path, batch_size=4, progress=False)
    monkeypatch.undo()
    assert failed.value.errno == errno.ENOSPC and len(writes) == 3
    assert list(tmp_path.iterdir()) == []


FULL_TMPFS = """
set -e
mount -t tmpfs -o size=4k tmpfs "$CACHE"
set +e
"$PYTHON" -m proclip_train.cli embed --model "$MODEL" --data "$DATA" --cache-dir "$CACHE" 2> "$ERR"
echo "exit=$?"
ls -A "$CACHE"
"""


def test_a_real_full_disk_fails_before_embedding_and_leaves_nothing(tmp_path, tiny_proclip_dir):
    """A 4 KiB tmpfs, mounted in a user + mount namespace: `proclip embed` into it exits 2 naming the folder, and
    the tmpfs is empty afterwards."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-Urm", "true"], check=False).returncode != 0:
        missing_requirement("no unprivileged user namespaces here to mount a small tmpfs")
    data = tmp_path / "captions.jsonl"
    datasets.Dataset.from_dict({"caption": CAPTIONS}).to_json(data)
    (tmp_path / "cache").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "MODEL": str(tiny_proclip_dir), "DATA": str(data),
           "CACHE": str(tmp_path / "cache"), "ERR": str(tmp_path / "stderr"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf")}  # fmt: skip
    result = subprocess.run(
        ["unshare", "-Urm", "sh", "-c", FULL_TMPFS], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["exit=2"]  # and `ls -A` of the full tmpfs printed nothing
    error, fix = (tmp_path / "stderr").read_text().strip().splitlines()[-2:]
    assert fix == "Free some space, or give --cache-dir on another disk."
    assert error.startswith(f"proclip embed: error: [Errno {errno.ENOSPC}] No space left in {tmp_path / 'cache'}")
