"""Inference Endpoints handler for a ProCLIP checkpoint folder: zero-shot image classification.

Request:  {"inputs": <PIL image, or a base64-encoded image string>, "parameters": {"candidate_labels": [...]}}
          (optional "hypothesis_template", default "This is a photo of {}.")
Response: [{"label": str, "score": float}, ...] sorted by score, highest first.

Standalone on purpose: Inference Endpoints imports this file on its own, so it loads the model through remote code.
"""

import base64
import io

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor


def decode_image(inputs) -> Image.Image:
    """A PIL image from a PIL image, raw bytes or a base64 string (a `data:` URL prefix is allowed)."""
    if isinstance(inputs, Image.Image):
        return inputs
    if isinstance(inputs, str):
        inputs = base64.b64decode(inputs.split(",", 1)[-1] if inputs.startswith("data:") else inputs)
    if isinstance(inputs, (bytes, bytearray)):
        return Image.open(io.BytesIO(inputs))
    raise ValueError(f"`inputs` must be an image or a base64 string, not {type(inputs).__name__}.")


class EndpointHandler:
    def __init__(self, path: str = ""):
        self.model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)

    def __call__(self, data: dict) -> list[dict]:
        parameters = data.get("parameters") or {}
        labels = parameters.get("candidate_labels")
        if not labels:
            raise ValueError("`parameters.candidate_labels` must list at least one label.")
        template = parameters.get("hypothesis_template", "This is a photo of {}.")
        batch = self.processor(images=decode_image(data["inputs"]), text=[template.format(label) for label in labels])
        with torch.inference_mode():
            logits = self.model(**batch).logits_per_image[0]
        scores = logits.softmax(-1).tolist()
        return sorted(({"label": l, "score": s} for l, s in zip(labels, scores)), key=lambda r: -r["score"])
