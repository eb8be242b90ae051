"""Build an untrained ProCLIP checkpoint folder from a CLIP checkpoint and a text embedder (`proclip init`)."""

import json
from pathlib import Path

import torch

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

# Written beside an untrained folder's weights (and by nothing else): stage 2 from such a folder is direct alignment.
UNTRAINED_ADAPTER_FILE = "untrained_adapter.json"


def has_untrained_adapter(folder: str | Path) -> bool:
    """Whether `folder` is a `proclip init` output that no stage has trained since (trainers write their own folders)."""
    return (Path(folder) / UNTRAINED_ADAPTER_FILE).is_file()


def build_checkpoint(vision: str, text: str, out_dir: str | Path, dtype: str | None = None, **options) -> Path:
    """Write a Hub-ready folder (weights, config, processor, remote code) with a freshly initialised adapter.

    `options` are `ProCLIPModel.from_towers` arguments (pooling, bidirectional, prompt_template, instruction,
    padding_side, adapter_blocks, adapter_expansion, adapter_normalize_input, max_text_length).
    """
    options = {k: v for k, v in options.items() if v is not None}
    torch_dtype = getattr(torch, dtype) if dtype else None
    model = ProCLIPModel.from_towers(vision=vision, text=text, dtype=torch_dtype, **options)
    processor = ProCLIPProcessor.from_towers(vision, text, model.config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    marker = {"adapter": "freshly initialised by `proclip init`; train stage 1 (proclip train --stage 1) on it first"}
    (out_dir / UNTRAINED_ADAPTER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    return out_dir


