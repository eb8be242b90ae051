"""What a ProCLIP Trainer checkpoint holds beyond transformers' own files, and the checks around saving weights.

1. Lean weights. The frozen towers never change during a stage (the LLM in stages 1-2, and in stage 1 the image
   tower too), so a checkpoint does not copy them: `trained_weights.safetensors` holds every tensor outside the
   top-level submodules whose parameters are all frozen (`frozen_submodules`), and `frozen_reference.json` names
   those submodules with the folder the run started from and a sha256 of each one's weights (`cache.weights_sha256`,
   the hash the embedding cache records for the LLM). Resuming loads the trained tensors into the model the run was
   given and refuses, naming both hashes, a model whose frozen submodules differ. The hash of the frozen weights is
   computed once per run (at the first checkpoint, or at resume) and reused: frozen weights cannot change within a
   run, and hashing an 8B LLM takes about 10 s. A model whose every submodule trains (or a peft model, which the
   Trainer already saves as adapter weights only) is checkpointed as transformers does.
2. The data path's random state (`DataRandomness`): the state of the collators' generators that the next batches
   start from, so a resumed run draws the same crops and captions as an uninterrupted one.
3. Whole checkpoints only. A checkpoint is written under a hidden name (`.checkpoint-N.partial/checkpoint-N`) and
   renamed to `checkpoint-N` once every rank has written its part, so a run killed mid-write leaves no
   `checkpoint-N` that looks resumable; resuming takes the newest checkpoint that holds its `trainer_state.json`
   (written last by transformers), and says which one it passed and why.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME  # the last file transformers writes into a checkpoint

from .cache import weights_sha256
from .collators import CollatorRandomState

logger = logging.getLogger(__name__)

TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"
FROZEN_REFERENCE_FILE = "frozen_reference.json"
DATA_RANDOM_STATE_FILE = "data_random_state.safetensors"
PARTIAL_SUFFIX = ".partial"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the model it would be resumed into."""


# ---------------------------------------------------------------------------------------------------------------------
# Lean weights: what is trained, plus a reference to what is frozen
# ---------------------------------------------------------------------------------------------------------------------


def frozen_submodules(model: nn.Module) -> list[str]:
    """Names of the model's top-level submodules that have parameters, none of which trains (e.g. `text_model`)."""
    frozen = []
    for name, module in model.named_children():
        parameters = list(module.parameters())
        if parameters and not any(p.requires_grad for p in parameters):
            frozen.append(name)
    return frozen


def kept_tensors(state_dict: Mapping[str, torch.Tensor], frozen: list[str]) -> dict[str, torch.Tensor]:
    """The entries of `state_dict` outside the `frozen` submodules: what a lean checkpoint stores."""
    return {name: tensor for name, tensor in state_dict.items() if name.split(".")[0] not in frozen}


def frozen_reference(model: nn.Module, frozen: list[str]) -> dict:
    """`{"source": where the model was loaded from, "weights_sha256": {submodule: sha256}}` of the frozen parts."""
    return {
        "source": str(getattr(model, "name_or_path", "") or ""),
        "weights_sha256": {name: weights_sha256(getattr(model, name)) for name in frozen},
    }


def is_lean_checkpoint(folder: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(folder, TRAINED_WEIGHTS_FILE))


