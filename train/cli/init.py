"""`proclip init`: build an untrained ProCLIP checkpoint folder from a CLIP checkpoint and a text embedder."""

import argparse

from ..demo.assets import resolve_text_tower
from ..hub.init import build_checkpoint


def add_init_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "init",
        help="build an untrained ProCLIP folder from a CLIP checkpoint and a text embedder",
        description="Build a ProCLIP checkpoint folder from two pretrained towers; the adapter starts untrained. "
        "Known embedders (LLM2CLIP-CC, Qwen3-Embedding, sentence-transformers folders) pick their pooling and "
        "prompt themselves; the flags below override them.",
    )
    parser.add_argument("--vision", required=True, help="CLIP checkpoint: Hub id or folder")
    parser.add_argument("--text", required=True, help="text embedder (LLM or encoder): Hub id or folder, or a packaged "
                        "real model by name: smollm2, gemma3, minilm")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--pooling", choices=["mean", "last_token", "cls"])
    parser.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, default=None,
                        help="run a decoder LLM without its causal mask (LLM2Vec-trained embedders only)")
    parser.add_argument("--prompt-template", help="caption wrapping with {text}, e.g. a chat turn")
    parser.add_argument("--instruction", help="text before each caption, left out of mean pooling")
    parser.add_argument("--padding-side", choices=["left", "right"])
    parser.add_argument("--adapter-blocks", type=int, help="residual MLP blocks (ProCLIP 1, LLM2CLIP 4)")
    parser.add_argument("--adapter-expansion", type=int, help="MLP width multiple (ProCLIP 8, LLM2CLIP 2)")
    parser.add_argument("--adapter-normalize-input", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--max-text-length", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype to save")
    parser.set_defaults(func=_run_init)


def _run_init(args) -> None:
    out = build_checkpoint(
        args.vision, resolve_text_tower(args.text), args.out, dtype=args.dtype, pooling=args.pooling,
        bidirectional=args.bidirectional, prompt_template=args.prompt_template, instruction=args.instruction, padding_side=args.padding_side,
        adapter_blocks=args.adapter_blocks, adapter_expansion=args.adapter_expansion,
        adapter_normalize_input=args.adapter_normalize_input, max_text_length=args.max_text_length,
    )
    print(f"Wrote {out}")
