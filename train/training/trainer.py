"""`ProCLIPTrainer`: transformers' `Trainer` running one curriculum stage of ProCLIP (METHOD.md §3-4).

What is trained and how the loss is formed lives in a small stage object (open_clip's `task/` split); the trainer
adds what every stage needs from the training loop:

    stage            trains                                                 teacher (owned here, never saved)
    "inheritance"    text_adapter                                           CLIP text encoder + projection, frozen
    "contrastive"    text_adapter, vision_model, visual_projection,         EMA of vision_model + visual_projection
                     logit_scale (clamped to [0, ln 100] after each step)

The LLM (`text_model`) never trains and stays in eval mode. Each stage is its own `train()` run; stage 2 starts from
stage 1's output. A new stage (e.g. LLM2CLIP's caption-contrastive stage 0) is a `TrainingStage` subclass added to
`STAGES`.

Training-loop semantics:
- Gradient accumulation: each micro-batch's loss is a per-micro-batch quantity (its own in-batch negatives, its own
  sums), so `loss_is_scaled_for_ga = False` and the Trainer divides it by the number of micro-batches in the step:
  the update follows the mean of the micro-batch losses. Accumulation adds no negatives.
- Data parallel: a stage's computation runs as the model's forward *through* the DDP / FSDP / DeepSpeed wrapper
  (`run_as_forward`), so the wrapper's gradient synchronisation and parameter gathering see a forward pass; the
  contrastive loss gathers negatives from every rank (`losses.ContrastiveLoss`).
- Checkpoints: the stage's own state (the EMA teacher) is written as `stage_state.safetensors` into every Trainer
  checkpoint next to the optimizer state, and restored with it on `resume_from_checkpoint`; skip and cache counters
  travel in `proclip_counters.json` the same way.
- The end of `train()` prints a report (samples skipped per reason, embedding-cache hits and misses, last loss
  components) and writes it to `<output_dir>/training_report.json`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import datasets
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection, Trainer, TrainerCallback
from transformers.utils import logging

from .cache import CachedEmbeddingCollator, EmbeddingCache, teacher_identity, text_tower_identity
from .data import SKIPPED_KEY, CLIPImageTransform, ContrastiveCollator, InheritanceCollator, SkipCounter
from .losses import ContrastiveDistillationLoss, ContrastiveLoss, InheritanceLoss

logger = logging.get_logger(__name__)

LOGIT_SCALE_MAX = math.log(100.0)
STAGE_STATE_FILE = "stage_state.safetensors"
COUNTERS_FILE = "proclip_counters.json"
REPORT_FILE = "training_report.json"
CACHE_STATS_KEY = "cache_stats"


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


def full_parameters(wrapped: nn.Module):
    """A context in which the parameters of the model inside `wrapped` hold their whole values.

    FSDP1 (`FullyShardedDataParallel`) keeps only each rank's shard between forward passes; FSDP2 parameters are
    DTensors (see `_full_tensor`), and DDP and DeepSpeed ZeRO-1/2 replicate parameters, so they need nothing.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return contextlib.nullcontext()


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


# ---------------------------------------------------------------------------------------------------------------------
# Running a stage's computation as the model's forward
# ---------------------------------------------------------------------------------------------------------------------


def run_as_forward(wrapped: nn.Module, module: nn.Module, fn: Callable[[], Any]) -> Any:
    """Call `fn()` as the forward of `module`, through `wrapped` (`module` itself or a DDP / FSDP / DeepSpeed wrapper).

    Data-parallel wrappers act in their forward call: DDP prepares its gradient reduction there, FSDP gathers
    parameters, DeepSpeed runs its hooks. A stage calls several methods of the model (`get_text_features`,
    `get_image_features`), so the whole computation is installed as `module.forward` for one call of `wrapped()`.
    Whatever `module.forward` was before (e.g. accelerate's autocast wrapper) is put back afterwards.
    """
    had_own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = fn
    try:
        return wrapped()
    finally:
        if had_own:
            module.forward = previous
        else:
            del module.forward


# ---------------------------------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------------------------------


