"""Inference Endpoints handler for a ProCLIP checkpoint folder: the Inference API's zero-shot image classification and
feature extraction.

Inference Endpoints' custom-handler contract: the server imports this file from the repository, builds
`EndpointHandler(path)` once and calls it with each request's body, read as huggingface-inference-toolkit reads it
(JSON, or `{"inputs": image}` for an `image/*` body, with the query string as `parameters` when the body has none).
What `huggingface_hub.InferenceClient` and the Hub's widgets send:

Zero-shot image classification: `candidate_labels` given (in `parameters`, or the query string of an image body)
    {"inputs": IMAGE, "parameters": {"candidate_labels": ["cat", "dog"] | "cat, dog",
                                     "hypothesis_template": "This is a photo of {}."}}      (template optional)
    -> [{"label": str, "score": float}, ...], highest score first: the zero-shot pipeline's answer. A string of
    labels is split on commas, as the Hub inference API does; the template must hold exactly one `{}`.
Feature extraction: no `candidate_labels`
    {"inputs": "a caption" | ["caption", ...]}                 -> [[float] * D] * N     (N = 1 for one string)
    {"inputs": IMAGE | [IMAGE, ...]}  (an image body included)  -> [[float] * D] * N
    `encode_text` / `encode_image`'s embeddings: L2-normalised unless `"normalize": false` (a top-level key, as
    `InferenceClient.feature_extraction` sends it, or in `parameters`). A string is text unless it is a
    `data:image/` URI or the base64 of an image file (PNG, JPEG, GIF, BMP, TIFF, WebP: told by its first bytes);
    one request holds texts or images, not both.
Both at once (this project's own form)
    {"inputs": {"text": "a caption" | [...], "image": IMAGE | [...]}} -> {"text_embeds": [[float] * D, ...],
    "image_embeds": [[float] * D, ...]} (either key alone gives its half): the projected, unnormalised
    `pooler_output` of `get_text_features` / `get_image_features`.

IMAGE is a base64 string (a `data:image/...;base64,` prefix is allowed), raw bytes or a PIL image (what the
Endpoints server passes for an image body), or, in zero-shot and `"image"` inputs, an `http(s)://` URL whose host is
listed in the environment variable `PROCLIP_IMAGE_URL_HOSTS` (comma-separated host names; empty by default, so URLs
are refused: a served model should not fetch whatever a caller names). A URL is fetched without following redirects,
within `url_timeout` seconds and `max_image_bytes`.

Every request is bounded before the work it asks for starts (`Limits`, each settable by a `PROCLIP_<NAME>` environment
variable, e.g. `PROCLIP_MAX_LABELS=1000`): an image's encoded size, its width and height, aspect ratio and pixels
(read from its header, before it is decoded), the pixels of all a request's images, the characters of each text and
of all a request's texts (templated labels included), and the tokens the text tower would run on. A request that
breaks a rule or a bound raises `ValueError` with a one-line reason (servers answer it with HTTP 400) in
milliseconds.

Standalone on purpose: Inference Endpoints imports this file on its own, so it imports only the standard library,
torch, PIL and transformers, and loads the model and the image opener (`images_proclip.py`, shipped beside it)
through remote code.
"""

import base64
import binascii
import dataclasses
import os
import threading

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

