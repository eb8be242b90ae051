"""ProCLIP: a CLIP image tower and an LLM-based text embedder joined by an adapter (arXiv 2510.18795).

Shipped as is inside every exported checkpoint folder (Hub remote code), next to `configuration_proclip.py`,
`processing_proclip.py`, `images_proclip.py`, `embedding_proclip.py`, `pipeline_proclip.py` and `saving_proclip.py`:
it imports only those, the standard library, torch and transformers.

Data flow, text:  input_ids -> text_model (LLM, frozen) -> pooling -> text_adapter -> text embedding (D)
Data flow, image: pixel_values -> vision_model (CLIP ViT) -> visual_projection -> image embedding (D)
"""

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPModel,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    PreTrainedModel,
)
try:  # transformers >= 5: initialisers that leave weights loaded from a checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4: `_init_weights` only ever sees modules whose weights were not loaded
    from torch.nn import init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, can_return_tuple, logging

try:  # a flat Hub folder
    from .configuration_proclip import ProCLIPConfig, TextTowerSettings
except ImportError:  # the installed package
    from configuration_proclip.configuration_proclip import (
        ProCLIPConfig,
        TextTowerSettings,
    )
from .embedding_proclip import embed_images, embed_texts, finish_embeddings, image_embedder, text_embedder
from .images_proclip import ImagePolicy, open_image
from .processing_proclip import ProCLIPProcessor, configure_text_tokenizer
from .saving_proclip import CUSTOM_PIPELINES, copy_remote_code, write_sentence_transformers_config

logger = logging.get_logger(__name__)


@dataclass
class ProCLIPOutput(ModelOutput):
    """Same fields as transformers' `CLIPOutput`.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): symmetric InfoNCE over the batch (`return_loss=True`).
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`): scaled cosines.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`): the transpose.
        text_embeds (`torch.FloatTensor` of shape `(text_batch_size, projection_dim)`): L2-normalised.
        image_embeds (`torch.FloatTensor` of shape `(image_batch_size, projection_dim)`): L2-normalised.
        text_model_output (`BaseModelOutputWithPooling`): output of `get_text_features`.
        vision_model_output (`BaseModelOutputWithPooling`): output of `get_image_features`.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self):
        return tuple(
            v.to_tuple() if k.endswith("_model_output") and v is not None else v for k, v in self.items()
        )


def contrastive_loss(
    logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Symmetric InfoNCE: the mean of the cross-entropies of the image rows and of the text rows.

    Args:
        logits_per_image (`torch.Tensor` of shape `(B, N)`): scaled similarities of B images to N captions.
        logits_per_text (`torch.Tensor` of shape `(B, N)`): of the B matching captions to N images.
        labels (`torch.Tensor` of shape `(B,)`, *optional*): the column of each row's match; default `arange(B)`
            (square logits with the pairs on the diagonal). Data-parallel training passes `arange(B) + rank * B`.
    """
    if labels is None:
        labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


# ----------------------------------------------------------------------------------------------------------------
# Text side: truncation, attention mask, pooling. Everything follows the attention mask, so the padding side of the
# tokenizer never changes an embedding.
# ----------------------------------------------------------------------------------------------------------------


