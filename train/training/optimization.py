"""A faster optimiser step: bfloat16 working weights with float32 master copies, and a CPU allocator that keeps memory.

Measured in `bench/bench_adapter_step.py` on stage 1 at the paper's size (H = 4096, D = 1280, expansion 8: a
273.7 M-parameter adapter, batch 256, cached embeddings; README, Benchmarks). Besides the matrix products, a step of
such an adapter is memory traffic, and on a CPU three costs dominate it:

- Fresh memory. glibc's malloc serves every block above 32 MiB with its own `mmap` and gives it back on `free`, so
  each step's gradients (512 MiB per matrix here), weight casts and activations are new pages that the kernel faults
  in and zeroes again, every step. `keep_freed_memory` makes malloc keep freed blocks for reuse (`mallopt`, once per
  process), as the jemalloc / tcmalloc preloads recommended for PyTorch on CPUs do.
- Precision casts. Under bfloat16 autocast every float32 weight is cast to bfloat16 in every forward and every
  bfloat16 weight gradient back to float32. `MasterWeightAdamW` keeps the trainable weights of linear and convolution
  layers in bfloat16 instead (autocast runs them in bfloat16 anyway, so the forward computes what it computes under
  autocast) and holds float32 master copies in its state: the gradients arrive in bfloat16 and are never cast.
- The optimiser's passes over memory. The update of a working weight (gradient clipping folded in, AdamW on the
  master, the result rounded into the working weight) runs as one compiled pass per tensor (`torch.compile`; with
  `master_update="eager"`, or where it cannot compile, three passes: the gradient into a float32 buffer, torch's fused
  AdamW, the master into the working weight). Gradient clipping only computes the norm (`clip_grad_norm_`); the
  factor is applied inside the update instead of as a pass of its own.

Biases, norms, embeddings and `logit_scale` stay float32 (they are small, and a CPU layer norm refuses bfloat16
weights on float32 inputs); they get torch's fused AdamW. The masters are what the model's `state_dict()` returns
while training, so Trainer checkpoints hold float32 weights, the optimiser state holds the masters (resuming is
exact), and at the end of training the model's parameters become the masters.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import sys
from collections.abc import Iterable

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

# glibc's mallopt parameters (malloc.h) and the largest value its `int` argument takes.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOPT_MAX = 2**31 - 1
# The layers whose weights autocast runs in bfloat16 anyway: bfloat16 working weights change no forward result.
_PRODUCT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
MASTER_UPDATES = ("auto", "compiled", "eager")
MASTER_WEIGHT_OPTIMIZERS = ("adamw_torch_fused", "adamw_torch")  # `--optim` values that build torch's AdamW
# `master_update="auto"` compiles once the working weights hold this many elements: compiling takes ~20 s once per
# process, and the compiled update saves ~0.3 s per step per 100 M elements on a 2-core CPU (bench_adapter_step.py).
AUTO_COMPILE_ELEMENTS = 16 * 2**20


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


# ---------------------------------------------------------------------------------------------------------------------
# The update of one working weight
# ---------------------------------------------------------------------------------------------------------------------


def master_adamw_update(
    weight: torch.Tensor, grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
    scale: torch.Tensor, lr: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor, eps: torch.Tensor,
    weight_decay: torch.Tensor, step: torch.Tensor,
) -> None:
    """One AdamW step (torch's: decoupled weight decay, bias-corrected moments) of a float32 `master` from the
    low-precision `grad` times `scale` (the clipping factor), rounded into the working `weight` afterwards.

    Tensors of one shape (flat views: a compiled kernel then serves every size); the hyper-parameters and the step
    number (already counted) are 0-d float32 tensors, so a new value does not recompile.
    """
    grad = grad.float() * scale
    master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
    denominator = exp_avg_sq.sqrt() / (1 - beta2**step).sqrt() + eps
    master.sub_(lr / (1 - beta1**step) * exp_avg / denominator)
    weight.copy_(master)


@functools.cache
def compiled_master_adamw_update():
    """`master_adamw_update` compiled into one pass (dynamic shapes: one compilation per process)."""
    return torch.compile(master_adamw_update, dynamic=True, fullgraph=True)


# ---------------------------------------------------------------------------------------------------------------------
# The optimiser
# ---------------------------------------------------------------------------------------------------------------------


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW over float32 parameters and low-precision working weights with float32 masters.

    Args:
        params: parameters or parameter groups (`lr`, `betas`, `eps`, `weight_decay` per group, as torch's AdamW).
        working_weights: the float32 parameters (among `params`) to train in `dtype`: converted in place (the same
            `nn.Parameter` objects, so wrappers and hooks keep working), their float32 values kept as masters.
        master_update: `"compiled"` (one pass per tensor; falls back to eager, with a warning, where torch cannot
            compile), `"eager"` (three passes), or `"auto"` (compiled from `AUTO_COMPILE_ELEMENTS` elements).

    State per parameter: `step` (0-d float32), `exp_avg`, `exp_avg_sq` (float32), and `master` (float32) for a working
    weight. `clip_grad_norm_(max_norm)` returns the gradients' total norm and folds the clipping factor into the next
    `step()`, which applies it to every gradient (the gradients themselves are not rescaled).
    """

    def __init__(
        self,
        params,
        working_weights: Iterable[nn.Parameter] = (),
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        dtype: torch.dtype = torch.bfloat16,
        master_update: str = "auto",
    ):
        if master_update not in MASTER_UPDATES:
            raise ValueError(f"master_update={master_update!r} must be one of {MASTER_UPDATES}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        working = {id(weight) for weight in working_weights}
        for group in self.param_groups:
            for parameter in group["params"]:
                self._init_state(parameter, dtype if id(parameter) in working else None)
        elements = sum(self.state[p]["master"].numel() for p in self.working_weights())
        self.compile_update = master_update == "compiled" or (
            master_update == "auto" and elements >= AUTO_COMPILE_ELEMENTS
        )
        self._clip_scale: torch.Tensor | None = None
        self._buffers: dict[int, torch.Tensor] = {}  # eager update: float32 gradients, kept from step to step

    def _init_state(self, parameter: nn.Parameter, dtype: torch.dtype | None) -> None:
        state = self.state[parameter]
        state["step"] = torch.zeros((), dtype=torch.float32, device=parameter.device)
        state["exp_avg"] = torch.zeros_like(parameter, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(parameter, dtype=torch.float32)
        if dtype is not None and parameter.dtype == torch.float32:
            state["master"] = parameter.detach().clone()
            parameter.data = parameter.data.to(dtype)

    def working_weights(self) -> list[nn.Parameter]:
        """The parameters trained through masters (while they are in low precision)."""
        return [p for group in self.param_groups for p in group["params"] if self._is_working(p)]

    def _is_working(self, parameter: torch.Tensor) -> bool:
        return "master" in self.state[parameter] and parameter.dtype != torch.float32

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The total 2-norm of all gradients (as `torch.nn.utils.clip_grad_norm_`); the next `step()` scales them by
        `min(1, max_norm / (norm + 1e-6))`."""
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))
        if max_norm > 0:
            self._clip_scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        scale, self._clip_scale = self._clip_scale, None
        for group in self.param_groups:
            plain = []
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                self.state[parameter]["step"] += 1
                if self._is_working(parameter):
                    self._working_step(parameter, group, scale)
                else:
                    plain.append(parameter)
            if plain:
                self._fused_step(plain, [p.grad for p in plain], [self.state[p] for p in plain], group, scale)
        return loss

    @staticmethod
    def _fused_step(params, grads, states, group: dict, scale: torch.Tensor | None) -> None:
        """Torch's fused AdamW on float32 tensors (parameters, or masters with float32 copies of their gradients)."""
        if scale is not None:
            torch._foreach_mul_(grads, scale)
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(
            params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
            [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2,
            weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
        )

    def _working_step(self, weight: nn.Parameter, group: dict, scale: torch.Tensor | None) -> None:
        state = self.state[weight]
        if self.compile_update:
            try:
                beta1, beta2 = group["betas"]
                hyper = [torch.tensor(float(v)) for v in (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])]
                compiled_master_adamw_update()(
                    weight.view(-1), weight.grad.view(-1), state["master"].view(-1), state["exp_avg"].view(-1),
                    state["exp_avg_sq"].view(-1), torch.ones(()) if scale is None else scale, *hyper, state["step"],
                )
                return
            except Exception as error:  # no C++ compiler, an unsupported platform, ...: the eager update still works
                logger.warning(f"The master-weight update could not be compiled ({type(error).__name__}: {error}); "
                               "it runs eagerly (three passes over memory) from now on.")
                self.compile_update = False
        buffer = self._buffers.get(id(weight))
        if buffer is None:
            buffer = self._buffers[id(weight)] = torch.empty_like(state["master"])
        if scale is None:
            buffer.copy_(weight.grad)
        else:
            torch.mul(weight.grad, scale.reshape(1), out=buffer)  # (1,), not 0-d: the product is taken in float32
        self._fused_step([state["master"]], [buffer], [state], group, None)
        weight.copy_(state["master"])

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every floating state tensor to its parameter's dtype: a working weight's float32 master and
        # moments are taken again from the saved values.
        super().load_state_dict(state_dict)
        parameters = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            parameter = parameters[index]
            if "master" in saved:
                for key in ("master", "exp_avg", "exp_avg_sq"):
                    self.state[parameter][key] = saved[key].to(parameter.device, torch.float32)

    # -- the model's face --------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Make `model.state_dict()` return the masters of its working weights and `model.load_state_dict()` write
        them (e.g. `load_best_model_at_end`)."""
        self._named_working_weights = {
            name: parameter for name, parameter in model.named_parameters() if "master" in self.state.get(parameter, {})
        }
        # (a partial: torch marks state-dict hooks with an attribute, which bound methods do not take)
        model.register_state_dict_post_hook(functools.partial(self._state_dict_with_masters))
        model.register_load_state_dict_pre_hook(self._load_into_masters)

    def _state_dict_with_masters(self, module, state_dict, prefix, local_metadata) -> None:
        for name, parameter in self._named_working_weights.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = self.state[parameter]["master"].detach()

    @torch.no_grad()
    def _load_into_masters(self, module, state_dict, prefix, *args) -> None:
        for name, parameter in self._named_working_weights.items():
            if prefix + name in state_dict:
                self.state[parameter]["master"].copy_(state_dict[prefix + name])

    def restore_float32_weights(self) -> None:
        """Give the working weights their float32 masters (shared storage): the model ends in float32, and a later
        step trains them as float32 parameters."""
        for weight in self.working_weights():
            weight.data = self.state[weight]["master"]


class RestoreFloat32Weights(TrainerCallback):
    """At the end of `train()` (before the caller saves the model), the working weights become their float32
    masters."""

    def __init__(self, optimizer: MasterWeightAdamW):
        self.optimizer = optimizer

    def on_train_end(self, args, state, control, **kwargs):
        self.optimizer.restore_float32_weights()


def product_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable float32 weights of the linear and convolution layers of `model`."""
    return [
        module.weight for module in model.modules()
        if isinstance(module, _PRODUCT_LAYERS) and module.weight.requires_grad and module.weight.dtype == torch.float32
    ]


def prepare_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, args) -> torch.optim.Optimizer:
    """The optimiser to train with: `optimizer` (the Trainer's, not yet stepped), or with `uses_master_weights(args)`
    a `MasterWeightAdamW` with its parameter groups, attached to `model`. On a CPU with `args.keep_freed_memory` it
    also configures the allocator."""
    if args.keep_freed_memory and args.device.type == "cpu" and not keep_freed_memory():
        logger.info("keep_freed_memory applies to glibc's malloc only; this platform keeps its own allocator.")
    if not uses_master_weights(args):
        return optimizer
    if type(optimizer) is not torch.optim.AdamW:
        raise ValueError(
            f"bf16_master_weights trains with AdamW (--optim {' or '.join(MASTER_WEIGHT_OPTIMIZERS)}), not "
            f"{type(optimizer).__name__}: pass --bf16_master_weights false to use it under bf16 autocast."
        )
    groups = [{key: group[key] for key in ("params", "lr", "betas", "eps", "weight_decay")}
              for group in optimizer.param_groups]
    master = MasterWeightAdamW(groups, product_weights(model), master_update=args.master_update)
    master.attach(model)
    logger.info(f"bf16 master weights: {len(master.working_weights())} weights train in bfloat16 with float32 masters "
                f"({'compiled' if master.compile_update else 'eager'} update).")
    return master


__all__ = [
    "MASTER_UPDATES",
    "MASTER_WEIGHT_OPTIMIZERS",
    "MasterWeightAdamW",
    "RestoreFloat32Weights",
    "keep_freed_memory",
    "master_adamw_update",
    "prepare_optimizer",
    "product_weights",
    "uses_master_weights",
]
