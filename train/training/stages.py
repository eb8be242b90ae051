"""The curriculum stages of ProCLIP (METHOD.md §3-4, §9) and the teachers they own.

A stage says what is trained and how the loss is formed (open_clip's `task/` split); `ProCLIPTrainer` runs the one
`STAGES[args.stage]` names:

    stage                  model                trains                                  teacher (owned, never saved)
    "caption-contrastive"  the LLM, LoRA-wrapped  LoRA adapters (stage 0)               -
    "masked-next-token"    the causal LM, LoRA    LoRA adapters (stage 0's MNTP phase)  -
    "inheritance"          ProCLIPModel         text_adapter (stage 1)                  CLIP text encoder + projection
    "contrastive"          ProCLIPModel         text_adapter, vision_model,             EMA of vision_model +
                                                visual_projection, logit_scale          visual_projection; with a
                                                (logit scale clamped to [0, ln 100]     text anchor, a frozen copy
                                                after each step) (stage 2)              of the starting text_adapter

In stages 1 and 2 the LLM (`text_model`) never trains and stays in eval mode. A new stage is a `TrainingStage`
subclass added to `STAGES`.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

from configuration_proclip import TextTowerSettings
from modeling_proclip import (
    configure_text_tokenizer,
    embed_token_ids,
    text_tower_kwargs,
)

from .arguments import ProCLIPTrainingArguments
from .cache import EmbeddingCache, teacher_identity, text_tower_identity
from .collators import (
    CACHE_STATS_KEY,
    CachedEmbeddingCollator,
    CaptionCollator,
    CaptionPairCollator,
    ContrastiveCollator,
    InheritanceCollator,
    MNTPCollator,
    mntp_mask_token_id,
)
from .data import load_image_text_dataset
from .images import CLIPImageTransform
from .losses import (
    ContrastiveDistillationLoss,
    ContrastiveLoss,
    InheritanceLoss,
)
from .skips import SKIPPED_KEY

LOGIT_SCALE_MAX = math.log(100.0)
STAGE_STATE_FILE = "stage_state.safetensors"
# Stage 0 trains the LLM into an LLM2Vec-style embedder: mean pooling over bidirectional attention by default.
STAGE0_TOWER_DEFAULTS = {"bidirectional": True}
TEXT_ANCHOR_PREFIX = "anchor_"  # batch keys of the text anchor's captions: anchor_captions, anchor_llm_embeds, ...


# ---------------------------------------------------------------------------------------------------------------------
# Teachers
# ---------------------------------------------------------------------------------------------------------------------


class _CLIPTextTeacher(CLIPTextModelWithProjection):
    """CLIP's text tower read out of a whole `CLIPModel` checkpoint: its image tower's weights go unused, expectedly."""

    _keys_to_ignore_on_load_unexpected = [r"^vision_model\.", r"^visual_projection\.", r"^logit_scale$"]


def load_clip_text_teacher(name_or_path: str, dtype: torch.dtype | None = None) -> CLIPTextModelWithProjection:
    """CLIP's text encoder with its projection, frozen, from a `CLIPModel` (or `CLIPTextModelWithProjection`) checkpoint.

    A `CLIPModel` config keeps the joint size in its top-level `projection_dim`; its `text_config.projection_dim` may
    be a stale default, so the text config is given the top-level value before loading.
    """
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type == "clip":
        text_config = config.text_config
        text_config.projection_dim = config.projection_dim
        teacher = _CLIPTextTeacher.from_pretrained(name_or_path, config=text_config, dtype=dtype)
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
# Batches
# ---------------------------------------------------------------------------------------------------------------------


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


def cached_or_computed(
    inputs: Mapping[str, Any], key: str, token_prefix: str, compute: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Embeddings of a caption view: the cached rows (`inputs[key]`, found where `inputs[key + "_found"]`), with the
    missing ones computed from `inputs[token_prefix + "input_ids" / "attention_mask"]` by `compute`, without grad."""
    cached, found = inputs.get(key), inputs.get(f"{key}_found")
    if cached is not None and (found is None or bool(found.all())):
        return cached
    input_ids, attention_mask = inputs[f"{token_prefix}input_ids"], inputs[f"{token_prefix}attention_mask"]
    if cached is not None:
        input_ids, attention_mask = input_ids[~found], attention_mask[~found]
    with torch.no_grad():
        computed = compute(input_ids, attention_mask)
    if cached is None:
        return computed
    merged = cached.clone()
    merged[~found] = computed.to(merged.dtype)
    return merged


