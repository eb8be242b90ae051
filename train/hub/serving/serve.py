"""Serve a checkpoint folder's `handler.py` on this machine as Inference Endpoints serve it: to try a handler before
deploying it, and to load-test it.

    proclip serve --model DIR [--host 127.0.0.1] [--port 8080]

A worker process (`proclip_train.hub.serving.endpoint_worker`) imports `DIR/handler.py` (the file that ships in the
checkpoint, not this project's copy), builds `EndpointHandler(DIR)` once and answers, as the Endpoints container does,
    POST / (or /predict)   a JSON body, or an image body (`Content-Type: image/png` ..., labels in the query string)
                           -> 200 with the handler's answer as JSON
    GET  /health (or /)    200 {"status": "ok"}
Errors are JSON `{"error": one line}`: 400 for a body the container cannot read and for a request the handler refuses
(it raises `ValueError`); 413 for a body over `max_body_bytes` (refused from its Content-Length before it is read);
503 when `max_pending` requests already wait; 504 when the handler spends over `timeout` s on one request: the worker
process is killed, so the requests queued behind it go on, each after a fresh worker is built; 500 only for a bug.
After any of them the server goes on answering.

One worker process answers requests one at a time in arrival order: on a CPU the model already uses every core for
one request, and a fast tokenizer must not run in two threads at once.

The client side (`post_json`, `run_clients`, `zero_shot_workloads`) drives such a server for the load test
(tests/integration/test_handler_server.py, bench/bench_handler_server.py); it only targets loopback addresses.

starlette and uvicorn (the `space` extra, via gradio) are imported only where the server is built and run.
"""

