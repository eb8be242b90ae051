"""A saved model folder's weights as they are on disk: read one tensor at a time (`SavedWeights`), and checked
against the folder's `config.json` before anything is loaded (`require_weights_fit_config`).

A config edited after saving (e.g. `hidden_size` 10^9) used to reach `from_pretrained`, which prints a table of
mismatched shapes and then fails allocating the model (a traceback); the shapes the config implies are read from a
model built on the meta device (no memory) and compared with the safetensors headers (no weight read), in
milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from configuration_proclip import ProCLIPConfig
from modeling_proclip import ProCLIPModel

_SHOWN = 3  # mismatched tensors an error message names


class SavedWeights(Mapping):
    """The tensors of a model folder's `*.safetensors` files (one file or shards), each read from disk when asked."""

    def __init__(self, folder: str | Path):
        self.files = {}
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(path, framework="pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each tensor's shape, from the file headers (no tensor is read)."""
        shapes = {}
        for name, path in self.files.items():
            with safe_open(path, framework="pt") as handle:
                shapes[name] = tuple(handle.get_slice(name).get_shape())
        return shapes


class WeightsConfigMismatch(ValueError):
    """A folder's weights do not have the shapes its config.json gives; the message names some and the fix."""


def require_weights_fit_config(folder: str | Path) -> None:
    """Raise `WeightsConfigMismatch` when tensors saved in the ProCLIP folder `folder` have other shapes than the
    model its `config.json` describes (built on the meta device: no memory, however large the config says)."""
    config = ProCLIPConfig.from_pretrained(folder)
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in ProCLIPModel(config).state_dict().items()}
    saved = SavedWeights(folder).shapes()
    wrong = [name for name, shape in saved.items() if name in expected and expected[name] != shape]
    if wrong:
        shown = "; ".join(f"{name} saved {list(saved[name])}, config gives {list(expected[name])}" for name in wrong[:_SHOWN])
        raise WeightsConfigMismatch(
            f"{folder}: its weights do not fit its config.json ({len(wrong)} of {len(saved)} tensors: {shown}).\n"
            "The config.json was edited or belongs to other weights: restore the one saved with them, or save the "
            "model again."
        )


__all__ = ["SavedWeights", "WeightsConfigMismatch", "require_weights_fit_config"]