def truncate_text_inputs(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, max_length: int, suffix_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row to `max_length` real tokens, keeping its last `suffix_length` tokens (template end, EOS).

    This is what the tokenizer's own truncation does with the installed template, so a caption truncated here or
    by the tokenizer gives the same ids. Any padding side in; right padding out.

    Args:
        input_ids, attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`).
    Returns:
        `(input_ids, attention_mask)`, each of shape `(batch_size, max_length)`.
    """
    mask = attention_mask.bool()
    rank = mask.cumsum(-1) - 1  # index of each real token among its row's real tokens
    length = mask.sum(-1, keepdim=True)
    keep = mask & ((rank < max_length - suffix_length) | (rank >= length - suffix_length))
    # Stable sort puts kept tokens first, in order; everything else after them.
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices[:, :max_length]
    return input_ids.gather(-1, order), keep.gather(-1, order).to(attention_mask.dtype)


def bidirectional_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 4D additive mask that lets every token see every real token: a decoder LLM run as an encoder (LLM2Vec).

    transformers passes a 4D mask through unchanged to eager and SDPA attention, so no model class is patched.

    Args:
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`): 1 for real tokens, 0 for padding.
    Returns:
        `torch.Tensor` of shape `(batch_size, 1, seq_len, seq_len)`: 0 where attention is allowed, dtype min elsewhere.
    """
    blocked = ~attention_mask.bool()[:, None, None, :]
    mask = torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(blocked, torch.finfo(dtype).min)
    return mask.expand(-1, -1, attention_mask.shape[-1], -1)


def text_tower_kwargs(
    text_model: nn.Module, attention_mask: torch.Tensor, bidirectional: bool
) -> dict[str, torch.Tensor]:
    """The attention mask and position ids to call a text tower with, for a 2D padding mask of either side.

    Position ids count real tokens only (so the padding side never shifts them); they are passed only when a row
    starts with padding (left padding), since otherwise they are the model's own default, 0, 1, 2, ... With
    `bidirectional`, the mask is the 4D all-real-tokens mask of `bidirectional_attention_mask`.

    Args:
        text_model: the text tower (a transformers model, possibly wrapped by peft).
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`).
    Returns:
        `{"attention_mask": ..., "position_ids": ...}` (position ids only where they differ from the default).
    """
    base = text_model.get_base_model() if hasattr(text_model, "get_base_model") else text_model  # peft
    kwargs = {"attention_mask": attention_mask}
    left_padded = torch.compiler.is_compiling() or not bool(attention_mask[:, 0].all())  # traced: always pass them
    if left_padded and "position_ids" in inspect.signature(base.forward).parameters:
        kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if bidirectional:
        dtype = base.get_input_embeddings().weight.dtype
        kwargs["attention_mask"] = bidirectional_attention_mask(attention_mask, dtype)
    return kwargs


def pool_hidden_states(
    hidden_states: torch.Tensor, attention_mask: torch.Tensor, pooling: str, skip_leading: int = 0
) -> torch.Tensor:
    """One vector per sequence from token states.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch_size, seq_len, hidden_size)`).
        attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`): 1 for real tokens, either padding side.
        pooling: `"mean"` over real tokens after the first `skip_leading` (instruction) ones; `"last_token"`, the
            last real token; `"cls"`, the first real token.
    Returns:
        `torch.Tensor` of shape `(batch_size, hidden_size)`.
    """
    mask = attention_mask.bool()
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    if pooling == "mean":
        if skip_leading:  # (without an instruction: the mask itself, three ops fewer per batch)
            mask = mask & (mask.cumsum(-1) > skip_leading)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1)
    if pooling == "last_token":
        last = mask.shape[-1] - 1 - mask.flip(-1).int().argmax(-1)
        return hidden_states[rows, last]
    if pooling == "cls":
        return hidden_states[rows, mask.int().argmax(-1)]
    raise ValueError(f"Unknown pooling {pooling!r}")


def empty_caption_token_id(text_model: nn.Module) -> int:
    """The token an empty caption is embedded as when its tokenizer adds nothing around text: the tower's EOS."""
    config = text_model.config
    token_id = next((i for i in (config.eos_token_id, config.pad_token_id) if i is not None), 0)
    return token_id[0] if isinstance(token_id, (list, tuple)) else token_id


def with_a_token_per_row(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give rows without a real token one: `token_id` in the first position.

    An empty caption has no token at all under a tokenizer that adds no template and no special tokens (a raw LLM
    such as SmolLM2); the text tower cannot run on nothing, so it reads the end-of-text token alone. Rows that have
    tokens are unchanged. No branch on values, so the function traces (ONNX export) as it runs.

    Args:
        input_ids, attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`), `seq_len` possibly 0.
    Returns:
        `(input_ids, attention_mask)` of shape `(batch_size, max(seq_len, 1))`.
    """
    if input_ids.shape[-1] == 0:
        input_ids, attention_mask = input_ids.new_zeros(len(input_ids), 1), attention_mask.new_zeros(len(input_ids), 1)
    first = torch.arange(input_ids.shape[-1], device=input_ids.device) == 0
    fill = (attention_mask.sum(-1, keepdim=True) == 0) & first
    return input_ids.masked_fill(fill, token_id), attention_mask.masked_fill(fill, 1)


def embed_token_ids(
    text_model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: TextTowerSettings,
    **tower_kwargs,
) -> BaseModelOutputWithPooling:
    """Run a text tower as an embedder: the one text path of ProCLIP (the model, stage 0, the embedding cache and
    caption-retrieval evaluation all embed through it).

    Rows longer than `settings.max_text_length` are truncated keeping their template end; the tower runs with
    `text_tower_kwargs` (positions of real tokens, bidirectional mask when asked); its last hidden states are pooled
    along the attention mask.

    Args:
        text_model: the text tower (any `AutoModel` text model, possibly peft-wrapped).
        input_ids, attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`), either padding side.
        settings: pooling, attention and lengths (`ProCLIPConfig.text_settings`, or a bare LLM's settings).
        tower_kwargs: passed to the tower (`output_hidden_states`, `output_attentions`, ...).
    Returns:
        `BaseModelOutputWithPooling` with the tower's `last_hidden_state` (batch_size, seq_len', hidden_size), the
        pooled `pooler_output` (batch_size, hidden_size), and the tower's `hidden_states` / `attentions` when asked.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    input_ids, attention_mask = with_a_token_per_row(input_ids, attention_mask, empty_caption_token_id(text_model))
    if input_ids.shape[-1] > settings.max_text_length:  # padding alone (`padding="max_length"`) is cut silently
        if torch.compiler.is_compiling() or attention_mask.sum(-1).max() > settings.max_text_length:
            logger.warning_once(f"Captions longer than max_text_length={settings.max_text_length} tokens are truncated.")
        input_ids, attention_mask = truncate_text_inputs(
            input_ids, attention_mask, settings.max_text_length, settings.text_suffix_length
        )
    kwargs = text_tower_kwargs(text_model, attention_mask, settings.bidirectional)
    outputs = text_model(input_ids=input_ids, **kwargs, **tower_kwargs, return_dict=True)
    hidden_states = outputs.last_hidden_state
    return BaseModelOutputWithPooling(
        last_hidden_state=hidden_states,
        pooler_output=pool_hidden_states(hidden_states, attention_mask, settings.pooling, settings.instruction_length),
        hidden_states=outputs.get("hidden_states"),
        attentions=outputs.get("attentions"),
    )


# ----------------------------------------------------------------------------------------------------------------
# The adapter (upstream `TextProj`)
# ----------------------------------------------------------------------------------------------------------------


def init_joint_space_module(module: nn.Module, initializer=nn.init) -> None:
    """The documented init of one module ProCLIP owns (the adapter's layers, the visual projection): Linear weights
    normal(0, fan_in^-1/2), biases zero, LayerNorms unit; other modules are left alone.

    `initializer` is a module with `normal_`, `zeros_`, `ones_`: torch's `nn.init`, or transformers' own
    (`ProCLIPPreTrainedModel._init_weights`), which leaves loaded tensors alone.
    """
    if isinstance(module, nn.Linear):
        initializer.normal_(module.weight, std=module.in_features**-0.5)
        if module.bias is not None:
            initializer.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        initializer.ones_(module.weight)
        initializer.zeros_(module.bias)


class ProCLIPAdapterBlock(nn.Module):
    """`x + fc2(GELU(fc1(LayerNorm(x))))`, widening H to `expansion * H` in between."""

    def __init__(self, hidden_size: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, expansion * hidden_size)
        self.fc2 = nn.Linear(expansion * hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.fc2(F.gelu(self.fc1(self.norm(hidden_states))))


class ProCLIPAdapter(nn.Module):
    """Maps a pooled LLM embedding (H) into CLIP's joint space (D): residual MLP blocks, LayerNorm, Linear."""

    def __init__(self, config: ProCLIPConfig):
        super().__init__()
        hidden_size = config.text_hidden_size
        self.normalize_input = config.adapter_normalize_input
        self.blocks = nn.ModuleList(
            [ProCLIPAdapterBlock(hidden_size, config.adapter_expansion) for _ in range(config.adapter_blocks)]
        )
        self.final_norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, config.projection_dim)

    def reset_parameters(self) -> None:
        """Fresh weights, `init_joint_space_module` on every layer (a seeded start for a new run): what a ProCLIP
        model built from a config, or loaded from a folder without adapter weights, starts from."""
        for module in self.modules():
            init_joint_space_module(module)

    def forward(self, llm_embeds: torch.Tensor) -> torch.Tensor:
        """(batch_size, H) pooled LLM embeddings -> (batch_size, D) unnormalised ProCLIP text embeddings."""
        hidden_states = llm_embeds.to(self.proj.weight.dtype)
        if self.normalize_input:
            hidden_states = F.normalize(hidden_states, dim=-1)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return self.proj(self.final_norm(hidden_states))


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class ProCLIPPreTrainedModel(PreTrainedModel):
    config: ProCLIPConfig
    config_class = ProCLIPConfig
    base_model_prefix = "proclip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CLIPEncoderLayer", "ProCLIPAdapterBlock"]  # and each tower's own (transformers adds them)
    # Checkpoints saved before towers were built without their unused pooler (`without_unused_heads`).
    _keys_to_ignore_on_load_unexpected = [r"^text_model\.pooler\."]

    @classmethod
    def is_custom_code(cls) -> bool:
        """`False`, so that transformers initialises every weight through `_init_weights` (5.x).

        For custom code, transformers 5 treats a module whose own parameters are all loaded as initialised, in case its
        `_init_weights` writes tensors without `transformers.initialization` (which skips loaded tensors itself). That
        also holds, vacuously, for a module without parameters of its own: it skipped the adapter (whose missing
        weights then kept uninitialised memory) and CLIP's attention and MLP init. ProCLIP initialises only through
        `transformers.initialization`, and the towers are transformers' own classes.
        """
        return False

    @torch.no_grad()
    def _init_weights(self, module):
        """The init of what ProCLIP owns (the towers are initialised by their own classes): `init_joint_space_module`
        for the adapter and the visual projection, `config.logit_scale_init` for the temperature."""
        init_joint_space_module(module, initializer=init)
        if isinstance(module, ProCLIPModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init)


def takes_keyword(module: nn.Module, name: str) -> bool:
    """Whether `module.forward` accepts the keyword argument `name`, by name or through `**kwargs`."""
    parameters = inspect.signature(module.forward).parameters.values()
    return any(parameter.name == name or parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)


def without_unused_heads(text_model: nn.Module) -> nn.Module:
    """The text tower without a pooler ProCLIP never reads (BERT-style encoders build one unless
    `add_pooling_layer=False`): unused parameters get no gradient, which DDP without `find_unused_parameters` refuses
    when the text tower trains (stage 0)."""
    if "add_pooling_layer" in inspect.signature(type(text_model).__init__).parameters:
        text_model.pooler = None
    return text_model


class ProCLIPModel(ProCLIPPreTrainedModel):
    r"""
    ProCLIP for image-text embedding, retrieval and zero-shot image classification.

    Build one from two pretrained towers with [`ProCLIPModel.from_towers`], or load a saved one with `from_pretrained`
    (`AutoModel.from_pretrained(repo, trust_remote_code=True)` where this package is not installed).
    """

    def __init__(self, config: ProCLIPConfig, vision_model: nn.Module | None = None, text_model: nn.Module | None = None):
        super().__init__(config)
        if vision_model is None:
            vision_model = CLIPVisionModel._from_config(config.vision_config)
            # transformers 4 wraps the tower's layers in `.vision_model`; 5 holds them directly (the checkpoint's keys)
            vision_model = getattr(vision_model, "vision_model", vision_model)
        self.vision_model = vision_model
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_model = without_unused_heads(text_model or AutoModel.from_config(config.text_config))
        self.text_adapter = ProCLIPAdapter(config)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))
        self._encoding_processor = None  # `encoding_processor()` loads it on first use
        self.post_init()

    # -- towers ----------------------------------------------------------------------------------------------------

    def get_llm_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled states of the text tower (the frozen LLM), before the adapter: what embedding caches store.

        Args:
            input_ids, attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`), either padding side.
        Returns:
            `torch.Tensor` of shape `(batch_size, text_hidden_size)`.
        """
        return embed_token_ids(self.text_model, input_ids, attention_mask, self.config.text_settings).pooler_output

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        llm_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Text embeddings in the joint space.

        Args:
            input_ids, attention_mask (`torch.Tensor` of shape `(batch_size, seq_len)`): tokenised captions, or
            llm_embeds (`torch.Tensor` of shape `(batch_size, text_hidden_size)`): cached `get_llm_embeddings`.
            token_type_ids: accepted because BERT-style tokenizers return it; single-segment captions ignore it, so
                the tokenizer path and the cached path give the same embedding.
            kwargs: passed to the text tower, as in `CLIPModel` (`output_hidden_states`, `output_attentions`);
                `return_dict=False` (or `config.return_dict=False`) returns a tuple.
        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` (batch_size, projection_dim) is the unnormalised
            embedding; `last_hidden_state` (batch_size, seq_len, text_hidden_size), `hidden_states` and `attentions`
            are the text tower's, or `None` when the embedding started from cached `llm_embeds`.
        """
        if llm_embeds is None:
            if input_ids is None:
                raise ValueError("get_text_features needs `input_ids` or cached `llm_embeds`.")
            outputs = embed_token_ids(self.text_model, input_ids, attention_mask, self.config.text_settings, **kwargs)
        elif llm_embeds.shape[-1] != self.config.text_hidden_size:
            raise ValueError(
                f"llm_embeds have size {llm_embeds.shape[-1]} but this model's text tower gives "
                f"{self.config.text_hidden_size}; they were computed with another LLM."
            )
        else:
            outputs = BaseModelOutputWithPooling(pooler_output=llm_embeds)
        outputs.pooler_output = self.text_adapter(outputs.pooler_output)
        return outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False, **kwargs
    ) -> BaseModelOutputWithPooling:
        """Image embeddings in the joint space, exactly as `CLIPModel.get_image_features` computes them.

        Args:
            pixel_values (`torch.Tensor` of shape `(batch_size, 3, image_size, image_size)`).
            kwargs: passed to the image tower (`output_hidden_states`, `output_attentions`); `return_dict` as in
                `get_text_features`.
        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` (batch_size, projection_dim) is unnormalised.
        """
        if takes_keyword(self.vision_model, "return_dict"):  # transformers 4's CLIPVisionTransformer always returns
            kwargs["return_dict"] = True  # an output object and takes no `return_dict`
        outputs = self.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        llm_embeds: torch.Tensor | None = None,
        return_loss: bool | None = None,
        token_type_ids: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs,
    ) -> ProCLIPOutput:
        """Scaled cosine similarities between every image and every caption.

        Args:
            input_ids, attention_mask (`(text_batch_size, seq_len)`) or llm_embeds (`(text_batch_size, H)`).
            pixel_values (`(image_batch_size, 3, image_size, image_size)`).
            return_loss: add the symmetric InfoNCE of matching pairs (needs equal batch sizes).
            token_type_ids: ignored, as in `get_text_features`.
            kwargs: passed to both towers (`output_hidden_states`, `output_attentions`); their outputs are
                `text_model_output` and `vision_model_output`. `return_dict=False` returns the fields as a tuple,
                as `CLIPModel` does.
        """
        if pixel_values is None or (input_ids is None and llm_embeds is None):
            missing = "images (`pixel_values`)" if pixel_values is None else "captions (`input_ids` or `llm_embeds`)"
            raise ValueError(
                f"ProCLIPModel scores images against captions and needs both; {missing} are missing. Pass "
                "`processor(text=..., images=...)`, or embed one side with `get_text_features` / `get_image_features`."
            )
        text_outputs = self.get_text_features(input_ids, attention_mask, llm_embeds, return_dict=True, **kwargs)
        vision_outputs = self.get_image_features(pixel_values, interpolate_pos_encoding, return_dict=True, **kwargs)
        text = F.normalize(text_outputs.pooler_output, dim=-1)
        image = F.normalize(vision_outputs.pooler_output, dim=-1)
        logits_per_text = self.logit_scale.exp() * text @ image.to(text.dtype).t()
        return ProCLIPOutput(
            loss=contrastive_loss(logits_per_text.t(), logits_per_text) if return_loss else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text,
            image_embeds=image,
            text_model_output=text_outputs,
            vision_model_output=vision_outputs,
        )

    # -- the text tower's token embeddings (adding tokens) -----------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        """The text tower's token embeddings."""
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    def resize_token_embeddings(self, *args, **kwargs) -> nn.Embedding:
        """Resize the text tower's token embeddings (its own `resize_token_embeddings`, with its init for new rows)
        and record the new vocabulary size in `config.text_config`, so that the saved folder loads."""
        embeddings = self.text_model.resize_token_embeddings(*args, **kwargs)
        self.config.text_config.vocab_size = self.vocab_size = embeddings.num_embeddings  # as PreTrainedModel's does
        return embeddings

    # -- lists of captions and images in, embeddings out (jina-clip's `encode_text` / `encode_image`) ------------------

    def encoding_processor(self) -> ProCLIPProcessor:
        """The processor `encode_text` / `encode_image` use when given none: the one saved with this model, read once
        from `config.name_or_path` (the folder or Hub repo the model was loaded from)."""
        if self._encoding_processor is None:
            if not self.name_or_path:
                raise ValueError("This model was not loaded from a folder or the Hub; pass `processor=` to encode.")
            self._encoding_processor = ProCLIPProcessor.from_pretrained(self.name_or_path, trust_remote_code=True)
        return self._encoding_processor

    def encode_text(
        self,
        sentences: str | list[str],
        batch_size: int = 32,
        normalize: bool = True,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = False,
        processor: ProCLIPProcessor | None = None,
    ):
        """Embed captions through the embedding service (`embedding_proclip.embed_texts`): tokenised at once, then
        longest first in batches of similar length, in inference mode, on the model's device.

        Args:
            sentences: a caption or a list of captions.
            batch_size: captions per forward pass.
            normalize: L2-normalise (after `truncate_dim`), so that dot products are cosines.
            truncate_dim: keep only the first `truncate_dim` dimensions (ProCLIP is not trained Matryoshka-style:
                measure what it costs first).
            show_progress_bar: one tqdm bar over the captions.
            convert_to_numpy: return a numpy array instead of a tensor.
            processor: the `ProCLIPProcessor` to tokenise with (default: `encoding_processor()`).
        Returns:
            float32 `(len(sentences), D)` embeddings in the order given (`(D,)` for one caption), on the model's
            device, or as numpy.
        """
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        tokenizer = (processor or self.encoding_processor()).tokenizer
        embeds = embed_texts(texts, tokenizer, text_embedder(self), batch_size=batch_size, device=self.device,
                             progress=show_progress_bar)
        return finish_embeddings(embeds, normalize, truncate_dim, convert_to_numpy, isinstance(sentences, str))

    def encode_image(
        self,
        images,
        batch_size: int = 32,
        normalize: bool = True,
        truncate_dim: int | None = None,
        show_progress_bar: bool = False,
        convert_to_numpy: bool = False,
        processor: ProCLIPProcessor | None = None,
        image_policy: ImagePolicy = ImagePolicy(),
    ):
        """Embed images through the embedding service (`embedding_proclip.embed_images`): a batch at a time, in
        inference mode, on the model's device and dtype.

        Args:
            images: one image or a list: PIL images, local paths, http(s) URLs (one request each, no retries),
                `data:image/...;base64,` URIs or base64 strings, or encoded bytes. They are opened a batch at a time by
                `images_proclip.open_image`, which raises `UnreadableImage` (an `OSError`) for one it cannot read.
            image_policy: what may be read and how large (default: paths and any URL, 10 s per URL, no size bound).
            batch_size, normalize, truncate_dim, show_progress_bar, convert_to_numpy, processor: as in `encode_text`.
        Returns:
            float32 `(len(images), D)` embeddings in the order given (`(D,)` for one image), on the model's device,
            or as numpy.
        """
        single = not isinstance(images, (list, tuple))
        embeds = embed_images(
            [images] if single else list(images), (processor or self.encoding_processor()).image_processor,
            image_embedder(self), batch_size=batch_size,
            read=functools.partial(open_image, policy=image_policy), device=self.device, dtype=self.dtype,
            progress=show_progress_bar,
        ).embeds
        return finish_embeddings(embeds, normalize, truncate_dim, convert_to_numpy, single)

    # -- building and saving ---------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        """transformers' `from_pretrained`, with one warning more: the ProCLIP parts (adapter, visual projection,
        temperature) whose weights the checkpoint lacks, or whose shapes it mismatches under
        `ignore_mismatched_sizes=True`, start from `_init_weights` (the documented init), that is untrained."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        fresh = set(info["missing_keys"]) | {key for key, *_shapes in info["mismatched_keys"]}
        untrained = sorted({key.split(".")[0] for key in fresh} & {"text_adapter", "visual_projection", "logit_scale"})
        if untrained:
            logger.warning(
                f"{model.name_or_path} has no trained weights for {', '.join(untrained)}: they start from ProCLIP's "
                "documented init (Linear weights normal(0, fan_in^-1/2), zero biases, unit LayerNorms), so its "
                "embeddings are untrained. Load a trained ProCLIP checkpoint, or train this one (`proclip train`)."
            )
        return (model, info) if output_loading_info else model

    @classmethod
    def from_towers(
        cls,
        vision: str,
        text: str,
        pooling: str | None = None,
        bidirectional: bool | None = None,
        prompt_template: str | None = None,
        instruction: str | None = None,
        padding_side: str | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ) -> "ProCLIPModel":
        """Build ProCLIP from a pretrained CLIP checkpoint and a pretrained text embedder; the adapter starts untrained.

        Args:
            vision: Hub id or folder of a `CLIPModel` (or `CLIPVisionModelWithProjection`) checkpoint. Its image
                tower, visual projection and `logit_scale` are taken as they are.
            text: Hub id or folder of the text embedder (any `AutoModel`). Known embedders (see
                `TEXT_TOWER_PRESETS`, and sentence-transformers folders) set pooling, bidirectionality, prompt and
                padding side; the arguments here override them.
            config_kwargs: other `ProCLIPConfig` fields (`adapter_blocks`, `adapter_expansion`, `max_text_length`, ...).
        """
        clip_config = AutoConfig.from_pretrained(vision)
        if clip_config.model_type == "clip":
            clip = CLIPModel.from_pretrained(vision, dtype=dtype)
            vision_model, visual_projection, logit_scale = clip.vision_model, clip.visual_projection, clip.logit_scale
            vision_config = clip.config.vision_config
            vision_config.projection_dim = clip.config.projection_dim
        elif clip_config.model_type == "clip_vision_model":
            clip = CLIPVisionModelWithProjection.from_pretrained(vision, dtype=dtype)
            vision_model, visual_projection, logit_scale = clip.vision_model, clip.visual_projection, None
            vision_config = clip.config
        else:
            raise ValueError(f"`vision` must be a CLIP checkpoint; {vision} has model_type {clip_config.model_type!r}.")

        text_model = AutoModel.from_pretrained(text, dtype=dtype)
        if logit_scale is not None:
            config_kwargs.setdefault("logit_scale_init", float(logit_scale.detach().float().clamp(0, math.log(100))))
        config = config_from_towers(
            vision_config, text, text_model.config, pooling=pooling, bidirectional=bidirectional,
            prompt_template=prompt_template, instruction=instruction, padding_side=padding_side,
            vision_name_or_path=str(vision), **config_kwargs,
        )
        model = cls(config, vision_model=vision_model, text_model=text_model)
        model.visual_projection.load_state_dict(visual_projection.state_dict())
        if dtype is not None:
            model.to(dtype)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights and config, plus the remote-code files that make the folder load without this package and the
        files the pipeline and sentence-transformers read (`saving_proclip.py`)."""
        self.config.custom_pipelines = CUSTOM_PIPELINES
        super().save_pretrained(save_directory, *args, **kwargs)
        copy_remote_code(save_directory, extra_sources=[self.config.name_or_path])
        write_sentence_transformers_config(save_directory)


def config_from_towers(
    vision_config,
    text: str,
    text_config,
    pooling: str | None = None,
    bidirectional: bool | None = None,
    prompt_template: str | None = None,
    instruction: str | None = None,
    padding_side: str | None = None,
    **config_kwargs,
) -> ProCLIPConfig:
    """A `ProCLIPConfig` for a CLIP vision config and a text tower, its text settings resolved and measured.

    Text settings come from the text tower's preset (`text_tower_preset`), then from the explicit arguments; the
    tokenizer-dependent counts (`instruction_length`, `text_suffix_length`) are measured on the text tower's
    tokenizer, configured exactly as `ProCLIPProcessor.from_towers` will configure it.
    """
    settings = TextTowerSettings.resolve(
        text, pooling=pooling, bidirectional=bidirectional, prompt_template=prompt_template, padding_side=padding_side
    ).record()
    config = ProCLIPConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        instruction=instruction,
        text_name_or_path=str(text),
        **settings,
        **config_kwargs,
    )
    config.instruction_length, config.text_suffix_length = configure_text_tokenizer(
        AutoTokenizer.from_pretrained(text), config
    )
    return config


__all__ = [
    "ProCLIPModel",
    "ProCLIPPreTrainedModel",
    "config_from_towers",
    "ProCLIPAdapter",
    "ProCLIPOutput",
    "contrastive_loss",
    "embed_token_ids",
    "text_tower_kwargs",
    "pool_hidden_states",
    "truncate_text_inputs",
    "bidirectional_attention_mask",
    "without_unused_heads",
]
