"""ProCLIP configuration.

This file is also shipped, as is, inside every exported checkpoint folder (Hub remote code), so it may import
only the standard library, torch and transformers.
"""

import dataclasses
import json
import math
from dataclasses import dataclass

from transformers import AutoConfig, CLIPVisionConfig
from transformers.utils import cached_file

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.51 - 4.57 (what the Inference Endpoints toolkit and optimum install)
    from transformers import PretrainedConfig as PreTrainedConfig

POOLING_MODES = ("mean", "last_token", "cls")

# The files of a checkpoint folder that make it loadable with `trust_remote_code=True`.
AUTO_MAP = {
    "AutoConfig": "configuration_proclip.ProCLIPConfig",
    "AutoModel": "modeling_proclip.ProCLIPModel",
    "AutoModelForZeroShotImageClassification": "modeling_proclip.ProCLIPModel",
}

LLAMA3_USER_TEMPLATE = "<|start_header_id|>user<|end_header_id|>\n\n{text}<|eot_id|>"

# Known embedders: how each wants to be pooled and prompted. Keys are matched against the text tower's
# name (a Hub id or the last part of a local path, case-insensitive prefix match). Explicit arguments win.
TEXT_TOWER_PRESETS = {
    "microsoft/llm2clip-llama-3-8b-instruct-cc-finetuned": {
        "pooling": "mean",
        "bidirectional": True,
        "prompt_template": LLAMA3_USER_TEMPLATE,
        "padding_side": "left",
    },
    "llm2clip-llama-3-8b-instruct-cc-finetuned": {
        "pooling": "mean",
        "bidirectional": True,
        "prompt_template": LLAMA3_USER_TEMPLATE,
        "padding_side": "left",
    },
    "qwen/qwen3-embedding-": {
        "pooling": "last_token",
        "bidirectional": False,
        "prompt_template": "{text}<|endoftext|>",
        "padding_side": "left",
    },
    "qwen3-embedding-": {
        "pooling": "last_token",
        "bidirectional": False,
        "prompt_template": "{text}<|endoftext|>",
        "padding_side": "left",
    },
}

# A text tower's own record of how it is pooled and prompted (`proclip train --stage 0` writes it next to the
# weights); of its keys, these are read.
TEXT_TOWER_SETTINGS_FILE = "proclip_text_tower.json"
TEXT_TOWER_SETTING_KEYS = ("pooling", "bidirectional", "prompt_template", "padding_side")



@dataclass
class TextTowerSettings:
    """How a text model runs as an embedder: the text fields of `ProCLIPConfig`, and their defaults.

    A `ProCLIPConfig` holds these fields itself (`config.text_settings` returns them); stage 0 and caption-retrieval
    evaluation of a bare LLM use this object directly. `configure_text_tokenizer` writes the prompt and instruction
    into a tokenizer and measures `instruction_length` / `text_suffix_length`; `embed_token_ids` reads the rest.

    Args:
        pooling: `"mean"`, `"last_token"` or `"cls"` (see `ProCLIPConfig`).
        bidirectional: run a decoder LLM without its causal mask.
        prompt_template: caption wrapping with `{text}` where the caption goes.
        instruction: text placed before each caption; its tokens are left out of mean pooling.
        padding_side: written into the tokenizer; embeddings do not depend on it.
        max_text_length: longest tokenized caption; longer ones are truncated, keeping the template's end.
        instruction_length: leading tokens excluded from mean pooling (measured on the tokenizer).
        text_suffix_length: trailing tokens truncation keeps (measured on the tokenizer).
    """

    pooling: str = "mean"
    bidirectional: bool = False
    prompt_template: str | None = None
    instruction: str | None = None
    padding_side: str | None = None
    max_text_length: int = 512
    instruction_length: int = 0
    text_suffix_length: int = 0

    def problems(self) -> list[str]:
        """What is wrong with these values, one message per field (empty when they can build a text tower)."""
        problems = []
        if self.pooling not in POOLING_MODES:
            problems.append(f"pooling={self.pooling!r} is not one of {POOLING_MODES}")
        if not isinstance(self.max_text_length, int) or self.max_text_length < 1:
            problems.append(f"max_text_length={self.max_text_length!r} must be a positive integer")
        for name in ("instruction_length", "text_suffix_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                problems.append(f"{name}={value!r} must be a non-negative integer")
        if self.padding_side not in (None, "left", "right"):
            problems.append(f"padding_side={self.padding_side!r} must be 'left', 'right' or None")
        if self.prompt_template is not None and self.prompt_template.count("{text}") != 1:
            problems.append(f"prompt_template={self.prompt_template!r} must contain '{{text}}' exactly once")
        return problems

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ValueError("Invalid text tower settings: " + "; ".join(problems))

    @classmethod
    def resolve(cls, text_name_or_path, defaults: dict | None = None, **explicit) -> "TextTowerSettings":
        """Settings of a text tower: the class defaults, then `defaults`, then the tower's own record or preset
        (`text_tower_preset`), then the `explicit` values that are not `None`."""
        values = {**(defaults or {}), **text_tower_preset(str(text_name_or_path))}
        values.update({key: value for key, value in explicit.items() if value is not None})
        return cls(**values)

    def record(self) -> dict:
        """What a text tower's own `proclip_text_tower.json` holds (what `text_tower_preset` reads back)."""
        return {key: getattr(self, key) for key in TEXT_TOWER_SETTING_KEYS}


TEXT_SETTING_FIELDS = tuple(field.name for field in dataclasses.fields(TextTowerSettings))

# Sentence-transformers pooling flags (1_Pooling/config.json) and the ProCLIP pooling mode each means.
_SENTENCE_TRANSFORMERS_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last_token",
}


class ProCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of a [`ProCLIPModel`]: a CLIP image tower with its visual projection, and an LLM-based text
    embedder whose pooled output an adapter maps into CLIP's joint space.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`):
            The CLIP image tower. Its `projection_dim` is the joint embedding size D.
        text_config (`dict` or `PreTrainedConfig`):
            Any text model known to `AutoConfig` (a decoder LLM or an encoder); round-trips with its own `model_type`.
        pooling (`str`, defaults to `"mean"`):
            How token states become one vector: `"mean"` over the text's tokens (LLM2Vec), `"last_token"` (the
            hidden state of the last real token; Qwen3-Embedding, E5-Mistral), or `"cls"` (the first token).
        bidirectional (`bool`, defaults to `False`):
            Run a decoder LLM without its causal mask. Only for embedders trained that way (LLM2Vec, LLM2CLIP-CC).
        prompt_template (`str`, *optional*):
            Wrapping of each caption, with `{text}` where the caption goes, e.g. Llama-3's user turn. It is
            installed in the saved tokenizer, so every caller that tokenizes gets the same ids.
        instruction (`str`, *optional*):
            Text placed before each caption, inside the template; its tokens are left out of mean pooling.
        instruction_length (`int`, defaults to 0):
            Number of leading tokens (special tokens, template prefix and instruction) excluded from mean pooling.
            Filled in from the tokenizer when an instruction is set; 0 means every real token is pooled.
        text_suffix_length (`int`, defaults to 0):
            Number of tokens the tokenizer appends after each caption (template suffix, EOS, `[SEP]`); truncation
            keeps them. Filled in from the tokenizer.
        max_text_length (`int`, defaults to 512):
            Longest tokenized caption the text tower reads; longer ones are truncated (with one warning).
        padding_side (`str`, *optional*):
            Written into the saved tokenizer (`"left"` for LLM2Vec-style embedders); `None` keeps the tokenizer's.
            Pooling and position ids follow the attention mask, so embeddings do not depend on it.
        adapter_blocks (`int`, defaults to 1):
            Number of residual MLP blocks in the adapter (ProCLIP 1, LLM2CLIP 4).
        adapter_expansion (`int`, defaults to 8):
            Hidden width of each block as a multiple of the LLM's hidden size (ProCLIP 8, LLM2CLIP 2).
        adapter_normalize_input (`bool`, defaults to `True`):
            L2-normalise the pooled LLM embedding before the adapter (upstream's cached-embedding path).
        projection_dim (`int`, *optional*):
            Joint embedding size D; must equal `vision_config.projection_dim` (taken from it when unset).
        logit_scale_init (`float`, defaults to ln(1/0.07)):
            Initial value of the learnable log temperature; `from_towers` takes the CLIP checkpoint's value.
        vision_name_or_path / text_name_or_path (`str`, *optional*):
            Where the two towers came from (recorded for model cards and for finding the stage-1 teacher).
    """

    model_type = "proclip"
    sub_configs = {"vision_config": CLIPVisionConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: dict | CLIPVisionConfig | None = None,
        text_config: dict | PreTrainedConfig | None = None,
        pooling: str = TextTowerSettings.pooling,
        bidirectional: bool = TextTowerSettings.bidirectional,
        prompt_template: str | None = TextTowerSettings.prompt_template,
        instruction: str | None = TextTowerSettings.instruction,
        instruction_length: int = TextTowerSettings.instruction_length,
        text_suffix_length: int = TextTowerSettings.text_suffix_length,
        max_text_length: int = TextTowerSettings.max_text_length,
        padding_side: str | None = TextTowerSettings.padding_side,
        adapter_blocks: int = 1,
        adapter_expansion: int = 8,
        adapter_normalize_input: bool = True,
        projection_dim: int | None = None,
        logit_scale_init: float = math.log(1 / 0.07),
        vision_name_or_path: str | None = None,
        text_name_or_path: str | None = None,
        auto_map: dict | None = None,
        **kwargs,
    ):
        # A plain `__init__`, as CLIPConfig's in transformers 4: transformers 5 keeps custom `__init__`s of remote
        # configs as they are, so this one class loads on both.
        self.vision_config = sub_config(CLIPVisionConfig, vision_config)
        self.text_config = sub_config(AutoConfig, text_config, default_model_type="llama")
        self.pooling = pooling
        self.bidirectional = bidirectional
        self.prompt_template = prompt_template
        self.instruction = instruction
        self.instruction_length = instruction_length
        self.text_suffix_length = text_suffix_length
        self.max_text_length = max_text_length
        self.padding_side = padding_side
        self.adapter_blocks = adapter_blocks
        self.adapter_expansion = adapter_expansion
        self.adapter_normalize_input = adapter_normalize_input
        self.projection_dim = self.vision_config.projection_dim if projection_dim is None else projection_dim
        self.logit_scale_init = logit_scale_init
        self.vision_name_or_path = vision_name_or_path
        self.text_name_or_path = text_name_or_path
        self.auto_map = dict(AUTO_MAP) if auto_map is None else auto_map
        super().__init__(**kwargs)
        self.validate_proclip()

    def validate_proclip(self):
        """Refuse values that cannot build a working model, naming each one."""
        problems = TextTowerSettings.problems(self)
        if self.projection_dim != self.vision_config.projection_dim:
            problems.append(
                f"projection_dim={self.projection_dim} differs from the CLIP tower's "
                f"vision_config.projection_dim={self.vision_config.projection_dim}; the adapter must land in the "
                "image tower's joint space"
            )
        for name in ("adapter_blocks", "adapter_expansion"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} must be a positive integer")
        if not 0.0 <= self.logit_scale_init <= math.log(100.0):
            problems.append(f"logit_scale_init={self.logit_scale_init} must lie in [0, ln 100]")
        if getattr(self.text_config, "hidden_size", None) is None:
            problems.append(f"text_config ({self.text_config.model_type}) has no hidden_size")
        if problems:
            raise ValueError("Invalid ProCLIPConfig: " + "; ".join(problems))

    @property
    def text_settings(self) -> TextTowerSettings:
        """The text tower's settings (pooling, attention, prompt, lengths) as one object."""
        return TextTowerSettings(**{name: getattr(self, name) for name in TEXT_SETTING_FIELDS})

    @property
    def text_hidden_size(self) -> int:
        """H, the size of the LLM embedder's pooled output (the adapter's input)."""
        return self.text_config.hidden_size


# transformers 5 reads (and writes) a text config's rotary settings as one `rope_parameters` dict; transformers 4 reads
# `rope_theta`, `rope_scaling` and, for models with sliding layers (Gemma 3), `rope_local_base_freq`.
READS_ROPE_PARAMETERS = hasattr(PreTrainedConfig, "convert_rope_params_to_dict")


def sub_config(config_class, value, default_model_type: str | None = None) -> PreTrainedConfig:
    """A sub-config from a config object (kept as is), a dict as config.json holds it, or `None` (the defaults).

    Args:
        config_class: the config class, or `AutoConfig` to pick it by the dict's `model_type`.
        default_model_type: the `model_type` of `AutoConfig` sub-configs whose dict names none.
    """
    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(value or {})
    if config_class is not AutoConfig:
        return config_class(**value)
    model_type = value.pop("model_type", default_model_type)
    if not READS_ROPE_PARAMETERS:
        value = legacy_rope_settings(value)
    return AutoConfig.for_model(model_type, **value)


def legacy_rope_settings(text_config: dict) -> dict:
    """A text config dict written by transformers 5, with its `rope_parameters` also spelt as transformers 4 reads
    them (`rope_theta`, `rope_scaling`, `rope_local_base_freq`, `partial_rotary_factor`); keys already present win.

    Without this, transformers 4 would run a tower saved with e.g. rope_theta=100000 (SmolLM2) at its class default.
    """
    parameters = text_config.get("rope_parameters")
    if not isinstance(parameters, dict):
        return text_config
    by_layer_type = {key: value for key, value in parameters.items() if isinstance(value, dict)}
    full = by_layer_type.get("full_attention", parameters)
    legacy = {"rope_theta": full.get("rope_theta")}
    if "sliding_attention" in by_layer_type:
        legacy["rope_local_base_freq"] = by_layer_type["sliding_attention"].get("rope_theta")
    if "partial_rotary_factor" in full:
        legacy["partial_rotary_factor"] = full["partial_rotary_factor"]
    if full.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {key: value for key, value in full.items() if key != "rope_theta"}
    return {**{key: value for key, value in legacy.items() if value is not None}, **text_config}


def text_tower_preset(text_name_or_path: str) -> dict:
    """The known-embedder settings for a text tower's name, or `{}` for an unknown one.

    A folder or repo holding `proclip_text_tower.json` (a stage-0 output) decides first, then a known name, then a
    sentence-transformers folder or repo's own pooling config (`1_Pooling/config.json`).
    """
    own = _own_text_tower_settings(text_name_or_path)
    if own:
        return own
    name = str(text_name_or_path).rstrip("/").lower()
    short = name.rsplit("/", 1)[-1]
    for key, preset in TEXT_TOWER_PRESETS.items():
        if name.startswith(key) or short.startswith(key):
            return dict(preset)
    return _sentence_transformers_pooling(text_name_or_path)


def _own_text_tower_settings(text_name_or_path: str) -> dict:
    settings_file = cached_file(
        text_name_or_path, TEXT_TOWER_SETTINGS_FILE,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
    )
    if settings_file is None:
        return {}
    with open(settings_file) as f:
        settings = json.load(f)
    return {key: settings[key] for key in TEXT_TOWER_SETTING_KEYS if key in settings}


def _sentence_transformers_pooling(text_name_or_path: str) -> dict:
    modules_file = cached_file(text_name_or_path, "modules.json", _raise_exceptions_for_missing_entries=False)
    if modules_file is None:
        return {}
    with open(modules_file) as f:
        modules = json.load(f)
    pooling_dirs = [m["path"] for m in modules if m.get("type", "").endswith("Pooling")]
    if not pooling_dirs:
        return {}
    pooling_file = cached_file(
        text_name_or_path, f"{pooling_dirs[0]}/config.json", _raise_exceptions_for_missing_entries=False
    )
    if pooling_file is None:
        return {}
    with open(pooling_file) as f:
        flags = json.load(f)
    for flag, mode in _SENTENCE_TRANSFORMERS_POOLING.items():
        if flags.get(flag):
            return {"pooling": mode, "bidirectional": False}
    return {}


__all__ = [
    "ProCLIPConfig", "TextTowerSettings", "text_tower_preset", "POOLING_MODES", "TEXT_TOWER_PRESETS",
    "TEXT_TOWER_SETTINGS_FILE", "TEXT_TOWER_SETTING_KEYS",
]