class TextAnchorCollator(CaptionCollator):
    """Adds a batch of anchor captions (text only) to every stage-2 batch, for the text anchor of `ContrastiveStage`.

    Each call draws `batch_size` rows of `anchor_rows` at random (with replacement, from this process's generator) and
    runs `anchor_collator` (stage 1's caption collator, reading the embedding cache when there is one) on them; its
    outputs join the batch under `TEXT_ANCHOR_PREFIX`: `anchor_captions` (A), `anchor_llm_embeds` (A, H) and
    `anchor_llm_embeds_found` (A,) from the cache, or `anchor_input_ids` / `anchor_attention_mask` (A, L) where a
    caption is missing from it. The anchor's cache hits and misses are counted as `anchor_llm_hits` / `_misses`.
    """

    def __init__(self, collator, anchor_rows, anchor_collator, batch_size: int, seed: int):
        super().__init__(None, None, seed)
        self.collator = collator
        self.anchor_rows = anchor_rows
        self.anchor_collator = anchor_collator
        self.batch_size = batch_size

    def __call__(self, rows):
        batch = self.collator(rows)
        drawn = torch.randint(len(self.anchor_rows), (self.batch_size,), generator=self.generator).tolist()
        anchor = self.anchor_collator([self.anchor_rows[i] for i in drawn])
        anchor.pop(SKIPPED_KEY, None)  # anchor rows are not training samples: their skips are not the data's
        stats = anchor.pop(CACHE_STATS_KEY, {})
        if stats:
            batch[CACHE_STATS_KEY] = {**batch.get(CACHE_STATS_KEY, {}),
                                    **{TEXT_ANCHOR_PREFIX + key: value for key, value in stats.items()}}
        batch.update({TEXT_ANCHOR_PREFIX + key: value for key, value in anchor.items()})
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# The stage interface
# ---------------------------------------------------------------------------------------------------------------------


