"""The process behind `proclip serve` that runs a checkpoint's `handler.py`: it reads each request body as Inference
Endpoints' container (huggingface-inference-toolkit) reads it, calls the handler and answers with JSON. The server
talks to it over a pipe and kills and restarts it when an answer is late: a thread cannot be stopped, a process can.

How a body is read (the toolkit's rules):
    Content-Type application/json (any parameters, e.g. charset)   -> the JSON object
    Content-Type image/png, jpeg, jpg, tiff, bmp, gif, webp, x-image, application/octet-stream
                                                                    -> {"inputs": the raw bytes}
    the query string, when the body has no "parameters"             -> "parameters" (digits -> int, true/false -> bool)
The toolkit hands the handler a decoded PIL image for an image body; the bytes are passed here so that the handler
checks the image's size from its header before decoding it (`handler.decode_image`).

Answers: 200 with the handler's answer; 400 with a one-line `{"error": ...}` for a body that cannot be read (another
content type, bytes that are not UTF-8, JSON that does not parse or nests too deeply) and for a request the handler
refuses (`ValueError`), as the toolkit answers; 500 only for a bug (the traceback goes to the server's log).
"""

import dataclasses
import importlib.util
import json
import logging
import multiprocessing
import os
import time
import traceback
from pathlib import Path

logger = logging.getLogger(__name__)

HANDLER_FILE = "handler.py"
IMAGE_TYPES = frozenset({"image/png", "image/jpeg", "image/jpg", "image/tiff", "image/bmp", "image/gif", "image/webp",
                         "image/x-image", "application/octet-stream"})
JSON_TYPE = "application/json"
# What building a handler imports (measured with `python -X importtime`): `import transformers` is lazy, and loading a
# model pulls in modeling, processing and masking utilities (12 s of a 13 s restart at load 8 on 2 cores).
PRELOADED = ["torch", "PIL.Image", "transformers", "transformers.modeling_utils", "transformers.processing_utils",
             "transformers.image_processing_utils", "transformers.masking_utils",
             "transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto"]


@dataclasses.dataclass(frozen=True)
class EndpointRequest:
    """What the worker needs of an HTTP request: its body, `Content-Type` header and query string pairs."""

    body: bytes
    content_type: str | None = None
    query: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class EndpointAnswer:
    """An HTTP status and its JSON body."""

    status: int
    body: bytes

    @classmethod
    def error(cls, status: int, message: str) -> "EndpointAnswer":
        """`{"error": message}` on one line of at most 500 characters."""
        line = " ".join(str(message).split())
        return cls(status, json.dumps({"error": line if len(line) <= 500 else line[:497] + "..."}).encode())


def load_handler(folder: str | os.PathLike):
    """`EndpointHandler(folder)` from `folder/handler.py`, imported from that file as Inference Endpoints does."""
    folder = Path(folder).resolve()
    spec = importlib.util.spec_from_file_location("proclip_endpoint_handler", folder / HANDLER_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EndpointHandler(str(folder))


def query_parameters(pairs: tuple[tuple[str, str], ...]) -> dict:
    """The query string as the toolkit passes it: the last value of each name, digits as int, true/false as bool."""
    parameters = {}
    for name, value in pairs:
        number = value.isascii() and value.isdigit()  # not "²": str.isdigit takes it, int() does not
        parameters[name] = int(value) if number else {"true": True, "false": False}.get(value, value)
    return parameters


def read_request(request: EndpointRequest) -> dict:
    """The handler's `data` for `request`, read as the Endpoints container reads it. Raises `ValueError` with a
    one-line reason for a body it cannot read."""
    media_type = (request.content_type or "").split(";")[0].strip().lower()
    if media_type in IMAGE_TYPES:
        data = {"inputs": request.body}
    elif media_type == JSON_TYPE:
        try:
            data = json.loads(request.body.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"the body is not UTF-8 (byte {error.start}); send JSON encoded as UTF-8") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"the body is not JSON: {error}") from None
        except RecursionError:
            raise ValueError("the body's JSON is nested too deeply (arrays or objects inside each other); "
                             "a request needs three levels") from None
        if not isinstance(data, dict):
            raise ValueError(f'the body must be a JSON object with "inputs", not a JSON {type(data).__name__}')
    elif not media_type:
        raise ValueError("the request has no Content-Type; send application/json, or an image with its image/* type")
    else:
        raise ValueError(f"Content-Type {media_type[:80]} is not supported; send {JSON_TYPE} or "
                         f"{', '.join(sorted(IMAGE_TYPES))}")
    if request.query and "parameters" not in data:
        data["parameters"] = query_parameters(request.query)
    return data


