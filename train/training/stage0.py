"""Stage 0 (LLM2CLIP, METHOD.md §9): turn a decoder LLM into a caption embedder, and measure how well any text tower
tells captions apart (caption retrieval accuracy).

A raw LLM's pooled hidden states barely separate captions. LLM2CLIP fine-tunes the LLM with the LLM2Vec recipe before
it becomes the text tower:

1. bidirectional attention: the causal mask is replaced by a padding-only one (`bidirectional_attention_mask`);
2. optionally, masked next-token prediction (MNTP, `--mntp_steps`): a fraction of the tokens is replaced by a mask
   token, and each one is predicted from the *previous* position's hidden state through the LM head (the causal LM
   loss on masked positions only); this LoRA is merged into the weights before step 3, as in LLM2Vec;
3. supervised contrastive learning on caption pairs: two captions of the same image are positives, every other pair's
   captions in the batch are negatives, gathered from all data-parallel ranks (`losses.ContrastiveLoss`).

Steps 2 and 3 train LoRA adapters (peft) and nothing else. The export merges the LoRA into the weights: the output is
a plain Hugging Face folder (`AutoModel` weights + the unchanged tokenizer) plus `proclip_text_tower.json`, which
records the pooling, the bidirectional attention, the prompt and the padding side, so `ProCLIPModel.from_towers(
text=folder)` / `proclip init --text folder` embed exactly as stage 0 trained (`text_tower_preset` reads it).

Caption retrieval accuracy (CRA, LLM2CLIP Table 1): for images with two captions, each first caption queries among
all second captions; top-1 accuracy (`metrics.caption_retrieval_accuracy`). `load_text_tower` embeds captions with any
text tower, so the numbers compare across kinds:
- a raw or stage-0 LLM (or encoder) folder: pooled hidden states, with the settings `from_towers` would use;
- a ProCLIP folder: the joint-space text embedding (`get_text_features`, i.e. after the adapter);
- a CLIP checkpoint: the text encoder's projected embedding (`CLIPTextModelWithProjection.text_embeds`).

Python entry points (the demo): `run_stage0(...) -> Path` and `caption_retrieval_accuracy_of(...) -> float`.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, Trainer, TrainingArguments
from transformers import set_seed as transformers_set_seed

from configuration_proclip.configuration_proclip import (
    POOLING_MODES,
    TEXT_TOWER_SETTING_KEYS,
    TEXT_TOWER_SETTINGS_FILE,
    text_tower_preset,
)
from modeling_proclip import bidirectional_attention_mask, configure_text_tokenizer, pool_hidden_states

from .data import (
    SKIPPED_KEY,
    CaptionCollator,
    InheritanceCollator,
    SkipCounter,
    caption_candidates,
    iter_row_captions,
    load_training_dataset,
)
from .losses import ContrastiveLoss
from ..evaluation.metrics import caption_retrieval_accuracy
from .trainer import load_clip_text_teacher, zero_loss

STAGE0_NAMES = ("0", "caption-contrastive")
STAGE0_REPORT_FILE = "stage0_report.json"
TOO_FEW_CAPTIONS = "too_few_captions"  # skip reason: a row without two different captions gives no positive pair

# What `from_towers` does with a text tower that has no preset; CRA of a raw LLM uses the same.
RAW_TOWER_DEFAULTS = {"pooling": "mean", "bidirectional": False, "prompt_template": None, "padding_side": None}
# The LLM2Vec recipe: mean pooling over a bidirectional LLM.
STAGE0_TOWER_DEFAULTS = {"pooling": "mean", "bidirectional": True, "prompt_template": None, "padding_side": None}


# ---------------------------------------------------------------------------------------------------------------------
# Running a text model as an embedder
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTowerSettings:
    """How a text model is run as an embedder: the text fields of `ProCLIPConfig` (no instruction).

    It can be passed where `configure_text_tokenizer` expects a config.
    """

    pooling: str = "mean"
    bidirectional: bool = False
    prompt_template: str | None = None
    padding_side: str | None = None
    max_text_length: int = 512
    instruction: str | None = None  # read by configure_text_tokenizer; stage 0 trains without one

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLING_MODES}")
        if self.prompt_template is not None and self.prompt_template.count("{text}") != 1:
            raise ValueError(f"prompt_template={self.prompt_template!r} must contain '{{text}}' exactly once")
        if self.padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side={self.padding_side!r} must be 'left', 'right' or None")

    @classmethod
    def resolve(
        cls, text: str | os.PathLike, defaults: Mapping[str, Any], max_text_length: int = 512, **explicit
    ) -> TextTowerSettings:
        """`defaults`, overridden by the tower's own settings or preset (`text_tower_preset`), overridden by the
        explicit values that are not `None` (`pooling`, `bidirectional`, `prompt_template`, `padding_side`)."""
        values = {**defaults, **text_tower_preset(str(text)), **{k: v for k, v in explicit.items() if v is not None}}
        return cls(max_text_length=max_text_length, **values)

    def record(self) -> dict:
        """What an exported text tower writes into `proclip_text_tower.json`."""
        return {key: getattr(self, key) for key in TEXT_TOWER_SETTING_KEYS}


class LLMEmbedder(nn.Module):
    """A text model run the way `ProCLIPModel.get_llm_embeddings` runs its text tower: positions count real tokens
    only, the attention mask is bidirectional when asked, and the states are pooled along the attention mask (so the
    padding side never changes an embedding).

    Args:
        model: the text model (an `AutoModel`, or an `AutoModelForCausalLM` for MNTP), peft-wrapped or not.
        pooling, bidirectional: as in `ProCLIPConfig`.
    """

    def __init__(self, model: nn.Module, pooling: str = "mean", bidirectional: bool = False):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.bidirectional = bidirectional
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft hides the signature
        self._takes_position_ids = "position_ids" in inspect.signature(base.forward).parameters

    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """The model's output for (batch_size, seq_len) ids and mask, with ProCLIP's mask and positions."""
        if self._takes_position_ids:
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = attention_mask
        if self.bidirectional:
            mask = bidirectional_attention_mask(attention_mask, self.model.get_input_embeddings().weight.dtype)
        return self.model(input_ids=input_ids, attention_mask=mask, **kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch_size, seq_len) ids and mask -> (batch_size, hidden_size) pooled embeddings."""
        hidden_states = self.run(input_ids, attention_mask).last_hidden_state
        return pool_hidden_states(hidden_states, attention_mask, self.pooling)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute the model's layers in backward (`--activation_checkpointing`). Non-reentrant by default, so the
        frozen embeddings need no gradient for the LoRA layers above them to get one."""
        checkpoint_kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs, **kwargs)


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

    @torch.inference_mode()
    def embed(self, texts: Sequence[str], batch_size: int = 64, bf16: bool = False) -> torch.Tensor:
        """Embed `texts` longest first (little padding per batch); returns (N, D) float32 in the order given."""
        order = sorted(range(len(texts)), key=lambda index: len(texts[index]), reverse=True)
        chunks, positions = [], []
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            batch = self.tokenizer(
                [texts[index] for index in indices], padding=True, truncation=True, return_tensors="pt"
            ).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                chunks.append(self.encode(batch["input_ids"], batch["attention_mask"]).float())
            positions.extend(indices)
        if not chunks:
            raise ValueError("no text to embed")
        embeds = torch.cat(chunks)
        return embeds[torch.argsort(torch.tensor(positions, device=embeds.device))]


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
        from modeling_proclip import ProCLIPModel, ProCLIPProcessor

        model = ProCLIPModel.from_pretrained(name, dtype=dtype).to(device).eval()
        tokenizer = ProCLIPProcessor.from_pretrained(name).tokenizer

        def encode(input_ids, attention_mask):
            return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output

        settings = {"embedding": "joint space (get_text_features: pooled LLM -> adapter)", "pooling": model.config.pooling,
                    "bidirectional": model.config.bidirectional, "prompt_template": model.config.prompt_template}
        return TextTower("proclip", name, tokenizer, encode, settings, device)

    if model_type in ("clip", "clip_text_model"):
        model = load_clip_text_teacher(name, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(name)

        def encode(input_ids, attention_mask):
            return model(input_ids=input_ids, attention_mask=attention_mask).text_embeds

        settings = {"embedding": "CLIP text encoder + projection (text_embeds)",
                    "max_text_length": tokenizer.model_max_length}
        return TextTower("clip", name, tokenizer, encode, settings, device)

    text_settings = TextTowerSettings.resolve(name, RAW_TOWER_DEFAULTS, max_text_length, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(name)
    configure_text_tokenizer(tokenizer, text_settings)
    model = AutoModel.from_pretrained(name, dtype=dtype).to(device).eval()
    embedder = LLMEmbedder(model, text_settings.pooling, text_settings.bidirectional)
    settings = {"embedding": "pooled hidden states", **dataclasses.asdict(text_settings)}
    settings.pop("instruction")
    return TextTower("llm", name, tokenizer, embedder, settings, device)


def caption_retrieval_accuracy_of(
    text_tower: TextTower | str | os.PathLike,
    captions_a: Sequence[str],
    captions_b: Sequence[str],
    batch_size: int = 64,
    bf16: bool = False,
    **tower_options,
) -> float:
    """CRA of a text tower: each `captions_a[i]` queries among all of `captions_b`; top-1 accuracy (ties count against
    the query). The two lists hold two captions of the same N images, in the same order.

    Args:
        text_tower: a loaded `TextTower`, or anything `load_text_tower` reads (then `tower_options` go to it:
            `device`, `pooling`, `bidirectional`, ...).
    """
    if len(captions_a) != len(captions_b):
        raise ValueError(f"captions_a has {len(captions_a)} captions but captions_b has {len(captions_b)}")
    tower = text_tower if isinstance(text_tower, TextTower) else load_text_tower(text_tower, **tower_options)
    embeds = tower.embed(list(captions_a) + list(captions_b), batch_size, bf16)
    # Caption k of image i: both lists list the images in order, so each image's first caption is its `captions_a`.
    return caption_retrieval_accuracy(embeds, torch.arange(len(captions_a)).repeat(2))


def caption_pairs(dataset, caption_columns: Sequence[str]) -> tuple[list[str], list[str], int]:
    """The first two non-blank captions of each row, read across `caption_columns` in order (a list-valued column
    counts each of its strings): `(first captions, second captions, rows without two)`."""
    first, second, skipped = [], [], 0
    for captions in iter_row_captions(dataset, caption_columns):
        if len(captions) < 2:
            skipped += 1
            continue
        first.append(captions[0])
        second.append(captions[1])
    return first, second, skipped


def evaluate_caption_retrieval(
    tower: TextTower, dataset, caption_columns: Sequence[str], batch_size: int = 64, bf16: bool = False
) -> dict:
    """`proclip eval --task caption-retrieval`: CRA of one text tower on a dataset's caption pairs.

    With two caption columns, each row's caption in the first queries among all rows' captions in the second; with
    one list-valued column, the first two captions of each row. Rows without two non-blank captions are skipped.

    Returns:
        `{"data": {...}, "protocol": {...}, "metrics": {"num_images", "caption_retrieval_accuracy"}}`.
    """
    from ..evaluation.tasks import TIE_POLICY

    first, second, skipped = caption_pairs(dataset, caption_columns)
    if not first:
        raise ValueError(f"no row has two non-blank captions in {list(caption_columns)}")
    accuracy = caption_retrieval_accuracy_of(tower, first, second, batch_size, bf16)
    return {
        "data": {"caption_columns": list(caption_columns), "skipped_rows": {TOO_FEW_CAPTIONS: skipped}},
        "protocol": {
            "query": "each image's first caption", "gallery": "every image's second caption", "top_k": 1,
            "similarity": "cosine", "ties": TIE_POLICY, "text_tower": {"kind": tower.kind, **tower.settings},
        },
        "metrics": {"num_images": len(first), "caption_retrieval_accuracy": accuracy},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------------------


class CaptionPairCollator(CaptionCollator):
    """Stage 0: rows -> two different captions of the same image, tokenised: the positive pairs.

    The two are drawn at random without replacement among the row's distinct non-blank captions in `caption_columns`
    (a list-valued column counts each of its strings; with two single-caption columns the pair is those two), and
    keep their column order. A row with fewer than two is dropped and counted under `too_few_captions`.

    Returns (a dict, B = rows kept):
        `captions`, `pair_captions` list[str] (B);
        `input_ids`, `attention_mask`, `pair_input_ids`, `pair_attention_mask` LongTensor (B, L) / (B, L');
        `skipped` dict[str, int].
    """

    def __init__(self, tokenizer, caption_columns: str | Sequence[str], max_length: int | None = None, seed: int = 0):
        super().__init__(tokenizer, max_length, seed)
        self.caption_columns = (caption_columns,) if isinstance(caption_columns, str) else tuple(caption_columns)

    def __call__(self, rows: list[Mapping]) -> dict[str, Any]:
        self._check_columns(rows, self.caption_columns)
        skipped: Counter = Counter({TOO_FEW_CAPTIONS: 0})
        first, second = [], []
        for row in rows:
            candidates = list(dict.fromkeys(caption_candidates(row, self.caption_columns)))
            if len(candidates) < 2:
                self._skip(skipped, TOO_FEW_CAPTIONS, row, f"fewer than two captions in {', '.join(self.caption_columns)}")
                continue
            # Column order kept (the loss is symmetric): with a short and a long column, the short captions pad to
            # short lengths instead of every view padding to the long ones.
            a, b = sorted(torch.randperm(len(candidates), generator=self.generator)[:2].tolist())
            first.append(candidates[a])
            second.append(candidates[b])
        batch: dict[str, Any] = {"captions": first, "pair_captions": second}
        batch.update(self._tokenize(self.tokenizer, first, self.max_length, ""))
        batch.update(self._tokenize(self.tokenizer, second, self.max_length, "pair_"))
        batch[SKIPPED_KEY] = dict(skipped)
        return batch


def mask_for_mntp(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_token_id: int, probability: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked next-token prediction inputs: replace a random `probability` of the tokens by `mask_token_id`.

    Each real token but a row's first may be masked (the first has no previous position to be predicted from); every
    row with two or more tokens gets at least one masked token. All chosen tokens become the mask token (no 80/10/10
    split).

    Returns:
        `(masked_input_ids, labels)`, both (B, L): labels hold the original id at masked positions and -100 elsewhere,
        the layout the causal LM loss expects (position i - 1 predicts label i).
    """
    real = attention_mask.bool()
    maskable = real & (real.cumsum(-1) > 1)
    draws = torch.rand(input_ids.shape, generator=generator)
    chosen = maskable & (draws < probability)
    rows = torch.arange(input_ids.shape[0])
    first_choice = torch.where(maskable, draws, 2.0).argmin(-1)  # the row's lowest draw: forced in
    chosen[rows, first_choice] |= maskable.any(-1)
    labels = torch.where(chosen, input_ids, -100)
    return torch.where(chosen, mask_token_id, input_ids), labels


class MNTPCollator:
    """MNTP batches: one caption per row (drawn as in stage 1, `InheritanceCollator`), masked by `mask_for_mntp`.

    Returns: `captions`, `input_ids` (masked), `attention_mask`, `labels`, `skipped`.
    """

    def __init__(self, tokenizer, caption_columns, mask_token_id: int, probability: float = 0.2,
                 max_length: int | None = None, seed: int = 0):
        self.captions = InheritanceCollator(tokenizer, caption_columns, max_length=max_length, seed=seed)
        self.mask_token_id = mask_token_id
        self.probability = probability

    def __call__(self, rows: list[Mapping]) -> dict[str, Any]:
        batch = self.captions(rows)
        batch["input_ids"], batch["labels"] = mask_for_mntp(
            batch["input_ids"], batch["attention_mask"], self.mask_token_id, self.probability, self.captions.generator
        )
        return batch


def mntp_mask_token_id(tokenizer) -> int:
    """The tokenizer's mask token, else "_" (LLM2Vec's choice for decoder LLMs, which have no mask token)."""
    if tokenizer.mask_token_id is not None:
        return tokenizer.mask_token_id
    return tokenizer.convert_tokens_to_ids(tokenizer.tokenize("_"))[-1]


# ---------------------------------------------------------------------------------------------------------------------
# What is trained
# ---------------------------------------------------------------------------------------------------------------------


class _TrainsAnEmbedder(nn.Module):
    """What the Trainer asks of the module it trains, passed on to the LLM embedder inside."""

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.embedder.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)


