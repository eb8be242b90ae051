"""Inference Endpoints handler for a ProCLIP checkpoint folder: zero-shot classification and embeddings.

Inference Endpoints' custom-handler contract: the server imports this file from the repository, builds
`EndpointHandler(path)` once and calls it with each request's JSON body. Three kinds of request:

Zero-shot image classification (what the Hub's zero-shot-image-classification widget and API send)
    {"inputs": IMAGE, "parameters": {"candidate_labels": ["cat", "dog"] | "cat, dog",
                                     "hypothesis_template": "This is a photo of {}."}}      (template optional)
    -> [{"label": str, "score": float}, ...], highest score first: the zero-shot pipeline's answer. A string of
    labels is split on commas, as the Hub inference API does; the template must hold exactly one `{}`.
Text embeddings
    {"inputs": {"text": "a caption" | ["caption", ...]}} -> {"text_embeds": [[float] * D, ...]}
Image embeddings
    {"inputs": {"image": IMAGE | [IMAGE, ...]}} -> {"image_embeds": [[float] * D, ...]}
    (`text` and `image` in one request give both). The embeddings are the projected, unnormalised `pooler_output`
    of `get_text_features` / `get_image_features`: normalise them before taking cosine similarities.

IMAGE is a base64 string (a `data:image/...;base64,` prefix is allowed), raw bytes or a PIL image (what the
Endpoints server passes for an image body), or an `http(s)://` URL whose host is listed in the environment variable
`PROCLIP_IMAGE_URL_HOSTS` (comma-separated host names; empty by default, so URLs are refused: a served model should
not fetch whatever a caller names). A URL is fetched without following redirects, within `url_timeout` seconds and
`max_image_bytes`.

A request that breaks a rule or a limit raises `ValueError` naming the problem (servers answer it with HTTP 400).
Limits (`Limits`) are read from `PROCLIP_<NAME>` environment variables, e.g. `PROCLIP_MAX_LABELS=1000`.

Standalone on purpose: Inference Endpoints imports this file on its own, so it imports only the standard library,
torch, PIL and transformers, and loads the model and the image opener (`images_proclip.py`, shipped beside it)
through remote code.
"""

import dataclasses
import os
import threading

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
from transformers.dynamic_module_utils import get_class_from_dynamic_module

