"""The Inference Endpoints handler served as Endpoints serve it (`proclip_train.hub.serving.serve`: the checkpoint's own
handler.py behind `POST /`) on 127.0.0.1: huggingface_hub's `InferenceClient`, raw image bodies with the labels in the
query string, the embedding forms, malformed and over-bound payloads (4xx in milliseconds), a timed-out request that
frees the worker, and a load of 8 concurrent clients. Every request goes to a loopback port of a server this module
starts; each is bounded by a timeout."""

import base64
import dataclasses
import http.client
import http.server
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch
from PIL import Image
from proclip_train.hub.serving.serve import (
    ServerConfig,
    free_port,
    png_base64,
    post_json,
    run_clients,
    serving,
    zero_shot_workloads,
)

CLIENTS, REQUESTS = 8, 50


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_proclip_dir):
    """A copy of the tiny folder: its handler.py is the one `save_pretrained` ships."""
    folder = tmp_path_factory.mktemp("served") / "proclip-tiny"
    shutil.copytree(tiny_proclip_dir, folder)
    return folder


@pytest.fixture(scope="module")
def url(checkpoint):
    # One intra-op thread: the tiny model's matrices are small and the test machine's cores are shared.
    with serving(checkpoint, ServerConfig(port=free_port(), timeout=60), env={"OMP_NUM_THREADS": "1"}) as url:
        yield url


@pytest.fixture(scope="module")
def model(checkpoint):
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    return ProCLIPModel.from_pretrained(checkpoint).eval(), ProCLIPProcessor.from_pretrained(checkpoint)


def test_zero_shot_answer_is_the_pipelines(url, checkpoint):
    from transformers import pipeline

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    labels = ["red", "ein blaues Quadrat", "猫"]
    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    expected = classifier(image, candidate_labels=labels, hypothesis_template="a photo of {}.")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    parameters = {"candidate_labels": labels, "hypothesis_template": "a photo of {}."}
    status, answer = post_json(url, {"inputs": base64.b64encode(buffer.getvalue()).decode(), "parameters": parameters})
    assert status == 200
    assert [r["label"] for r in answer] == [r["label"] for r in expected]
    assert [r["score"] for r in answer] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_labels_as_one_string_are_split_on_commas(url):
    image = png_base64((30, 30, 200), (40, 30))
    as_list = post_json(url, {"inputs": image, "parameters": {"candidate_labels": ["red", "blue", "grün"]}})
    as_text = post_json(url, {"inputs": image, "parameters": {"candidate_labels": " red, blue ,grün,"}})
    assert as_list[0] == as_text[0] == 200
    assert as_text[1] == as_list[1]  # three labels, not the string's characters


def test_embedding_requests_give_the_models_features(url, model):
    model, processor = model
    captions = ["a red circle", "ein blaues Quadrat unter einem grünen Dreieck"]
    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (20, 50), (30, 200, 30))]
    encoded = [png_base64((200, 30, 30), (40, 30)), png_base64((30, 200, 30), (20, 50))]
    status, answer = post_json(url, {"inputs": {"text": captions, "image": encoded}})
    assert status == 200 and set(answer) == {"text_embeds", "image_embeds"}
    with torch.inference_mode():
        text = model.get_text_features(**processor(text=captions)).pooler_output
        image = model.get_image_features(processor(images=images)["pixel_values"]).pooler_output
    torch.testing.assert_close(torch.tensor(answer["text_embeds"]), text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(answer["image_embeds"]), image, atol=1e-5, rtol=1e-4)
    status, one = post_json(url, {"inputs": {"text": captions[0]}})
    assert status == 200 and len(one["text_embeds"]) == 1
    assert one["text_embeds"][0] == pytest.approx(answer["text_embeds"][0], abs=1e-5)


