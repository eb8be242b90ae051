"""ProCLIP model and processor (the installed face of the Hub files `modeling_proclip.py`, `processing_proclip.py`)."""

from .modeling_proclip import (
    ProCLIPAdapter,
    ProCLIPModel,
    ProCLIPOutput,
    ProCLIPPreTrainedModel,
    bidirectional_attention_mask,
    config_from_towers,
    pool_hidden_states,
    truncate_text_inputs,
)
from .processing_proclip import ProCLIPProcessor, configure_text_tokenizer

ProCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ProCLIPModel",
    "ProCLIPPreTrainedModel",
    "ProCLIPAdapter",
    "ProCLIPOutput",
    "ProCLIPProcessor",
    "configure_text_tokenizer",
    "config_from_towers",
    "pool_hidden_states",
    "truncate_text_inputs",
    "bidirectional_attention_mask",
]
