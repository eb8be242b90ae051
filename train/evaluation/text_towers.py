"""Any text tower as a caption embedder: a raw or stage-0 LLM (or encoder), a ProCLIP folder, or a CLIP checkpoint.

`load_text_tower(name_or_path) -> TextTower`, whose `embed(texts)` returns (N, D) float32 embeddings, so caption
retrieval accuracy (`tasks.text_tower_caption_retrieval_accuracy`) compares across kinds:
- a raw or stage-0 LLM (or encoder) folder: pooled hidden states, with the settings `from_towers` would use;
- a ProCLIP folder: the joint-space text embedding (`get_text_features`, i.e. after the adapter);
- a CLIP checkpoint: the text encoder's projected embedding (`CLIPTextModelWithProjection.text_embeds`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedConfig

from configuration_proclip import TextTowerSettings
from modeling_proclip import (
    ProCLIPModel,
    ProCLIPProcessor,
    configure_text_tokenizer,
    embed_texts,
    embed_token_ids,
    text_embedder,
)

from ..training.cache import teacher_text_embeds
from ..training.stages import load_clip_text_teacher


@dataclass
class TextTower:
    """Any text tower behind one call: `embed(texts) -> (N, D)` float32 embeddings, unnormalised.

    Attributes:
        kind: `"llm"` (pooled hidden states of any text model), `"proclip"` (joint-space text embeddings) or
            `"clip"` (CLIP's projected text embeddings).
        name_or_path: where it was loaded from.
        tokenizer: configured for this tower (prompt, padding side, length limit).
        encode: `(input_ids, attention_mask) -> (B, D)`.
        settings: what defines the embedding, for results files.
        device: where `encode` runs.
    """

    kind: str
    name_or_path: str
    tokenizer: Any
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    settings: dict
    device: torch.device

    def embed(self, texts: Sequence[str], batch_size: int = 64, bf16: bool = False) -> torch.Tensor:
        """Embed `texts` through the embedding service (`embed_texts`: longest first, little padding per batch);
        returns (N, D) float32 in the order given."""
        return embed_texts(texts, self.tokenizer, self.encode, batch_size=batch_size, device=self.device, bf16=bf16)


def load_text_tower(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    pooling: str | None = None,
    bidirectional: bool | None = None,
    prompt_template: str | None = None,
    padding_side: str | None = None,
    max_text_length: int = 512,
) -> TextTower:
    """Load any text tower for caption embedding: a ProCLIP folder, a CLIP checkpoint, or any other text model.

    Args:
        name_or_path: Hub id or folder.
        device: default: cuda if available, else cpu.
        pooling, bidirectional, prompt_template, padding_side, max_text_length: for a plain text model only,
            overriding its own record (`proclip_text_tower.json`) or preset; without either, mean pooling with causal
            attention, as `ProCLIPModel.from_towers` would build it. A ProCLIP folder or a CLIP checkpoint brings its
            own settings, and giving any of these for one is an error.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    name = str(name_or_path)
    model_type = PreTrainedConfig.get_config_dict(name)[0].get("model_type")
    overrides = {"pooling": pooling, "bidirectional": bidirectional, "prompt_template": prompt_template,
                 "padding_side": padding_side}
    if model_type in ("proclip", "clip", "clip_text_model"):
        given = [key for key, value in overrides.items() if value is not None]
        if given:
            raise ValueError(f"{name} is a {model_type} checkpoint with its own text settings; {given} apply to LLMs.")

    if model_type == "proclip":
        model = ProCLIPModel.from_pretrained(name, dtype=dtype).to(device).eval()
        tokenizer = ProCLIPProcessor.from_pretrained(name).tokenizer
        settings = {"embedding": "joint space (get_text_features: pooled LLM -> adapter)", "pooling": model.config.pooling,
                    "bidirectional": model.config.bidirectional, "prompt_template": model.config.prompt_template}
        return TextTower("proclip", name, tokenizer, text_embedder(model), settings, device)

    if model_type in ("clip", "clip_text_model"):
        model = load_clip_text_teacher(name, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(name)
        settings = {"embedding": "CLIP text encoder + projection (text_embeds)",
                    "max_text_length": tokenizer.model_max_length}
        return TextTower("clip", name, tokenizer, teacher_text_embeds(model), settings, device)

    # Without a record or preset: the settings `ProCLIPModel.from_towers` would build the tower with.
    text_settings = TextTowerSettings.resolve(name, max_text_length=max_text_length, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(name)
    text_settings.instruction_length, text_settings.text_suffix_length = configure_text_tokenizer(tokenizer, text_settings)
    model = AutoModel.from_pretrained(name, dtype=dtype).to(device).eval()

    def encode(input_ids, attention_mask):
        return embed_token_ids(model, input_ids, attention_mask, text_settings).pooler_output

    settings = {"embedding": "pooled hidden states", **dataclasses.asdict(text_settings)}
    return TextTower("llm", name, tokenizer, encode, settings, device)


__all__ = ["TextTower", "load_text_tower"]
