"""`proclip convert`: upstream ProCLIP / LLM2CLIP checkpoints into this package's format (the command line of
`hub/build/convert.py`).
"""

import argparse

import torch

from configuration_proclip import POOLING_MODES

from ..hub.build.convert import UnsupportedCheckpointError, convert_checkpoint
from .errors import UsageError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_convert_parser(subparsers) -> None:
    """Register `proclip convert`."""
    parser = subparsers.add_parser(
        "convert",
        help="convert an upstream ProCLIP / LLM2CLIP checkpoint (open_clip state dict) into a Hub-ready folder",
        description=(
            "Convert an upstream ProCLIP / LLM2CLIP checkpoint (open_clip-style: an OpenAI ViT, the text adapter "
            "and logit_scale) into a ProCLIP folder loadable with transformers. All sizes are read from tensor "
            "shapes; a checkpoint that cannot be mapped faithfully (EVA towers, unexpected, missing or misshapen "
            "keys) is refused with the keys at fault."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, help="upstream weights: .pt/.bin (read weights-only) or .safetensors"
    )
    parser.add_argument("--text", required=True, help="Hub id or folder of the LLM embedder the adapter was trained on")
    parser.add_argument("--out", required=True, help="output folder (weights, config, processor, remote code)")
    parser.add_argument(
        "--vision-config",
        help="CLIP checkpoint (Hub id or folder) giving the attention heads; needed for ViTs other than OpenAI's "
        "B/32, B/16, L/14, L/14-336",
    )
    parser.add_argument(
        "--activation", choices=("quick_gelu", "gelu"), default="quick_gelu",
        help="image tower MLP activation (default quick_gelu: what OpenAI weights were trained with)",
    )
    parser.add_argument(
        "--no-normalize-input", dest="normalize_input", action="store_false",
        help="do not L2-normalise the pooled LLM embedding before the adapter (adapters trained on upstream's "
        "online-LLM path); by default it is normalised, as in upstream's cached-embedding training",
    )
    parser.add_argument("--pooling", choices=POOLING_MODES, help="override the text tower's preset pooling")
    parser.add_argument(
        "--bidirectional", action=argparse.BooleanOptionalAction, default=None,
        help="override the preset: run the decoder LLM without its causal mask (LLM2Vec-style embedders)",
    )
    parser.add_argument("--prompt-template", help="override the preset caption wrapping, with {text} for the caption")
    parser.add_argument("--instruction", help="text placed before each caption; left out of mean pooling")
    parser.add_argument("--padding-side", choices=("left", "right"), help="override the tokenizer's padding side")
    parser.add_argument("--max-text-length", type=int, default=512, help="longest caption in tokens (default 512)")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="dtype of the saved model")
    parser.set_defaults(func=run_convert)


def run_convert(args) -> int:
    try:
        convert_checkpoint(
            args.checkpoint,
            args.text,
            args.out,
            vision_config=args.vision_config,
            activation=args.activation,
            normalize_input=args.normalize_input,
            pooling=args.pooling,
            bidirectional=args.bidirectional,
            prompt_template=args.prompt_template,
            instruction=args.instruction,
            padding_side=args.padding_side,
            max_text_length=args.max_text_length,
            dtype=_DTYPES[args.dtype],
        )
    except UnsupportedCheckpointError as err:
        raise UsageError(str(err)) from err
    print(f"Wrote {args.out}")
    return 0