class _AfterOptimizerStep(TrainerCallback):
    """Runs the stage's post-step work (logit-scale clamp, EMA update) right after each optimiser step."""

    def __init__(self, trainer: ProCLIPTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if not trainer.accelerator.optimizer_step_was_skipped:
            wrapped = trainer.model_wrapped
            trainer.stage.after_optimizer_step(
                trainer.accelerator.unwrap_model(wrapped), full_parameters=lambda: full_parameters(wrapped)
            )


class ProCLIPTrainer(Trainer):
    """`Trainer` for one ProCLIP stage.

    Args:
        model: a `ProCLIPModel` (stage 2: usually stage 1's output).
        args: `TrainingArguments`; `remove_unused_columns` is forced to `False` (the collators read raw columns).
        stage: `"inheritance"` / `1` or `"contrastive"` / `2`.
        train_dataset: rows with caption column(s) (and an image column in stage 2), e.g. from
            `data.load_training_dataset`.
        processing_class: the model's `ProCLIPProcessor`; it builds the default collator and is saved with the model.
        data_collator: optional; by default the stage's collator from `data.py` (wrapped to read `embedding_cache`).
        caption_columns, image_column, noise_caption_column: the dataset columns the default collator reads.
        embedding_cache: an `EmbeddingCache` of this model's LLM embeddings (and the teacher's); it is validated here
            and a cache made with another model is refused (`cache.StaleCacheError`).
        teacher: stage 1's CLIP checkpoint (default: `model.config.vision_name_or_path`).
        reduction, structure_form: of the alignment terms (both stages), see `losses`.
        distill_weight, ema_momentum: stage 2's lambda and EMA momentum.
        **kwargs: the other `Trainer` arguments (`callbacks`, `eval_dataset`, `optimizers`, ...).

    Batches (what a custom collator must give): `captions` (list[str]); the LLM's `input_ids` / `attention_mask` or
    cached `text_embeds` (with `text_embeds_found`); stage 1: the teacher's `teacher_input_ids` /
    `teacher_attention_mask` or cached `teacher_embeds`, optionally the same with a `noise_` prefix; stage 2:
    `pixel_values`. An optional `skipped` dict counts samples the collator dropped.
    """

    # Each micro-batch's loss stands alone (own negatives): the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        args,
        stage: str | int = "inheritance",
        *,
        train_dataset=None,
        processing_class=None,
        data_collator=None,
        caption_columns: str | Sequence[str] = ("caption",),
        image_column: str = "image",
        noise_caption_column: str | None = None,
        embedding_cache: EmbeddingCache | None = None,
        teacher: str | None = None,
        reduction: str = "sum",
        structure_form: str = "upstream",
        distill_weight: float = 1.0,
        ema_momentum: float = 0.999,
        **kwargs,
    ):
        name = stage_name(stage)
        if name == "inheritance":
            self.stage: TrainingStage = InheritanceStage(teacher, reduction, structure_form)
        else:
            self.stage = ContrastiveStage(distill_weight, ema_momentum, reduction, structure_form)
        if args.remove_unused_columns:
            logger.info("ProCLIPTrainer sets remove_unused_columns=False: its collators read the raw dataset columns.")
            args.remove_unused_columns = False
        if isinstance(train_dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset)):
            if args.accelerator_config.dispatch_batches is None:
                # Batches hold caption strings, which accelerate cannot split between ranks: each rank reads its
                # own share of the stream instead of receiving slices of the main process's batches.
                args.accelerator_config.dispatch_batches = False
        if args.ddp_find_unused_parameters is None:
            # Every trainable parameter takes part in every stage's loss (an emptied batch uses `zero_loss`), so DDP
            # can skip its per-step search for unused parameters.
            args.ddp_find_unused_parameters = False

        self.stage.freeze(model)
        self.stage.setup(model, args.device)
        self.embedding_cache = embedding_cache
        if embedding_cache is not None:
            if processing_class is None:
                raise ValueError("An embedding cache is checked against the model's tokenizer: pass processing_class.")
            embedding_cache.validate(text_tower_identity(model, processing_class.tokenizer), self.stage.cache_identity())
        if data_collator is None:
            if processing_class is None:
                raise ValueError("ProCLIPTrainer needs processing_class (the ProCLIPProcessor) or a data_collator.")
            data_collator = self.stage.make_collator(
                processing_class,
                caption_columns=caption_columns,
                image_column=image_column,
                noise_caption_column=noise_caption_column,
                cache=embedding_cache,
                seed=args.data_seed if args.data_seed is not None else args.seed,
            )
        super().__init__(
            model=model, args=args, train_dataset=train_dataset, data_collator=data_collator,
            processing_class=processing_class, **kwargs,
        )
        self.add_callback(_AfterOptimizerStep(self))
        self.skip_counter = SkipCounter()
        self.cache_counter: Counter = Counter()
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_batches = 0
        self.last_components: dict[str, float] = {}

    # -- the loss ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's loss on one micro-batch (its own negatives and sums; see `loss_is_scaled_for_ga`)."""
        skipped = inputs.pop(SKIPPED_KEY, None)
        cache_stats = inputs.pop(CACHE_STATS_KEY, None)
        if model.training:
            self.skip_counter.update(skipped or {})
            self.cache_counter.update(cache_stats or {})
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped.text_model.eval()  # the Trainer calls model.train() every step; the frozen LLM must not drop out

        with self.accelerator.autocast():
            outputs = run_as_forward(model, unwrapped, lambda: self.stage.compute(unwrapped, inputs))
        if model.training:
            self._accumulate_components(outputs)
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        # The Trainer's 6 * parameters * tokens estimate counts the frozen LLM as trained and cannot see cached
        # embeddings: ProCLIP does not report FLOs.
        return 0

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices only: no decay on biases, norms and other 1-d parameters (incl. logit_scale)."""
        return [name for name, p in model.named_parameters() if p.ndim >= 2]

    # -- logging -------------------------------------------------------------------------------------------------------

    def _accumulate_components(self, outputs: Mapping[str, torch.Tensor]) -> None:
        for key, value in outputs.items():
            if key == "loss":
                continue
            value = value.detach().float()
            self._component_sums[key] = self._component_sums.get(key, torch.zeros_like(value)) + value
        self._component_batches += 1

    def _drain_components(self) -> dict[str, float]:
        """Mean of each loss component since the last call, over micro-batches and ranks (a collective)."""
        means = {}
        for key in sorted(self._component_sums):
            mean = self._component_sums[key] / self._component_batches
            means[key] = float(self.accelerator.reduce(mean, reduction="mean")) if self.args.world_size > 1 else float(mean)
        self._component_sums, self._component_batches = {}, 0
        if means:
            self.last_components = means
        return means

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get the mean of each loss component since the last log (over micro-batches and ranks)."""
        if "loss" in logs:
            for key, value in self._drain_components().items():
                logs[key if key == "logit_scale" else f"loss_{key}"] = value
        super().log(logs, start_time)

    # -- checkpoints: the stage's state and the counters travel with the optimizer state -----------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        counters = self._gathered_counters()  # a collective: every rank calls it
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state = self.stage.state_dict()
        if state:
            save_file(state, os.path.join(output_dir, self.stage.state_file), metadata={"stage": self.stage.name})
        with open(os.path.join(output_dir, COUNTERS_FILE), "w") as f:
            json.dump(counters, f, indent=2)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        if self.stage.state_file is not None:
            path = os.path.join(checkpoint, self.stage.state_file)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {self.stage.state_file}: it was not written by a {self.stage.name}-stage "
                    "ProCLIPTrainer, so its EMA teacher cannot be restored."
                )
            self.stage.load_state_dict(load_file(path, device=str(self.args.device)))
        counters_path = os.path.join(checkpoint, COUNTERS_FILE)
        # Totals over all ranks were saved; rank 0 carries them on, so the final all-reduce counts them once.
        if os.path.isfile(counters_path) and self.args.process_index == 0:
            with open(counters_path) as f:
                counters = json.load(f)
            self.skip_counter.update(counters.get("skipped", {}))
            self.cache_counter.update(counters.get("embedding_cache", {}))
            if isinstance(self.stage, ContrastiveStage):
                self.stage.rows_dropped_to_equalise_ranks += counters.get("rows_dropped_to_equalise_ranks", 0)

    def _gathered_counters(self) -> dict:
        counters = {
            "skipped": self.skip_counter.as_dict(),
            "embedding_cache": dict(self.cache_counter),
            "rows_dropped_to_equalise_ranks": getattr(self.stage, "rows_dropped_to_equalise_ranks", 0),
        }
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return counters
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, counters)
        total = {"skipped": Counter(), "embedding_cache": Counter(), "rows_dropped_to_equalise_ranks": 0}
        for rank_counters in gathered:
            total["skipped"].update(rank_counters["skipped"])
            total["embedding_cache"].update(rank_counters["embedding_cache"])
            total["rows_dropped_to_equalise_ranks"] += rank_counters["rows_dropped_to_equalise_ranks"]
        return {**total, "skipped": dict(total["skipped"]), "embedding_cache": dict(total["embedding_cache"])}

    # -- the end-of-training report ------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._drain_components()  # steps after the last logging step
        counters = self._gathered_counters()
        self.report = {
            "stage": self.stage.name,
            "global_step": output.global_step,
            "train_loss": output.training_loss,
            **counters,
            "skipped_summary": SkipCounter(counters["skipped"]).summary(),
            "last_loss_components": self.last_components,  # mean over the last logging window
        }
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, REPORT_FILE), "w") as f:
                json.dump(self.report, f, indent=2)
            print(f"ProCLIP {self.stage.name} stage: {self.report['skipped_summary']}", end="")
            cache = counters["embedding_cache"]
            if cache:
                print(f"; embedding cache: {cache.get('llm_hits', 0)} hits, {cache.get('llm_misses', 0)} misses", end="")
            print(f" (report: {os.path.join(self.args.output_dir, REPORT_FILE)})")
        return output


__all__ = [
    "ContrastiveStage",
    "EMATeacher",
    "InheritanceStage",
    "ProCLIPTrainer",
    "STAGES",
    "TrainingStage",
    "load_clip_text_teacher",
    "run_as_forward",
    "stage_name",
]