class CaptionContrastiveModel(_TrainsAnEmbedder):
    """Stage 0's contrastive step: both captions of each pair through the LLM embedder, symmetric InfoNCE.

    Uses `losses.ContrastiveLoss` (stage 2's loss, negatives from every rank) with the two caption views in the roles
    of image and text, and a fixed temperature: logits = cosine / temperature.
    """

    def __init__(self, embedder: LLMEmbedder, temperature: float = 0.05):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.embedder = embedder
        self.loss = ContrastiveLoss()
        self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature)), persistent=False)

    def forward(self, input_ids, attention_mask, pair_input_ids, pair_attention_mask) -> dict[str, torch.Tensor]:
        if input_ids.shape[0] == 0:
            return {"loss": zero_loss(self)}
        first = self.embedder(input_ids, attention_mask)
        second = self.embedder(pair_input_ids, pair_attention_mask)
        return self.loss(first, second, self.logit_scale)


class MaskedNextTokenModel(_TrainsAnEmbedder):
    """MNTP step: the causal LM's next-token loss on masked positions, with the embedder's attention (bidirectional)."""

    def __init__(self, embedder: LLMEmbedder):
        super().__init__()
        self.embedder = embedder

    def forward(self, input_ids, attention_mask, labels) -> dict[str, torch.Tensor]:
        if input_ids.shape[0] == 0:
            return {"loss": zero_loss(self)}
        return {"loss": self.embedder.run(input_ids, attention_mask, labels=labels).loss}


