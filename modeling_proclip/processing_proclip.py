"""ProCLIP processor: the CLIP image processor and the LLM embedder's tokenizer, behind one call.

Shipped as is inside every exported checkpoint folder (Hub remote code): it imports only the standard library,
torch, tokenizers (a transformers dependency) and transformers. Images are opened by `images_proclip.open_image`;
the zero-shot pipeline is `pipeline_proclip.py`'s.

The text side of ProCLIP must give one embedding per caption whoever tokenizes it — the zero-shot pipeline (which
calls the tokenizer directly), this processor, training, or the embedding cache. So everything that shapes the token
ids (prompt wrapping, instruction, EOS, padding side, the length limit) is written into the saved tokenizer by
`configure_text_tokenizer`, never left to caller code.
"""

import json
import os

try:
    from typing import Unpack
except ImportError:  # Python 3.10, where transformers 4.x still runs
    from typing_extensions import Unpack

import torch
from tokenizers import processors
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.utils import logging

logger = logging.get_logger(__name__)

# ProcessorMixin calls the tokenizer and the image processor itself in transformers 4.57 and 5 (5 checks the inputs
# too); 4.51's leaves that to each processor, as its CLIPProcessor does.
MIXIN_CALLS_COMPONENTS = "__call__" in vars(ProcessorMixin)

# Tokenizer classes transformers 5 names in tokenizer_config.json that transformers 4 lacks, and the name both read.
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}

_PREFIX_PIECE = "proclip_prefix"
_SUFFIX_PIECE = "proclip_suffix"


def _special_ids_around_text(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a caption on its own (e.g. `[CLS]`/`[SEP]`, `<bos>`)."""
    probe = "proclip probe"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(bare) + 1):
        if with_special[start : start + len(bare)] == bare:
            return with_special[:start], with_special[start + len(bare) :]
    raise ValueError(f"Cannot locate the caption inside the tokenizer's own special tokens: {with_special} vs {bare}")


def _template_piece(name: str, ids: list[int], tokenizer) -> dict:
    return {"id": name, "ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)}


def configure_text_tokenizer(tokenizer, config) -> tuple[int, int]:
    """Write the text settings of a `ProCLIPConfig` into `tokenizer` (in place) and measure them.

    Installs `config.prompt_template` and `config.instruction` as the tokenizer's post-processor (so `tokenizer(text)`
    yields `[specials] prefix instruction text suffix [specials]` for every caller), sets a pad token if missing
    (the EOS token: padding is masked out, so its identity does not matter), the padding side, and
    `model_max_length = config.max_text_length`.

    Returns:
        `(instruction_length, text_suffix_length)`: how many leading tokens are excluded from mean pooling (0 without
        an instruction) and how many trailing tokens truncation must keep.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The text tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an EOS token to pad "
                "with; set `tokenizer.pad_token` before building ProCLIP."
            )
        logger.info("The text tokenizer has no pad token; padding with its EOS token %r.", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if config.padding_side is not None:
        tokenizer.padding_side = config.padding_side
    tokenizer.model_max_length = config.max_text_length

    lead, trail = _special_ids_around_text(tokenizer)
    if config.prompt_template is None and config.instruction is None:
        return 0, len(trail)

    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"prompt_template/instruction need a fast (tokenizers-backed) tokenizer; {type(tokenizer).__name__} is not."
        )
    template = config.prompt_template or "{text}"
    before, after = template.split("{text}")
    before += config.instruction or ""
    prefix = lead + (tokenizer(before, add_special_tokens=False)["input_ids"] if before else [])
    suffix = (tokenizer(after, add_special_tokens=False)["input_ids"] if after else []) + trail

    single, pieces = [], []
    if prefix:
        single.append(f"{_PREFIX_PIECE}:0")
        pieces.append(_template_piece(_PREFIX_PIECE, prefix, tokenizer))
    single.append("$A:0")
    if suffix:
        single.append(f"{_SUFFIX_PIECE}:0")
        pieces.append(_template_piece(_SUFFIX_PIECE, suffix, tokenizer))
    pair = single + ["$B:1"]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=pieces
    )
    # Keep a reload from rebuilding the post-processor out of `add_bos_token` / `add_eos_token`.
    for key in ("add_bos_token", "add_eos_token"):
        tokenizer.init_kwargs.pop(key, None)
    instruction_length = len(prefix) if config.instruction else 0
    return instruction_length, len(suffix)


class ProCLIPProcessingKwargs(ProcessingKwargs, total=False):
    """The defaults of every `ProCLIPProcessor` call, lowest in `_merge_kwargs`' order: captions padded to the longest
    and truncated to the tokenizer's `model_max_length` (= `max_text_length`; the template's end is kept), PyTorch
    tensors."""

    _defaults = {
        "text_kwargs": {"padding": True, "truncation": True, "return_tensors": "pt"},
        "images_kwargs": {"return_tensors": "pt"},
    }


