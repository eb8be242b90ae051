"""`ProCLIPTrainingArguments`: every option of every curriculum stage, beside transformers' `TrainingArguments`.

One dataclass is read by `proclip train` (through `HfArgumentParser`, so every Trainer flag works too), by `--config`
YAML/JSON files (the same names) and by Python callers such as the demo. Its defaults are the recipe's (METHOD.md §5:
AdamW beta2 0.98, eps 1e-6, weight decay 0.05, cosine schedule with 3 % warmup, gradient clipping at 5) where they
differ from `TrainingArguments`'.

    stage 0  caption-contrastive   LLM2CLIP's LoRA fine-tuning of the LLM on caption pairs (`--text`, `--lora_*`,
                                   `--temperature`, `--mntp_steps`, the text-tower settings)
    stage 1  inheritance           the adapter distils CLIP's text encoder (`--teacher`, `--reduction`,
                                   `--structure_form`, `--structure_weight`, `--noise_caption_column`)
    stage 2  contrastive           InfoNCE + self-distillation of the image tower (`--distill_weight`, `--ema_momentum`);
                                   optionally a text anchor on the adapter (`--text_anchor_weight`, `--text_anchor_*`)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from configuration_proclip import POOLING_MODES

from .losses import REDUCTIONS, STRUCTURE_FORMS
from .optimization import MASTER_UPDATES, MASTER_WEIGHT_OPTIMIZERS, uses_master_weights
from .registry import (
    CURRICULUM_STAGES,
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    STAGE_NUMBERS,
    canonical_stage,
)

# Learning rates where a stage's recipe differs from TrainingArguments' 5e-5: LLM2Vec's LoRA rate for stage 0.
STAGE_LEARNING_RATES = {"caption-contrastive": 2e-4}
DEFAULT_LEARNING_RATE = 5e-5


def _option(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class ProCLIPTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the options of ProCLIP's stages; see the module docstring for which stage reads what."""

    # -- what runs, on what ------------------------------------------------------------------------------------------
    stage: str | None = _option(
        None, "Curriculum stage: 0 / caption-contrastive, 1 / inheritance, 2 / contrastive.",
        choices=[*STAGE_NUMBERS, *CURRICULUM_STAGES],
    )
    model: str | None = _option(None, "Stages 1-2: the ProCLIP folder or Hub id to start from (`proclip init`, or "
                                "stage 1's output).")
    text: str | None = _option(None, "Stage 0: the LLM to fine-tune, a Hub id or folder (any AutoModel text model).")
    data: str | None = _option(None, "Training data: a folder, a file or glob (csv/jsonl/parquet/arrow/txt/tar), or a "
                               "Hub dataset name[:config].")
    config: str | None = _option(None, "YAML or JSON file of these flags; command-line flags win.")
    output_dir: str | None = _option(None, "Where the trained model goes.", aliases=["--out"])
    split: str = _option("train", "Dataset split (slicing such as train[:10000] works).")
    streaming: bool = _option(False, "Stream the dataset (then set --max_steps).")
    image_column: str = _option(DEFAULT_IMAGE_COLUMN, "Stage 2: the image column.")
    caption_column: list[str] | None = _option(
        None, f"Caption column(s); repeat the flag or list several (default: {DEFAULT_CAPTION_COLUMN}). Stages 1-2 draw one caption per "
        "sample; stage 0 draws two different ones as a positive pair.", action="extend",
    )
    noise_caption_column: str | None = _option(None, "Stage 1: a second caption view per sample that adds its own "
                                                "instance term.")
    allow_paths_outside_data: bool = _option(
        False, "Read image paths that leave the data folder (absolute paths elsewhere, ../); by default those rows are "
        "skipped and counted.",
    )
    allow_remote_images: bool = _option(
        False, "Fetch images given as URLs (http://, s3://, file://, local://, ...); by default, and always with "
        "HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set, those rows are skipped and counted.",
    )
    from_scratch_adapter: bool = _option(
        False, "Stage 2: start from an adapter that never had stage 1 on purpose (direct alignment, as LLM2CLIP); "
        "without it, such a start is warned about.",
    )
    embedding_cache: bool = _option(True, "Stages 1-2: use the embedding cache when one exists (see `proclip embed`).")
    skip_nonfinite_steps: bool = _option(
        False, "Skip an optimizer step whose loss or gradient is NaN or infinite (on every rank alike; counted in "
        "training_report.json) instead of stopping with an error that names the step and its rows.",
    )
    resume_from_checkpoint: str | None = _option(
        None, "A checkpoint folder to resume from; without a value (or `True`), the latest checkpoint-* folder in "
        "--output_dir.", nargs="?", const="True",
    )
    cache_dir: str | None = _option(
        None, "Embedding cache folder (default: proclip_embedding_cache/ inside a data folder, or in the folder of a "
        "data file: --data pairs/ -> pairs/proclip_embedding_cache/, --data dir/captions.jsonl -> "
        "dir/proclip_embedding_cache/; none for a Hub dataset). `proclip embed` and `proclip train` must find the same "
        "one.",
    )

    # -- stages 1 and 2: alignment terms -----------------------------------------------------------------------------
    teacher: str | None = _option(None, "Stage 1: the CLIP checkpoint whose text encoder is the teacher (default: the "
                                  "model's vision_name_or_path).")
    reduction: str = _option("sum", "Alignment terms summed (upstream) or averaged per row / pair.", choices=list(REDUCTIONS))
    structure_form: str = _option(
        "upstream", "Structure term: smooth-L1 of distances (upstream) or |squared-distance difference| (paper).",
        choices=list(STRUCTURE_FORMS),
    )
    structure_weight: float = _option(1.0, "Weight of the structure term L_struct (stage 1, and stage 2's "
                                      "self-distillation); 0 is the `w/o L_struct` ablation.")
    distill_weight: float = _option(1.0, "Stage 2: lambda, the weight of the self-distillation term.", aliases=["--lambda"])
    ema_momentum: float = _option(0.999, "Stage 2: momentum of the EMA image teacher (1.0 = a frozen copy).")

    # -- stage 2: text anchor (beyond the paper: self-distillation anchors only the image tower) ---------------------
    text_anchor_weight: float = _option(
        0.0, "Stage 2: mu, the weight of the text anchor: each step a batch of --text_anchor_data captions (text only) "
        "goes through the adapter and is pulled towards the frozen starting adapter's outputs (stage 1's instance "
        "term, --reduction); 0 = off.",
    )
    text_anchor_data: str | None = _option(None, "Stage 2: the text anchor's captions (e.g. the stage-1 corpus), in "
                                           "any --data format; their LLM embeddings are read from the embedding cache "
                                           "when it has them.")
    text_anchor_caption_column: str | None = _option(None, "Stage 2: the caption column of --text_anchor_data "
                                                     "(default: the first --caption_column).")
    text_anchor_batch_size: int | None = _option(None, "Stage 2: anchor captions per micro-batch (default: "
                                                 "--per_device_train_batch_size).")

    # -- stage 0: the text tower it trains and exports ---------------------------------------------------------------
    pooling: str | None = _option(None, "Stage 0: pooling (default: the LLM's preset, else mean).",
                                  choices=list(POOLING_MODES))
    bidirectional: bool | None = _option(None, "Stage 0: bidirectional attention (default: the LLM's preset, else "
                                         "true, as LLM2Vec).")
    prompt_template: str | None = _option(None, "Stage 0: caption wrapping with '{text}', e.g. a chat turn.")
    padding_side: str | None = _option(None, "Stage 0: recorded padding side (embeddings do not depend on it).",
                                       choices=["left", "right"])
    max_text_length: int = _option(512, "Stage 0: longest tokenized caption; longer ones are truncated.")
    lora_r: int = _option(16, "Stage 0: LoRA rank.")
    lora_alpha: float = _option(32.0, "Stage 0: LoRA alpha (scaling alpha / r).")
    lora_dropout: float = _option(0.05, "Stage 0: LoRA dropout.")
    lora_target_modules: str = _option("all-linear", "Stage 0: comma-separated module names, or all-linear.")
    temperature: float = _option(0.05, "Stage 0: InfoNCE temperature (logits = cosine / temperature).")
    mntp_steps: int = _option(0, "Stage 0: steps of masked next-token prediction before the contrastive phase.")
    mntp_probability: float = _option(0.2, "Stage 0: fraction of tokens masked in MNTP.")

    # -- speed: optimiser precision, memory (training/optimization.py; measured by bench/bench_adapter_step.py) -----
    bf16_master_weights: bool = _option(
        True, "With --bf16 (without FSDP / DeepSpeed, which keep masters of their own): the trainable matrices train "
        "as bfloat16 working weights (no per-step casts), and the optimiser updates float32 master copies, which "
        "checkpoints and the final model hold. False: bfloat16 autocast over float32 weights.",
    )
    master_update: str = _option(
        "auto", "With bf16 master weights: the update of a bfloat16 weight (clipping, AdamW on its master, rounding) "
        "as one torch.compile'd pass per tensor (compiled; ~20 s to compile once per process, needs a C++ compiler "
        "on a CPU) or three eager passes (eager); auto compiles from 16 M elements of such weights.",
        choices=list(MASTER_UPDATES),
    )
    keep_freed_memory: bool = _option(
        True, "On a CPU with glibc: malloc keeps freed blocks for reuse instead of unmapping them, so each step's "
        "large tensors (gradients, activations) are not page-faulted in again. Process-wide; the resident size stays "
        "at its peak.",
    )

    # -- the recipe's defaults where they differ from TrainingArguments' --------------------------------------------
    learning_rate: float | None = _option(None, f"Peak learning rate (default: {DEFAULT_LEARNING_RATE:g}; stage 0 "
                                          f"{STAGE_LEARNING_RATES['caption-contrastive']:g}, LLM2Vec's).")
    adam_beta2: float = _option(0.98, "AdamW beta2.")
    adam_epsilon: float = _option(1e-6, "AdamW epsilon.")
    weight_decay: float = _option(0.05, "AdamW weight decay (matrices only; no decay on biases, norms, logit_scale).")
    lr_scheduler_type: str = _option("cosine", "Learning-rate schedule.")
    warmup_steps: float = _option(0.03, "Warmup steps; a float < 1 is a fraction of the training steps.")
    max_grad_norm: float = _option(5.0, "Gradient clipping norm.")
    remove_unused_columns: bool = _option(False, "Kept False: the collators read the raw dataset columns.")
    save_steps: float = _option(1000, "Save a checkpoint every this many steps.")
    logging_steps: float = _option(10, "Log every this many steps.")

    def __post_init__(self):
        self.stage = canonical_stage(self.stage)
        if self.learning_rate is None:
            self.learning_rate = STAGE_LEARNING_RATES.get(self.stage, DEFAULT_LEARNING_RATE)
        problems = self.stage_option_problems()
        if problems:
            raise ValueError("Invalid ProCLIP training options: " + "; ".join(problems))
        if self.use_cpu or not torch.accelerator.is_available():
            self.dataloader_pin_memory = False  # it only speeds up copies to an accelerator (torch warns without one)
        super().__post_init__()

    def stage_option_problems(self) -> list[str]:
        """What is wrong with the ProCLIP options, one message each."""
        problems = []
        if self.reduction not in REDUCTIONS:
            problems.append(f"reduction={self.reduction!r} must be one of {REDUCTIONS}")
        if self.structure_form not in STRUCTURE_FORMS:
            problems.append(f"structure_form={self.structure_form!r} must be one of {STRUCTURE_FORMS}")
        for name in ("structure_weight", "distill_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.ema_momentum <= 1.0:
            problems.append(f"ema_momentum={self.ema_momentum} must lie in [0, 1]")
        if self.temperature <= 0:
            problems.append(f"temperature={self.temperature} must be positive")
        if not 0.0 < self.mntp_probability < 1.0:
            problems.append(f"mntp_probability={self.mntp_probability} must lie in (0, 1)")
        if self.mntp_steps < 0:
            problems.append(f"mntp_steps={self.mntp_steps} must be >= 0")
        if self.master_update not in MASTER_UPDATES:
            problems.append(f"master_update={self.master_update!r} must be one of {MASTER_UPDATES}")
        optim = str(getattr(self.optim, "value", self.optim))
        if uses_master_weights(self) and optim not in MASTER_WEIGHT_OPTIMIZERS:
            problems.append(f"bf16_master_weights trains with AdamW ({' or '.join(MASTER_WEIGHT_OPTIMIZERS)}), not "
                            f"optim={optim!r}: pass --bf16_master_weights false to use {optim} under bf16 autocast")
        if self.text_anchor_weight < 0:
            problems.append(f"text_anchor_weight={self.text_anchor_weight} must be >= 0")
        if self.text_anchor_weight > 0 and self.text_anchor_data is None:
            problems.append("text_anchor_weight > 0 needs --text_anchor_data, the captions the adapter is anchored on")
        if self.text_anchor_weight > 0 and self.stage not in (None, "contrastive"):
            problems.append("text_anchor_weight is a stage-2 option: the other stages have no starting adapter to "
                            "anchor to")
        if self.text_anchor_batch_size is not None and self.text_anchor_batch_size < 1:
            problems.append(f"text_anchor_batch_size={self.text_anchor_batch_size} must be >= 1")
        if self.stage == "contrastive" and self.noise_caption_column is not None:
            problems.append("noise_caption_column is a stage-1 option; stage 2 draws among its caption columns")
        return problems

    @property
    def caption_columns(self) -> list[str]:
        """The caption columns to read (`caption` when none is given)."""
        return list(self.caption_column or [DEFAULT_CAPTION_COLUMN])


__all__ = ["ProCLIPTrainingArguments"]