class TrainingStage:
    """One curriculum stage: which parameters train, the teachers, the batches, the loss, the post-step work.

    Built from the run's `ProCLIPTrainingArguments`. `ProCLIPTrainer` calls, in order: `freeze(model)`,
    `setup(model, device, processing_class)`, `check_cache(...)` (with an embedding cache), `make_collator(...)`
    (when the user gives none), then per micro-batch `compute(model, inputs)` and per optimiser step
    `after_optimizer_step`.
    """

    name: str = ""
    state_file: str | None = None  # stages with state (an EMA) save it into Trainer checkpoints under this name

    def __init__(self, args: ProCLIPTrainingArguments):
        self.args = args
        self.rows_dropped_to_equalise_ranks = 0

    def freeze(self, model: nn.Module) -> None:
        """Set which parameters train."""

    def setup(self, model: nn.Module, device: torch.device, processing_class=None) -> None:
        """Build the teachers on `device`."""

    def check_cache(self, model: nn.Module, processing_class, cache: EmbeddingCache) -> None:
        """Refuse an embedding cache this stage cannot use (`cache.StaleCacheError` for another model's)."""
        raise ValueError(f"The {self.name} stage trains the text tower itself: it cannot read an embedding cache.")

    def make_collator(self, processing_class, cache: EmbeddingCache | None):
        raise NotImplementedError

    def compute(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss of one micro-batch and its components: `{"loss": ..., "<component>": ...}` (scalars).

        Runs as the model's forward (see `trainer.run_as_forward`). A micro-batch may hold no sample (all dropped by
        the collator); the loss must then still reach every trainable parameter (`zero_loss`), and any collective must
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

    def equalise_ranks(self, inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The cross-rank gather needs the same batch size on every rank: dropped samples can make them differ, so
        every rank keeps the smallest size (the rows cut here are counted)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return inputs
        size = torch.tensor(batch_size_of(inputs), device=device)
        dist.all_reduce(size, op=dist.ReduceOp.MIN)
        size = int(size)
        if size == batch_size_of(inputs):
            return inputs
        self.rows_dropped_to_equalise_ranks += batch_size_of(inputs) - size
        return trim_batch(inputs, size)

    @property
    def seed(self) -> int:
        """Seed of the collators' draws (captions, crops, masks)."""
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed


# ---------------------------------------------------------------------------------------------------------------------
# Stages 1 and 2: parts of a ProCLIPModel around its frozen LLM
# ---------------------------------------------------------------------------------------------------------------------


class _ProCLIPStage(TrainingStage):
    """A stage of a `ProCLIPModel`: the submodules in `trainable` train, the LLM stays frozen in eval mode, and the
    pooled LLM embeddings may come from an embedding cache."""

    trainable: tuple[str, ...] = ()

    def freeze(self, model):
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.split(".")[0] in self.trainable)
        model.text_model.eval()

    def teacher_cache_identity(self) -> dict | None:
        """Identity of this stage's text teacher as the embedding cache records it; `None` without one."""
        return None

    def check_cache(self, model, processing_class, cache):
        if processing_class is None:
            raise ValueError("An embedding cache is checked against the model's tokenizer: pass processing_class.")
        cache.validate(text_tower_identity(model, processing_class.tokenizer), self.teacher_cache_identity())

    def llm_embeddings(self, model: nn.Module, inputs: Mapping[str, Any], view: str = "") -> torch.Tensor:
        """Pooled frozen-LLM embeddings (B, H) of a caption view (`""`, or `"noise_"` for stage 1's second view)."""
        return cached_or_computed(inputs, f"{view}llm_embeds", view, model.get_llm_embeddings)

    def text_features(self, model: nn.Module, inputs: Mapping[str, Any], view: str = "") -> torch.Tensor:
        """(B, D) unnormalised joint-space text embeddings of a caption view, through the trainable adapter."""
        model.text_model.eval()  # the Trainer calls model.train() every step; the frozen LLM must not drop out
        return model.get_text_features(llm_embeds=self.llm_embeddings(model, inputs, view)).pooler_output