DEFAULT_TEMPLATE = "This is a photo of {}."  # the zero-shot pipeline's default
PARAMETERS = ("candidate_labels", "hypothesis_template")
EMBEDDING_INPUTS = ("text", "image")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; each field can be set by the environment variable `PROCLIP_<FIELD NAME>`.

    Args:
        max_labels: candidate labels per zero-shot request.
        max_texts: captions per embedding request.
        max_images: images per embedding request.
        max_text_chars: characters per caption or label (longer text is truncated to the model's
            `max_text_length` tokens anyway; this bounds the tokenizer's work).
        max_image_bytes: size of an encoded image.
        max_image_pixels: width x height of a decoded image.
        image_url_hosts: host names that image URLs may point to (comma-separated in the environment).
        url_timeout: seconds allowed for fetching one image URL.
    """

    max_labels: int = 100
    max_texts: int = 64
    max_images: int = 16
    max_text_chars: int = 10_000
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 40_000_000
    image_url_hosts: tuple = ()
    url_timeout: float = 10.0

    @classmethod
    def from_env(cls, environ=None) -> "Limits":
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            text = environ.get(f"PROCLIP_{field.name.upper()}")
            if text is None:
                continue
            if field.name == "image_url_hosts":
                values[field.name] = tuple(host.strip().lower() for host in text.split(",") if host.strip())
            else:
                values[field.name] = type(field.default)(text)
        return cls(**values)

    def image_policy(self):
        """The `ImagePolicy` of these limits: no local paths, URLs only to `image_url_hosts`, bounded sizes."""
        return ImagePolicy(allow_paths=False, url_hosts=self.image_url_hosts, url_timeout=self.url_timeout,
                           max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)


def _checkpoint_code(name: str):
    """`images_proclip.<name>` from the folder this file ships in, imported as transformers imports remote code
    (Endpoints import this file on its own, not as part of a package)."""
    return get_class_from_dynamic_module(f"images_proclip.{name}", os.path.dirname(os.path.abspath(__file__)))


ImagePolicy, open_image = _checkpoint_code("ImagePolicy"), _checkpoint_code("open_image")


def decode_image(inputs, limits: Limits = Limits()) -> Image.Image:
    """An RGB PIL image from a PIL image, raw bytes, a base64 string (a `data:` URL prefix is allowed) or an allowed
    http(s) URL, read by the checkpoint's `images_proclip.open_image` within `limits`. Raises `ValueError` naming
    what is wrong."""
    if isinstance(inputs, str) and inputs.startswith(("http://", "https://")) and not limits.image_url_hosts:
        raise ValueError("image URLs are not accepted by this endpoint (PROCLIP_IMAGE_URL_HOSTS is empty); "
                         "send the image as base64")
    if not isinstance(inputs, (str, bytes, bytearray, Image.Image)):
        raise ValueError(f"an image must be a base64 string or an image URL, not {type(inputs).__name__}")
    return open_image(inputs, limits.image_policy())


def candidate_labels(parameters: dict, limits: Limits = Limits()) -> list[str]:
    """`parameters["candidate_labels"]` as a list: a string is split on commas (as the Hub inference API does),
    blanks dropped. Raises `ValueError` for a missing, empty, oversized or ill-typed value."""
    labels = parameters.get("candidate_labels")
    if isinstance(labels, str):
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    if labels is None or (isinstance(labels, list) and not labels):
        raise ValueError("`parameters.candidate_labels` must name at least one label (a list, or one string of "
                         "comma-separated labels)")
    if not isinstance(labels, list) or not all(isinstance(label, str) and label.strip() for label in labels):
        raise ValueError("`parameters.candidate_labels` must be a list of non-empty strings or a comma-separated "
                         f"string, not {labels!r:.80}")
    if len(labels) > limits.max_labels:
        raise ValueError(f"{len(labels)} candidate labels; the limit is {limits.max_labels}")
    _check_text_lengths(labels, "candidate label", limits)
    return labels


def hypothesis_template(parameters: dict) -> str:
    """`parameters["hypothesis_template"]` (default "This is a photo of {}."), refused unless a string with
    exactly one `{}` that `str.format` fills."""
    template = parameters.get("hypothesis_template", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"`parameters.hypothesis_template` must be a string with exactly one {{}} for the label, "
                         f"not {template!r:.80}")
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"`parameters.hypothesis_template` {template!r:.80} does not format: {error!r}; "
                         "write other braces as {{ and }}") from error
    return template


def _check_text_lengths(texts: list[str], what: str, limits: Limits) -> None:
    longest = max(len(text) for text in texts)
    if longest > limits.max_text_chars:
        raise ValueError(f"a {what} has {longest} characters; the limit is {limits.max_text_chars}")


def _as_list(value, what: str, item_type, limit: int) -> list:
    """`value` or `[value]`, checked: one to `limit` items of `item_type`."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"`inputs.{what}` is an empty list")
    if len(items) > limit:
        raise ValueError(f"`inputs.{what}` has {len(items)} items; the limit is {limit}")
    wrong = [type(item).__name__ for item in items if not isinstance(item, item_type)]
    if wrong:
        raise ValueError(f"`inputs.{what}` must hold {item_type.__name__} items, not {wrong[0]}")
    return items


class EndpointHandler:
    """Builds the model and processor from `path` once; each call answers one request (see the module docstring).

    Calls are serialised by a lock: a fast tokenizer must not be used by two threads at once, and a server may call
    from a thread pool.
    """

    def __init__(self, path: str = ""):
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.limits = Limits.from_env()
        self._lock = threading.Lock()

    def __call__(self, data: dict):
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError('the request must be a JSON object with "inputs" (and "parameters" for zero-shot '
                             "classification)")
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError(f"`parameters` must be an object, not {type(parameters).__name__}")
        inputs = data["inputs"]
        if isinstance(inputs, dict):
            return self.embeddings(inputs)
        unknown = sorted(set(parameters) - set(PARAMETERS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
        labels, template = candidate_labels(parameters, self.limits), hypothesis_template(parameters)
        return self.classify(decode_image(inputs, self.limits), labels, template)

    def classify(self, image: Image.Image, labels: list[str], template: str) -> list[dict]:
        """Zero-shot scores of `labels` for `image`: the pipeline's softmax over `logits_per_image`, sorted."""
        with self._lock, torch.inference_mode():
            batch = self.processor(images=image, text=[template.format(label) for label in labels])
            logits = self.model(**batch).logits_per_image[0]
        scores = logits.softmax(-1).tolist()
        return sorted(({"label": l, "score": s} for l, s in zip(labels, scores)), key=lambda r: -r["score"])

    def embeddings(self, inputs: dict) -> dict:
        """`{"text_embeds": (N, D) lists}` and/or `{"image_embeds": (M, D) lists}` for `inputs["text"]` /
        `inputs["image"]`."""
        unknown = sorted(set(inputs) - set(EMBEDDING_INPUTS))
        if unknown or not inputs:
            raise ValueError(f"`inputs` as an object takes {' and/or '.join(EMBEDDING_INPUTS)}"
                             + (f", not {', '.join(unknown)}" if unknown else ""))
        texts = images = None
        if "text" in inputs:
            texts = _as_list(inputs["text"], "text", str, self.limits.max_texts)
            _check_text_lengths(texts, "text", self.limits)
        if "image" in inputs:
            cells = _as_list(inputs["image"], "image", object, self.limits.max_images)  # decode_image checks each
            images = [decode_image(cell, self.limits) for cell in cells]
        result = {}
        with self._lock, torch.inference_mode():
            if texts is not None:
                batch = self.processor(text=texts)
                features = self.model.get_text_features(input_ids=batch["input_ids"],
                                                        attention_mask=batch["attention_mask"])
                result["text_embeds"] = features.pooler_output.float().tolist()
            if images is not None:
                pixel_values = self.processor(images=images)["pixel_values"]
                result["image_embeds"] = self.model.get_image_features(pixel_values).pooler_output.float().tolist()
        return result
