"""Finite numbers only: the one check that no weights or embeddings holding a NaN or an infinity are saved, scored,
exported or published.

- Saving: `proclip train` and stage 0 refuse to write such weights (`require_finite` on the state dict, the fix:
  training diverged).
- Using: `proclip eval`, `export`, `card`, `space` and `push` refuse a folder whose saved weights hold them
  (`require_finite_folder`: its `*.safetensors` files read one tensor at a time, so memory holds one tensor), and
  `eval` / `export` refuse embeddings that do (`require_finite_embeddings`: an overflow, e.g. under bf16). A NaN in
  one adapter weight makes every embedding NaN, which the retrieval metrics would otherwise score as a perfect R@5.

Every refusal is a `NonFiniteError` whose message has two lines: what holds the values (naming the tensors or rows),
then the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .saved_weights import SavedWeights

_SHOWN = 8  # tensor names or rows an error message lists before "and N more"

SAVING_FIX = "Training diverged: lower --learning_rate, check the data, or train with --skip_nonfinite_steps."
USING_FIX = ("Nothing is evaluated, exported or published from such weights: retrain the model, or restore the folder "
             "from a good copy.")


class NonFiniteError(ValueError):
    """Weights or embeddings hold NaN or infinite values; the message names them and says what to do."""


class NonFiniteWeightsError(NonFiniteError):
    """Weights hold NaN or infinite values: they are neither written nor used."""


def _listed(items: list, total: int) -> tuple[str, str]:
    """("N of M", the first items joined, "and K more" when cut)."""
    shown = ", ".join(map(str, items[:_SHOWN])) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
    return f"{len(items)} of {total}", shown


def nonfinite_tensor_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, in the mapping's order."""
    return [
        name for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all())
    ]


def require_finite(tensors: Mapping[str, torch.Tensor], what: str, fix: str = SAVING_FIX) -> None:
    """Raise `NonFiniteWeightsError` if any of `tensors` holds a NaN or an infinity: "`what`: N of M tensors hold
    NaN or infinite values (names)." and, on a second line, `fix`."""
    names = nonfinite_tensor_names(tensors)
    if names:
        count, shown = _listed(names, len(tensors))
        raise NonFiniteWeightsError(f"{what}: {count} tensors hold NaN or infinite values ({shown}).\n{fix}")


def require_finite_folder(folder: str | Path) -> None:
    """Refuse to use a saved model folder whose weights hold a NaN or an infinity (`NonFiniteWeightsError`)."""
    require_finite(SavedWeights(folder), f"{folder} cannot be used", USING_FIX)


def require_finite_embeddings(embeds: torch.Tensor, what: str, rows: list | None = None) -> None:
    """Raise `NonFiniteError` if rows of `embeds` (N, D) hold a NaN or an infinity, naming them (`rows[i]` for row i
    when given: the dataset rows they embed)."""
    bad = torch.nonzero(~torch.isfinite(embeds).all(dim=1)).flatten().tolist()
    if bad:
        count, shown = _listed([rows[i] if rows is not None else i for i in bad], len(embeds))
        raise NonFiniteError(
            f"{what}: {count} embeddings hold NaN or infinite values (rows {shown}).\nThe model overflows on them: run "
            "in float32 (without --bf16), or check the weights and those inputs."
        )


__all__ = [
    "NonFiniteError",
    "NonFiniteWeightsError",
    "nonfinite_tensor_names",
    "require_finite",
    "require_finite_embeddings",
    "require_finite_folder",
]
