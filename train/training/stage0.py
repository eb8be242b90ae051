"""Stage 0 (LLM2CLIP, METHOD.md §9): turn a decoder LLM into a caption embedder before it becomes the text tower.

A raw LLM's pooled hidden states barely separate captions. LLM2CLIP fine-tunes the LLM with the LLM2Vec recipe:

1. bidirectional attention: the causal mask is replaced by a padding-only one (`bidirectional_attention_mask`);
2. optionally, masked next-token prediction (MNTP, `--mntp_steps`, stage `masked-next-token`): a fraction of the
   tokens is replaced by a mask token, and each one is predicted from the *previous* position's hidden state through
   the LM head (the causal LM loss on masked positions only); this LoRA is merged into the weights before step 3,
   as in LLM2Vec;
3. supervised contrastive learning on caption pairs (stage `caption-contrastive`): two captions of the same image are
   positives, every other pair's captions in the batch are negatives, gathered from all data-parallel ranks.

Both phases are `ProCLIPTrainer` runs of stages in `stages.STAGES`, training LoRA adapters (peft) and nothing else;
they embed with `modeling_proclip.embed_token_ids`, the text path the ProCLIP model itself uses. This module attaches,
merges and exports the LoRA: the output is a plain Hugging Face folder (`AutoModel` weights + the unchanged tokenizer)
plus `proclip_text_tower.json`, which records the pooling, the bidirectional attention, the prompt and the padding side,
so `ProCLIPModel.from_towers(text=folder)` / `proclip init --text folder` embed exactly as stage 0 trained
(`text_tower_preset` reads it).

Python entry point (the demo): `run_stage0(...) -> Path`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers import set_seed as transformers_set_seed

from configuration_proclip import TEXT_TOWER_SETTINGS_FILE, TextTowerSettings
from modeling_proclip import without_unused_heads

from .arguments import ProCLIPTrainingArguments
from .data import load_image_text_dataset
from .finite import require_finite
from .skips import SkipCounter
from .trainer import ProCLIPTrainer

STAGE0_REPORT_FILE = "stage0_report.json"
STAGE0_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "temperature", "mntp_steps",
                  "mntp_probability", "max_text_length")


def attach_lora(model: nn.Module, args: ProCLIPTrainingArguments) -> nn.Module:
    """`model` wrapped with fresh LoRA adapters (peft, `args.lora_*`); only they train."""
    targets = args.lora_target_modules
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        bias="none",
    )
    return get_peft_model(model, config)


def train_stage0(args: ProCLIPTrainingArguments) -> Path:
    """Run stage 0 (`args.text` on the caption pairs of `args.data`) and export the merged text tower into
    `args.output_dir`; returns that folder.

    Writes `stage0_report.json` there too: settings, LoRA, losses, skipped rows and the wall time of each phase.
    """
    started = time.perf_counter()
    dataset = load_image_text_dataset(
        args.data, split=args.split, streaming=args.streaming, caption_columns=args.caption_columns
    )
    transformers_set_seed(args.seed)  # the LoRA initialisation
    report: dict[str, Any] = {
        "text": str(args.text), "data": str(args.data), "caption_columns": args.caption_columns,
        "options": {name: getattr(args, name) for name in STAGE0_OPTIONS},
    }
    if args.mntp_steps > 0:
        phase_start = time.perf_counter()
        base, report["mntp"] = _masked_next_token_phase(args, dataset)
        report["mntp"]["seconds"] = time.perf_counter() - phase_start
    else:
        base = without_unused_heads(AutoModel.from_pretrained(args.text))  # no LoRA on a pooler that gets no gradient

    phase_start = time.perf_counter()
    trainer = ProCLIPTrainer(
        attach_lora(base, args), dataclasses.replace(args, stage="caption-contrastive"), train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.text),
    )
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    report["text_tower"] = trainer.stage.settings.record()
    report["contrastive"] = {
        "steps": output.global_step, "train_loss": output.training_loss, "skipped": trainer.report["skipped"],
        "seconds": time.perf_counter() - phase_start,
    }
    out_dir = Path(args.output_dir)
    if trainer.args.should_save:
        phase_start = time.perf_counter()
        # The tokenizer is exported as it shipped: `from_towers` installs the prompt from proclip_text_tower.json.
        export_text_tower(trainer.model, AutoTokenizer.from_pretrained(args.text), trainer.stage.settings, out_dir)
        report["export_seconds"] = time.perf_counter() - phase_start
        report["total_seconds"] = time.perf_counter() - started
        (out_dir / STAGE0_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        print(f"Stage 0: {SkipCounter(trainer.report['skipped']).summary()}; text tower written to {out_dir}")
    return out_dir


def _masked_next_token_phase(args: ProCLIPTrainingArguments, dataset) -> tuple[nn.Module, dict]:
    """MNTP with a LoRA on the causal LM; returns the base model (no LM head) with that LoRA merged, and a report."""
    causal_lm, loading = AutoModelForCausalLM.from_pretrained(args.text, output_loading_info=True)
    head = causal_lm.get_output_embeddings()
    head_names = {name for name, p in causal_lm.named_parameters() if any(p is q for q in head.parameters())}
    if head_names & set(loading["missing_keys"]):
        raise ValueError(
            f"{args.text} has no trained LM head ({sorted(head_names)} missing), which MNTP predicts through; "
            "train without --mntp_steps, or start from the causal LM checkpoint."
        )
    mntp_args = dataclasses.replace(
        args, stage="masked-next-token", max_steps=args.mntp_steps, output_dir=os.path.join(args.output_dir, "mntp"),
        save_strategy="no", resume_from_checkpoint=None,
    )
    trainer = ProCLIPTrainer(
        attach_lora(causal_lm, args), mntp_args, train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(args.text),
    )
    output = trainer.train()
    merged = trainer.model.merge_and_unload()
    report = {"steps": output.global_step, "train_loss": output.training_loss,
              "mask_token_id": trainer.data_collator.mask_token_id, "skipped": trainer.report["skipped"]}
    return merged.base_model, report


def export_text_tower(model, tokenizer, settings: TextTowerSettings, out_dir: str | os.PathLike) -> Path:
    """Merge the LoRA of a peft-wrapped text model into its weights and save a plain Hugging Face folder: the
    weights, the tokenizer, and `proclip_text_tower.json` (the settings `text_tower_preset` gives back).

    The peft wrapper is unloaded in place: `model` holds no LoRA layers afterwards. Weights holding a NaN or an
    infinity are not written (`finite.NonFiniteWeightsError`).
    """
    out_dir = Path(out_dir)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    require_finite(merged.state_dict(), f"Not saving the text tower to {out_dir}")
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
    **options,
) -> Path:
    """Stage 0 from Python: fine-tune `text_dir` on the caption pairs of `data_spec` and export it to `out_dir`.

    Args:
        text_dir: the LLM (Hub id or folder).
        data_spec: the caption data, as for `proclip train`.
        caption_columns: the columns a row's two captions are drawn from.
        **options: other `ProCLIPTrainingArguments` fields over the stage-0 defaults (e.g. `lora_r`, `temperature`,
            `mntp_steps`, `max_steps`, `per_device_train_batch_size`, `learning_rate`, `seed`, `bf16`).

    Returns:
        `out_dir`, a text tower usable as `--text` for `proclip init` and `ProCLIPModel.from_towers`; its
        `stage0_report.json` holds the wall time of each phase.
    """
    args = ProCLIPTrainingArguments(
        output_dir=str(out_dir), stage="caption-contrastive", text=str(text_dir), data=str(data_spec),
        caption_column=list(caption_columns), **options,
    )
    return train_stage0(args)


__all__ = ["attach_lora", "export_text_tower", "run_stage0", "train_stage0"]