def twenty_megabyte_png() -> str:
    noise = torch.randint(0, 256, (2600, 2700, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    Image.fromarray(noise.numpy()).save(buffer, format="PNG", compress_level=0)
    assert buffer.tell() > 20 * 10**6
    return base64.b64encode(buffer.getvalue()).decode()


def post_raw(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def announce_body(url: str, size: int) -> tuple[int, dict]:
    """Send only the headers of a POST whose body would be `size` bytes and read the answer (the server refuses it
    on its Content-Length, 413, without reading the body)."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.putrequest("POST", parts.path or "/")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_malformed_requests_get_400_naming_the_problem_and_the_server_keeps_answering(url):
    image = png_base64((10, 200, 10), (40, 30))
    labels = {"candidate_labels": ["a", "b"]}
    cases = [
        ({"parameters": labels}, '"inputs"'),
        ({"inputs": "not base64 at all!", "parameters": labels}, "not valid base64"),
        ({"inputs": base64.b64encode(b"GIF89a? no, plain text").decode(), "parameters": labels}, "not an image"),
        ({"inputs": twenty_megabyte_png(), "parameters": labels}, "the limit is 10.0 MB"),
        ({"inputs": image, "parameters": {"candidate_labels": []}}, "at least one label"),
        ({"inputs": image, "parameters": {"candidate_labels": " , ,"}}, "at least one label"),
        ({"inputs": image, "parameters": {"candidate_labels": [f"label {i}" for i in range(1000)]}},
         "1000 candidate labels; the limit is 100"),
        ({"inputs": 42, "parameters": labels}, "not int"),
        ({"inputs": image, "parameters": {"candidate_labels": {"a": 1}}}, "list of non-empty strings"),
        ({"inputs": image, "parameters": {"candidate_labels": ["a", 3]}}, "list of non-empty strings"),
        ({"inputs": image, "parameters": ["a", "b"]}, "`parameters` must be an object"),
        ({"inputs": image, "parameters": {**labels, "hypothesis_template": "a photo"}}, "exactly one {}"),
        ({"inputs": image, "parameters": {**labels, "hypothesis_template": "{} and {}"}}, "exactly one {}"),
        ({"inputs": image, "parameters": {**labels, "hypothesis_template": "{x} {}"}}, "does not format"),
        ({"inputs": image, "parameters": {**labels, "candidate_label": ["c"]}}, "unknown parameter(s) candidate_label"),
        ({"inputs": {"text": [1, 2]}}, "must hold str items"),
        ({"inputs": {"text": []}}, "empty list"),
        ({"inputs": {"captions": ["a"]}}, "text and/or image"),
        ({"inputs": "http://127.0.0.1:9/cat.png", "parameters": labels}, "image URLs are not accepted"),
        ([1, 2, 3], '"inputs"'),
    ]
    for payload, message in cases:
        status, answer = post_json(url, payload, timeout=60)
        assert status == 400, (payload if len(str(payload)) < 300 else message, answer)
        assert message in answer["error"], (message, answer)
    status, answer = post_raw(url, b'{"inputs": ')
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = post_json(url, {"inputs": image, "parameters": labels})
    assert status == 200 and {r["label"] for r in answer} == {"a", "b"}


def test_eight_concurrent_clients_get_the_sequential_answers(url):
    loads = zero_shot_workloads(CLIENTS, REQUESTS)
    sequential = run_clients(url, [[payload for load in loads for payload in load]], timeout=60)
    assert sequential.errors == 0
    concurrent = run_clients(url, loads, timeout=60)
    assert concurrent.requests == CLIENTS * REQUESTS and concurrent.errors == 0
    flat = [answer for client in concurrent.answers for answer in client]
    assert flat == sequential.answers[0]  # exactly: the same inputs give the same floats
    assert len({json.dumps(answer) for _, answer in flat}) == CLIENTS * REQUESTS


@pytest.fixture
def image_server(tmp_path):
    """A static file server on 127.0.0.1 with one PNG (`/red.png`) and a redirect (`/moved` -> `/red.png`)."""
    Image.new("RGB", (12, 10), (220, 20, 20)).save(tmp_path / "red.png")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def do_GET(self):
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/red.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_image_urls_are_fetched_only_from_allowed_hosts(checkpoint, image_server):
    """The handler module as Endpoints import it (from the checkpoint), called in this process."""
    spec = importlib.util.spec_from_file_location("checkpoint_handler", checkpoint / "handler.py")
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    allowed = handler.Limits(image_url_hosts=("127.0.0.1",), url_timeout=10)
    image = handler.decode_image(f"{image_server}/red.png", allowed)
    assert image.size == (12, 10) and image.getpixel((0, 0)) == (220, 20, 20)
    refusals = [
        (f"{image_server}/red.png", handler.Limits(), "not accepted by this endpoint"),
        (f"{image_server.replace('127.0.0.1', 'localhost')}/red.png", allowed, "host 'localhost' is not allowed"),
        (f"{image_server}/moved", allowed, "redirects to"),
        (f"{image_server}/missing.png", allowed, "answered HTTP 404"),
        (f"{image_server}/red.png", dataclasses.replace(allowed, max_image_bytes=50), "more than"),
    ]
    for url, limits, message in refusals:
        with pytest.raises(ValueError, match=message):
            handler.decode_image(url, limits)
    assert handler.Limits.from_env({"PROCLIP_MAX_LABELS": "1000", "PROCLIP_IMAGE_URL_HOSTS": "127.0.0.1, ::1"}) == \
        handler.Limits(max_labels=1000, image_url_hosts=("127.0.0.1", "::1"))


# -- the Inference API's protocol, spoken by huggingface_hub's own client -------------------------------------------


def png_bytes(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    return base64.b64decode(png_base64(colour, size))


def post_body(url: str, body: bytes, content_type: str | None, timeout: float = 60) -> tuple[int, object]:
    """POST raw bytes with `content_type` (no Content-Type header when None); `(status, decoded JSON answer)`."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("POST", parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                           headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.fixture
def client(url, monkeypatch):
    """huggingface_hub's `InferenceClient` for the loopback server. The suite runs with HF_HUB_OFFLINE=1 (no Hub),
    which the client also applies to an endpoint URL; this server is on 127.0.0.1, so it is lifted here."""
    import huggingface_hub
    from huggingface_hub import InferenceClient

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return InferenceClient(url, timeout=60)


def test_inference_client_feature_extraction_is_encode_text(client, model):
    model, processor = model
    captions = ["a red circle", "ein blaues Quadrat unter einem grünen Dreieck", "猫"]
    one = client.feature_extraction(captions[0])
    many = client.feature_extraction(captions)
    raw = client.feature_extraction(captions, normalize=False)
    assert one.shape == (1, model.config.projection_dim) and many.shape == (3, model.config.projection_dim)
    expected = model.encode_text(captions, processor=processor)
    torch.testing.assert_close(torch.from_numpy(one), expected[:1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(many), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(raw), model.encode_text(captions, normalize=False, processor=processor),
                               atol=1e-5, rtol=1e-4)


def test_inference_client_zero_shot_is_the_pipelines(client, checkpoint):
    from transformers import pipeline

    labels = ["red", "ein blaues Quadrat", "猫"]
    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    expected = classifier(Image.new("RGB", (40, 30), (200, 30, 30)), candidate_labels=labels,
                          hypothesis_template="a photo of {}.")
    answer = client.zero_shot_image_classification(
        png_bytes((200, 30, 30), (40, 30)), candidate_labels=labels, hypothesis_template="a photo of {}.")
    assert [r.label for r in answer] == [r["label"] for r in expected]
    assert [r.score for r in answer] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_a_raw_image_body_is_read_as_the_container_reads_it(url, checkpoint, model):
    """`Content-Type: image/png` (or octet-stream) and the labels in the query string: a zero-shot answer; without
    labels, the image's embedding (`encode_image`)."""
    from transformers import pipeline

    model, processor = model
    image, body = Image.new("RGB", (40, 30), (30, 30, 200)), png_bytes((30, 30, 200), (40, 30))
    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    expected = classifier(image, candidate_labels=["blue", "a red circle"], hypothesis_template="{}")
    query = urllib.parse.urlencode({"candidate_labels": "blue, a red circle", "hypothesis_template": "{}"})
    for content_type in ("image/png", "image/PNG; foo=bar", "application/octet-stream"):
        status, answer = post_body(f"{url}?{query}", body, content_type)
        assert status == 200, answer
        assert [r["label"] for r in answer] == [r["label"] for r in expected]
        assert [r["score"] for r in answer] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    status, answer = post_body(url, body, "image/png")
    assert status == 200
    torch.testing.assert_close(torch.tensor(answer), model.encode_image([image], processor=processor),
                               atol=1e-5, rtol=1e-4)
    status, answer = post_json(url, {"inputs": [png_base64((30, 30, 200), (40, 30)),
                                                "data:image/png;base64," + png_base64((200, 30, 30), (20, 50))]})
    assert status == 200
    both = model.encode_image([image, Image.new("RGB", (20, 50), (200, 30, 30))], processor=processor)
    torch.testing.assert_close(torch.tensor(answer), both, atol=1e-5, rtol=1e-4)


# -- cheap requests with expensive answers, and malformed ones: 4xx in milliseconds ---------------------------------


def thin_png(length: int) -> bytes:
    """A 1 x `length` PNG: about a kilobyte however long (a uniform colour compresses to nothing)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, length), (90, 90, 90)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_requests_over_a_bound_are_refused_in_milliseconds(url):
    thin, very_thin = thin_png(300_000), thin_png(4_000_000)
    assert len(thin) < 2000 and len(very_thin) < 20_000
    labels = {"candidate_labels": ["a", "b"]}
    cases = [
        (lambda: post_body(url + "?candidate_labels=a,b", thin, "image/png"), 400, "1 x 300000 pixels"),
        (lambda: post_body(url, very_thin, "image/png"), 400, "1 x 4000000 pixels"),
        (lambda: post_json(url, {"inputs": base64.b64encode(thin_png(9000)).decode(), "parameters": labels}), 400,
         "the limit is an aspect ratio of 20"),
        (lambda: post_json(url, {"inputs": png_base64((1, 2, 3), (40, 30)),
                                 "parameters": {"candidate_labels": ["x" * 10_000] * 100}}), 400,
         "characters; the limit is 10000"),
        (lambda: post_json(url, {"inputs": png_base64((1, 2, 3), (40, 30)),
                                 "parameters": {"candidate_labels": ["x" * 1000] * 100}}), 400,
         "the limit is 20000 characters per request"),
        (lambda: post_json(url, {"inputs": ["y" * 5_000] * 10}), 400, "the limit is 20000 characters per request"),
        (lambda: announce_body(url, 33 * 2**20), 413, "the request body is 33.0 MB; the limit is 32.0 MB"),
    ]
    for send, status, message in cases:
        started = time.perf_counter()
        got, answer = send()
        assert (got, message) == (status, message) and message in answer["error"], answer
        assert "\n" not in answer["error"]
        assert time.perf_counter() - started < 2.0  # milliseconds when the machine is quiet; shared cores here
    status, answer = post_json(url, {"inputs": png_base64((10, 200, 10), (40, 30)), "parameters": labels})
    assert status == 200 and {r["label"] for r in answer} == {"a", "b"}


def test_malformed_bodies_are_4xx_with_a_one_line_reason(url):
    deep = b"[" * 200_000 + b"]" * 200_000
    cases = [
        (b'{"inputs": "\\ud800 lone surrogate"}', "application/json", "lone surrogate"),
        (b'{"inputs": "%s", "parameters": {"candidate_labels": ["\\udfff"]}}' % png_base64((1, 2, 3), (4, 4)).encode(),
         "application/json", "lone surrogate"),
        (b'{"inputs": {"text": ["ok", "\\ud83d"]}}', "application/json", "lone surrogate"),
        (b'{"inputs": ' + deep + b"}", "application/json", "nested"),
        (deep, "application/json", "nested"),
        (b'{"inputs": "caf\xe9"}', "application/json", "not UTF-8"),
        (b"", "application/json", "not JSON"),
        (b'"just a string"', "application/json", '"inputs"'),
        (b'{"inputs": "a"}', "text/plain", "Content-Type text/plain is not supported"),
        (b'{"inputs": "a"}', None, "no Content-Type"),
        (b"GIF89a? no, plain text", "image/png", "not an image"),
        (b"", "image/png", "not an image"),
    ]
    for body, content_type, message in cases:
        started = time.perf_counter()
        status, answer = post_body(url, body, content_type)
        assert 400 <= status < 500 and message in answer["error"], (body[:60], content_type, status, answer)
        assert "\n" not in answer["error"] and len(answer["error"]) < 500
        assert time.perf_counter() - started < 2.0
    status, answer = post_json(url, {"inputs": "still answering"})
    assert status == 200 and len(answer) == 1


def test_a_timed_out_request_frees_the_worker(checkpoint):
    """With the image bounds lifted, a 1 x 300000 PNG costs the handler many seconds (its resize): the server answers
    504 at its timeout, kills the worker process and answers the request queued behind it with a fresh one."""
    lifted = {"OMP_NUM_THREADS": "1", "PROCLIP_MAX_IMAGE_SIDE": "10000000", "PROCLIP_MAX_ASPECT_RATIO": "10000000"}
    with serving(checkpoint, ServerConfig(port=free_port(), timeout=2), env=lifted) as url:
        status, expected = post_json(url, {"inputs": "queued behind it"})
        assert status == 200
        answers = {}

        def send(name, body, content_type):
            started = time.perf_counter()
            answers[name] = (*post_body(url, body, content_type), time.perf_counter() - started)

        slow = threading.Thread(target=send, args=("slow", thin_png(300_000), "image/png"))
        slow.start()
        time.sleep(0.5)
        queued = threading.Thread(target=send, args=("queued", b'{"inputs": "queued behind it"}', "application/json"))
        queued.start()
        slow.join(60)
        queued.join(60)
    status, answer, seconds = answers["slow"]
    assert status == 504 and "no answer within 2 s" in answer["error"] and seconds < 10
    status, answer, seconds = answers["queued"]  # waited for the timeout and a restart, not for the slow request
    assert status == 200 and answer[0] == pytest.approx(expected[0], abs=1e-6)
    print(f"timed out after {answers['slow'][2]:.1f} s; the queued request answered after {seconds:.1f} s")


def test_a_limit_variable_that_is_not_a_number_stops_proclip_serve_in_two_lines(checkpoint):
    command = [sys.executable, "-m", "proclip_train.cli", "serve", "--model", str(checkpoint), "--port",
               str(free_port())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PROCLIP_MAX_LABELS": "many", "OMP_NUM_THREADS": "1"})
    errors = [line for line in result.stderr.splitlines() if line.startswith("proclip serve: error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors == [f"proclip serve: error: {checkpoint.resolve() / 'handler.py'} failed to load: ValueError: "
                      "PROCLIP_MAX_LABELS='many' is not a number; unset it or give e.g. 100"]
