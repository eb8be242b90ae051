"""ProCLIP model, processor and pipeline (the installed face of the Hub files `modeling_proclip.py`,
`processing_proclip.py`, `pipeline_proclip.py`, ...)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from configuration_proclip import ProCLIPConfig

from .modeling_proclip import (
    ProCLIPAdapter,
    ProCLIPModel,
    ProCLIPOutput,
    ProCLIPPreTrainedModel,
    bidirectional_attention_mask,
    config_from_towers,
    contrastive_loss,
    embed_token_ids,
    pool_hidden_states,
    text_tower_kwargs,
    truncate_text_inputs,
    without_unused_heads,
)
from .embedding_proclip import (
    Embedded,
    EmbeddedBatch,
    embed_images,
    embed_in_batches,
    embed_texts,
    image_embedder,
    iter_embedded_batches,
    iter_text_batches,
    longest_first,
    text_embedder,
)
from .images_proclip import ImagePolicy, UnreadableImage, open_image, to_rgb
from .pipeline_proclip import ProCLIPZeroShotImageClassificationPipeline, zero_shot_labels
from .processing_proclip import ProCLIPProcessor, configure_text_tokenizer

# Saved folders name these classes in `auto_map` (remote code); with the package installed, the Auto classes also
# know them directly, so `AutoModel.from_pretrained(folder)` works without `trust_remote_code`.
ProCLIPProcessor.register_for_auto_class("AutoProcessor")
AutoConfig.register(ProCLIPConfig.model_type, ProCLIPConfig, exist_ok=True)
AutoModel.register(ProCLIPConfig, ProCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(ProCLIPConfig, ProCLIPModel, exist_ok=True)
AutoProcessor.register(ProCLIPConfig, ProCLIPProcessor, exist_ok=True)

__all__ = [
    "ProCLIPModel",
    "ProCLIPPreTrainedModel",
    "ProCLIPAdapter",
    "ProCLIPOutput",
    "ProCLIPProcessor",
    "ProCLIPZeroShotImageClassificationPipeline",
    "configure_text_tokenizer",
    "open_image",
    "ImagePolicy",
    "UnreadableImage",
    "to_rgb",
    "Embedded",
    "EmbeddedBatch",
    "embed_images",
    "embed_in_batches",
    "embed_texts",
    "image_embedder",
    "iter_embedded_batches",
    "iter_text_batches",
    "longest_first",
    "text_embedder",
    "zero_shot_labels",
    "config_from_towers",
    "contrastive_loss",
    "embed_token_ids",
    "pool_hidden_states",
    "text_tower_kwargs",
    "truncate_text_inputs",
    "bidirectional_attention_mask",
    "without_unused_heads",
]