DEFAULT_TEMPLATE = "This is a photo of {}."  # the zero-shot pipeline's default
ZERO_SHOT_PARAMETERS = ("candidate_labels", "hypothesis_template")
FEATURE_PARAMETERS = ("normalize",)
EMBEDDING_INPUTS = ("text", "image")
# The first bytes of the image files a base64 string is recognised by (WebP: RIFF....WEBP).
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; each field can be set by the environment variable `PROCLIP_<FIELD NAME>`.

    Args:
        max_labels: candidate labels per zero-shot request.
        max_texts: captions per embedding request.
        max_images: images per embedding request.
        max_text_chars: characters per caption or label.
        max_request_chars: characters of all a request's texts (each label with its template).
        max_request_tokens: tokens of all a request's texts after truncation to the model's `max_text_length`: what
            the text tower runs on (bounds the time of a request of many long labels).
        max_image_bytes: size of an encoded image.
        max_image_side: width and height of an image, each (read from its header, before decoding).
        max_aspect_ratio: longer side / shorter side: the processor scales the shorter side to its input size, so a
            1 x 300000 image would be resized to 224 x 67 million pixels.
        max_image_pixels: width x height of an image.
        max_request_pixels: width x height summed over a request's images.
        image_url_hosts: host names that image URLs may point to (comma-separated in the environment).
        url_timeout: seconds allowed for fetching one image URL.
    """

    max_labels: int = 100
    max_texts: int = 64
    max_images: int = 16
    max_text_chars: int = 10_000
    max_request_chars: int = 20_000
    max_request_tokens: int = 4_096
    max_image_bytes: int = 10 * 2**20
    max_image_side: int = 10_000
    max_aspect_ratio: float = 20.0
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 80_000_000
    image_url_hosts: tuple = ()
    url_timeout: float = 10.0

    @classmethod
    def from_env(cls, environ=None) -> "Limits":
        """The defaults, overridden by the `PROCLIP_<NAME>` variables set in `environ` (default `os.environ`)."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = f"PROCLIP_{field.name.upper()}"
            text = environ.get(name)
            if text is None:
                continue
            if field.name == "image_url_hosts":
                values[field.name] = tuple(host.strip().lower() for host in text.split(",") if host.strip())
                continue
            try:
                values[field.name] = type(field.default)(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a number; unset it or give e.g. {field.default}") from None
        return cls(**values)

    def image_policy(self):
        """The `ImagePolicy` of these limits: no local paths, URLs only to `image_url_hosts`, bounded sizes."""
        return ImagePolicy(allow_paths=False, url_hosts=self.image_url_hosts, url_timeout=self.url_timeout,
                           max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           max_side=self.max_image_side, max_aspect_ratio=self.max_aspect_ratio)


def _checkpoint_code(name: str):
    """`images_proclip.<name>` from the folder this file ships in, imported as transformers imports remote code
    (Endpoints import this file on its own, not as part of a package)."""
    return get_class_from_dynamic_module(f"images_proclip.{name}", os.path.dirname(os.path.abspath(__file__)))


ImagePolicy, open_image = _checkpoint_code("ImagePolicy"), _checkpoint_code("open_image")


def decode_image(inputs, limits: Limits = Limits()) -> Image.Image:
    """An RGB PIL image from a PIL image, raw bytes, a base64 string (a `data:` URL prefix is allowed) or an allowed
    http(s) URL, read by the checkpoint's `images_proclip.open_image` within `limits` (sizes checked from the header,
    before decoding). Raises `ValueError` naming what is wrong."""
    if isinstance(inputs, str) and inputs.startswith(("http://", "https://")) and not limits.image_url_hosts:
        raise ValueError("image URLs are not accepted by this endpoint (PROCLIP_IMAGE_URL_HOSTS is empty); "
                         "send the image as base64")
    if not isinstance(inputs, (str, bytes, bytearray, Image.Image)):
        raise ValueError(f"an image must be a base64 string or an image URL, not {type(inputs).__name__}")
    return open_image(inputs, limits.image_policy())


def is_image(item) -> bool:
    """Whether a feature-extraction input is an image: bytes, a PIL image, a `data:image/` URI, or a string whose
    first characters decode (base64) to an image file's signature. Any other string is text."""
    if isinstance(item, (bytes, bytearray, Image.Image)):
        return True
    if not isinstance(item, str):
        return False
    if item.startswith("data:image/"):
        return True
    try:
        head = base64.b64decode(item[:16], validate=True) if len(item) >= 16 else b""
    except (binascii.Error, ValueError):
        return False
    return head.startswith(IMAGE_SIGNATURES) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def check_texts(texts: list[str], what: str, limits: Limits) -> None:
    """Refuse (`ValueError`) texts that are not text (a lone surrogate cannot be tokenised or answered as JSON) or
    whose characters pass `limits`, one text or all of them."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"a {what} holds a lone surrogate ({text[error.start]!r} at character {error.start}); "
                             "send each \\ud800-\\udfff escape as half of a pair") from None
    longest = max(len(text) for text in texts)
    if longest > limits.max_text_chars:
        raise ValueError(f"a {what} has {longest} characters; the limit is {limits.max_text_chars}")
    total = sum(len(text) for text in texts)
    if total > limits.max_request_chars:
        raise ValueError(f"the {what}s have {total} characters; the limit is {limits.max_request_chars} characters "
                         "per request")


def candidate_labels(parameters: dict, limits: Limits = Limits()) -> list[str]:
    """`parameters["candidate_labels"]` as a list: a string is split on commas (as the Hub inference API does),
    blanks dropped. Raises `ValueError` for a missing, empty, oversized or ill-typed value."""
    labels = parameters.get("candidate_labels")
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if labels is None or (isinstance(labels, list) and not labels):
        raise ValueError("`parameters.candidate_labels` must name at least one label (a list, or one string of "
                         "comma-separated labels)")
    if not isinstance(labels, list):
        raise ValueError("`parameters.candidate_labels` must be a list of non-empty strings or a comma-separated "
                         f"string, not {type(labels).__name__}")
    if len(labels) > limits.max_labels:
        raise ValueError(f"{len(labels)} candidate labels; the limit is {limits.max_labels}")
    if not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError("`parameters.candidate_labels` must be a list of non-empty strings or a comma-separated "
                         "string, not a list holding " + next(_describe(label) for label in labels
                                                              if not isinstance(label, str) or not label.strip()))
    return labels


def _describe(value) -> str:
    """A short, safe description of a caller's value for an error message (no repr of a deep or huge value)."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    return type(value).__name__


def hypothesis_template(parameters: dict) -> str:
    """`parameters["hypothesis_template"]` (default "This is a photo of {}."), refused unless a string with
    exactly one `{}` that `str.format` fills."""
    template = parameters.get("hypothesis_template", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"`parameters.hypothesis_template` must be a string with exactly one {{}} for the label, "
                         f"not {_describe(template)}")
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"`parameters.hypothesis_template` {_describe(template)} does not format: {error!r}; "
                         "write other braces as {{ and }}") from error
    return template