def save_lean_weights(folder: str | os.PathLike, tensors: Mapping[str, torch.Tensor], reference: dict) -> None:
    """Write `trained_weights.safetensors` and `frozen_reference.json` into a checkpoint folder."""
    os.makedirs(folder, exist_ok=True)
    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    save_file(contiguous, os.path.join(folder, TRAINED_WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(folder, FROZEN_REFERENCE_FILE), "w") as f:
        json.dump(reference, f, indent=2)


def read_frozen_reference(folder: str | os.PathLike) -> dict:
    path = os.path.join(folder, FROZEN_REFERENCE_FILE)
    if not os.path.isfile(path):
        raise CheckpointMismatchError(f"{folder} has {TRAINED_WEIGHTS_FILE} but no {FROZEN_REFERENCE_FILE}: it is "
                                      "incomplete; resume from another checkpoint.")
    with open(path) as f:
        return json.load(f)


def check_frozen_reference(folder: str | os.PathLike, saved: dict, current: dict) -> None:
    """Refuse (`CheckpointMismatchError`) to resume a checkpoint into a model whose frozen parts differ."""
    saved_hashes, current_hashes = saved["weights_sha256"], current["weights_sha256"]
    if set(saved_hashes) != set(current_hashes):
        raise CheckpointMismatchError(
            f"{folder} was saved with frozen {sorted(saved_hashes)}, but {sorted(current_hashes)} are frozen now: "
            "resume with the stage and model the checkpoint was trained with."
        )
    for name in sorted(saved_hashes):
        if saved_hashes[name] != current_hashes[name]:
            start = saved["source"] or "<the folder the run started from>"
            raise CheckpointMismatchError(
                f"{folder} was trained on a frozen {name} with sha256 {saved_hashes[name]} (from "
                f"{saved['source'] or 'an unnamed folder'}), but the model given now has {current_hashes[name]} (from "
                f"{current['source'] or 'an unnamed folder'}): resume with --model {start}."
            )


def load_lean_weights(folder: str | os.PathLike, model: nn.Module, frozen: list[str]) -> None:
    """Copy a lean checkpoint's tensors into `model`; they must be exactly its tensors outside `frozen`."""
    tensors = load_file(os.path.join(folder, TRAINED_WEIGHTS_FILE), device="cpu")
    expected = set(kept_tensors(model.state_dict(), frozen))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointMismatchError(
            f"{folder} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}; resume with the "
            "stage and model the checkpoint was trained with."
        )
    model.load_state_dict(tensors, strict=False)


# ---------------------------------------------------------------------------------------------------------------------
# The data path's random state
# ---------------------------------------------------------------------------------------------------------------------


class DataRandomness:
    """Where the collator's generators must start so that the next batches are drawn as in an uninterrupted run.

    The trainer reports each batch it trains on (`trained(batch["random_state"])`) and each epoch's start; it saves
    `state_dict()` into checkpoints and, on resume, `load_state_dict` then `starts_for_epoch` give the collator its
    starting points (`CaptionCollator.resume_random_state`).

    - `num_workers == 0`: one generator in the main process, continued across epochs: its state after the last
      trained batch.
    - `num_workers == W > 0`: a DataLoader hands batch i of an epoch to worker (i - first) mod W, so the generator that
      draws batch i is the one that drew batch i - W. For each of the next W batches this keeps its generator's start:
      the state after batch i - W, or for a worker that has not drawn a batch yet in this epoch its DataLoader seed
      (the epoch's base seed, read from any trained batch, plus its id). Workers are seeded anew each epoch, so a
      checkpoint at an epoch's end needs none of this. With `persistent_workers` the resumed epoch is exact but the
      following ones are not (a worker keeps its generator across epochs and is handed other batches after a resume).

    Batches from a collator without random state (a custom one) are not tracked. Nothing is restored with
    `ignore_data_skip` (the resumed epoch restarts from its first batch) or for streaming data (the Trainer skips
    batches by reading and collating them again, which redraws them from the seeds).
    """

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.batches_into_epoch = 0
        self.main_state: torch.Tensor | None = None
        self.next_starts: dict[int, torch.Tensor | int | None] = {}  # batch index -> start (None: unseen worker)
        self.base_seed: int | None = None
        self.resumed: dict | None = None

    def begin_epoch(self, batches_in_epoch: int | None) -> dict[int | None, torch.Tensor | int]:
        """An epoch's data iterator is about to start; returns the generator starts the collator must take for it."""
        resumed, self.resumed = self.resumed, None
        if resumed is not None and resumed["batches_into_epoch"] > 0 and resumed["batches_into_epoch"] != batches_in_epoch:
            self.batches_into_epoch = resumed["batches_into_epoch"]  # mid-epoch: the Trainer skips the trained batches
            starts = resumed["starts"]
            self.next_starts = {self.batches_into_epoch + j: start for j, start in enumerate(starts)}
            return {**({None: self.main_state} if self.main_state is not None else {}), **dict(enumerate(starts))}
        self.batches_into_epoch, self.base_seed = 0, None
        self.next_starts = {j: None for j in range(self.num_workers)}
        return {None: self.main_state} if resumed is not None and self.main_state is not None else {}

    def trained(self, random_state: CollatorRandomState) -> None:
        """A batch drawn from `random_state`'s generator was trained on."""
        if random_state.worker is None:
            self.main_state = random_state.state
        else:
            index = self.batches_into_epoch
            self.next_starts.pop(index, None)
            self.next_starts[index + self.num_workers] = random_state.state
            if self.base_seed is None and random_state.worker_seed is not None:
                self.base_seed = random_state.worker_seed - random_state.worker
        self.batches_into_epoch += 1

    def state_dict(self) -> dict:
        """`{"batches_into_epoch", "main_state", "starts"}`: starts of the generators of the next W batches (tensors,
        or int DataLoader seeds of workers that had not drawn yet); empty at an epoch's start."""
        starts = []
        if self.num_workers and self.batches_into_epoch > 0:
            for index in range(self.batches_into_epoch, self.batches_into_epoch + self.num_workers):
                start = self.next_starts.get(index)
                starts.append(self.base_seed + index if start is None else start)
        return {"batches_into_epoch": self.batches_into_epoch, "main_state": self.main_state, "starts": starts}

    def load_state_dict(self, state: dict) -> None:
        self.main_state = state["main_state"]
        self.resumed = state


def save_data_random_states(folder: str | os.PathLike, per_rank: list[dict], num_workers: int) -> None:
    """Write every rank's `DataRandomness.state_dict()` as one safetensors file (ints in its metadata)."""
    tensors, ranks = {}, []
    for rank, state in enumerate(per_rank):
        if state["main_state"] is not None:
            tensors[f"rank{rank}.main"] = state["main_state"]
        seeds = {}
        for j, start in enumerate(state["starts"]):
            if isinstance(start, torch.Tensor):
                tensors[f"rank{rank}.start{j}"] = start
            else:
                seeds[j] = int(start)
        ranks.append({"batches_into_epoch": state["batches_into_epoch"], "starts": len(state["starts"]), "seeds": seeds})
    metadata = {"num_workers": str(num_workers), "ranks": json.dumps(ranks)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, DATA_RANDOM_STATE_FILE), metadata)


