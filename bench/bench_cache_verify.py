"""What checking an embedding-cache shard costs at open, side by side in one run (README, "Guarantees").

    python bench/bench_cache_verify.py [--gib 2] [--repeats 3]

Writes one shard of `--gib` GiB of random float32 rows (4096 columns, as an 8B LLM's embeddings) with the cache's own
writer, then times, interleaved and as medians of `--repeats` runs:
1. a plain sequential read of the file (`os.pread` in 16 MiB chunks): the floor any full check stands on;
2. the full check made the first time a file is opened (`shards.content_problem`: sha256 + NaN/inf scan);
3. opening it again (`shards.open_shard` with a valid stamp: the header and structure only).
The file is read back from the page cache once it has been written (this machine has the RAM for it), so 1 and 2
measure CPU and memory bandwidth; a cold disk adds its own read time to both.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from proclip_train.training import shards

COLUMNS = 4096


def write_shard(folder: Path, gib: float) -> Path:
    rows = int(gib * 2**30 / (COLUMNS * 4 + shards.KEY_SIZE))
    metadata = {"format": shards.CACHE_FORMAT, "version": shards.CACHE_VERSION, "llm_identity": "{}",
                "llm_fingerprint": "0"}  # fmt: skip
    tensors = {"keys": ((rows, shards.KEY_SIZE), torch.uint8), "llm": ((rows, COLUMNS), torch.float32)}
    writer = shards.ShardWriter(folder / "shard-bench.safetensors", tensors, metadata)
    generator = np.random.default_rng(0)
    writer.write_rows("keys", 0, torch.from_numpy(generator.integers(0, 256, (rows, shards.KEY_SIZE), dtype=np.uint8)))
    block = 8192
    for start in range(0, rows, block):
        count = min(block, rows - start)
        writer.write_rows("llm", start, torch.from_numpy(generator.standard_normal((count, COLUMNS), dtype=np.float32)))
    return writer.publish()


def plain_read(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in shards._chunks(fd, 0, path.stat().st_size):
            pass
    finally:
        os.close(fd)


def full_check(path: Path) -> None:
    header, start = shards.read_safetensors_header(path)
    assert shards.content_problem(shards.Shard(path, header, start)) is None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cache-", dir=os.environ.get("BENCH_DIR")) as scratch:
        path = write_shard(Path(scratch), args.gib)
        shards.open_shard(path)  # first open: full check, then the stamp
        timings = {"plain read": [], "full check (first open)": [], "open with a valid stamp": []}
        for _ in range(args.repeats):
            for name, run in (("plain read", plain_read), ("full check (first open)", full_check),
                              ("open with a valid stamp", shards.open_shard)):  # fmt: skip
                begin = time.perf_counter()
                run(path)
                timings[name].append(time.perf_counter() - begin)
        size = path.stat().st_size / 2**30
        print(f"shard: {size:.2f} GiB, medians of {args.repeats} interleaved runs")
        base = statistics.median(timings["plain read"])
        for name, values in timings.items():
            median = statistics.median(values)
            ratio = median / base
            print(f"{name:>26}: {median * 1000:9.1f} ms  ({median / size:6.2f} s/GiB, {ratio:5.2f}x plain read)")


if __name__ == "__main__":
    main()
