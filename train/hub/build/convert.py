"""`proclip convert`: upstream ProCLIP / LLM2CLIP checkpoints (open_clip-style state dicts) into this package's format.

Upstream checkpoints hold an open_clip OpenAI ViT (`visual.*`), the text adapter (`text.text_adaptor.*`, upstream's
`TextProj`) and `logit_scale`; the LLM itself is not in them and comes from `--text`. Every size is read from tensor
shapes (METHOD.md §8); anything that cannot be mapped faithfully onto transformers' `CLIPVisionModel` and
`ProCLIPAdapter` is refused with the keys at fault, never dropped or guessed.

    proclip convert --checkpoint proclip_l14_336.pt --text microsoft/LLM2CLIP-Llama-3-8B-Instruct-CC-Finetuned \
        --out proclip-l14-336 --dtype bfloat16
"""

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
)
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_proclip import (
    ProCLIPModel,
    ProCLIPProcessor,
    config_from_towers,
    configure_text_tokenizer,
)

# OpenAI's ViTs by (width, layers, patch size, image size): the Hub id of the matching CLIP and its number of heads,
# which shapes cannot tell (heads = width // 64 for all of them).
OPENAI_VITS = {
    (768, 12, 32, 224): ("openai/clip-vit-base-patch32", 12),
    (768, 12, 16, 224): ("openai/clip-vit-base-patch16", 12),
    (1024, 24, 14, 224): ("openai/clip-vit-large-patch14", 16),
    (1024, 24, 14, 336): ("openai/clip-vit-large-patch14-336", 16),
}

# Image towers that open_clip / EVA-CLIP can hold but transformers' CLIPVisionModel cannot express.
FOREIGN_VISION_TOWERS = {
    "EVA-CLIP (EVA02 ViT: rotary embeddings, split q/k/v, SwiGLU)": re.compile(
        r"^visual\.(blocks\.|patch_embed\.|cls_token$|pos_embed$|rope\.|norm\.|head\.)|\.rope\.|\.(q_bias|v_bias)$"
    ),
    "timm": re.compile(r"^visual\.trunk\."),
    "ModifiedResNet": re.compile(r"^visual\.(layer[1-4]|attnpool|stem)\.|^visual\.conv[23]\."),
}

ADAPTER_PREFIX = "text.text_adaptor."
RESBLOCK_PREFIX = "visual.transformer.resblocks."


class UnsupportedCheckpointError(ValueError):
    """The checkpoint cannot be converted faithfully; the message names the keys or settings at fault."""


@dataclass(frozen=True)
class UpstreamLayout:
    """Sizes of an upstream checkpoint, read from its tensor shapes (heads from a config or `OPENAI_VITS`)."""

    width: int
    layers: int
    heads: int
    mlp_width: int
    patch_size: int
    image_size: int
    num_channels: int
    projection_dim: int  # D
    text_hidden_size: int  # H
    adapter_blocks: int  # n_blocks
    adapter_expansion: int  # r
    vision_name_or_path: str | None = None

    def vision_config(self, activation: str = "quick_gelu") -> CLIPVisionConfig:
        """The CLIPVisionConfig of the image tower; `projection_dim` is the joint size D."""
        return CLIPVisionConfig(
            hidden_size=self.width,
            intermediate_size=self.mlp_width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_channels=self.num_channels,
            image_size=self.image_size,
            patch_size=self.patch_size,
            projection_dim=self.projection_dim,
            hidden_act=activation,
            layer_norm_eps=1e-5,  # open_clip's LayerNorm default
        )