def answer(handler, request: EndpointRequest) -> EndpointAnswer:
    """`handler`'s answer to `request` as JSON, or the error the container would answer (500 only for a bug)."""
    try:
        result = handler(read_request(request))
    except ValueError as error:  # a body that cannot be read, a request the handler refuses
        return EndpointAnswer.error(400, error)
    except Exception as error:
        logger.error("the handler failed:\n%s", traceback.format_exc())
        return EndpointAnswer.error(500, f"{type(error).__name__}: {error}")
    try:
        return EndpointAnswer(200, json.dumps(result, allow_nan=False).encode())
    except (TypeError, ValueError) as error:
        logger.error("the handler's answer is not JSON:\n%s", traceback.format_exc())
        return EndpointAnswer.error(500, f"the handler's answer is not JSON: {error}")


def serve_requests(folder: str, connection) -> None:
    """The worker process: load `folder`'s handler, say "ready" (or why not), then answer each request received on
    `connection` until the server closes it."""
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    try:
        handler = load_handler(folder)
    except Exception as error:  # the server reports it and exits; a traceback here would only repeat it
        connection.send(("failed", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", os.getpid()))
    while True:
        try:
            request = connection.recv()
        except (EOFError, OSError):  # the server is gone
            return
        connection.send(answer(handler, request))


class HandlerLoadError(RuntimeError):
    """The worker process could not build the handler (the message says why)."""


class EndpointWorker:
    """One worker process that runs `folder`'s handler; `answer` is called from one thread at a time.

    A request the worker does not answer within `timeout` seconds is answered 504 and the process killed; the next
    request starts a new one (as `start` does: a fresh Python, the handler's imports and the model loaded again).
    """

    def __init__(self, folder: str | os.PathLike, timeout: float, startup_timeout: float = 600.0):
        self.folder, self.timeout, self.startup_timeout = str(folder), timeout, startup_timeout
        self.process = self.connection = None

    def start(self) -> None:
        """Start the process and wait until its handler is built; `HandlerLoadError` with the reason if it is not."""
        # Forked from multiprocessing's fork server, which imports `PRELOADED` once and runs no threads: a worker
        # inherits no locks, and a restarted one skips the imports.
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOADED)
        self.connection, child = context.Pipe()
        self.process = context.Process(target=serve_requests, args=(self.folder, child), name="endpoint-handler",
                                       daemon=True)
        started = time.monotonic()
        self.process.start()
        child.close()
        if not self.connection.poll(self.startup_timeout):
            self.stop()
            raise HandlerLoadError(f"the handler was not built within {self.startup_timeout:.0f} s")
        try:
            state, detail = self.connection.recv()
        except EOFError:
            self.process.join(5)
            state, detail = "failed", f"the process exited with code {self.process.exitcode}"
        if state != "ready":
            self.stop()
            raise HandlerLoadError(f"{Path(self.folder) / HANDLER_FILE} failed to load: {' '.join(detail.split())}")
        logger.info("handler process %s ready in %.1f s", detail, time.monotonic() - started)

    def stop(self, grace: float = 0.0) -> None:
        """End the process and forget it: let it exit within `grace` seconds (it returns when its pipe closes),
        then kill it (it may be in the middle of an answer)."""
        if self.process is not None:
            self.connection.close()
            self.process.join(grace)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.process = self.connection = None

    def answer(self, request: EndpointRequest) -> EndpointAnswer:
        """The worker's answer to `request`; 504 (and the process killed) after `timeout` s, 500 if it died."""
        if self.process is None:
            self.start()
        started = time.monotonic()
        self.connection.send(request)
        if not self.connection.poll(self.timeout):
            logger.warning("no answer within %.0f s: killing handler process %s", self.timeout, self.process.pid)
            self.stop()
            return EndpointAnswer.error(504, f"no answer within {self.timeout:g} s; the handler was stopped")
        try:
            return self.connection.recv()
        except EOFError:
            self.process.join(5)
            exitcode = self.process.exitcode
            self.stop()
            return EndpointAnswer.error(500, f"the handler process died after {time.monotonic() - started:.1f} s "
                                             f"(exit code {exitcode}, e.g. killed for memory)")