class Stage0Trainer(Trainer):
    """`Trainer` for the modules above: drops the raw captions from batches, counts skipped rows, and keeps the batch
    size equal across ranks (the cross-rank gather needs it).

    ProCLIPTrainer's stages train parts of a `ProCLIPModel` around a frozen LLM; stage 0 trains the LLM itself
    (through LoRA) before any ProCLIP model exists, so it has its own small trainer.
    """

    # Each micro-batch's loss stands alone (its own negatives): the Trainer averages them over accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model: nn.Module, args: TrainingArguments, **kwargs):
        args.remove_unused_columns = False  # the collators read raw caption columns
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False  # every LoRA parameter is in every loss (empty batch: zero_loss)
        super().__init__(model=model, args=args, **kwargs)
        self.skip_counter = SkipCounter()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop(SKIPPED_KEY, None)
        if model.training:
            self.skip_counter.update(skipped or {})
        tensors = _same_size_on_every_rank({k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        outputs = model(**tensors)
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def floating_point_ops(self, inputs) -> int:
        return 0  # the 6 * parameters * tokens estimate would count the frozen base weights as trained


def _same_size_on_every_rank(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut every rank's batch to the smallest one (dropped rows make them differ)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    first = next(iter(tensors.values()))
    size = torch.tensor(first.shape[0], device=first.device)
    dist.all_reduce(size, op=dist.ReduceOp.MIN)
    return {k: v[: int(size)] for k, v in tensors.items()}


def add_lora(model: nn.Module, options: Stage0Arguments):
    """Wrap `model` with fresh LoRA adapters (peft); only they train."""
    from peft import LoraConfig, get_peft_model

    targets = options.lora_target_modules
    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        bias="none",
    )
    return get_peft_model(model, config)


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Stage0Arguments:
    """The options of `proclip train --stage 0` (the rest are `TrainingArguments`)."""

    stage: str = field(default="0", metadata={"help": "0 (or caption-contrastive).", "choices": list(STAGE0_NAMES)})
    text: str | None = field(default=None, metadata={"help": "The LLM to fine-tune: a Hub id or folder (any AutoModel text model)."})
    data: str | None = field(
        default=None, metadata={"help": "Caption data: a folder, a file or glob (csv/jsonl/parquet/arrow/tar), or a Hub dataset name[:config]."}
    )
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of these flags; command-line flags win."})
    caption_column: list[str] | None = field(
        default=None,
        metadata={"help": "Caption column(s): two captions of a row are a positive pair, drawn among all its captions in these columns (default: caption, a list per row).", "action": "extend"},
    )
    split: str = field(default="train", metadata={"help": "Dataset split (slicing such as train[:10000] works)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set --max_steps)."})
    pooling: str | None = field(default=None, metadata={"help": "Pooling (default: the LLM's preset, else mean).", "choices": list(POOLING_MODES)})
    bidirectional: bool | None = field(
        default=None, metadata={"help": "Bidirectional attention (default: the LLM's preset, else true, as LLM2Vec)."}
    )
    prompt_template: str | None = field(default=None, metadata={"help": "Caption wrapping with '{text}', e.g. a chat turn (default: none)."})
    padding_side: str | None = field(default=None, metadata={"help": "Recorded padding side (embeddings do not depend on it).", "choices": ["left", "right"]})
    max_text_length: int = field(default=512, metadata={"help": "Longest tokenized caption; longer ones are truncated."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "Comma-separated module names, or all-linear."})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (logits = cosine / temperature)."})
    mntp_steps: int = field(default=0, metadata={"help": "Steps of masked next-token prediction before the contrastive phase (0: none)."})
    mntp_probability: float = field(default=0.2, metadata={"help": "Fraction of tokens masked in MNTP."})


def stage0_training_defaults() -> dict:
    """`TrainingArguments` defaults of stage 0: `proclip train`'s recipe defaults with LLM2Vec's learning rate."""
    from ..cli.train import TRAIN_DEFAULTS

    return {**TRAIN_DEFAULTS, "learning_rate": 2e-4}


def train_stage0(options: Stage0Arguments, training_args: TrainingArguments) -> Path:
    """Run stage 0 and export the merged text tower into `training_args.output_dir`; returns that folder.

    Writes `stage0_report.json` there too: settings, LoRA, losses, skipped rows and the wall time of each phase.
    """
    started = time.perf_counter()
    caption_columns = options.caption_column or ["caption"]
    settings = TextTowerSettings.resolve(
        options.text, STAGE0_TOWER_DEFAULTS, options.max_text_length, pooling=options.pooling,
        bidirectional=options.bidirectional, prompt_template=options.prompt_template, padding_side=options.padding_side,
    )
    tokenizer = AutoTokenizer.from_pretrained(options.text)  # exported as it is: from_towers installs the prompt
    run_tokenizer = AutoTokenizer.from_pretrained(options.text)
    configure_text_tokenizer(run_tokenizer, settings)
    dataset = load_training_dataset(
        options.data, split=options.split, streaming=options.streaming, caption_columns=caption_columns
    )
    seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
    transformers_set_seed(training_args.seed)  # the LoRA initialisation
    report: dict[str, Any] = {
        "text": str(options.text), "data": str(options.data), "caption_columns": list(caption_columns),
        "text_tower": settings.record(), "options": dataclasses.asdict(options),
    }

    if options.mntp_steps > 0:
        phase_start = time.perf_counter()
        base, report["mntp"] = _masked_next_token_phase(
            options, settings, run_tokenizer, dataset, training_args, caption_columns, seed
        )
        report["mntp"]["seconds"] = time.perf_counter() - phase_start
    else:
        base = AutoModel.from_pretrained(options.text)

    phase_start = time.perf_counter()
    embedder = LLMEmbedder(add_lora(base, options), settings.pooling, settings.bidirectional)
    trainer = Stage0Trainer(
        model=CaptionContrastiveModel(embedder, options.temperature),
        args=training_args,
        train_dataset=dataset,
        data_collator=CaptionPairCollator(run_tokenizer, caption_columns, settings.max_text_length, seed),
    )
    output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    skipped = trainer.skip_counter.all_reduce()
    report["contrastive"] = {
        "steps": output.global_step, "train_loss": output.training_loss, "skipped": skipped,
        "seconds": time.perf_counter() - phase_start,
    }
    out_dir = Path(training_args.output_dir)
    if trainer.args.should_save:
        phase_start = time.perf_counter()
        export_text_tower(embedder.model, tokenizer, settings, out_dir)
        report["export_seconds"] = time.perf_counter() - phase_start
        report["total_seconds"] = time.perf_counter() - started
        (out_dir / STAGE0_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        print(f"Stage 0: {SkipCounter(skipped).summary()}; text tower written to {out_dir}")
    return out_dir


def _masked_next_token_phase(options, settings, tokenizer, dataset, training_args, caption_columns, seed):
    """MNTP with a LoRA on the causal LM; returns the base model (no LM head) with that LoRA merged, and a report."""
    causal_lm, loading = AutoModelForCausalLM.from_pretrained(options.text, output_loading_info=True)
    head = causal_lm.get_output_embeddings()
    head_names = {name for name, p in causal_lm.named_parameters() if any(p is q for q in head.parameters())}
    if head_names & set(loading["missing_keys"]):
        raise ValueError(
            f"{options.text} has no trained LM head ({sorted(head_names)} missing), which MNTP predicts through; "
            "train without --mntp_steps, or start from the causal LM checkpoint."
        )
    lm = LLMEmbedder(add_lora(causal_lm, options), settings.pooling, settings.bidirectional)
    args = dataclasses.replace(
        training_args, max_steps=options.mntp_steps, output_dir=os.path.join(training_args.output_dir, "mntp"),
        save_strategy="no", resume_from_checkpoint=None,
    )
    collator = MNTPCollator(
        tokenizer, caption_columns, mntp_mask_token_id(tokenizer), options.mntp_probability,
        settings.max_text_length, seed,
    )
    trainer = Stage0Trainer(model=MaskedNextTokenModel(lm), args=args, train_dataset=dataset, data_collator=collator)
    output = trainer.train()
    merged = lm.model.merge_and_unload()
    report = {"steps": output.global_step, "train_loss": output.training_loss,
              "mask_token_id": collator.mask_token_id, "skipped": trainer.skip_counter.all_reduce()}
    return merged.base_model, report


def export_text_tower(model, tokenizer, settings: TextTowerSettings, out_dir: str | os.PathLike) -> Path:
    """Merge the LoRA of a peft-wrapped text model into its weights and save a plain Hugging Face folder: the
    weights, the tokenizer, and `proclip_text_tower.json` (the settings `text_tower_preset` gives back).

    The peft wrapper is unloaded in place: `model` holds no LoRA layers afterwards.
    """
    out_dir = Path(out_dir)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {**settings.record(), "trained_by": "proclip stage 0 (LLM2CLIP caption-contrastive fine-tuning)"}
    (out_dir / TEXT_TOWER_SETTINGS_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def run_stage0(
    text_dir: str | os.PathLike,
    data_spec: str | os.PathLike,
    caption_columns: Sequence[str],
    out_dir: str | os.PathLike,
    options: Stage0Arguments | None = None,
    **training_kwargs,
) -> Path:
    """Stage 0 from Python: fine-tune `text_dir` on the caption pairs of `data_spec` and export it to `out_dir`.

    Args:
        text_dir: the LLM (Hub id or folder).
        data_spec: the caption data, as for `proclip train`.
        caption_columns: the columns a row's two captions are drawn from.
        options: the other stage-0 options (LoRA, temperature, MNTP, pooling); `text`, `data` and `caption_column`
            are taken from the arguments above.
        **training_kwargs: `TrainingArguments` fields over the stage-0 defaults (e.g. `max_steps`,
            `per_device_train_batch_size`, `learning_rate`, `seed`, `bf16`).

    Returns:
        `out_dir`, a text tower usable as `--text` for `proclip init` and `ProCLIPModel.from_towers`; its
        `stage0_report.json` holds the wall time of each phase.
    """
    options = dataclasses.replace(
        options or Stage0Arguments(), text=str(text_dir), data=str(data_spec), caption_column=list(caption_columns)
    )
    training_args = TrainingArguments(output_dir=str(out_dir), **{**stage0_training_defaults(), **training_kwargs})
    return train_stage0(options, training_args)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: `proclip train --stage 0 ...` (routed here by training.py)
# ---------------------------------------------------------------------------------------------------------------------


def is_stage0_command(argv: Sequence[str]) -> bool:
    """Whether `proclip train` words ask for stage 0 (`--stage 0`, here or in the `--config` file)."""
    from ..cli.train import read_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--stage")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    stage = known.stage
    if stage is None and known.config:
        stage = read_config_file(known.config).get("stage")
    return str(stage) in STAGE0_NAMES


def stage0_train_command(argv: Sequence[str]) -> Path:
    """`proclip train --stage 0 --text LLM --data SPEC --caption-column A --caption-column B --out DIR [...]`."""
    from ..cli.train import parse_train_args

    options, training_args = parse_train_args(
        list(argv), Stage0Arguments, required=("text", "data"), defaults=stage0_training_defaults()
    )
    return train_stage0(options, training_args)


__all__ = [
    "CaptionContrastiveModel",
    "CaptionPairCollator",
    "LLMEmbedder",
    "MNTPCollator",
    "MaskedNextTokenModel",
    "Stage0Arguments",
    "Stage0Trainer",
    "TextTower",
    "TextTowerSettings",
    "caption_retrieval_accuracy_of",
    "evaluate_caption_retrieval",
    "export_text_tower",
    "load_text_tower",
    "mask_for_mntp",
    "run_stage0",
    "train_stage0",
]
