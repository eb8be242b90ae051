"""Retrieval scoring at scale against the machine's limit, in fresh processes.

    python bench/bench_retrieval_scale.py [--sizes 10000 100000] [--dim 1280] [--threads 2] [--chunk-size 512]

For each N: N images x N captions of precomputed random embeddings (D = 1280, float32, caption i describes image i;
captions are their image plus noise, so the recalls are neither 0 nor 1) go through
`image_text_retrieval_recall`, the function `proclip eval --task retrieval` scores with (both directions, R@1/5/10,
pessimistic ties). Each N runs in its own subprocess, so its peak RSS (`getrusage` ru_maxrss, taken before anything
else allocates) is that of the embeddings plus the scoring. In the same process, after the scoring, the limit: the
pure GEMM of N x N x D (`torch.mm` of 1024 images at a time against all captions, into one reused buffer), same
threads. Both are timed `--repeats` times, alternating; medians.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch
from proclip_train.evaluation.metrics import (
    DEFAULT_CHUNK_SIZE,
    image_text_retrieval_recall,
)

GEMM_ROWS = 1024
NOISE = 20.0  # caption = image + NOISE * N(0, 1) per coordinate: R@1 of a few percent at N = 10 000


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_embeddings(n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, captions), each (n, dim) float32, built in slices so no third n x dim tensor ever exists."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, dim, generator=generator)
    captions = torch.empty(n, dim)
    for start in range(0, n, 4096):
        rows = slice(start, min(start + 4096, n))
        captions[rows] = images[rows] + NOISE * torch.randn(rows.stop - start, dim, generator=generator)
    return images, captions


def gemm_seconds(images: torch.Tensor, captions: torch.Tensor) -> float:
    """Seconds for images @ captions.T (N x N x D), in row blocks written into one buffer."""
    buffer = torch.empty(GEMM_ROWS, captions.shape[0])
    start_time = time.perf_counter()
    for start in range(0, images.shape[0], GEMM_ROWS):
        block = images[start : start + GEMM_ROWS]
        torch.mm(block, captions.T, out=buffer[: block.shape[0]])
    return time.perf_counter() - start_time


def worker(n: int, dim: int, threads: int, chunk_size: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    images, captions = random_embeddings(n, dim)
    rss_embeddings = psutil.Process().memory_info().rss / 2**20
    ids = torch.arange(n)
    scoring, gemm, recall, peak = [], [], None, None
    for _ in range(repeats):
        start = time.perf_counter()
        recall = image_text_retrieval_recall(images, captions, ids, chunk_size=chunk_size)
        scoring.append(time.perf_counter() - start)
        peak = peak if peak is not None else peak_rss_mib()  # before the GEMM's buffer exists
        gemm.append(gemm_seconds(images, captions))
    return {
        "n": n, "dim": dim, "threads": threads, "chunk_size": chunk_size, "repeats": repeats,
        "scoring_s": statistics.median(scoring), "gemm_s": statistics.median(gemm),
        "scoring_runs_s": scoring, "gemm_runs_s": gemm,
        "ratio": statistics.median(scoring) / statistics.median(gemm),
        "gemm_gflops": 2 * n * n * dim / statistics.median(gemm) / 1e9,
        "rss_after_embeddings_mib": rss_embeddings, "peak_rss_scoring_mib": peak,
        "embeddings_mib": 2 * n * dim * 4 / 2**20, "recall": recall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--repeats", type=int, nargs="+", default=[3, 1], help="per size (the last one repeats)")
    parser.add_argument("--out", help="write the results as JSON")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.dim, args.threads, args.chunk_size, args.repeats[0])))
        return

    results = []
    for index, n in enumerate(args.sizes):
        repeats = args.repeats[min(index, len(args.repeats) - 1)]
        command = [sys.executable, __file__, "--worker", str(n), "--dim", str(args.dim), "--threads", str(args.threads),
                   "--chunk-size", str(args.chunk_size), "--repeats", str(repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"N = {n:>7,} x {n:,}, D = {args.dim}, {args.threads} threads: scoring {r['scoring_s']:.2f} s, "
              f"GEMM limit {r['gemm_s']:.2f} s ({r['gemm_gflops']:.0f} GFLOP/s), ratio {r['ratio']:.2f}; "
              f"peak RSS {r['peak_rss_scoring_mib']:.0f} MiB (after the embeddings: {r['rss_after_embeddings_mib']:.0f} "
              f"MiB, of which embeddings {r['embeddings_mib']:.0f}); R@1 i->t {r['recall']['image_to_text_R@1']:.4f}, "
              f"t->i {r['recall']['text_to_image_R@1']:.4f}", flush=True)
    for small, large in zip(results, results[1:]):
        factor = large["n"] / small["n"]
        print(f"{small['n']:,} -> {large['n']:,} (N x {factor:.0f}): scoring time x {large['scoring_s'] / small['scoring_s']:.0f} "
              f"(N^2: x {factor ** 2:.0f}), peak RSS x {large['peak_rss_scoring_mib'] / small['peak_rss_scoring_mib']:.1f}, "
              f"RSS above the embeddings {small['peak_rss_scoring_mib'] - small['embeddings_mib']:.0f} -> "
              f"{large['peak_rss_scoring_mib'] - large['embeddings_mib']:.0f} MiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
