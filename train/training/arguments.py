"""The options of `proclip train`: ProCLIP's own (per stage) beside transformers' `TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

from configuration_proclip import POOLING_MODES

STAGE0_NAMES = ("0", "caption-contrastive")
# Recipe defaults for `proclip train` where they differ from TrainingArguments' (METHOD.md §5); flags override them.
TRAIN_DEFAULTS = {
    "adam_beta2": 0.98,
    "adam_epsilon": 1e-6,
    "weight_decay": 0.05,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float < 1 is a fraction of the training steps
    "max_grad_norm": 5.0,
    "remove_unused_columns": False,
    "report_to": "none",
    "save_strategy": "steps",
    "save_steps": 1000,
    "logging_steps": 10,
}


@dataclass
class ProCLIPArguments:
    """The ProCLIP options of `proclip train` (the rest are `TrainingArguments`)."""

    stage: str | None = field(
        default=None, metadata={"help": "1 (or inheritance) or 2 (or contrastive).", "choices": ["1", "2", "inheritance", "contrastive"]}
    )
    model: str | None = field(
        default=None, metadata={"help": "ProCLIP folder or Hub id to start from (`proclip init`, or stage 1's output)."}
    )
    data: str | None = field(
        default=None, metadata={"help": "Training data: a folder, a file or glob (csv/jsonl/parquet/arrow/txt/tar), or a Hub dataset name[:config]."}
    )
    config: str | None = field(default=None, metadata={"help": "YAML or JSON file of these flags; command-line flags win."})
    teacher: str | None = field(
        default=None, metadata={"help": "Stage 1: the CLIP checkpoint whose text encoder is the teacher (default: the model's vision_name_or_path)."}
    )
    image_column: str = field(default="image", metadata={"help": "Stage 2: the image column."})
    caption_column: list[str] | None = field(
        default=None,
        metadata={"help": "Caption column(s); repeat the flag or list several: one caption is drawn per sample (default: caption).", "action": "extend"},
    )
    noise_caption_column: str | None = field(
        default=None, metadata={"help": "Stage 1: a second caption view per sample that adds its own instance term."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split (slicing such as train[:10000] works)."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set --max_steps)."})
    reduction: str = field(default="sum", metadata={"help": "Alignment terms summed (upstream) or averaged per row / pair.", "choices": ["sum", "mean"]})
    structure_form: str = field(
        default="upstream", metadata={"help": "Structure term: smooth-L1 of distances (upstream) or |squared-distance difference| (paper).", "choices": ["upstream", "paper"]}
    )
    distill_weight: float = field(default=1.0, metadata={"help": "Stage 2: lambda, the weight of the self-distillation term.", "aliases": ["--lambda"]})
    ema_momentum: float = field(default=0.999, metadata={"help": "Stage 2: momentum of the EMA image teacher (1.0 = a frozen copy)."})
    embedding_cache: bool = field(default=True, metadata={"help": "Use the embedding cache when one exists (see `proclip embed`)."})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Embedding cache folder (default: proclip_embedding_cache/ next to the data)."}
    )


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
    return {**TRAIN_DEFAULTS, "learning_rate": 2e-4}
