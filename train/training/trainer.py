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
- Non-finite values: a micro-batch whose loss is NaN or infinite, or a step whose gradient is, stops training with
  `NonFiniteLossError`, naming the step and the micro-batch's rows (`batch["sources"]`; rows whose inputs, e.g. a
  cached embedding, are not finite first); with `skip_nonfinite_steps` the step is skipped instead (its gradients are
  dropped, so the optimizer changes nothing) and counted. Every rank takes the same decision (one all-reduce per
  step). Under fp16 loss scaling, non-finite gradients are the scaler's to skip. No model or checkpoint with
  non-finite weights is written (`finite.NonFiniteWeightsError`).
- Samples trained: every optimizer step counts the rows it trained on, over all ranks; a step that trained on none
  (every row of every micro-batch dropped) changes no weight either (no weight decay, no optimizer state), a
  checkpoint is not written before the first trained sample, and a run that trained on none ends with
  `NoSamplesTrainedError` instead of saving.
- Checkpoints: lean weights (`checkpoints.py`: the trained tensors and a hash reference to the frozen towers; the
  final output folder stays a whole model), the stage's own state (the EMA teacher) as `stage_state.safetensors`,
  the collators' random state as `data_random_state.safetensors`, and the counters as `proclip_counters.json`, next
  to the optimizer, scheduler and RNG state; all restored on `resume_from_checkpoint`, so a resumed run ends with the
  same weights, bit for bit, as an uninterrupted one.
- The end of `train()` prints a report (samples trained, samples skipped per reason, skipped steps, embedding-cache
  hits and misses, last loss components) and writes it to `<output_dir>/training_report.json`, beside the run's
  arguments (`training_args.json`, what model cards read the recipe from).
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
from transformers.trainer_utils import rotate_checkpoints
from transformers.utils import logging

from .arguments import ProCLIPTrainingArguments
from .cache import EmbeddingCache
from .checkpoints import (
    DataRandomness,
    check_frozen_reference,
    frozen_reference,
    frozen_submodules,
    is_lean_checkpoint,
    kept_tensors,
    load_data_random_state,
    load_lean_weights,
    partial_checkpoint_root,
    publish_checkpoint,
    read_frozen_reference,
    remove_partial_checkpoints,
    save_data_random_states,
    save_lean_weights,
)
from .collators import CACHE_STATS_KEY, RANDOM_STATE_KEY, SOURCES_KEY
from .finite import require_finite
from .skips import SKIPPED_KEY, SkipCounter
from .optimization import MasterWeightAdamW, RestoreFloat32Weights, prepare_optimizer
from .stages import STAGES, TrainingStage, batch_size_of

logger = logging.get_logger(__name__)

COUNTERS_FILE = "proclip_counters.json"
REPORT_FILE = "training_report.json"
ARGS_FILE = "training_args.json"
SHOWN_ROWS = 8  # rows of a bad micro-batch named in a message


class NonFiniteLossError(RuntimeError):
    """A NaN or infinite loss or gradient stopped training (see `ProCLIPTrainingArguments.skip_nonfinite_steps`)."""


class NoSamplesTrainedError(RuntimeError):
    """A run ended without training on a single sample: nothing is saved."""


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