import asyncio
import base64
import contextlib
import dataclasses
import io
import ipaddress
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .endpoint_worker import (
    HANDLER_FILE,
    EndpointAnswer,
    EndpointRequest,
    EndpointWorker,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerConfig:
    """How the server listens and what it bounds.

    Args:
        host, port: where to listen (loopback by default).
        max_body_bytes: the largest request body read; a 10 MB image is about 13.4 MB as base64.
        max_pending: requests waiting or running at once; more are answered 503 at once.
        timeout: seconds the handler may spend on one request; then it is answered 504 and the worker restarted.
    """

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 32 * 2**20
    max_pending: int = 64
    timeout: float = 120.0


class RequestTooLarge(ValueError):
    pass


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (`RequestTooLarge`) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"the request body is {int(declared) / 2**20:.1f} MB; "
                              f"the limit is {limit / 2**20:.1f} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"the request body is over {limit / 2**20:.1f} MB, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(worker: EndpointWorker, config: ServerConfig):
    """The ASGI app (a `starlette.applications.Starlette`): `POST /` hands the request to `worker` (one thread talks
    to it, so requests are answered in arrival order), `GET /health` says the server is up."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def respond(answer: EndpointAnswer) -> Response:
        return Response(answer.body, status_code=answer.status, media_type="application/json")

    sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endpoint-worker")
    pending = 0  # touched only on the event loop's thread

    async def predict(request) -> Response:
        nonlocal pending
        if pending >= config.max_pending:
            return respond(EndpointAnswer.error(503, f"{pending} requests are already waiting; try again later"))
        pending += 1
        try:
            body = await read_body(request, config.max_body_bytes)
            call = EndpointRequest(body, request.headers.get("content-type"), tuple(request.query_params.multi_items()))
            return respond(await asyncio.get_running_loop().run_in_executor(sender, worker.answer, call))
        except RequestTooLarge as error:
            return respond(EndpointAnswer.error(413, error))
        except Exception as error:  # the server must outlive a worker that cannot start; the caller learns why
            logger.exception("the handler's worker failed")
            return respond(EndpointAnswer.error(500, f"{type(error).__name__}: {error}"))
        finally:
            pending -= 1

    async def health(request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        sender.shutdown(wait=False, cancel_futures=True)
        worker.stop(grace=5)

    return Starlette(routes=[Route(path, predict, methods=["POST"]) for path in ("/", "/predict")]
                     + [Route(path, health, methods=["GET"]) for path in ("/", "/health")], lifespan=lifespan)


# -- client side ---------------------------------------------------------------------------------------------------


def is_loopback_url(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def post_json(url: str, payload, timeout: float = 120.0) -> tuple[int, object]:
    """POST `payload` as JSON; returns `(HTTP status, decoded JSON answer)`, error statuses included."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        return error.code, json.loads(body) if body else None


@dataclasses.dataclass
class LoadReport:
    """What `run_clients` saw. `answers[c][i]` is client c's i-th `(status, JSON)`; `latencies` are seconds per
    request, all clients together."""

    answers: list[list[tuple[int, object]]]
    latencies: list[float]
    wall_seconds: float

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def errors(self) -> int:
        return sum(status != 200 for client in self.answers for status, _ in client)

    def latency_percentile(self, percent: int) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[percent - 1]

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.wall_seconds


def run_clients(url: str, workloads: list[list[dict]], timeout: float = 120.0) -> LoadReport:
    """Send each workload's requests one after another, all workloads at once (one thread per client).

    Only loopback URLs are accepted: a load test targets this machine. The work is bounded by the workloads
    given and by `timeout` per request.
    """
    if not is_loopback_url(url):
        raise ValueError(f"{url} is not a loopback address; load tests only target this machine")
    answers = [[] for _ in workloads]
    latencies, lock = [], threading.Lock()

    def client(index: int) -> None:
        for payload in workloads[index]:
            started = time.perf_counter()
            answers[index].append(post_json(url, payload, timeout))
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(workloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadReport(answers, latencies, time.perf_counter() - started)


LOAD_LABELS = ("red", "blue", "green", "a red circle", "ein blaues Quadrat", "un triangle vert", "猫", "a dog",
               "yellow", "purple shape", "Kreis", "square")


def png_base64(colour: tuple[int, int, int], size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def zero_shot_workloads(clients: int, requests: int) -> list[list[dict]]:
    """`clients` x `requests` zero-shot requests for a load test, no two alike: the image's colour and size, the
    candidate labels (2 to 5, several languages) and the template vary with the request's number."""
    loads = []
    for client in range(clients):
        load = []
        for i in range(requests):
            n = client * requests + i
            colour = ((37 * n) % 256, (91 * n + 40) % 256, (53 * client + 7 * i) % 256)
            labels = [LOAD_LABELS[(n + step * (client + 1)) % len(LOAD_LABELS)] for step in range(2 + n % 4)]
            load.append({"inputs": png_base64(colour, (24 + n % 17, 24 + client % 17)),
                         "parameters": {"candidate_labels": list(dict.fromkeys(labels)),
                                        "hypothesis_template": ("a photo of {}.", "{}")[n % 2]}})
        loads.append(load)
    return loads


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], url: str, env: dict | None = None, startup_timeout: float = 300.0,
            cwd: str | os.PathLike | None = None) -> Iterator[Path]:
    """Run `command` until the `with` block ends; enter once `url` answers 200 (polled).

    Yields the path of the process's log (stdout and stderr). Raises `RuntimeError` with the log's tail if the
    process exits first or `url` does not answer within `startup_timeout` s.
    """
    with tempfile.NamedTemporaryFile("w+", prefix="proclip-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   cwd=cwd)
    log_path = Path(log.name)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {process.returncode} before {url} answered:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {startup_timeout:.0f} s:\n"
                                   + log_path.read_text(errors="replace")[-3000:])
            time.sleep(0.25)
        yield log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serving(folder: str | os.PathLike, config: ServerConfig | None = None, env: dict | None = None,
            startup_timeout: float = 300.0) -> Iterator[str]:
    """Serve `folder`'s handler in a subprocess (`proclip serve`) on a free loopback port until the `with` block
    ends; yields the URL to POST to."""
    config = config or ServerConfig(port=free_port())
    command = [sys.executable, "-m", "proclip_train.cli", "serve", "--model", str(folder), "--host", config.host,
               "--port", str(config.port), "--max-body-mb", str(config.max_body_bytes / 2**20),
               "--max-pending", str(config.max_pending), "--timeout", str(config.timeout)]
    url = f"http://{config.host}:{config.port}"
    with running(command, f"{url}/health", env, startup_timeout):
        yield url + "/"


def serve_folder(folder: str | os.PathLike, config: ServerConfig) -> None:
    """Serve `folder`'s own `handler.py` with uvicorn until interrupted (`proclip serve`)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    worker = EndpointWorker(folder, config.timeout)
    worker.start()  # built before the port opens: a handler that cannot load stops here, with its reason
    try:
        print(f"serving {Path(folder) / HANDLER_FILE} on http://{config.host}:{config.port}/", flush=True)
        uvicorn.run(build_app(worker, config), host=config.host, port=config.port, log_level="warning",
                    access_log=False)
    finally:
        worker.stop(grace=5)
