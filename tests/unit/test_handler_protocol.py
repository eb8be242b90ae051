"""The Inference Endpoints handler in this process, imported from the checkpoint as Endpoints import it: the Inference
API's request shapes, each request bound refused before its work starts, and the reading of request bodies as the
Endpoints container reads them (`proclip_train.hub.serving.endpoint_worker`). The served handler:
test_handler_server.py."""

import base64
import importlib.util
import io
import json
import time

import pytest
import torch
from PIL import Image
from proclip_train.hub.serving.endpoint_worker import (
    EndpointRequest,
    answer,
    query_parameters,
    read_request,
)


@pytest.fixture(scope="module")
def handler_module(tiny_proclip_dir):
    spec = importlib.util.spec_from_file_location("checkpoint_handler", tiny_proclip_dir / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def handler(handler_module, tiny_proclip_dir, one_thread):
    return handler_module.EndpointHandler(str(tiny_proclip_dir))


def png(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_feature_extraction_shapes_are_the_inference_apis(handler):
    model, processor = handler.model, handler.processor
    one, many = handler({"inputs": "a red circle"}), handler({"inputs": ["a red circle", "猫"]})
    assert len(one) == 1 and len(many) == 2 and len(one[0]) == model.config.projection_dim
    torch.testing.assert_close(torch.tensor(many), model.encode_text(["a red circle", "猫"], processor=processor))
    raw = handler({"inputs": "a red circle", "normalize": False})
    torch.testing.assert_close(torch.tensor(raw), model.encode_text(["a red circle"], normalize=False,
                                                                    processor=processor))
    assert handler({"inputs": "a red circle", "parameters": {"normalize": False}}) == raw
    images = [png((40, 30)), base64.b64encode(png((20, 50), (0, 0, 255))).decode()]
    expected = model.encode_image([Image.open(io.BytesIO(png((40, 30)))), Image.new("RGB", (20, 50), (0, 0, 255))],
                                  processor=processor)
    torch.testing.assert_close(torch.tensor(handler({"inputs": images})), expected)


def test_a_string_is_an_image_only_by_its_first_bytes(handler_module):
    is_image = handler_module.is_image
    for kind in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=kind)
        assert is_image(base64.b64encode(buffer.getvalue()).decode()), kind
    assert is_image("data:image/png;base64,AAAA") and is_image(b"anything") and is_image(Image.new("RGB", (1, 1)))
    for text in ("a red circle", "iVBORw0KGgo", "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY", "data:text/plain,hi", ""):
        assert not is_image(text), text


def test_zero_shot_and_embedding_refusals_name_the_bound(handler, handler_module):
    limits = handler_module.Limits
    image = base64.b64encode(png((40, 30))).decode()
    cases = [
        (limits(max_request_tokens=20), {"inputs": image, "parameters": {"candidate_labels": ["a", "b", "c"] * 3}},
         "tokens; the limit is 20 tokens per request"),
        (limits(max_request_tokens=20), {"inputs": ["a red circle"] * 5}, "the limit is 20 tokens"),
        (limits(), {"inputs": image, "parameters": {"candidate_labels": ["x" * 10_001, "y"]}},
         "a candidate label has 10021 characters; the limit is 10000"),  # with its template
        (limits(), {"inputs": png((2, 41))}, "aspect ratio of 20"),
        (limits(max_image_side=30), {"inputs": png((40, 30))}, "the limit is 30 per side"),
        (limits(max_image_pixels=1000), {"inputs": png((40, 30))}, "the limit is 1000 pixels"),
        (limits(max_request_pixels=2000), {"inputs": [png((40, 30))] * 2}, "over 2000 pixels together"),
        (limits(), {"inputs": ["a caption", image]}, "mixes texts and images"),
        (limits(), {"inputs": [1]}, "must hold str items, not int"),
        (limits(), {"inputs": "a", "truncate": True}, "unknown parameter(s) truncate; known here: normalize"),
        (limits(), {"inputs": "a", "normalize": "yes"}, "`normalize` must be true or false"),
        (limits(), {"inputs": {"text": "a"}, "parameters": {"normalize": False}}, "known here: none"),
        (limits(), {"inputs": image, "parameters": {"candidate_labels": ["ok", ["nested"]]}}, "holding list"),
        (limits(), {"inputs": "\ud83d", "parameters": {"candidate_labels": "a"}}, "not valid base64"),
        (limits(), {"inputs": image, "parameters": {"candidate_labels": "a", "hypothesis_template": "\udc00 {}"}},
         "lone surrogate"),
    ]
    default = handler.limits
    try:
        for bound, payload, message in cases:
            handler.limits = bound
            with pytest.raises(ValueError, match=None) as caught:
                handler(payload)
            assert message in str(caught.value), (message, str(caught.value))
    finally:
        handler.limits = default


def test_an_image_over_a_bound_is_refused_from_its_header(handler_module):
    """A 1 x 4000000 PNG (a few kilobytes) decodes to 12 MB and resizes to gigabytes: refused before either."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 4_000_000), (9, 9, 9)).save(buffer, format="PNG", optimize=True)
    started = time.perf_counter()
    with pytest.raises(ValueError, match="1 x 4000000 pixels; the limit is 10000 per side"):
        handler_module.decode_image(buffer.getvalue())
    assert time.perf_counter() - started < 0.5
    with pytest.raises(ValueError, match="aspect ratio"):  # a decoded image (the container's image body) too
        handler_module.decode_image(Image.new("RGB", (5000, 10)))


def test_limits_are_read_from_the_environment(handler_module):
    limits = handler_module.Limits
    assert limits.from_env({"PROCLIP_MAX_REQUEST_TOKENS": "100", "PROCLIP_MAX_ASPECT_RATIO": "4.5"}) == \
        limits(max_request_tokens=100, max_aspect_ratio=4.5)
    with pytest.raises(ValueError, match="PROCLIP_MAX_LABELS='many' is not a number"):
        limits.from_env({"PROCLIP_MAX_LABELS": "many"})


def test_bodies_are_read_as_the_container_reads_them():
    labels = (("candidate_labels", "cat, dog"), ("top_k", "3"), ("flag", "true"))
    assert read_request(EndpointRequest(b"\x89PNG...", "image/png", labels)) == \
        {"inputs": b"\x89PNG...", "parameters": {"candidate_labels": "cat, dog", "top_k": 3, "flag": True}}
    body = json.dumps({"inputs": "x", "parameters": {"candidate_labels": ["a"]}}).encode()
    assert read_request(EndpointRequest(body, "Application/JSON; charset=utf-8", labels))["parameters"] == \
        {"candidate_labels": ["a"]}  # the body's parameters win over the query string
    assert query_parameters((("a", "1"), ("a", "2"), ("b", "²"))) == {"a": 2, "b": "²"}
    refusals = [
        (EndpointRequest(b"{}", "text/csv"), "Content-Type text/csv is not supported"),
        (EndpointRequest(b"{}", None), "no Content-Type"),
        (EndpointRequest(b"[1]", "application/json"), "not a JSON list"),
        (EndpointRequest(b"[" * 100_000, "application/json"), "nested too deeply"),
        (EndpointRequest(b"\xff", "application/json"), "not UTF-8 (byte 0)"),
    ]
    for request, message in refusals:
        with pytest.raises(ValueError, match=None) as caught:
            read_request(request)
        assert message in str(caught.value)


def test_only_a_bug_is_a_500_and_every_error_is_one_line():
    def refusing(data):
        raise ValueError("two\nlines")

    def buggy(data):
        raise KeyError("oops")

    request = EndpointRequest(b'{"inputs": "x"}', "application/json")
    refused = answer(refusing, request)
    assert refused.status == 400 and json.loads(refused.body) == {"error": "two lines"}
    assert answer(buggy, request).status == 500
    assert answer(lambda data: [float("nan")], request).status == 500  # not JSON: a bug, not the caller's fault
    ok = answer(lambda data: {"echo": data["inputs"]}, request)
    assert ok.status == 200 and json.loads(ok.body) == {"echo": "x"}
