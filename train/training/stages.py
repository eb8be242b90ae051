"""The curriculum stages of ProCLIP (METHOD.md §3-4) and the teachers they own.

A stage says what is trained and how the loss is formed (open_clip's `task/` split); `ProCLIPTrainer` runs it:

    stage            trains                                                 teacher (owned here, never saved)
    "inheritance"    text_adapter                                           CLIP text encoder + projection, frozen
    "contrastive"    text_adapter, vision_model, visual_projection,         EMA of vision_model + visual_projection
                     logit_scale (clamped to [0, ln 100] after each step)

The LLM (`text_model`) never trains and stays in eval mode. A new stage is a `TrainingStage` subclass added to
`STAGES`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection
from transformers.utils import logging

from .cache import teacher_identity
from .collators import CachedEmbeddingCollator, ContrastiveCollator, InheritanceCollator
from .data import CLIPImageTransform
from .losses import ContrastiveDistillationLoss, ContrastiveLoss, InheritanceLoss

LOGIT_SCALE_MAX = math.log(100.0)
STAGE_STATE_FILE = "stage_state.safetensors"


# ---------------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------------


def load_clip_text_teacher(name_or_path: str, dtype: torch.dtype | None = None) -> CLIPTextModelWithProjection:
    """CLIP's text encoder with its projection, from a `CLIPModel` (or `CLIPTextModelWithProjection`) checkpoint.

    A `CLIPModel` config keeps the joint size in its top-level `projection_dim`; its `text_config.projection_dim` may
    be a stale default, so the text config is given the top-level value before loading.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        # The image tower's weights are expected to go unused: keep transformers' load report about them quiet.
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()
        try:
            teacher = CLIPTextModelWithProjection.from_pretrained(name_or_path, config=text_config, dtype=dtype)
        finally:
            logging.set_verbosity(verbosity)
    elif config.model_type == "clip_text_model":
        teacher = CLIPTextModelWithProjection.from_pretrained(name_or_path, dtype=dtype)
    else:
        raise ValueError(
            f"The stage-1 teacher must be a CLIP checkpoint; {name_or_path} has model_type {config.model_type!r}."
        )
    return freeze(teacher)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients, eval mode: a teacher."""
    module.requires_grad_(False)
    return module.eval()


class EMATeacher(nn.Module):
    """An exponential moving average of the image tower (`vision_model` + `visual_projection`), kept in float32.

    After each optimiser step, `update(model)` sets `ema = momentum * ema + (1 - momentum) * param` for every
    parameter; momentum 1.0 keeps the starting weights (a frozen copy). Buffers keep their starting values (a CLIP
    ViT's are constant position ids).
    """

    def __init__(self, model: nn.Module, momentum: float):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1], got {momentum}")
        self.momentum = momentum
        self.vision_model = copy.deepcopy(model.vision_model).float()
        self.visual_projection = copy.deepcopy(model.visual_projection).float()
        freeze(self)

    def train(self, mode: bool = True) -> EMATeacher:  # a teacher stays in eval mode (open_clip's distill task)
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) unnormalised image embeddings of the EMA image tower."""
        pooled = self.vision_model(pixel_values=pixel_values.to(self.visual_projection.weight.dtype)).pooler_output
        return self.visual_projection(pooled)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self.momentum == 1.0:
            return
        for name in ("vision_model", "visual_projection"):
            ema_params = list(getattr(self, name).parameters())
            params = [_full_tensor(p).float() for p in getattr(model, name).parameters()]
            torch._foreach_lerp_(ema_params, params, 1.0 - self.momentum)


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: FSDP2 shards parameters as DTensors."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach()



# ---------------------------------------------------------------------------------------------------------------------
# Inputs shared by the stages
# ---------------------------------------------------------------------------------------------------------------------


def llm_embeddings(model: nn.Module, inputs: Mapping[str, Any], view: str = "") -> torch.Tensor:
    """Pooled frozen-LLM embeddings (B, H) of a caption view: cached rows, with missing ones computed by the LLM.

    `view` is `""` for the captions and `"noise_"` for stage 1's second caption view.
    """
    cached, found = inputs.get(f"{view}text_embeds"), inputs.get(f"{view}text_embeds_found")
    if cached is not None and (found is None or bool(found.all())):
        return cached
    input_ids, attention_mask = inputs[f"{view}input_ids"], inputs[f"{view}attention_mask"]
    if cached is not None:
        input_ids, attention_mask = input_ids[~found], attention_mask[~found]
    with torch.no_grad():
        computed = model.get_llm_embeddings(input_ids, attention_mask)
    if cached is None:
        return computed
    merged = cached.clone()
    merged[~found] = computed.to(merged.dtype)
    return merged


def batch_size_of(inputs: Mapping[str, Any]) -> int:
    return len(inputs["captions"])


def zero_loss(model: nn.Module) -> torch.Tensor:
    """0, connected to every trainable parameter: a rank whose micro-batch lost all its samples still takes part in
    the data-parallel gradient reduction (with zero gradients)."""
    return sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), torch.zeros(()))