class ProCLIPProcessor(ProcessorMixin):
    r"""
    Pairs a CLIP image processor with the LLM embedder's tokenizer.

    Called like transformers' `CLIPProcessor`: keyword arguments are merged by `ProcessorMixin` (`_merge_kwargs`), so
    the caller's own `padding`, `truncation`, `max_length`, `return_tensors`, `text_kwargs={...}` or
    `images_kwargs={...}` override the defaults (`ProCLIPProcessingKwargs`) instead of colliding with them. Pooling,
    positions and the model's truncation follow the attention mask, so any padding (`True`, `"max_length"`,
    `pad_to_multiple_of`, either `padding_side`) gives the embedding of the default call.

    Args:
        image_processor (`CLIPImageProcessor`): resizes, crops and normalises images (RGB conversion included).
        tokenizer (`PreTrainedTokenizerBase`): the text tower's tokenizer, configured by `configure_text_tokenizer`.
    """

    valid_processor_kwargs = ProCLIPProcessingKwargs
    if hasattr(ProcessorMixin, "attributes"):  # transformers 4 loads the parts by these names; 5 reads `__init__`
        attributes = ["image_processor", "tokenizer"]
        image_processor_class = "AutoImageProcessor"
        tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer)

    @classmethod
    def from_towers(cls, vision: str, text: str, config, **kwargs) -> "ProCLIPProcessor":
        """Build from the CLIP checkpoint's image processor and the text tower's tokenizer, set up for `config`."""
        image_processor = AutoImageProcessor.from_pretrained(vision, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(text, **kwargs)
        configure_text_tokenizer(tokenizer, config)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    @classmethod
    def from_args_and_dict(cls, args, processor_dict: dict, **kwargs):
        """As `ProcessorMixin`'s, without the parts' own settings that transformers 5 keeps in processor_config.json:
        `args` holds the loaded parts already (transformers 5 drops them too; 4.51 would pass them twice)."""
        processor_dict = {
            key: value for key, value in processor_dict.items() if key not in ("image_processor", "tokenizer")
        }
        return super().from_args_and_dict(args, processor_dict, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """Save as `ProcessorMixin` does, in files every supported transformers reads: also the image processor's own
        `preprocessor_config.json` (transformers 5 keeps it inside `processor_config.json`, where transformers 4 and
        transformers.js do not look), and the tokenizer's class under a name transformers 4 knows."""
        saved = super().save_pretrained(save_directory, **kwargs)
        self.image_processor.save_pretrained(save_directory)
        tokenizer_config = os.path.join(save_directory, "tokenizer_config.json")
        with open(tokenizer_config) as f:
            content = json.load(f)
        if content.get("tokenizer_class") in PORTABLE_TOKENIZER_CLASSES:
            content["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[content["tokenizer_class"]]
            with open(tokenizer_config, "w") as f:
                json.dump(content, f, indent=2, ensure_ascii=False)
        return saved

    def __call__(
        self,
        images: ImageInput | None = None,
        text: TextInput | PreTokenizedInput | list[TextInput] | list[PreTokenizedInput] | None = None,
        **kwargs: Unpack[ProcessingKwargs],
    ) -> BatchFeature:
        """Prepare images and/or captions for [`ProCLIPModel`].

        Args:
            images: a PIL image, a path, URL or base64 string, an array or tensor (`(H, W)` grayscale, `(H, W, C)` or
                `(C, H, W)`), or a list of them; grayscale and RGBA are converted to RGB.
            text (`str` or `list[str]`): captions; `""` is the prompt template (and special tokens) alone.
            kwargs: tokenizer and image-processor options, as for `CLIPProcessor`. `add_special_tokens=False` is
                refused: the template and EOS the model was trained with live in the tokenizer's special tokens.

        Returns:
            `BatchFeature` with `pixel_values` (B, 3, H, W) and/or `input_ids`, `attention_mask` (B, L).
        """
        if images is None and text is None:
            raise ValueError("ProCLIPProcessor needs `images`, `text`, or both.")
        for name, value in (("text", text), ("images", images)):
            if isinstance(value, (list, tuple)) and len(value) == 0:
                raise ValueError(f"`{name}` is an empty list; pass at least one.")
        if not {**kwargs.get("text_kwargs", {}), **kwargs}.get("add_special_tokens", True):
            raise ValueError(
                "add_special_tokens=False would drop the prompt template and EOS this model embeds every caption with; "
                "leave it out."
            )
        if images is not None:
            images = _with_channels(images)
        if MIXIN_CALLS_COMPONENTS:
            return super().__call__(images=images, text=text, **kwargs)
        merged = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        features = {}
        if text is not None:
            features.update(self.tokenizer(text, **merged["text_kwargs"]))
        if images is not None:
            features.update(self.image_processor(images, **merged["images_kwargs"]))
        return BatchFeature(features, tensor_type=merged["text_kwargs"].get("return_tensors"))


def _with_channels(image):
    """A 2-D array or tensor (a grayscale image, `(H, W)`) as `(H, W, 3)`, in (nested) lists too; anything else as
    it is."""
    if isinstance(image, (list, tuple)):
        return [_with_channels(item) for item in image]
    if getattr(image, "ndim", None) != 2:
        return image
    if isinstance(image, torch.Tensor):
        return image[..., None].expand(-1, -1, 3)
    return image[..., None].repeat(3, axis=-1)  # numpy


__all__ = [
    "ProCLIPProcessor",
    "configure_text_tokenizer",
]
