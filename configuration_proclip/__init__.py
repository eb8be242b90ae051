"""ProCLIP configuration (the installed face of the Hub file `configuration_proclip.py`)."""

from .configuration_proclip import (
    POOLING_MODES,
    TEXT_TOWER_PRESETS,
    TEXT_TOWER_SETTINGS_FILE,
    ProCLIPConfig,
    TextTowerSettings,
    text_tower_preset,
)

__all__ = [
    "ProCLIPConfig", "TextTowerSettings", "text_tower_preset", "POOLING_MODES", "TEXT_TOWER_PRESETS",
    "TEXT_TOWER_SETTINGS_FILE",
]
