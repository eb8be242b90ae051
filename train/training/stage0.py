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

import dataclasses
import inspect
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainingArguments,
)
from transformers import set_seed as transformers_set_seed

from configuration_proclip.configuration_proclip import (
    POOLING_MODES,
    TEXT_TOWER_SETTING_KEYS,
    TEXT_TOWER_SETTINGS_FILE,
    text_tower_preset,
)
from modeling_proclip import (
    bidirectional_attention_mask,
    configure_text_tokenizer,
    pool_hidden_states,
)

from .arguments import Stage0Arguments, stage0_training_defaults
from .collators import CaptionPairCollator, MNTPCollator, mntp_mask_token_id
from .data import (
    SKIPPED_KEY,
    SkipCounter,
    load_training_dataset,
)
from .losses import ContrastiveLoss
from .stages import zero_loss

STAGE0_REPORT_FILE = "stage0_report.json"

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
