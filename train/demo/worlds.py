"""The demo's two worlds: the synthetic shapes (`world.WorldConfig`) and Fashion-MNIST's photos
(`fashion.FashionWorldConfig`). Both write the same folder layout and answer the same questions (classes, held-out
classes, prompts); `load_world_config` tells which one a world folder holds."""

from __future__ import annotations

import json
from pathlib import Path

from .fashion import FashionWorldConfig
from .world import WorldConfig

WORLD_CONFIGS = {config.world_name: config for config in (WorldConfig, FashionWorldConfig)}


def load_world_config(world_dir: str | Path) -> WorldConfig | FashionWorldConfig:
    """The config a world folder was written with (its `world.json`'s `"world"`; synthetic worlds written before
    there were two have none)."""
    info = json.loads((Path(world_dir) / "world.json").read_text())
    return WORLD_CONFIGS[info.get("world", WorldConfig.world_name)].from_dict(info["config"])


__all__ = ["WORLD_CONFIGS", "load_world_config"]
