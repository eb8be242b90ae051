"""`ProCLIPTrainer`: transformers' `Trainer` running one curriculum stage of ProCLIP (METHOD.md §3-4).

What is trained and how the loss is formed lives in a stage object (`stages.py`, open_clip's `task/` split); the
trainer adds what every stage needs from the training loop. Each stage is its own `train()` run; stage 2 starts from
stage 1's output.

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
  components) and writes it to `<output_dir>/training_report.json`, beside the run's arguments
  (`training_args.json`, what model cards read the recipe from).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import datasets
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import Trainer, TrainerCallback
from transformers.utils import logging

from .arguments import ProCLIPTrainingArguments
from .cache import EmbeddingCache
from .data import SKIPPED_KEY, SkipCounter
from .optimization import MasterWeightAdamW, RestoreFloat32Weights, prepare_optimizer
from .stages import STAGES, TrainingStage

logger = logging.get_logger(__name__)

COUNTERS_FILE = "proclip_counters.json"
REPORT_FILE = "training_report.json"
ARGS_FILE = "training_args.json"
CACHE_STATS_KEY = "cache_stats"


def full_parameters(wrapped: nn.Module):
    """A context in which the parameters of the model inside `wrapped` hold their whole values.

    FSDP1 (`FullyShardedDataParallel`) keeps only each rank's shard between forward passes; FSDP2 parameters are
    DTensors (see `_full_tensor`), and DDP and DeepSpeed ZeRO-1/2 replicate parameters, so they need nothing.
    """
    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return contextlib.nullcontext()


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
    """`Trainer` for one ProCLIP stage: `STAGES[args.stage]`.

    Args:
        model: stages 1-2: a `ProCLIPModel` (stage 2: usually stage 1's output); stage 0: the LLM wrapped with LoRA
            (`stage0.attach_lora`).
        args: `ProCLIPTrainingArguments`: `stage` and every stage option. It is not modified: the trainer works on a
            copy whose `remove_unused_columns` is `False` (the collators read raw columns).
        train_dataset: rows with caption column(s) (and an image column in stage 2), e.g. from
            `data.load_image_text_dataset`.
        processing_class: stages 1-2: the model's `ProCLIPProcessor`; stage 0: the LLM's tokenizer (the stage writes
            the text tower's settings into it). It builds the default collator and is saved with the model.
        data_collator: optional; by default the stage's collator (`collators.py`, wrapped to read `embedding_cache`).
        embedding_cache: stages 1-2: an `EmbeddingCache` of this model's LLM embeddings (and the teacher's); it is
            validated here and a cache made with another model is refused (`cache.StaleCacheError`).
        **kwargs: the other `Trainer` arguments (`callbacks`, `eval_dataset`, `optimizers`, ...).

    Batches (what a custom collator must give): `captions` (list[str]); the LLM's `input_ids` / `attention_mask` or
    cached `llm_embeds` (with `llm_embeds_found`); stage 1: the teacher's `teacher_input_ids` /
    `teacher_attention_mask` or cached `teacher_embeds`, optionally the same with a `noise_` prefix; stage 2:
    `pixel_values`. An optional `skipped` dict counts samples the collator dropped.
    """

    # Each micro-batch's loss stands alone (own negatives): the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: nn.Module,
        args: ProCLIPTrainingArguments,
        *,
        train_dataset=None,
        processing_class=None,
        data_collator=None,
        embedding_cache: EmbeddingCache | None = None,
        **kwargs,
    ):
        if not isinstance(args, ProCLIPTrainingArguments):
            raise TypeError(
                f"ProCLIPTrainer takes ProCLIPTrainingArguments (the stage and its options), not {type(args).__name__}."
            )
        if args.stage is None:
            raise ValueError("ProCLIPTrainingArguments.stage is not set: choose 0, 1 or 2 (or a stage's name).")
        args = _trainer_arguments(args, streaming=isinstance(
            train_dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset)
        ))
        self.stage: TrainingStage = STAGES[args.stage](args)
        self.stage.freeze(model)
        self.stage.setup(model, args.device, processing_class)
        self.embedding_cache = embedding_cache
        if embedding_cache is not None:
            self.stage.check_cache(model, processing_class, embedding_cache)
        if data_collator is None:
            if processing_class is None:
                raise ValueError("ProCLIPTrainer needs processing_class (the processor or tokenizer) or a data_collator.")
            data_collator = self.stage.make_collator(processing_class, embedding_cache)
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
        with self.accelerator.autocast():
            outputs = run_as_forward(model, unwrapped, lambda: self.stage.compute(unwrapped, inputs))
        if model.training:
            self._accumulate_components(outputs)
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        # The Trainer's 6 * parameters * tokens estimate counts frozen weights (the LLM, LoRA's base) as trained and
        # cannot see cached embeddings: ProCLIP does not report FLOs.
        return 0

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices only: no decay on biases, norms and other 1-d parameters (incl. logit_scale)."""
        return [name for name, p in model.named_parameters() if p.ndim >= 2]

    def create_optimizer(self, model=None):
        """The Trainer's optimiser, through `optimization.prepare_optimizer` (bf16 master weights, the allocator)."""
        if self.optimizer is None:
            super().create_optimizer(model)
            self.optimizer = prepare_optimizer(self.model if model is None else model, self.optimizer, self.args)
            if isinstance(self.optimizer, MasterWeightAdamW):
                self.add_callback(RestoreFloat32Weights(self.optimizer))
        return self.optimizer

    def _clip_grad_norm(self, model):
        # With master weights the optimiser applies the clipping factor inside its update (no pass of its own).
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper
        if isinstance(optimizer, MasterWeightAdamW):
            return optimizer.clip_grad_norm_(self.args.max_grad_norm)
        return super()._clip_grad_norm(model)

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
            self.stage.rows_dropped_to_equalise_ranks += counters.get("rows_dropped_to_equalise_ranks", 0)

    def _gathered_counters(self) -> dict:
        counters = {
            "skipped": self.skip_counter.as_dict(),
            "embedding_cache": dict(self.cache_counter),
            "rows_dropped_to_equalise_ranks": self.stage.rows_dropped_to_equalise_ranks,
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
            with open(os.path.join(self.args.output_dir, ARGS_FILE), "w") as f:  # the recipe, for model cards
                f.write(self.args.to_json_string())
            print(f"ProCLIP {self.stage.name} stage: {self.report['skipped_summary']}", end="")
            cache = counters["embedding_cache"]
            if cache:
                print(f"; embedding cache: {cache.get('llm_hits', 0)} hits, {cache.get('llm_misses', 0)} misses", end="")
            print(f" (report: {os.path.join(self.args.output_dir, REPORT_FILE)})")
        return output


def _trainer_arguments(args: ProCLIPTrainingArguments, streaming: bool) -> ProCLIPTrainingArguments:
    """A copy of `args` with what every stage's training loop needs (the caller's object stays as it was)."""
    changes = {"remove_unused_columns": False}  # the collators read the raw dataset columns
    if args.ddp_find_unused_parameters is None:
        # Every trainable parameter takes part in every stage's loss (an emptied batch uses `zero_loss`), so DDP can
        # skip its per-step search for unused parameters.
        changes["ddp_find_unused_parameters"] = False
    if args.activation_checkpointing and args.activation_checkpointing_kwargs is None:
        # Non-reentrant recomputation: frozen embeddings need no gradient for the trainable layers above them.
        changes["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    if streaming and args.accelerator_config.dispatch_batches is None:
        # Batches hold caption strings, which accelerate cannot split between ranks: each rank reads its own share
        # of the stream instead of receiving slices of the main process's batches.
        changes["accelerator_config"] = dataclasses.replace(args.accelerator_config, dispatch_batches=False)
    return dataclasses.replace(args, **changes)


__all__ = ["ProCLIPTrainer", "run_as_forward"]