class _StepHooks(TrainerCallback):
    """The trainer's work around the training loop: the data path's random state at each epoch's start, the
    non-finite / no-sample guard before each optimiser step, and the stage's post-step work after it."""

    def __init__(self, trainer: ProCLIPTrainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.trainer._begin_data_epoch(train_dataloader)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._guard_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        if not (trainer.accelerator.optimizer_step_was_skipped or trainer.step_dropped):
            wrapped = trainer.model_wrapped
            trainer.stage.after_optimizer_step(
                trainer.accelerator.unwrap_model(wrapped), full_parameters=lambda: full_parameters(wrapped)
            )


def gradients_finite(model: nn.Module) -> bool:
    """Whether every gradient of `model` is finite (parameters without a gradient count as finite)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=float("inf"))))


def nonfinite_input_rows(inputs: Mapping[str, Any], rows: int) -> dict[int, list[str]]:
    """Rows of a micro-batch whose floating-point inputs (cached embeddings, pixels) hold NaN or inf: {row: [keys]}."""
    bad: dict[int, list[str]] = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim and value.shape[0] == rows:
            for row in torch.nonzero(~torch.isfinite(value.reshape(rows, -1)).all(1)).flatten().tolist():
                bad.setdefault(row, []).append(key)
    return bad


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
    `pixel_values`. Optional: a `skipped` dict counting samples the collator dropped, `sources` (one string per row,
    named in error messages) and `random_state` (a `collators.CollatorRandomState`, checkpointed for exact resumes).

    After `train()`, `report` holds what `training_report.json` holds.
    """

    # Each micro-batch's loss stands alone (own negatives): the Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False
    # Checkpoints keep the trained tensors and a reference to the frozen towers (`checkpoints.py`); False keeps
    # transformers' whole-model checkpoints (what bench/bench_checkpoints.py compares against).
    lean_checkpoints = True

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
        streaming = isinstance(train_dataset, (torch.utils.data.IterableDataset, datasets.IterableDataset))
        args = _trainer_arguments(args, streaming=streaming)
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
        self.add_callback(_StepHooks(self))
        self.skip_counter = SkipCounter()
        self.cache_counter: Counter = Counter()
        # Totals over all ranks (the same on every rank): decided from all-reduced per-step numbers.
        self.step_counts: Counter = Counter(samples_trained=0, steps_skipped_nonfinite=0, steps_without_samples=0)
        # Streaming data is skipped on resume by reading (and collating) it again, which redraws its random numbers.
        self.data_randomness = None if streaming else DataRandomness(args.dataloader_num_workers)
        self.step_dropped = False
        self._step_samples = 0
        self._step_micro_batches = 0
        self._step_nonfinite: list[dict] = []
        self._frozen_reference: dict | None = None
        self._writing_checkpoint = False
        self._partial_root: str | None = None  # where a checkpoint being written goes until it is whole
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_batches = 0
        self.last_components: dict[str, float] = {}
        self._cache_use_checked = False

    # -- the loss ------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The stage's loss on one micro-batch (its own negatives and sums; see `loss_is_scaled_for_ga`)."""
        skipped = inputs.pop(SKIPPED_KEY, None)
        cache_stats = inputs.pop(CACHE_STATS_KEY, None)
        sources = inputs.pop(SOURCES_KEY, None)
        random_state = inputs.pop(RANDOM_STATE_KEY, None)
        if model.training:
            self.skip_counter.update(skipped or {})
            self.cache_counter.update(cache_stats or {})
            if cache_stats and not self._cache_use_checked:
                self._warn_on_cache_misses()
            if random_state is not None and self.data_randomness is not None:
                self.data_randomness.trained(random_state)
        unwrapped = self.accelerator.unwrap_model(model)
        rows, trimmed_before = batch_size_of(inputs), self.stage.rows_dropped_to_equalise_ranks
        with self.accelerator.autocast():
            outputs = run_as_forward(model, unwrapped, lambda: self.stage.compute(unwrapped, inputs))
        loss = outputs["loss"]
        if model.training:
            self._step_samples += rows - (self.stage.rows_dropped_to_equalise_ranks - trimmed_before)
            if bool(torch.isfinite(loss.detach())):
                self._accumulate_components(outputs)
            else:
                self._step_nonfinite.append(self._nonfinite_record(loss, inputs, rows, sources))
            self._step_micro_batches += 1
        return (loss, outputs) if return_outputs else loss

    def floating_point_ops(self, inputs) -> int:
        # The Trainer's 6 * parameters * tokens estimate counts frozen weights (the LLM, LoRA's base) as trained and
        # cannot see cached embeddings: ProCLIP does not report FLOs.
        return 0

    def get_decay_parameter_names(self, model) -> list[str]:
        """Weight decay on matrices only: no decay on biases, norms and other 1-d parameters (incl. logit_scale)."""
        return [name for name, p in model.named_parameters() if p.ndim >= 2]

    # -- the step guard: non-finite values and steps without samples --------------------------------------------------

    def _nonfinite_record(self, loss: torch.Tensor, inputs: Mapping[str, Any], rows: int, sources) -> dict:
        """What an error message says about a micro-batch with a non-finite loss (kept until the step's decision)."""
        sources = list(sources) if sources is not None else [f"row {i}" for i in range(rows)]
        bad_inputs = nonfinite_input_rows(inputs, rows)
        return {
            "rank": self.args.process_index, "micro_batch": self._step_micro_batches, "loss": float(loss.detach()),
            "rows": sources,
            "nonfinite_inputs": [f"{sources[row]} ({', '.join(keys)})" for row, keys in sorted(bad_inputs.items())],
        }

    def _guard_step(self) -> None:
        """Before an optimiser step: stop on a non-finite loss or gradient (or skip the step with
        `skip_nonfinite_steps`), skip a step that trained on no sample, and count the samples of the others.

        Skipping drops the gradients, so the optimizer changes nothing (it leaves parameters without a gradient alone:
        no update, no weight decay, no moment update). One all-reduce makes every rank decide alike.
        """
        model = self.accelerator.unwrap_model(self.model_wrapped)
        # Under fp16 loss scaling, overflowing gradients are the scaler's to skip (and to lower the scale for).
        check_gradients = getattr(self.accelerator, "scaler", None) is None
        grads_bad = check_gradients and not gradients_finite(model)
        local = torch.tensor([len(self._step_nonfinite), int(grads_bad), self._step_samples], device=self.args.device)
        if self.args.world_size > 1:
            dist.all_reduce(local)
        bad_losses, bad_grads, samples = (int(v) for v in local.tolist())
        self.step_dropped = bool(bad_losses or bad_grads or samples == 0)
        if bad_losses or bad_grads:
            message = self._nonfinite_message(bad_losses, self._gathered(self._step_nonfinite))
            if not self.args.skip_nonfinite_steps:
                raise NonFiniteLossError(message)
            self.step_counts["steps_skipped_nonfinite"] += 1
            if self.step_counts["steps_skipped_nonfinite"] <= 5 and self.args.should_log:
                logger.warning("Skipped (--skip_nonfinite_steps): %s", message.split(" Check ")[0])
        elif samples == 0:
            self.step_counts["steps_without_samples"] += 1
        else:
            self.step_counts["samples_trained"] += samples
        if self.step_dropped:
            model.zero_grad(set_to_none=True)
        self._step_samples, self._step_micro_batches, self._step_nonfinite = 0, 0, []

    def _gathered(self, records: list) -> list:
        """Every rank's records (a collective), rank by rank."""
        if self.args.world_size == 1:
            return records
        gathered = [None] * self.args.world_size
        dist.all_gather_object(gathered, records)
        return [record for rank_records in gathered for record in rank_records]

    def _nonfinite_message(self, bad_losses: int, records: list[dict]) -> str:
        step = self.state.global_step + 1
        if not records:  # the losses were finite: the gradient was not
            head = f"Non-finite gradient at step {step} (the loss of every micro-batch was finite)."
        else:
            first = records[0]
            where = f"micro-batch {first['micro_batch'] + 1}" + (f" on rank {first['rank']}" if self.args.world_size > 1 else "")
            head = f"Non-finite loss ({first['loss']}) at step {step}, {where}"
            if bad_losses > 1:
                head += f" ({bad_losses} micro-batches in all)"
            head += "."
            if first["nonfinite_inputs"]:
                head += f" Rows with non-finite inputs: {'; '.join(first['nonfinite_inputs'][:SHOWN_ROWS])}."
            rows = first["rows"]
            more = f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
            head += f" Its {len(rows)} rows: {'; '.join(rows[:SHOWN_ROWS])}{more}."
        return (
            f"{head} Check those rows (a cached embedding: run `proclip embed` again), lower --learning_rate, or pass "
            "--skip_nonfinite_steps to skip and count such steps."
        )

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

    def _warn_on_cache_misses(self) -> None:
        """After the first micro-batch that looked captions up: warn when the cache answered under half of them."""
        self._cache_use_checked = True
        hits, misses = self.cache_counter.get("llm_hits", 0), self.cache_counter.get("llm_misses", 0)
        if misses > hits and self.args.should_log:
            logger.warning(
                f"The embedding cache in {self.embedding_cache.folder} holds {hits} of the first {hits + misses} "
                "captions: the others go through the frozen text tower at every step (for an LLM, most of each step's "
                "time). Was it built from other data or caption columns? `proclip embed` with this run's --data and "
                "--caption-column adds the missing ones."
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get the mean of each loss component since the last log (over micro-batches and ranks)."""
        if "loss" in logs:
            for key, value in self._drain_components().items():
                logs[key if key == "logit_scale" else f"loss_{key}"] = value
        super().log(logs, start_time)

    # -- saving: finite weights only; lean checkpoints ---------------------------------------------------------------

    def _frozen_parts(self) -> list[str]:
        """The frozen submodules a checkpoint leaves out (none: transformers' whole-model checkpoints, which DeepSpeed
        and FSDP write their own way, and which `push_to_hub` uploads as models)."""
        if not self.lean_checkpoints or self.is_deepspeed_enabled or self.is_fsdp_enabled or self.args.push_to_hub:
            return []
        return frozen_submodules(self.accelerator.unwrap_model(self.model))

    def _current_frozen_reference(self, frozen: list[str]) -> dict:
        """The frozen parts' reference, hashed once per run: frozen weights do not change within it."""
        if self._frozen_reference is None or set(self._frozen_reference["weights_sha256"]) != set(frozen):
            self._frozen_reference = frozen_reference(self.accelerator.unwrap_model(self.model), frozen)
        return self._frozen_reference

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the model (refusing non-finite weights); inside a checkpoint, only what is trained."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        weights = state_dict if state_dict is not None else self.accelerator.unwrap_model(self.model).state_dict()
        frozen = self._frozen_parts() if self._writing_checkpoint else []
        if not frozen:
            require_finite(weights, f"Not saving the model to {output_dir}")
            return super()._save(output_dir, state_dict=state_dict)
        kept = kept_tensors(weights, frozen)
        require_finite(kept, f"Not saving the checkpoint {output_dir}")  # on every rank, so that every rank stops alike
        if self.args.should_save:
            save_lean_weights(output_dir, kept, self._current_frozen_reference(frozen))

    def _save_checkpoint(self, model, trial) -> None:
        if self.step_counts["samples_trained"] == 0:
            logger.warning(
                "No sample trained after %d steps (%s): checkpoint not written.",
                self.state.global_step, self.skip_counter.summary(),
            )
            return
        # Written under a hidden name and published by one rename once every rank has written its part: a run killed
        # mid-write leaves no checkpoint-N that looks resumable (`_get_output_dir` points transformers' writer there).
        run_dir, step = self._get_output_dir(trial=trial), self.state.global_step
        if self.args.should_save:
            remove_partial_checkpoints(run_dir)  # earlier runs' unfinished writes
        self.accelerator.wait_for_everyone()
        self._writing_checkpoint, self._partial_root = True, partial_checkpoint_root(run_dir, step)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint, partial_root, self._partial_root = False, self._partial_root, None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(partial_root, run_dir, step)
            best = self.state.best_model_checkpoint
            if best is not None and best.startswith(partial_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        return self._partial_root if self._partial_root is not None else super()._get_output_dir(trial)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not is_lean_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        saved = read_frozen_reference(resume_from_checkpoint)
        frozen = list(saved["weights_sha256"])
        check_frozen_reference(resume_from_checkpoint, saved, self._current_frozen_reference(frozen_submodules(model)))
        load_lean_weights(resume_from_checkpoint, model, frozen)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is not None and is_lean_checkpoint(best):
            return self._load_from_checkpoint(best)
        return super()._load_best_model()

    # -- checkpoints: the stage's state, the data path's random state and the counters travel with the optimizer ----

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        counters = self._gathered_counters()  # collectives: every rank calls them
        data_states = self._gathered([self.data_randomness.state_dict()] if self.data_randomness else [])
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        state = self.stage.state_dict()
        if state:
            save_file(state, os.path.join(output_dir, self.stage.state_file), metadata={"stage": self.stage.name})
        if data_states:
            save_data_random_states(output_dir, data_states, self.args.dataloader_num_workers)
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
            self.stage.load_state_dict(load_file(path))  # copied into the EMA, on its device; "cpu:0" is no safetensors device
        if self.data_randomness is not None and not self.args.ignore_data_skip:  # else the epoch restarts anyway
            saved = load_data_random_state(
                checkpoint, self.args.process_index, self.args.world_size, self.args.dataloader_num_workers
            )
            if saved is not None:
                self.data_randomness.load_state_dict(saved)
        counters_path = os.path.join(checkpoint, COUNTERS_FILE)
        if os.path.isfile(counters_path):
            with open(counters_path) as f:
                counters = json.load(f)
            self.step_counts.update(counters.get("steps", {}))  # totals over all ranks, kept on every rank
            # Totals over all ranks were saved; rank 0 carries them on, so the final all-reduce counts them once.
            if self.args.process_index == 0:
                self.skip_counter.update(counters.get("skipped", {}))
                self.cache_counter.update(counters.get("embedding_cache", {}))
                self.stage.rows_dropped_to_equalise_ranks += counters.get("rows_dropped_to_equalise_ranks", 0)

    def _begin_data_epoch(self, train_dataloader) -> None:
        """An epoch's data iterator is about to start: give the collator the generator starts it must use."""
        resume = getattr(self.data_collator, "resume_random_state", None)
        if self.data_randomness is None or resume is None:
            return
        length = len(train_dataloader) if train_dataloader is not None and hasattr(train_dataloader, "__len__") else None
        if self.data_randomness.resumed is not None and self.args.dataloader_persistent_workers:
            logger.warning("Resuming with persistent DataLoader workers: the data path's random draws are exact for "
                           "the rest of this epoch only.")
        resume(self.data_randomness.begin_epoch(length))

    def _gathered_counters(self) -> dict:
        counters = {
            "skipped": self.skip_counter.as_dict(),
            "embedding_cache": dict(self.cache_counter),
            "rows_dropped_to_equalise_ranks": self.stage.rows_dropped_to_equalise_ranks,
        }
        if self.args.world_size > 1:
            total = {"skipped": Counter(), "embedding_cache": Counter(), "rows_dropped_to_equalise_ranks": 0}
            for rank_counters in self._gathered([counters]):
                total["skipped"].update(rank_counters["skipped"])
                total["embedding_cache"].update(rank_counters["embedding_cache"])
                total["rows_dropped_to_equalise_ranks"] += rank_counters["rows_dropped_to_equalise_ranks"]
            counters = {**total, "skipped": dict(total["skipped"]), "embedding_cache": dict(total["embedding_cache"])}
        return {**counters, "steps": dict(self.step_counts)}

    # -- the end-of-training report ------------------------------------------------------------------------------------

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        self._drain_components()  # steps after the last logging step
        counters = self._gathered_counters()
        skipped_summary = SkipCounter(counters["skipped"]).summary()
        if self.step_counts["samples_trained"] == 0:
            raise NoSamplesTrainedError(
                f"The {self.stage.name} stage trained on no sample in {output.global_step} steps ({skipped_summary}); "
                "nothing is saved. Check the data and the --image_column / --caption_column names."
            )
        self.report = {
            "stage": self.stage.name,
            "global_step": output.global_step,
            "train_loss": output.training_loss,
            **dict(self.step_counts),
            **{key: value for key, value in counters.items() if key != "steps"},
            "skipped_summary": skipped_summary,
            "last_loss_components": self.last_components,  # mean over the last logging window
        }
        if self.args.should_save:
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, REPORT_FILE), "w") as f:
                json.dump(self.report, f, indent=2)
            with open(os.path.join(self.args.output_dir, ARGS_FILE), "w") as f:  # the recipe, for model cards
                f.write(self.args.to_json_string())
            print(f"ProCLIP {self.stage.name} stage: {self.step_counts['samples_trained']} samples trained, "
                  f"{skipped_summary}", end="")
            if self.step_counts["steps_skipped_nonfinite"]:
                print(f", {self.step_counts['steps_skipped_nonfinite']} non-finite steps skipped", end="")
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


__all__ = ["NoSamplesTrainedError", "NonFiniteLossError", "ProCLIPTrainer", "run_as_forward"]