def trim_batch(inputs: dict[str, Any], size: int) -> dict[str, Any]:
    """The first `size` samples of every per-sample entry (tensors and lists of batch length)."""
    batch = batch_size_of(inputs)
    return {
        key: value[:size] if (isinstance(value, (torch.Tensor, list)) and len(value) == batch) else value
        for key, value in inputs.items()
    }


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------


class TrainingStage:
    """One curriculum stage: which submodules train, the teachers, the loss, and what happens after each step.

    Subclasses set `name` and `trainable` (top-level submodule / parameter names of `ProCLIPModel`) and implement
    `compute`. The trainer calls, in order: `freeze(model)`, `setup(model, device)`, `make_collator(...)` (when the
    user gives none), then per micro-batch `compute(model, inputs)` and per optimiser step `after_optimizer_step`.
    """

    name: str = ""
    trainable: tuple[str, ...] = ()
    state_file: str | None = None  # stages with state (an EMA) save it into Trainer checkpoints under this name

    def freeze(self, model: nn.Module) -> None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.split(".")[0] in self.trainable)
        model.text_model.eval()

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Build the teachers on `device`."""

    def cache_identity(self) -> dict | None:
        """Identity of this stage's teacher as the embedding cache records it; `None` when there is no text teacher."""
        return None

    def make_collator(self, processor, *, caption_columns, image_column, noise_caption_column, cache, seed):
        raise NotImplementedError

    def compute(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch and its components: `{"loss": ..., "<component>": ...}` (scalars).

        Runs as the model's forward (see `run_as_forward`). A micro-batch may hold no sample (all dropped by the
        collator); the loss must then still reach every trainable parameter (`zero_loss`), and any collective must
        run on every rank.
        """
        raise NotImplementedError

    def after_optimizer_step(self, model: nn.Module, full_parameters=contextlib.nullcontext) -> None:
        """Called after every optimiser step that was not skipped. Inside `full_parameters()` the parameters hold
        their whole values (FSDP1 shards them between forward passes)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


