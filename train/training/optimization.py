"""A faster optimiser step: bfloat16 working weights with float32 master copies, and a CPU allocator that keeps memory.

Measured in `bench/bench_adapter_step.py` on stage 1 at the paper's size (H = 4096, D = 1280, expansion 8: a
273.7 M-parameter adapter, batch 256, cached embeddings; README, Benchmarks). Two costs besides the matrix products
dominate such a step on a CPU:

- Fresh memory. glibc's malloc serves every block above 32 MiB with its own `mmap` and gives it back on `free`, so
  each step's gradients (a 512 MiB matrix each), weight casts and activations are new pages that the kernel faults in
  and zeroes again, every step. `keep_freed_memory` makes malloc keep freed blocks for reuse (`mallopt`, once per
  process), as the jemalloc / tcmalloc preloads that Intel recommends for PyTorch on CPUs do.
- Precision casts under bfloat16 autocast. Autocast casts every float32 weight to bfloat16 in every forward and the
  bfloat16 weight gradients back to float32, and the optimiser and gradient clipping then stream float32 tensors.
  `MasterWeights` keeps the trainable matrices in bfloat16 instead (forward and backward use them as they are; the
  gradients arrive in bfloat16) and gives the optimiser float32 master copies to update; after each step the masters
  are rounded into the working weights.

Which tensors: the trainable float32 weights of linear and convolution layers (the adapter's and the image tower's
matrices, the patch embedding), which autocast would cast to bfloat16 anyway, so the forward computes exactly what it
computes under autocast. Biases, norms, embeddings and `logit_scale` stay float32 (they are small, and a CPU layer norm
refuses bfloat16 weights on float32 inputs). The masters are what the model's `state_dict()`
returns while training, so Trainer checkpoints hold float32 weights and resuming from one is exact, and what the
model's parameters become at the end of training.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

# glibc's mallopt parameters (malloc.h) and the largest value its `int` argument takes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOPT_MAX = 2**31 - 1
# The layers whose weights autocast runs in bfloat16 anyway: their bfloat16 working weights change no forward result.
_PRODUCT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks below 2 GiB for reuse instead of unmapping them; `False` off glibc.

    Process-wide and permanent: blocks up to 2 GiB come from the heap (no `mmap` of their own), and the heap is not
    trimmed until 2 GiB at its top are free. Memory a step frees is then the memory the next step reuses, without
    page faults; the process's resident size stays at its peak instead of falling between steps.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MALLOPT_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _MALLOPT_MAX))


def uses_master_weights(args) -> bool:
    """Whether a run with these `ProCLIPTrainingArguments` trains bfloat16 working weights with float32 masters.

    FSDP and DeepSpeed keep float32 parameters of their own and cast them for compute (their mixed precision).
    """
    return bool(args.bf16 and args.bf16_master_weights and not args.fsdp and not args.deepspeed)


class MasterWeights:
    """The trainable matrices of `model` as `dtype` working weights, updated through float32 masters by `optimizer`.

    Built before the optimiser's first step, from the optimiser over the float32 model: in its parameter groups
    each trainable float32 weight of a linear or convolution layer is replaced by a float32 copy (its master), and the
    model's parameter is converted to `dtype` in place (the same `nn.Parameter`, so wrappers and hooks keep working).
    Then, around every `optimizer.step()`:

        before:  master.grad = float32(weight.grad)      (clipped by the Trainer as usual, in `dtype`)
        step:    the optimiser updates the master (any torch optimiser; fused AdamW by default)
        after:   weight = dtype(master); master.grad = None

    The model's `state_dict()` returns the masters, and `load_state_dict()` (e.g. `load_best_model_at_end`) writes
    the masters too. `restore()` gives the model its float32 weights back (the masters' own storage: a later
    optimiser step keeps updating them). Gradients of accumulated micro-batches are summed in `dtype`.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16):
        if optimizer.state:
            raise ValueError("MasterWeights must wrap an optimiser before its first step (it holds no state yet).")
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        products = {id(module.weight) for module in model.modules() if isinstance(module, _PRODUCT_LAYERS)}
        self.names: list[str] = []
        self.weights: list[nn.Parameter] = []
        self.masters: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            for index, weight in enumerate(group["params"]):
                if id(weight) not in products or weight.dtype != torch.float32 or not weight.requires_grad:
                    continue
                master = nn.Parameter(weight.detach().clone())
                group["params"][index] = master
                weight.data = weight.data.to(dtype)
                self.names.append(names[id(weight)])
                self.weights.append(weight)
                self.masters.append(master)
        self.restored = False
        self._handles = [
            optimizer.register_step_pre_hook(self._gradients_to_masters),
            optimizer.register_step_post_hook(self._masters_to_weights),
            # (a partial: torch marks state-dict hooks with an attribute, which bound methods do not take)
            model.register_state_dict_post_hook(functools.partial(self._state_dict_with_masters)),
            model.register_load_state_dict_pre_hook(self._load_into_masters),
        ]

    def __len__(self) -> int:
        return len(self.weights)

    @torch.no_grad()
    def _gradients_to_masters(self, optimizer, args, kwargs) -> None:
        for weight, master in zip(self.weights, self.masters):
            master.grad = None if weight.grad is None else weight.grad.to(torch.float32)

    @torch.no_grad()
    def _masters_to_weights(self, optimizer, args, kwargs) -> None:
        if self.weights and not self.restored:
            torch._foreach_copy_(self.weights, self.masters)
        for master in self.masters:
            master.grad = None

    def _state_dict_with_masters(self, module, state_dict, prefix, local_metadata) -> None:
        for name, master in zip(self.names, self.masters):
            if prefix + name in state_dict:
                state_dict[prefix + name] = master.detach()

    @torch.no_grad()
    def _load_into_masters(self, module, state_dict, prefix, *args) -> None:
        for name, master in zip(self.names, self.masters):
            if prefix + name in state_dict:
                master.copy_(state_dict[prefix + name])

    def restore(self) -> None:
        """Give the model its float32 weights: each parameter becomes its master (shared storage)."""
        for weight, master in zip(self.weights, self.masters):
            weight.data = master.data
        self.restored = True


class RestoreMasterWeights(TrainerCallback):
    """At the end of `train()` (before the caller saves the model), the model's parameters become the float32
    masters."""

    def __init__(self, master_weights: MasterWeights):
        self.master_weights = master_weights

    def on_train_end(self, args, state, control, **kwargs):
        self.master_weights.restore()


def prepare_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, args) -> MasterWeights | None:
    """Apply the run's speed options to a freshly built optimiser (before its first step) and its model.

    `keep_freed_memory` (on a CPU) configures the allocator; with `uses_master_weights(args)` the trainable matrices
    become bfloat16 working weights with float32 masters in `optimizer`: the `MasterWeights` is returned (`None`
    otherwise), and the caller must call its `restore()` when training ends (`RestoreMasterWeights`).
    """
    if args.keep_freed_memory and args.device.type == "cpu" and not keep_freed_memory():
        logger.info("keep_freed_memory applies to glibc's malloc only; this platform keeps its own allocator.")
    if not uses_master_weights(args):
        return None
    master_weights = MasterWeights(model, optimizer, torch.bfloat16)
    logger.info(f"bf16 master weights: {len(master_weights)} trainable matrices train in bfloat16, float32 masters.")
    return master_weights


__all__ = ["MasterWeights", "RestoreMasterWeights", "keep_freed_memory", "prepare_optimizer", "uses_master_weights"]