def load_data_random_state(folder: str | os.PathLike, rank: int, world_size: int, num_workers: int) -> dict | None:
    """This rank's saved `DataRandomness` state, or `None` (with a warning) when the checkpoint has none or was made
    with another number of ranks or DataLoader workers."""
    path = os.path.join(folder, DATA_RANDOM_STATE_FILE)
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:  # the metadata, without the tensors
        metadata = f.metadata() or {}
    ranks = json.loads(metadata["ranks"])
    if len(ranks) != world_size or int(metadata["num_workers"]) != num_workers:
        logger.warning(
            "%s was saved by %d rank(s) with %s DataLoader worker(s); this run has %d and %d: the data path's random "
            "draws (crops, caption choice) restart from their seeds instead of continuing.",
            folder, len(ranks), metadata["num_workers"], world_size, num_workers,
        )
        return None
    tensors = load_file(path)
    saved = ranks[rank]
    starts = [
        tensors[f"rank{rank}.start{j}"] if f"rank{rank}.start{j}" in tensors else saved["seeds"][str(j)]
        for j in range(saved["starts"])
    ]
    return {"batches_into_epoch": saved["batches_into_epoch"], "main_state": tensors.get(f"rank{rank}.main"),
            "starts": starts}


__all__ = [
    "CheckpointMismatchError",
    "DataRandomness",
    "check_frozen_reference",
    "frozen_reference",
    "frozen_submodules",
    "is_lean_checkpoint",
    "kept_tensors",
    "load_lean_weights",
    "save_lean_weights",
]


# ---------------------------------------------------------------------------------------------------------------------
# Whole checkpoints only
# ---------------------------------------------------------------------------------------------------------------------


def partial_checkpoint_root(run_dir: str | os.PathLike, step: int) -> str:
    """The hidden folder a checkpoint of `step` is written in (as `<root>/checkpoint-<step>`) before it is published."""
    return os.path.join(run_dir, f".checkpoint-{step}{PARTIAL_SUFFIX}")


def remove_partial_checkpoints(run_dir: str | os.PathLike) -> None:
    """Delete the hidden, unfinished checkpoint writes of earlier (killed) runs in `run_dir`."""
    if os.path.isdir(run_dir):
        for name in os.listdir(run_dir):
            if name.startswith(".checkpoint-") and name.endswith(PARTIAL_SUFFIX):
                shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def publish_checkpoint(partial_root: str, run_dir: str | os.PathLike, step: int) -> str:
    """Move the finished `<partial_root>/checkpoint-<step>` to `<run_dir>/checkpoint-<step>` (one rename; a checkpoint
    of the same step from an earlier run is replaced) and remove `partial_root`. Returns the published folder."""
    written = os.path.join(partial_root, f"checkpoint-{step}")
    published = os.path.join(run_dir, f"checkpoint-{step}")
    if os.path.isdir(published):
        shutil.rmtree(published)
    os.replace(written, published)
    shutil.rmtree(partial_root, ignore_errors=True)
    return published


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be resumed from (None when it can): a checkpoint is whole once it holds trainer_state.json."""
    if os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        return None
    return (f"{os.path.basename(os.path.normpath(folder))} is incomplete (no {TRAINER_STATE_NAME}: its run was stopped "
            "while writing it, or the file was removed)")


def latest_complete_checkpoint(run_dir: str | os.PathLike) -> tuple[str | None, list[str]]:
    """The newest `checkpoint-N` folder of `run_dir` that can be resumed from, and the reasons the newer ones cannot.

    Returns:
        `(path or None, [reason, ...])`, the reasons newest first.
    """
    steps = sorted(
        (int(match.group(1)), name) for name in os.listdir(run_dir)
        if (match := CHECKPOINT_NAME.match(name)) and os.path.isdir(os.path.join(run_dir, name))
    )
    passed = []
    for _, name in reversed(steps):
        folder = os.path.join(run_dir, name)
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, passed
        passed.append(reason)
    return None, passed
