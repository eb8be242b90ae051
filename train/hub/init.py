"""Build an untrained ProCLIP checkpoint folder from a CLIP checkpoint and a text embedder (`proclip init`)."""

from pathlib import Path

import torch

from modeling_proclip import ProCLIPModel, ProCLIPProcessor


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
    return out_dir


