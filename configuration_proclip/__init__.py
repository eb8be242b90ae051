"""ProCLIP configuration (the installed face of the Hub file `configuration_proclip.py`)."""

from .configuration_proclip import POOLING_MODES, TEXT_TOWER_PRESETS, ProCLIPConfig, text_tower_preset

__all__ = ["ProCLIPConfig", "text_tower_preset", "POOLING_MODES", "TEXT_TOWER_PRESETS"]
