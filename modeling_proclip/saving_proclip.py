"""What a saved ProCLIP folder holds beside its weights and config, so that other code loads it without this package:
the flat remote-code files (`copy_remote_code`), the custom pipeline's entry in `config.json` (`CUSTOM_PIPELINES`) and
sentence-transformers' module files (`write_sentence_transformers_config`). `ProCLIPModel.save_pretrained` writes all
three.

Shipped as is inside every exported checkpoint folder (Hub remote code): it imports only the standard library and
transformers, so a model loaded with `trust_remote_code=True` saves a complete folder too.
"""

import json
import os
import shutil

from transformers.utils import logging

logger = logging.get_logger(__name__)

# transformers' `pipeline()` reads this from a folder's config.json and builds the class from the folder's code.
CUSTOM_PIPELINES = {
    "zero-shot-image-classification": {
        "impl": "pipeline_proclip.ProCLIPZeroShotImageClassificationPipeline",
        "pt": ["AutoModelForZeroShotImageClassification"],
        "type": "multimodal",
    }
}


# sentence-transformers (>= 6) reads a folder through its generic `Transformer` module: text goes through
# `get_text_features`, images through `get_image_features`; `SentenceTransformer(folder, trust_remote_code=True)`.
# A `Normalize` module follows (as in normalised ST models: no folder of its own, its defaults), so that `encode`
# gives what `encode_text` / `encode_image` give by default: unit-length embeddings.
SENTENCE_TRANSFORMERS_FILES = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"},
    ],
    "sentence_bert_config.json": {
        "transformer_task": "feature-extraction",
        "modality_config": {
            "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
            "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
        },
        "module_output_name": "sentence_embedding",
    },
    "config_sentence_transformers.json": {"model_type": "SentenceTransformer", "similarity_fn_name": "cosine"},
}


def write_sentence_transformers_config(save_directory) -> None:
    """Write the small JSON files that let sentence-transformers load a checkpoint folder."""
    for name, content in SENTENCE_TRANSFORMERS_FILES.items():
        with open(os.path.join(save_directory, name), "w") as f:
            json.dump(content, f, indent=2)


REMOTE_CODE_FILES = (
    "configuration_proclip.py", "modeling_proclip.py", "processing_proclip.py", "images_proclip.py",
    "embedding_proclip.py", "pipeline_proclip.py", "saving_proclip.py",
)
ENDPOINT_HANDLER_FILE = "handler.py"


def copy_remote_code(save_directory, extra_sources=()) -> None:
    """Copy the flat Hub files (config, model, processor, Inference Endpoints handler) into a checkpoint folder.

    They are found next to this file (a Hub folder, or the installed package with `configuration_proclip/` beside
    it), or in `extra_sources` (the folder a remote-code model was loaded from: transformers' module cache holds
    only the imported files, not `handler.py`).
    """
    here = os.path.dirname(os.path.abspath(__file__))
    folders = [here, os.path.join(os.path.dirname(here), "configuration_proclip")]
    folders += [str(d) for d in extra_sources if d and os.path.isdir(d)]
    for name in REMOTE_CODE_FILES + (ENDPOINT_HANDLER_FILE,):
        source = next((os.path.join(d, name) for d in folders if os.path.isfile(os.path.join(d, name))), None)
        if source is None:
            if name == ENDPOINT_HANDLER_FILE:
                logger.warning(f"{name} not found; the saved folder will not serve on Inference Endpoints.")
                continue
            raise FileNotFoundError(f"Cannot find {name} to copy next to the checkpoint.")
        target = os.path.join(save_directory, name)
        if os.path.abspath(source) != os.path.abspath(target):
            shutil.copyfile(source, target)


__all__ = [
    "CUSTOM_PIPELINES",
    "ENDPOINT_HANDLER_FILE",
    "REMOTE_CODE_FILES",
    "SENTENCE_TRANSFORMERS_FILES",
    "copy_remote_code",
    "write_sentence_transformers_config",
]
