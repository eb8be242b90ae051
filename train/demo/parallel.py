"""Train the demo's runs in worker processes, several at a time.

Every run is seeded and trains on one torch thread, so a run trained in a worker is bit-identical to the same run
trained in the main process: `--jobs` changes the wall time, never a number in the tables. Each worker builds its
own `Demo` on the same folder (loading the `init` model, the embedding cache and the evaluation splits once) and
trains the runs it is given; a run waits for the stage-1 run it starts from. A worker's output (the trainer's logs)
goes to the run's `train.log`, so the main process prints one line per finished run.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import Stage2Setting

LOG_FILE = "train.log"


@dataclass(frozen=True)
class RunTask:
    """One training run of the demo.

    Args:
        seed, name: the run (`runs/seed{seed}/{name}`).
        stage: 1 (`Demo.step_stage1`) or 2 (`Demo.step_stage2`).
        setting: a sweep's stage-2 setting (`None`: the row's own).
        after: the run of the same seed it starts from (`None`: it starts from the `init` model).
    """

    seed: int
    name: str
    stage: int
    setting: Stage2Setting | None = None
    after: str | None = None

    @property
    def label(self) -> str:
        return f"seed {self.seed}: {self.name}"

    def train(self, demo) -> dict:
        """Train this run with `demo` (in whichever process holds it); returns its done record."""
        if self.stage == 1:
            return demo.step_stage1(self.seed, self.name)
        return demo.step_stage2(self.seed, self.name, self.setting)


_WORKER_DEMO = None


def _start_worker(demo_class: type, demo_arguments: dict) -> None:
    """Worker initializer: one demo (`run.Demo`) per process, on the main process's torch threads."""
    global _WORKER_DEMO
    threads = demo_arguments.pop("threads")
    torch.set_num_threads(threads or 1)
    _WORKER_DEMO = demo_class(**demo_arguments, progress=False, threads=threads)


def _train_in_worker(task: RunTask, log_path: str) -> dict:
    """Train `task` in this worker with its stdout and stderr (trainer logs, warnings) sent to `log_path`."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            return task.train(_WORKER_DEMO)
        finally:
            for stream, original in zip((1, 2), saved):
                os.dup2(original, stream)
                os.close(original)


def default_jobs() -> int:
    """Worker processes by default: the CPUs this process may use, at most 4 (each holds its own copy of the LLM)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def train_in_workers(demo, tasks: list[RunTask], jobs: int, on_finished: Callable[[RunTask, dict], None],
                     done_before: set[tuple[int, str]] = frozenset()) -> None:
    """Train `tasks` (in order, each once its `after` run is finished or in `done_before`) in `jobs` worker processes
    of `demo`'s folder; `on_finished(task, record)` runs in this process as each one ends. A failed run stops the
    others and raises its error."""
    finished = set(done_before)
    pending = list(tasks)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools or open file handles
    arguments = {"out": demo.out, "config": demo.config, "command": demo.command, "threads": demo.threads}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_start_worker,
                             initargs=(type(demo), arguments)) as pool:
        running = {}
        try:
            while pending or running:
                for task in [t for t in pending if t.after is None or (t.seed, t.after) in finished]:
                    if len(running) >= jobs:
                        break
                    pending.remove(task)
                    log_path = demo.run_dir(task.seed, task.name) / LOG_FILE
                    running[pool.submit(_train_in_worker, task, str(log_path))] = task
                if not running:
                    raise RuntimeError(f"runs wait for runs that are not scheduled: {[t.label for t in pending]}")
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    error = future.exception()
                    if error is not None:
                        log_path = demo.run_dir(task.seed, task.name) / LOG_FILE
                        raise RuntimeError(f"{task.label} failed in a worker process: {error} (its log: {log_path})") \
                            from error
                    finished.add((task.seed, task.name))
                    on_finished(task, future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the runs not started yet never start
            raise