class InheritanceStage(TrainingStage):
    """Stage 1, representation inheritance: the adapter learns to reproduce CLIP's text embeddings (METHOD.md §3).

    Args:
        teacher: the CLIP checkpoint whose text encoder is the teacher; `None` = `config.vision_name_or_path`, the
            checkpoint the image tower came from.
        reduction, structure_form: see `losses.InheritanceLoss`.
    """

    name = "inheritance"
    trainable = ("text_adapter",)

    def __init__(self, teacher: str | None = None, reduction: str = "sum", structure_form: str = "upstream"):
        self.teacher_name = teacher
        self.loss = InheritanceLoss(reduction=reduction, structure_form=structure_form)
        self.teacher: CLIPTextModelWithProjection | None = None
        self.teacher_tokenizer = None

    def setup(self, model, device):
        name = self.teacher_name or model.config.vision_name_or_path
        if name is None:
            raise ValueError(
                "Stage 1 needs the CLIP checkpoint whose text encoder is the teacher: the model's config has no "
                "vision_name_or_path, so pass teacher= (--teacher)."
            )
        self.teacher_name = str(name)
        self.teacher = load_clip_text_teacher(self.teacher_name).to(device)
        self.teacher_tokenizer = AutoTokenizer.from_pretrained(self.teacher_name)
        if self.teacher.config.projection_dim != model.config.projection_dim:
            raise ValueError(
                f"The teacher {self.teacher_name} projects to {self.teacher.config.projection_dim} dimensions, the "
                f"model's joint space has {model.config.projection_dim}: the teacher must be the CLIP checkpoint "
                "the image tower comes from."
            )

    def cache_identity(self):
        return teacher_identity(self.teacher, self.teacher_tokenizer)

    def make_collator(self, processor, *, caption_columns, image_column, noise_caption_column, cache, seed):
        max_length = processor.tokenizer.model_max_length
        cached_teacher = cache is not None and cache.has_teacher
        collator = InheritanceCollator(
            tokenizer=None if cache is not None else processor.tokenizer,
            caption_columns=caption_columns,
            noise_caption_column=noise_caption_column,
            max_length=max_length,
            teacher_tokenizer=None if cached_teacher else self.teacher_tokenizer,
            seed=seed,
        )
        if cache is None:
            return collator
        return CachedEmbeddingCollator(
            collator, cache, processor.tokenizer, max_length, self.teacher_tokenizer, use_teacher=cached_teacher
        )

    def teacher_embeddings(self, inputs, view: str = "") -> torch.Tensor:
        """CLIP text embeddings (B, D) of a caption view: cached rows, missing ones computed by the teacher."""
        cached, found = inputs.get(f"{view}teacher_embeds"), inputs.get(f"{view}teacher_embeds_found")
        if cached is not None and bool(found.all()):
            return cached
        input_ids, attention_mask = inputs[f"{view}teacher_input_ids"], inputs[f"{view}teacher_attention_mask"]
        if cached is not None:
            input_ids, attention_mask = input_ids[~found], attention_mask[~found]
        with torch.no_grad():
            computed = self.teacher(input_ids=input_ids, attention_mask=attention_mask).text_embeds
        if cached is None:
            return computed
        merged = cached.clone()
        merged[~found] = computed.to(merged.dtype)
        return merged

    def compute(self, model, inputs):
        if batch_size_of(inputs) == 0:  # every sample of this micro-batch was dropped
            return {"loss": zero_loss(model)}
        student = model.get_text_features(text_embeds=llm_embeddings(model, inputs)).pooler_output
        extra = {}
        if "noise_captions" in inputs:
            extra["student_extra"] = model.get_text_features(text_embeds=llm_embeddings(model, inputs, "noise_")).pooler_output
            extra["teacher_extra"] = self.teacher_embeddings(inputs, "noise_")
        return self.loss(student, self.teacher_embeddings(inputs), **extra)


