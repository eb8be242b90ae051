"""What a checkpoint folder's remote code answers, as JSON on stdout: run by `tests/test_versions.py` with each
transformers version's Python (where ProCLIP is not installed), whose outputs it compares.

Usage: python remote_code_outputs.py IMAGE FOLDER [FOLDER ...]

For each folder, through `trust_remote_code=True` only: `AutoModel` + `AutoProcessor` logits and the normalised
text and image embeddings of a fixed batch, the `pipeline("zero-shot-image-classification")` answer, and the answer
of the folder's Inference Endpoints handler (`handler.py`, imported by its path as the Endpoints toolkit does).
"""

import base64
import importlib.util
import json
import os
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

CAPTIONS = ["a photo of a dog", "a red circle on a green background", "the cat is white", ""]
LABELS = ["dog", "red circle", "cat"]
TEMPLATE = "a photo of a {}."


def folder_outputs(folder: str, image_path: str) -> dict:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.open(image_path).convert("RGB")
    with torch.inference_mode():
        outputs = model(**processor(images=[image, image.rotate(90)], text=CAPTIONS))
    classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    spec = importlib.util.spec_from_file_location("handler", os.path.join(folder, "handler.py"))
    handler_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler_module)
    with open(image_path, "rb") as f:
        request = {"inputs": base64.b64encode(f.read()).decode(), "parameters": {"candidate_labels": LABELS}}
    return {
        "classes": [type(model).__module__.split(".")[0], type(processor).__module__.split(".")[0]],
        "logits_per_image": outputs.logits_per_image.tolist(),
        "text_embeds": outputs.text_embeds.tolist(),
        "image_embeds": outputs.image_embeds.tolist(),
        "pipeline": classifier(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE),
        "handler": handler_module.EndpointHandler(folder)(request),
    }


if __name__ == "__main__":
    image_path, folders = sys.argv[1], sys.argv[2:]
    result = {"transformers": transformers.__version__, "torch": torch.__version__}
    result["folders"] = [folder_outputs(folder, image_path) for folder in folders]
    print(json.dumps(result))