def _as_list(value, what: str, limit: int) -> list:
    """`value` or `[value]`, checked: one to `limit` items."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"`{what}` is an empty list")
    if len(items) > limit:
        raise ValueError(f"`{what}` has {len(items)} items; the limit is {limit}")
    return items


def _strings(items: list, what: str) -> list[str]:
    wrong = next((item for item in items if not isinstance(item, str)), None)
    if wrong is not None:
        raise ValueError(f"`{what}` must hold str items, not {_describe(wrong)}")
    return items


class EndpointHandler:
    """Builds the model and processor from `path` once; each call answers one request (see the module docstring).

    Calls are serialised by a lock: a fast tokenizer must not be used by two threads at once, and a server may call
    from a thread pool.
    """

    def __init__(self, path: str = ""):
        self.limits = Limits.from_env()
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self._lock = threading.Lock()

    def __call__(self, data: dict):
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request must be a JSON object with "inputs" (and "parameters" for zero-shot '
                             "classification)")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"`parameters` must be an object, not {type(parameters).__name__}")
        # InferenceClient.feature_extraction sends its options beside "inputs", zero_shot_* inside "parameters".
        parameters = {**{key: value for key, value in data.items() if key not in ("inputs", "parameters")},
                      **parameters}
        inputs = data["inputs"]
        zero_shot = "candidate_labels" in parameters and not isinstance(inputs, dict)
        known = ZERO_SHOT_PARAMETERS if zero_shot else () if isinstance(inputs, dict) else FEATURE_PARAMETERS
        unknown = sorted(str(name) for name in set(parameters) - set(known))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)[:200]}; known here: "
                             f"{', '.join(known) or 'none'}")
        if isinstance(inputs, dict):
            return self.embeddings(inputs)
        if zero_shot:
            labels, template = candidate_labels(parameters, self.limits), hypothesis_template(parameters)
            check_texts([template.format(label) for label in labels], "candidate label", self.limits)
            return self.classify(decode_image(inputs, self.limits), labels, template)
        normalize = parameters.get("normalize", True)
        if not isinstance(normalize, bool):
            raise ValueError(f"`normalize` must be true or false, not {_describe(normalize)}")
        return self.features(inputs, normalize)

    def _check_tokens(self, texts: list[str], what: str) -> None:
        """Refuse texts (checked by `check_texts`) whose tokens after truncation pass the limit, before the model
        runs."""
        tokens = sum(map(len, self.processor.tokenizer(texts, truncation=True)["input_ids"]))
        if tokens > self.limits.max_request_tokens:
            raise ValueError(f"the {what}s are {tokens} tokens; the limit is {self.limits.max_request_tokens} tokens "
                             "per request")

    def _images(self, cells: list) -> list[Image.Image]:
        """Each cell decoded (`decode_image`), the pixels of all of them bounded by `max_request_pixels`."""
        images, pixels = [], 0
        for cell in cells:
            images.append(decode_image(cell, self.limits))
            pixels += images[-1].width * images[-1].height
            if pixels > self.limits.max_request_pixels:
                raise ValueError(f"the images hold over {self.limits.max_request_pixels} pixels together, the limit "
                                 "per request")
        return images

    def classify(self, image: Image.Image, labels: list[str], template: str) -> list[dict]:
        """Zero-shot scores of `labels` for `image`: the pipeline's softmax over `logits_per_image`, sorted."""
        texts = [template.format(label) for label in labels]
        with self._lock, torch.inference_mode():
            self._check_tokens(texts, "candidate label")
            batch = self.processor(images=image, text=texts)
            logits = self.model(**batch).logits_per_image[0]
        scores = logits.softmax(-1).tolist()
        return sorted(({"label": l, "score": s} for l, s in zip(labels, scores)), key=lambda r: -r["score"])

    def features(self, inputs, normalize: bool) -> list[list[float]]:
        """The Inference API's feature extraction: `(N, D)` `encode_text` or `encode_image` embeddings of a string,
        an image or a list of either."""
        items = inputs if isinstance(inputs, list) else [inputs]
        kinds = {is_image(item) for item in items}
        if len(kinds) > 1:
            raise ValueError("`inputs` mixes texts and images; send them in two requests, or as "
                             '{"text": [...], "image": [...]}')
        if kinds == {True}:
            images = self._images(_as_list(inputs, "inputs", self.limits.max_images))
            with self._lock:
                embeds = self.model.encode_image(images, normalize=normalize, processor=self.processor)
        else:
            texts = _strings(_as_list(inputs, "inputs", self.limits.max_texts), "inputs")
            check_texts(texts, "text", self.limits)
            with self._lock:
                self._check_tokens(texts, "text")
                embeds = self.model.encode_text(texts, normalize=normalize, processor=self.processor)
        return embeds.float().tolist()

    def embeddings(self, inputs: dict) -> dict:
        """`{"text_embeds": (N, D) lists}` and/or `{"image_embeds": (M, D) lists}` for `inputs["text"]` /
        `inputs["image"]`: unnormalised."""
        unknown = sorted(str(name) for name in set(inputs) - set(EMBEDDING_INPUTS))
        if unknown or not inputs:
            raise ValueError(f"`inputs` as an object takes {' and/or '.join(EMBEDDING_INPUTS)}"
                             + (f", not {', '.join(unknown)[:200]}" if unknown else ""))
        texts = images = None
        if "text" in inputs:
            texts = _strings(_as_list(inputs["text"], "inputs.text", self.limits.max_texts), "inputs.text")
            check_texts(texts, "text", self.limits)
        if "image" in inputs:
            images = self._images(_as_list(inputs["image"], "inputs.image", self.limits.max_images))
        result = {}
        with self._lock:
            if texts is not None:
                self._check_tokens(texts, "text")
                result["text_embeds"] = self.model.encode_text(texts, normalize=False, processor=self.processor)
            if images is not None:
                result["image_embeds"] = self.model.encode_image(images, normalize=False, processor=self.processor)
        return {key: embeds.float().tolist() for key, embeds in result.items()}