class InheritanceStage(_ProCLIPStage):
    """Stage 1, representation inheritance: the adapter learns to reproduce CLIP's text embeddings (METHOD.md §3).

    Reads `args.teacher` (the CLIP checkpoint whose text encoder is the teacher; default the model's
    `vision_name_or_path`, where the image tower came from), `reduction`, `structure_form`, `structure_weight`.
    """

    name = "inheritance"
    trainable = ("text_adapter",)

    def __init__(self, args):
        super().__init__(args)
        self.teacher_name = args.teacher
        self.loss = InheritanceLoss(args.reduction, args.structure_form, args.structure_weight)
        self.teacher: CLIPTextModelWithProjection | None = None
        self.teacher_tokenizer = None

    def setup(self, model, device, processing_class=None):
        name = self.teacher_name or model.config.vision_name_or_path
        if name is None:
            raise ValueError(
                "Stage 1 needs the CLIP checkpoint whose text encoder is the teacher: the model's config has no "
                "vision_name_or_path, so pass --teacher."
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

    def teacher_cache_identity(self):
        return teacher_identity(self.teacher, self.teacher_tokenizer)

    def make_collator(self, processing_class, cache):
        max_length = processing_class.tokenizer.model_max_length
        cached_teacher = cache is not None and cache.has_teacher
        collator = InheritanceCollator(
            tokenizer=None if cache is not None else processing_class.tokenizer,
            caption_columns=self.args.caption_columns,
            noise_caption_column=self.args.noise_caption_column,
            max_length=max_length,
            teacher_tokenizer=None if cached_teacher else self.teacher_tokenizer,
            seed=self.seed,
        )
        if cache is None:
            return collator
        return CachedEmbeddingCollator(
            collator, cache, processing_class.tokenizer, max_length, self.teacher_tokenizer, use_teacher=cached_teacher
        )

    def teacher_embeddings(self, inputs, view: str = "") -> torch.Tensor:
        """CLIP text embeddings (B, D) of a caption view: cached rows, missing ones computed by the teacher."""
        return cached_or_computed(
            inputs, f"{view}teacher_embeds", f"{view}teacher_",
            lambda input_ids, attention_mask: self.teacher(input_ids=input_ids, attention_mask=attention_mask).text_embeds,
        )

    def compute(self, model, inputs):
        if batch_size_of(inputs) == 0:  # every sample of this micro-batch was dropped
            return {"loss": zero_loss(model)}
        extra = {}
        if "noise_captions" in inputs:
            extra["student_extra"] = self.text_features(model, inputs, "noise_")
            extra["teacher_extra"] = self.teacher_embeddings(inputs, "noise_")
        return self.loss(self.text_features(model, inputs), self.teacher_embeddings(inputs), **extra)


class ContrastiveStage(_ProCLIPStage):
    """Stage 2, contrastive tuning with self-distillation (METHOD.md §4), and optionally a text anchor.

    Reads `args.distill_weight` (lambda; 0 trains with InfoNCE alone and builds no EMA teacher), `ema_momentum`
    (1.0 = a frozen copy of the starting image tower), `reduction`, `structure_form`, `structure_weight`.

    Text anchor (beyond the paper; `args.text_anchor_weight` mu > 0): self-distillation anchors only the image tower,
    and the adapter may drift on text it never sees with images. Each micro-batch then also carries a batch of
    `args.text_anchor_data` captions (`TextAnchorCollator`); they go through the trainable adapter (s) and through a
    frozen copy of the adapter as stage 2 started (t), and `mu * L_ins(s, t)` (stage 1's instance term, `reduction`)
    joins the loss. Only the adapter receives its gradient. `losses.ContrastiveDistillationLoss` sums every term.
    """

    name = "contrastive"
    trainable = ("text_adapter", "vision_model", "visual_projection", "logit_scale")

    def __init__(self, args):
        super().__init__(args)
        self.distill_weight = args.distill_weight
        self.text_anchor_weight = args.text_anchor_weight
        self.loss = ContrastiveDistillationLoss(
            self.distill_weight, args.reduction, args.structure_form, args.structure_weight,
            text_anchor_weight=self.text_anchor_weight,
        )
        self.ema: EMATeacher | None = None
        self.anchor_adapter: nn.Module | None = None
        has_state = self.distill_weight > 0 or self.text_anchor_weight > 0
        self.state_file = STAGE_STATE_FILE if has_state else None  # no teacher, no state

    def setup(self, model, device, processing_class=None):
        if self.distill_weight > 0:
            self.ema = EMATeacher(model, self.args.ema_momentum).to(device)
        if self.text_anchor_weight > 0:
            self.anchor_adapter = freeze(copy.deepcopy(model.text_adapter).float()).to(device)

    def make_collator(self, processing_class, cache):
        max_length = processing_class.tokenizer.model_max_length
        collator = ContrastiveCollator(
            tokenizer=None if cache is not None else processing_class.tokenizer,
            transform=CLIPImageTransform(processing_class.image_processor, train=True),
            image_column=self.args.image_column,
            caption_columns=self.args.caption_columns,
            max_length=max_length,
            seed=self.seed,
        )
        if cache is not None:
            collator = CachedEmbeddingCollator(collator, cache, processing_class.tokenizer, max_length)
        if self.text_anchor_weight == 0:
            return collator
        return self.text_anchor_collator(collator, processing_class, cache)

    def text_anchor_collator(self, collator, processing_class, cache) -> TextAnchorCollator:
        """`collator` with a batch of `args.text_anchor_data` captions added to each of its batches."""
        column = self.args.text_anchor_caption_column or self.args.caption_columns[0]
        rows = load_image_text_dataset(self.args.text_anchor_data, caption_columns=(column,)).select_columns([column])
        max_length = processing_class.tokenizer.model_max_length
        anchor = InheritanceCollator(tokenizer=None if cache is not None else processing_class.tokenizer,
                                     caption_columns=(column,), max_length=max_length, seed=self.seed)
        if cache is not None:
            anchor = CachedEmbeddingCollator(anchor, cache, processing_class.tokenizer, max_length)
        batch_size = self.args.text_anchor_batch_size or self.args.per_device_train_batch_size
        return TextAnchorCollator(collator, rows, anchor, batch_size, self.seed + 1)

    def compute(self, model, inputs):
        inputs = self.equalise_ranks(inputs, inputs["pixel_values"].device)
        if batch_size_of(inputs) == 0:
            return {"loss": zero_loss(model)}
        image = model.get_image_features(inputs["pixel_values"]).pooler_output
        text = self.text_features(model, inputs)
        teacher = self.ema(inputs["pixel_values"]) if self.ema is not None else None
        anchor = self.text_anchor_embeddings(model, inputs) if self.anchor_adapter is not None else (None, None)
        out = self.loss(image, text, model.logit_scale, teacher, *anchor)
        out["logit_scale"] = model.logit_scale.detach().float()  # log space, clamped to [0, ln 100]
        return out

    def text_anchor_embeddings(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainable adapter's and the frozen starting adapter's outputs on the batch's anchor captions
        (`anchor_llm_embeds` (A, H) -> (A, D) each; the second without gradient)."""
        embeds = self.llm_embeddings(model, inputs, TEXT_ANCHOR_PREFIX)
        student = model.get_text_features(llm_embeds=embeds).pooler_output
        with torch.no_grad():
            target = self.anchor_adapter(embeds)
        return student, target

    def after_optimizer_step(self, model, full_parameters=contextlib.nullcontext):
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)  # elementwise: right on a shard too
        if self.ema is not None:
            with full_parameters():
                self.ema.update(model)

    def state_dict(self):
        state = {}
        if self.ema is not None:
            state.update({f"ema.{k}": v.detach().contiguous() for k, v in self.ema.state_dict().items()})
        if self.anchor_adapter is not None:
            state.update({f"anchor.{k}": v.detach().contiguous() for k, v in self.anchor_adapter.state_dict().items()})
        return state

    def load_state_dict(self, state):
        if self.ema is not None:
            self.ema.load_state_dict({k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")})
        if self.anchor_adapter is not None:
            self.anchor_adapter.load_state_dict(
                {k.removeprefix("anchor."): v for k, v in state.items() if k.startswith("anchor.")}
            )


# ---------------------------------------------------------------------------------------------------------------------
# Stage 0 (LLM2CLIP): the LLM itself, through LoRA, into a caption embedder
# ---------------------------------------------------------------------------------------------------------------------


class _TextTowerStage(TrainingStage):
    """A stage that trains a bare (LoRA-wrapped) text model: only the parameters that already require grad (the LoRA
    adapters peft added) train. `setup` resolves the text tower's settings (`args.text`'s own record or preset, then
    `args.pooling` / `bidirectional` / `prompt_template` / `padding_side`, LLM2Vec's bidirectional mean pooling by
    default) and writes them into the tokenizer it is given, which then tokenises every batch."""

    def __init__(self, args):
        super().__init__(args)
        self.settings: TextTowerSettings | None = None
        self.tokenizer = None

    def freeze(self, model):
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(
                f"The {self.name} stage trains LoRA adapters, but no parameter of the model requires grad: wrap the "
                "LLM with `stage0.attach_lora` first."
            )

    def setup(self, model, device, processing_class=None):
        if processing_class is None:
            raise ValueError(f"The {self.name} stage tokenises with the LLM's tokenizer: pass it as processing_class.")
        settings = TextTowerSettings.resolve(
            self.args.text, defaults=STAGE0_TOWER_DEFAULTS, pooling=self.args.pooling,
            bidirectional=self.args.bidirectional, prompt_template=self.args.prompt_template,
            padding_side=self.args.padding_side, max_text_length=self.args.max_text_length,
        )
        settings.instruction_length, settings.text_suffix_length = configure_text_tokenizer(processing_class, settings)
        self.settings, self.tokenizer = settings, processing_class

    @staticmethod
    def text_model(model: nn.Module) -> nn.Module:
        """The transformers model inside a peft wrapper (its layers hold the LoRA): what `compute` calls, since the
        wrapper's own `forward` is the stage's computation while it runs (`trainer.run_as_forward`)."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model


class CaptionContrastiveStage(_TextTowerStage):
    """Stage 0's contrastive phase (METHOD.md §9): both captions of each pair through the text tower (`embed_token_ids`,
    the same path the ProCLIP model embeds with), symmetric InfoNCE with negatives from every rank
    (`losses.ContrastiveLoss`, the two caption views in the roles of image and text) at a fixed temperature:
    logits = cosine / `args.temperature`."""

    name = "caption-contrastive"

    def __init__(self, args):
        super().__init__(args)
        self.loss = ContrastiveLoss()
        self.logit_scale = torch.tensor(math.log(1.0 / args.temperature))

    def make_collator(self, processing_class, cache):
        return CaptionPairCollator(self.tokenizer, self.args.caption_columns, self.settings.max_text_length, self.seed)

    def compute(self, model, inputs):
        inputs = self.equalise_ranks(inputs, inputs["input_ids"].device)
        if batch_size_of(inputs) == 0:
            return {"loss": zero_loss(model)}
        text_model = self.text_model(model)
        first = embed_token_ids(text_model, inputs["input_ids"], inputs["attention_mask"], self.settings).pooler_output
        second = embed_token_ids(
            text_model, inputs["pair_input_ids"], inputs["pair_attention_mask"], self.settings
        ).pooler_output
        return self.loss(first, second, self.logit_scale)


class MaskedNextTokenStage(_TextTowerStage):
    """Stage 0's optional MNTP phase: the causal LM's next-token loss on masked positions (`collators.mask_for_mntp`),
    with the text tower's attention (bidirectional) and positions (`text_tower_kwargs`)."""

    name = "masked-next-token"

    def make_collator(self, processing_class, cache):
        return MNTPCollator(
            self.tokenizer, self.args.caption_columns, mntp_mask_token_id(self.tokenizer),
            self.args.mntp_probability, self.settings.max_text_length, self.seed,
        )

    def compute(self, model, inputs):
        inputs = self.equalise_ranks(inputs, inputs["input_ids"].device)
        if batch_size_of(inputs) == 0:
            return {"loss": zero_loss(model)}
        text_model = self.text_model(model)
        kwargs = text_tower_kwargs(text_model, inputs["attention_mask"], self.settings.bidirectional)
        return {"loss": text_model(input_ids=inputs["input_ids"], labels=inputs["labels"], **kwargs).loss}


STAGES: dict[str, type[TrainingStage]] = {
    stage.name: stage for stage in (CaptionContrastiveStage, MaskedNextTokenStage, InheritanceStage, ContrastiveStage)
}


__all__ = [
    "LOGIT_SCALE_MAX",
    "STAGES",
    "CaptionContrastiveStage",
    "ContrastiveStage",
    "EMATeacher",
    "InheritanceStage",
    "MaskedNextTokenStage",
    "TextAnchorCollator",
    "TrainingStage",
    "load_clip_text_teacher",
    "zero_loss",
]