class ContrastiveStage(TrainingStage):
    """Stage 2, contrastive tuning with self-distillation (METHOD.md §4).

    Args:
        distill_weight: lambda, the weight of the self-distillation term; 0 trains with InfoNCE alone (no EMA
            teacher is built or run).
        ema_momentum: momentum of the EMA teacher (1.0 = a frozen copy of the starting image tower).
        reduction, structure_form: see `losses.ContrastiveDistillationLoss`.
    """

    name = "contrastive"
    trainable = ("text_adapter", "vision_model", "visual_projection", "logit_scale")

    def __init__(
        self,
        distill_weight: float = 1.0,
        ema_momentum: float = 0.999,
        reduction: str = "sum",
        structure_form: str = "upstream",
    ):
        if distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {distill_weight}")
        self.distill_weight = distill_weight
        self.ema_momentum = ema_momentum
        if distill_weight == 0:
            self.loss = ContrastiveLoss()
        else:
            self.loss = ContrastiveDistillationLoss(distill_weight, reduction=reduction, structure_form=structure_form)
        self.ema: EMATeacher | None = None
        self.state_file = STAGE_STATE_FILE if distill_weight > 0 else None  # no teacher, no state
        self.rows_dropped_to_equalise_ranks = 0

    def setup(self, model, device):
        if self.distill_weight > 0:
            self.ema = EMATeacher(model, self.ema_momentum).to(device)

    def make_collator(self, processor, *, caption_columns, image_column, noise_caption_column, cache, seed):
        if noise_caption_column is not None:
            raise ValueError("A noise caption column is a stage-1 option; stage 2 draws among its caption columns.")
        max_length = processor.tokenizer.model_max_length
        collator = ContrastiveCollator(
            tokenizer=None if cache is not None else processor.tokenizer,
            transform=CLIPImageTransform(processor.image_processor, train=True),
            image_column=image_column,
            caption_columns=caption_columns,
            max_length=max_length,
            seed=seed,
        )
        if cache is None:
            return collator
        return CachedEmbeddingCollator(collator, cache, processor.tokenizer, max_length)

    def compute(self, model, inputs):
        inputs = self._equalise_ranks(inputs)
        if batch_size_of(inputs) == 0:
            return {"loss": zero_loss(model)}
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
        text = model.get_text_features(text_embeds=llm_embeddings(model, inputs)).pooler_output
        if self.distill_weight == 0:
            out = self.loss(image, text, model.logit_scale)
        else:
            out = self.loss(image, text, model.logit_scale, self.ema(inputs["pixel_values"]))
        out["logit_scale"] = model.logit_scale.detach().float()  # log space, clamped to [0, ln 100]
        return out

    def _equalise_ranks(self, inputs):
        """The cross-rank gather needs the same batch size on every rank: dropped samples can make them differ, so
        every rank keeps the smallest size (the rows cut here are counted)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return inputs
        size = torch.tensor(batch_size_of(inputs), device=inputs["pixel_values"].device)
        dist.all_reduce(size, op=dist.ReduceOp.MIN)
        size = int(size)
        if size == batch_size_of(inputs):
            return inputs
        self.rows_dropped_to_equalise_ranks += batch_size_of(inputs) - size
        return trim_batch(inputs, size)

    def after_optimizer_step(self, model, full_parameters=contextlib.nullcontext):
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)  # elementwise: right on a shard too
        if self.ema is not None:
            with full_parameters():
                self.ema.update(model)

    def state_dict(self):
        if self.ema is None:
            return {}
        return {f"ema.{k}": v.detach().contiguous() for k, v in self.ema.state_dict().items()}

    def load_state_dict(self, state):
        self.ema.load_state_dict({k.removeprefix("ema."): v for k, v in state.items()})


STAGES: dict[str, type[TrainingStage]] = {"inheritance": InheritanceStage, "contrastive": ContrastiveStage}
STAGE_ALIASES = {"1": "inheritance", "2": "contrastive"}


def stage_name(stage: str | int) -> str:
    """`1` / `"1"` / `"inheritance"` -> `"inheritance"`, and so on; unknown names raise `ValueError`."""
    name = STAGE_ALIASES.get(str(stage), str(stage))
    if name not in STAGES:
        known = ", ".join([*STAGE_ALIASES, *STAGES])
        raise ValueError(f"Unknown stage {stage!r}; choose one of {known}.")
    return name


__all__ = [
    "STAGES",
    "ContrastiveStage",
    "EMATeacher",
    "InheritanceStage",
    "TrainingStage",
    "load_clip_text_teacher",
    "stage_name",
]