@dataclass(frozen=True)
class KeyMap:
    """One upstream tensor: its expected shape and where it goes in `ProCLIPModel`'s state dict.

    `how` is `"copy"`, `"transpose"` (open_clip's right-multiplied `visual.proj`) or `"split_qkv"` (the fused
    `in_proj` of `nn.MultiheadAttention`; `target` then holds `{}` for q, k and v).
    """

    source: str
    shape: tuple[int, ...]
    target: str
    how: str = "copy"


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def load_upstream_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an upstream checkpoint (`.safetensors`, or `.pt`/`.bin` with `weights_only=True`) as a flat state dict.

    open_clip training checkpoints (`{"epoch", "state_dict", ...}`) and DDP's `module.` prefix are unwrapped.
    A pickle that needs more than tensors and plain containers is refused: loading it could run arbitrary code.
    """
    path = Path(path)
    if not path.is_file():
        raise UnsupportedCheckpointError(f"{path} is not a file.")
    if path.suffix == ".safetensors":
        checkpoint = load_file(path, device="cpu")
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            reason = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler" in line), str(err))
            raise UnsupportedCheckpointError(
                f"{path} is a pickle that needs more than tensors to load, so it is not opened (torch.load with "
                f"weights_only=True refused it: {reason}). Loading it fully could run arbitrary code. If you trust "
                "its source, re-save only its weights, e.g. `torch.save(torch.load(f, weights_only=False)"
                "['state_dict'], 'weights.pt')`, and convert that."
            ) from err
    else:
        raise UnsupportedCheckpointError(f"{path}: expected a .pt, .pth, .bin, .ckpt or .safetensors file.")

    for wrapper in ("state_dict", "model", "module"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict):
        raise UnsupportedCheckpointError(f"{path} holds a {type(checkpoint).__name__}, not a state dict.")
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module.") :]: value for key, value in checkpoint.items()}
    not_tensors = sorted(key for key, value in checkpoint.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise UnsupportedCheckpointError(f"{path}: these entries are not tensors: {_listing(not_tensors)}")
    return checkpoint


# ----------------------------------------------------------------------------------------------------------------
# Layout: sizes from shapes, and the key-by-key plan
# ----------------------------------------------------------------------------------------------------------------


def infer_layout(
    state_dict: dict[str, torch.Tensor], vision_config: str | CLIPVisionConfig | None = None
) -> UpstreamLayout:
    """Read every size of an upstream checkpoint from its shapes.

    Args:
        state_dict: the upstream state dict (`load_upstream_state_dict`).
        vision_config: a CLIP checkpoint (Hub id or folder, `CLIPModel` or vision-only) or a `CLIPVisionConfig`
            giving the number of attention heads, which shapes do not tell. Without it the OpenAI ViT table is used.
    Raises:
        UnsupportedCheckpointError: a foreign image tower, keys the layout needs are missing, or sizes that do not fit
            together.
    """
    _refuse_foreign_towers(state_dict)
    anchors = [
        "visual.conv1.weight", "visual.positional_embedding", "visual.proj", f"{RESBLOCK_PREFIX}0.mlp.c_fc.weight"
    ]
    adapter_indices = _indices(state_dict, ADAPTER_PREFIX)
    blocks = max(adapter_indices, default=1) - 1  # the last two indices are the final LayerNorm and Linear
    anchors += [f"{ADAPTER_PREFIX}0.fn.0.weight", f"{ADAPTER_PREFIX}{blocks + 1}.weight"]
    if adapter_indices and blocks < 1:
        raise UnsupportedCheckpointError(
            "The adapter has no residual blocks (only "
            f"{_listing(sorted(k for k in state_dict if k.startswith(ADAPTER_PREFIX)))}); ProCLIPAdapter needs one."
        )
    missing = [key for key in anchors if key not in state_dict]
    if missing:
        raise UnsupportedCheckpointError(
            "Not an upstream ProCLIP/LLM2CLIP checkpoint with an OpenAI ViT: missing keys "
            f"{_listing(missing)} (it has {_listing(sorted(state_dict))})."
        )
    conv = state_dict["visual.conv1.weight"]
    width, num_channels, patch_size = conv.shape[0], conv.shape[1], conv.shape[-1]
    positions = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(max(positions, 0))
    if grid * grid != positions or conv.ndim != 4 or conv.shape[-2] != patch_size:
        raise UnsupportedCheckpointError(
            f"visual.conv1.weight {tuple(conv.shape)} and visual.positional_embedding "
            f"{tuple(state_dict['visual.positional_embedding'].shape)} do not describe a square grid of square patches."
        )
    layers = max(_indices(state_dict, RESBLOCK_PREFIX)) + 1
    image_size = grid * patch_size
    text_proj = state_dict[f"{ADAPTER_PREFIX}{blocks + 1}.weight"]
    hidden = text_proj.shape[-1]
    fc1_width = state_dict[f"{ADAPTER_PREFIX}0.fn.0.weight"].shape[0]
    if fc1_width % hidden:
        raise UnsupportedCheckpointError(
            f"{ADAPTER_PREFIX}0.fn.0.weight has {fc1_width} rows, not a whole multiple of H={hidden}; ProCLIPAdapter "
            "needs an integer expansion factor."
        )
    name, heads = _heads(width, layers, patch_size, image_size, vision_config)
    return UpstreamLayout(
        width=width,
        layers=layers,
        heads=heads,
        mlp_width=state_dict[f"{RESBLOCK_PREFIX}0.mlp.c_fc.weight"].shape[0],
        patch_size=patch_size,
        image_size=image_size,
        num_channels=num_channels,
        projection_dim=state_dict["visual.proj"].shape[-1],
        text_hidden_size=hidden,
        adapter_blocks=blocks,
        adapter_expansion=fc1_width // hidden,
        vision_name_or_path=name,
    )


def key_plan(layout: UpstreamLayout) -> list[KeyMap]:
    """Every key an upstream checkpoint of this layout holds, its shape, and its place in `ProCLIPModel`."""
    w, m, d, h = layout.width, layout.mlp_width, layout.projection_dim, layout.text_hidden_size
    grid = layout.image_size // layout.patch_size
    plan = [
        KeyMap("logit_scale", (), "logit_scale"),
        KeyMap("visual.class_embedding", (w,), "vision_model.embeddings.class_embedding"),
        KeyMap(
            "visual.conv1.weight",
            (w, layout.num_channels, layout.patch_size, layout.patch_size),
            "vision_model.embeddings.patch_embedding.weight",
        ),
        KeyMap(
            "visual.positional_embedding", (grid * grid + 1, w), "vision_model.embeddings.position_embedding.weight"
        ),
        *_layer_norm("visual.ln_pre", w, "vision_model.pre_layrnorm"),
        *_layer_norm("visual.ln_post", w, "vision_model.post_layernorm"),
        KeyMap("visual.proj", (w, d), "visual_projection.weight", how="transpose"),
    ]
    for i in range(layout.layers):
        source, target = f"{RESBLOCK_PREFIX}{i}", f"vision_model.encoder.layers.{i}"
        plan += [
            *_layer_norm(f"{source}.ln_1", w, f"{target}.layer_norm1"),
            KeyMap(f"{source}.attn.in_proj_weight", (3 * w, w), f"{target}.self_attn.{{}}_proj.weight", "split_qkv"),
            KeyMap(f"{source}.attn.in_proj_bias", (3 * w,), f"{target}.self_attn.{{}}_proj.bias", "split_qkv"),
            *_linear(f"{source}.attn.out_proj", w, w, f"{target}.self_attn.out_proj"),
            *_layer_norm(f"{source}.ln_2", w, f"{target}.layer_norm2"),
            *_linear(f"{source}.mlp.c_fc", w, m, f"{target}.mlp.fc1"),
            *_linear(f"{source}.mlp.c_proj", m, w, f"{target}.mlp.fc2"),
        ]
    r_h = layout.adapter_expansion * h
    for k in range(layout.adapter_blocks):
        source, target = f"{ADAPTER_PREFIX}{k}", f"text_adapter.blocks.{k}"
        plan += [
            *_layer_norm(f"{source}.ln", h, f"{target}.norm"),
            *_linear(f"{source}.fn.0", h, r_h, f"{target}.fc1"),
            *_linear(f"{source}.fn.3", r_h, h, f"{target}.fc2"),
        ]
    plan += [
        *_layer_norm(f"{ADAPTER_PREFIX}{layout.adapter_blocks}", h, "text_adapter.final_norm"),
        *_linear(f"{ADAPTER_PREFIX}{layout.adapter_blocks + 1}", h, d, "text_adapter.proj"),
    ]
    return plan


def convert_state_dict(state_dict: dict[str, torch.Tensor], layout: UpstreamLayout) -> dict[str, torch.Tensor]:
    """Map an upstream state dict onto `ProCLIPModel`'s names (all but `text_model.*`), after checking every key.

    Raises:
        UnsupportedCheckpointError: listing missing keys, unexpected keys and shape mismatches together.
    """
    plan = key_plan(layout)
    expected = {entry.source: entry.shape for entry in plan}
    missing = [key for key in expected if key not in state_dict]
    unexpected = sorted(key for key in state_dict if key not in expected)
    wrong = [
        f"{key} (expected {expected[key]}, got {tuple(state_dict[key].shape)})"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (no place for them in ProCLIP): {_listing(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_listing(wrong)}")
    if problems:
        raise UnsupportedCheckpointError(
            f"Cannot convert faithfully ({_describe(layout)}): " + "; ".join(problems)
        )

    converted = {}
    for entry in plan:
        tensor = state_dict[entry.source]
        if entry.how == "split_qkv":
            for name, part in zip("qkv", tensor.chunk(3, dim=0)):
                converted[entry.target.format(name)] = part.contiguous()
        elif entry.how == "transpose":
            converted[entry.target] = tensor.t().contiguous()
        else:
            converted[entry.target] = tensor
    return converted


# ----------------------------------------------------------------------------------------------------------------
# Building the ProCLIP folder
# ----------------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    checkpoint: str | Path,
    text: str,
    out_dir: str | Path | None = None,
    vision_config: str | None = None,
    activation: str = "quick_gelu",
    normalize_input: bool = True,
    pooling: str | None = None,
    bidirectional: bool | None = None,
    prompt_template: str | None = None,
    instruction: str | None = None,
    padding_side: str | None = None,
    max_text_length: int = 512,
    dtype: torch.dtype | None = None,
) -> tuple[ProCLIPModel, ProCLIPProcessor]:
    """Convert an upstream checkpoint into a `ProCLIPModel` and its processor; save both to `out_dir` if given.

    Args:
        checkpoint: the upstream state dict file.
        text: Hub id or folder of the LLM embedder the adapter was trained on (its hidden size must be the adapter's
            H). Pooling, bidirectionality, prompt and padding side come from its preset (as in
            `ProCLIPModel.from_towers`) unless given here.
        vision_config: a CLIP checkpoint giving the number of attention heads (needed outside the OpenAI ViT table).
        activation: the image tower's MLP activation: `"quick_gelu"` (OpenAI weights) or `"gelu"`.
        normalize_input: L2-normalise the pooled LLM embedding before the adapter, as upstream's `TextProj` does by
            default and in its cached-embedding training path; `False` for adapters trained on the online-LLM path.
        dtype: dtype of the whole model (e.g. `torch.bfloat16` for 8B text towers); default float32.
    """
    state_dict = load_upstream_state_dict(checkpoint)
    layout = infer_layout(state_dict, vision_config)
    converted = convert_state_dict(state_dict, layout)

    text_hidden_size = getattr(AutoConfig.from_pretrained(text), "hidden_size", None)  # before loading any weights
    if text_hidden_size != layout.text_hidden_size:
        raise UnsupportedCheckpointError(
            f"The checkpoint's adapter reads H={layout.text_hidden_size}-d LLM embeddings, but --text {text} has "
            f"hidden_size={text_hidden_size}: it is not the embedder this adapter was trained on."
        )
    text_model = AutoModel.from_pretrained(text, dtype=dtype)
    logit_scale = float(converted["logit_scale"])
    config = config_from_towers(
        layout.vision_config(activation),
        text,
        text_model.config,
        pooling=pooling,
        bidirectional=bidirectional,
        prompt_template=prompt_template,
        instruction=instruction,
        padding_side=padding_side,
        max_text_length=max_text_length,
        adapter_blocks=layout.adapter_blocks,
        adapter_expansion=layout.adapter_expansion,
        adapter_normalize_input=normalize_input,
        logit_scale_init=min(max(logit_scale, 0.0), math.log(100.0)),
        vision_name_or_path=layout.vision_name_or_path,
    )
    tokenizer = AutoTokenizer.from_pretrained(text)
    configure_text_tokenizer(tokenizer, config)

    model = ProCLIPModel(config, text_model=text_model)
    result = model.load_state_dict(converted, strict=False)
    not_loaded = [key for key in result.missing_keys if not key.startswith("text_model.")]
    if not_loaded or result.unexpected_keys:  # the plan and ProCLIPModel disagree: a bug here, not in the file
        raise RuntimeError(f"Conversion plan out of date: not filled {not_loaded}, unknown {result.unexpected_keys}")
    if dtype is not None:
        model.to(dtype)
    model.eval()

    size = layout.image_size
    image_processor = CLIPImageProcessorPil(  # what CLIPImageProcessor is without torchvision; saved as that
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = ProCLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    if out_dir is not None:
        model.save_pretrained(out_dir)
        processor.save_pretrained(out_dir)
    return model, processor


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


def _refuse_foreign_towers(state_dict) -> None:
    for family, pattern in FOREIGN_VISION_TOWERS.items():
        keys = sorted(key for key in state_dict if pattern.search(key))
        if keys:
            raise UnsupportedCheckpointError(
                f"The image tower is {family}, not an OpenAI-style ViT, and transformers' CLIPVisionModel cannot "
                f"hold it faithfully; keys at fault: {_listing(keys)}"
            )


def _heads(width, layers, patch_size, image_size, vision_config) -> tuple[str | None, int]:
    """(name or path of the matching CLIP, number of attention heads)."""
    if vision_config is None:
        known = OPENAI_VITS.get((width, layers, patch_size, image_size))
        if known is None:
            raise UnsupportedCheckpointError(
                f"A ViT of width {width}, {layers} layers, patch {patch_size}, image {image_size} is none of "
                f"OpenAI's ({', '.join(name for name, _ in OPENAI_VITS.values())}), so its number of attention heads "
                "is unknown: pass --vision-config with a CLIP checkpoint of this architecture."
            )
        return known
    name = None
    if not isinstance(vision_config, CLIPVisionConfig):
        name = str(vision_config)
        vision_config = AutoConfig.from_pretrained(vision_config)
        vision_config = getattr(vision_config, "vision_config", vision_config)
    found = {"hidden_size": width, "num_hidden_layers": layers, "patch_size": patch_size, "image_size": image_size}
    differ = [
        f"{field}={getattr(vision_config, field, None)} (checkpoint: {value})"
        for field, value in found.items()
        if getattr(vision_config, field, None) != value
    ]
    if differ:
        raise UnsupportedCheckpointError(
            f"--vision-config {name or ''} does not describe this checkpoint's image tower: {', '.join(differ)}"
        )
    if width % vision_config.num_attention_heads:
        raise UnsupportedCheckpointError(
            f"num_attention_heads={vision_config.num_attention_heads} does not divide the width {width}"
        )
    return name, vision_config.num_attention_heads


def _indices(state_dict, prefix) -> list[int]:
    """The integer indices `i` of keys `{prefix}{i}.…`."""
    return sorted({int(m.group(1)) for key in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", key))})


def _layer_norm(source, size, target) -> list[KeyMap]:
    return [KeyMap(f"{source}.{name}", (size,), f"{target}.{name}") for name in ("weight", "bias")]


def _linear(source, in_features, out_features, target) -> list[KeyMap]:
    return [
        KeyMap(f"{source}.weight", (out_features, in_features), f"{target}.weight"),
        KeyMap(f"{source}.bias", (out_features,), f"{target}.bias"),
    ]


def _describe(layout) -> str:
    return (
        f"read as a width-{layout.width}, {layout.layers}-layer ViT with patch {layout.patch_size} at "
        f"{layout.image_size} px, D={layout.projection_dim}, and an adapter with H={layout.text_hidden_size}, "
        f"r={layout.adapter_expansion}, {layout.adapter_blocks} block(s)"
    )


def _listing(items, limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


__all__ = [
    "UnsupportedCheckpointError",
    "UpstreamLayout",
    "KeyMap",
    "OPENAI_VITS",
    "load_upstream_state_dict",
    "infer_layout",
    "key_plan",
    "convert_state_dict",
    "convert_checkpoint",
]
