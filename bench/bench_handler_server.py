"""Load-test a checkpoint's Inference Endpoints handler served as Endpoints serve it
(`proclip_train.hub.serving.serve`).

    python bench/bench_handler_server.py [--model DIR] [--clients 8] [--requests 50] [--threads N] [--out FILE]

Starts the server on a free 127.0.0.1 port, sends every request once from one client (the sequential answers), then
the same requests from `--clients` concurrent clients (`--requests` each, no two alike: image colour and size,
2-5 labels in several languages, two templates), and reports errors, how many concurrent answers are identical to
the sequential answer for the same input, p50/p95 latency and throughput of both runs, as JSON and as a README
table row. Only loopback addresses are contacted; every request has a timeout.

Without --model the tiny test checkpoint (tests/conftest.py's towers) is built in a temporary folder.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tiny_clip, build_tiny_llm  # noqa: E402
from proclip_train.hub.serving.serve import (  # noqa: E402
    LoadReport,
    run_clients,
    serving,
    zero_shot_workloads,
)

from modeling_proclip import ProCLIPModel, ProCLIPProcessor  # noqa: E402


def tiny_checkpoint(folder: Path) -> Path:
    """The tests' tiny ProCLIP folder (2-layer CLIP vision tower, 2-layer Llama with SmolLM2's tokenizer)."""
    clip, llm = build_tiny_clip(folder / "clip"), build_tiny_llm(folder / "llm")
    torch.manual_seed(0)
    model = ProCLIPModel.from_towers(vision=clip, text=llm, adapter_expansion=2)
    model.save_pretrained(folder / "proclip")
    ProCLIPProcessor.from_towers(clip, llm, model.config).save_pretrained(folder / "proclip")
    return folder / "proclip"


def summary(report: LoadReport) -> dict:
    return {"requests": report.requests, "errors": report.errors, "wall_s": round(report.wall_seconds, 2),
            "p50_ms": round(1000 * report.latency_percentile(50), 1),
            "p95_ms": round(1000 * report.latency_percentile(95), 1),
            "requests_per_s": round(report.requests_per_second, 2)}


def bench(model: Path, clients: int, requests: int, threads: int | None, timeout: float) -> dict:
    loads = zero_shot_workloads(clients, requests)
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    started = time.perf_counter()
    with serving(model, env=env) as url:
        startup = time.perf_counter() - started
        sequential = run_clients(url, [[payload for load in loads for payload in load]], timeout)
        concurrent = run_clients(url, loads, timeout)
    reference = sequential.answers[0]
    answers = [answer for client in concurrent.answers for answer in client]
    return {
        "model": str(model), "clients": clients, "requests_per_client": requests, "threads": threads or "default",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "server_startup_s": round(startup, 1),
        "sequential": summary(sequential),
        "concurrent": summary(concurrent),
        "identical": sum(a == b for a, b in zip(answers, reference)),
    }


def table_row(result: dict) -> str:
    c, s = result["concurrent"], result["sequential"]
    total = result["clients"] * result["requests_per_client"]
    identical = "all" if result["identical"] == total else f"{result['identical']} of {total}"
    return (f"| {Path(result['model']).name} | {result['threads']} | {result['clients']} | {c['requests']} | "
            f"{c['errors']} | {identical} | {c['p50_ms']:.0f} / {c['p95_ms']:.0f} | {c['requests_per_s']:.1f} | "
            f"{s['p50_ms']:.0f} | {s['requests_per_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a checkpoint folder with handler.py (default: the tiny one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per request")
    parser.add_argument("--out", type=Path, help="write the result as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = args.model or tiny_checkpoint(Path(scratch))
        result = bench(model, args.clients, args.requests, args.threads, args.timeout)
    print(json.dumps(result, indent=2))
    print("| model | threads | clients | requests | errors | identical | p50 / p95 ms | req/s | "
          "sequential p50 ms | sequential req/s |\n|---|---|---|---|---|---|---|---|---|---|")
    print(table_row(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
