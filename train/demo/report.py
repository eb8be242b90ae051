"""The demo's comparison: which runs make its rows, the tables of `results.md` (mean +- sd over seeds), the environment
they were measured in, the figure (`comparison.png`), and the comparison over several teachers (`combine_results`)."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import statistics
from pathlib import Path

import torch

from .config import ADDITIVE_FIELDS
from .languages import ZERO_SHOT_TEMPLATES
from .scores import LANGUAGES

# Variants trained per seed: name -> (stage-1 run it starts from or None for a fresh adapter, distill weight or
# None for the config's lambda, human label).
STAGE1_RUNS = {"stage1": 1.0, "stage1-nostruct": 0.0}  # name -> weight of L_struct (`--structure_weight`)
STAGE2_RUNS = {
    "direct": (None, 0.0),
    "proclip": ("stage1", None),
    "proclip-nostruct": ("stage1-nostruct", None),
    "proclip-nodistill": ("stage1", 0.0),
}
# Runs on the stage-0 LLM (`--stage0`): "stage0-" + the name of the run it repeats on that text tower.
STAGE0_PREFIX = "stage0-"
STAGE0_TOWER_RUNS = {STAGE0_PREFIX + name: name for name in ("stage1", "proclip")}
RUN_NAMES = (*STAGE1_RUNS, *STAGE2_RUNS, *STAGE0_TOWER_RUNS)


def stage1_start(name: str) -> str | None:
    """The stage-1 run a stage-2 run (or its stage-0 LLM repeat) starts from; `None` for a fresh adapter or a
    stage-1 run."""
    start = STAGE2_RUNS.get(STAGE0_TOWER_RUNS.get(name, name), (None,))[0]
    return (STAGE0_PREFIX + start if name in STAGE0_TOWER_RUNS else start) if start else None


def runs_with_starts(names) -> set[str]:
    """`names` and the stage-1 runs their stage-2 runs start from: what training `names` needs."""
    return {*names, *filter(None, map(stage1_start, names))}


ROW_LABELS = {
    "teacher": "Teacher CLIP (trained on the whole world)",
    "stage1": "After stage 1 only (teacher's image tower, inherited adapter)",
    "direct": "LLM2CLIP-style direct alignment (fresh adapter, stage 2 only)",
    "proclip": "ProCLIP (stage 1 + stage 2 with self-distillation)",
    "proclip-nostruct": "ProCLIP without L_struct (stage 1 without the structure term)",
    "proclip-nodistill": "ProCLIP without self-distillation (lambda = 0)",
    "stage0-stage1": "After stage 1 only, on the stage-0 LLM",
    "stage0-proclip": "ProCLIP on the stage-0 LLM (LLM2CLIP caption-contrastive fine-tuning first)",
}
TOWER_LABELS = {  # rows of the text towers' caption retrieval table
    "teacher": "Teacher CLIP text encoder (32 tokens, projected)",
    "llm": "LLM, pooled hidden states as shipped (mean, causal)",
    "stage0": "LLM after stage 0 (mean, {attention}, LoRA merged)",
}


ENVIRONMENT_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "datasets", "accelerate", "peft")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment_description(threads: int | None) -> dict:
    """What a demo's numbers depend on beyond its code and seeds: library versions, CPU, threads. Bit-determinism
    holds for one library build and CPU only (BENCHMARKS.md), so every results.json records them."""
    versions = {}
    for package in ENVIRONMENT_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "torch_threads": threads or torch.get_num_threads(), "packages": versions}


def environment_line(environment: dict) -> str:
    packages = ", ".join(f"{name} {version}" for name, version in environment["packages"].items() if version)
    return (f"{environment['cpu']} ({environment['cpu_count']} cores, {environment['torch_threads']} torch "
            f"thread(s)), Python {environment['python']}, {packages}")


def translated_zeroshot(result: dict, key: str = "top1") -> float:
    """Zero-shot top-1 with translated class prompts (`key`: of all, seen or held-out classes), averaged over the
    languages (a `score` result)."""
    return statistics.fmean(result["zeroshot_translated"][lang][key] for lang in LANGUAGES)


def value(get, result: dict) -> float:
    """A column's value in a `score` result; NaN where the result has no such score (a world without long captions,
    synonyms or scenes), which `_stats` leaves out and the tables and figure drop."""
    try:
        return get(result)
    except KeyError:
        return float("nan")


COLUMNS = (  # (key, header, getter on a `score` result)
    ("zs_seen", "ZS top-1 seen", lambda r: r["zeroshot"]["top1_seen"]),
    ("zs_held", "ZS top-1 held-out", lambda r: r["zeroshot"]["top1_held_out"]),
    ("short_i2t", "short I→T", lambda r: r["retrieval"]["short"]["i2t_R@1"]),
    ("short_t2i", "short T→I", lambda r: r["retrieval"]["short"]["t2i_R@1"]),
    ("long_i2t", "long I→T", lambda r: r["retrieval"]["long"]["i2t_R@1"]),
    ("long_t2i", "long T→I", lambda r: r["retrieval"]["long"]["t2i_R@1"]),
    ("cra", "CRA short→long", lambda r: r["caption_retrieval"]["short_to_long"]),
    ("zs_translated", "ZS translated (de/fr/es mean)", lambda r: translated_zeroshot(r)),
    ("zs_synonyms", "ZS synonyms", lambda r: r["zeroshot_synonyms"]["top1"]),
)
WORDS_COLUMNS = (  # a world whose classes have synonyms (Fashion-MNIST): other words for them, seen and held-out apart
    ("syn_seen", "synonyms seen", lambda r: r["zeroshot_synonyms"]["top1_seen"]),
    ("syn_held", "synonyms held-out", lambda r: r["zeroshot_synonyms"]["top1_held_out"]),
    ("tr_seen", "translated seen (mean)", lambda r: translated_zeroshot(r, "top1_seen")),
    ("tr_held", "translated held-out (mean)", lambda r: translated_zeroshot(r, "top1_held_out")),
)
MULTILINGUAL_COLUMNS = (  # zero-shot with the class prompts translated, per language, and translated-caption retrieval
    *[(f"{lang}_zs", f"{lang} ZS", lambda r, lang=lang: r["zeroshot_translated"][lang]["top1"]) for lang in LANGUAGES],
    *[(f"{lang}_zs_{attribute}", f"{lang} {attribute} right", lambda r, lang=lang, attribute=attribute:
       r["zeroshot_translated"][lang][f"{attribute}_correct"]) for lang in LANGUAGES for attribute in ("colour", "shape")],
    ("en_zs_colour", "en colour right", lambda r: r["zeroshot"]["colour_correct"]),
    ("en_zs_shape", "en shape right", lambda r: r["zeroshot"]["shape_correct"]),
    *[(f"{lang}_t2i", f"{lang} T→I", lambda r, lang=lang: r["retrieval"][lang]["t2i_R@1"]) for lang in LANGUAGES],
)
HELD_COLUMNS = (
    ("short_t2i_seen", "short T→I seen scenes", lambda r: r["retrieval"]["short"]["t2i_R@1_seen"]),
    ("short_t2i_held", "short T→I held-out scenes", lambda r: r["retrieval"]["short"]["t2i_R@1_held_out"]),
    ("short_i2t_seen", "short I→T seen scenes", lambda r: r["retrieval"]["short"]["i2t_R@1_seen"]),
    ("short_i2t_held", "short I→T held-out scenes", lambda r: r["retrieval"]["short"]["i2t_R@1_held_out"]),
    ("long_t2i_seen", "long T→I seen", lambda r: r["retrieval"]["long"]["t2i_R@1_seen"]),
    ("long_t2i_held", "long T→I held-out", lambda r: r["retrieval"]["long"]["t2i_R@1_held_out"]),
)


def _stats(values: list[float]) -> dict:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


# Compared across teachers and seeds (`combine_results`), not a column of a single demo's tables.
ZS_ALL_COLUMN = ("zs_all", "ZS top-1 (all classes)", lambda r: r["zeroshot"]["top1"])
ALL_COLUMNS = COLUMNS + MULTILINGUAL_COLUMNS + HELD_COLUMNS + WORDS_COLUMNS + (ZS_ALL_COLUMN,)


def comparison_rows(teacher: dict | list[dict], runs: dict, teacher_seconds: float | None = None,
                    stage0_seconds: float | None = None, stage0_description: str | None = None) -> list[dict]:
    """One row per model: each column's mean and sd over seeds (and teachers: `teacher` may be a list of the
    teachers' scores, `runs` each run's records over every teacher), and the training wall time of each stage
    (stage 0, when the row's LLM went through it, is one run shared by every seed)."""
    teachers = teacher if isinstance(teacher, list) else [teacher]
    rows = [{"row": "teacher", "label": ROW_LABELS["teacher"],
             **{key: _stats([value(get, t["test"]) for t in teachers]) for key, _, get in ALL_COLUMNS},
             "stage_seconds": {"teacher": _stats([teacher_seconds] if teacher_seconds else [])}}]
    for name in ("stage1", *STAGE2_RUNS, *STAGE0_TOWER_RUNS):
        records = [r for r in runs.get(name, []) if r]
        if not records:
            continue
        label = ROW_LABELS[name] + (f" [stage 0: {stage0_description}]" if name in STAGE0_TOWER_RUNS and
                                    stage0_description else "")
        row = {"row": name, "label": label}
        for key, _, get in ALL_COLUMNS:
            row[key] = _stats([value(get, r["test"]) for r in records])
        seconds = {}
        if name in STAGE0_TOWER_RUNS:
            seconds["stage 0"] = _stats([stage0_seconds] if stage0_seconds else [])
        if STAGE0_TOWER_RUNS.get(name, name) in STAGE1_RUNS:
            seconds["stage 1"] = _stats([r["train_seconds"] for r in records])
        else:
            start = records[0]["starts_from"]
            if start:
                seconds["stage 1"] = _stats([r["train_seconds"] for r in runs[start] if r])
            seconds["stage 2"] = _stats([r["train_seconds"] for r in records])
        row["stage_seconds"] = seconds
        rows.append(row)
    return rows


def format_stat(stat: dict, percent: bool = True) -> str:
    if stat["n"] == 0:
        return "–"
    scale = 100 if percent else 1
    text = f"{scale * stat['mean']:.1f}"
    return text + (f" ± {scale * stat['sd']:.1f}" if stat["n"] > 1 else "")


def table_markdown(rows: list[dict], columns, time_column: bool = False) -> list[str]:
    """A markdown table of `comparison_rows` over those of `columns` that hold a number (and the training wall time
    per stage); no lines when none does."""
    columns = [column for column in columns if any(row[column[0]]["n"] for row in rows)]
    if not columns:
        return []
    lines = ["| Model | " + " | ".join(header for _, header, _ in columns) + (" | training wall time (s) |" if
                                                                              time_column else " |"),
             "|---" * (len(columns) + 1 + time_column) + "|"]
    for row in rows:
        cells = [format_stat(row[key]) for key, _, _ in columns]
        if time_column:
            cells.append(" + ".join(f"{stage} {format_stat(stat, percent=False)}"
                                    for stage, stat in row["stage_seconds"].items()))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    return lines


COLUMN_VALUES = {key: get for key, _, get in COLUMNS}
SWEEP_COLUMNS = tuple(  # (split, header, value of a `score` result): `COLUMNS` entries on val and test
    (split, header, COLUMN_VALUES[key])
    for split, header, key in (("val", "ZS seen", "zs_seen"), ("val", "ZS held-out", "zs_held"),
                               ("val", "short T→I", "short_t2i"), ("test", "ZS seen", "zs_seen"),
                               ("test", "ZS held-out", "zs_held"), ("test", "short T→I", "short_t2i"),
                               ("test", "ZS translated", "zs_translated"))
)


def sweep_markdown(results: dict) -> list[str]:
    """The stage-2 settings sweep beside the demo's ProCLIP, over the seeds the sweep ran on (mean +- sd)."""
    settings = results.get("sweep_runs") or {f"setting {i}": [r] for i, r in enumerate(results.get("sweep") or [])}
    settings = {name: [r for r in records if r] for name, records in settings.items()}
    settings = {name: records for name, records in settings.items() if records}
    if not settings:
        return []
    n = max(len(records) for records in settings.values())
    main = [r for r in results["runs"].get("proclip", [])[:n] if r]
    seeds = "seed 0" if n == 1 else f"seeds 0–{n - 1}, mean ± sd"
    lines = ["", f"Stage-2 settings on {seeds} (choose on val; test shown for reference; mu = text anchor):", "",
             "| starts from | lr | lambda | EMA momentum | reduction | mu | "
             + " | ".join(f"{split} {header}" for split, header, _ in SWEEP_COLUMNS) + " |",
             "|---" * (6 + len(SWEEP_COLUMNS)) + "|"]
    stage2_lr = results["config"]["stage2"]["lr"]
    for records in ([main] if main else []) + list(settings.values()):
        r = records[0]
        cells = [format_stat(_stats([value(get, record[split]) for record in records]))
                 for split, _, get in SWEEP_COLUMNS]
        lines.append(f"| {r['starts_from'] or 'fresh adapter'} | {r.get('lr', stage2_lr):g} | {r['distill_weight']:g} "
                     f"| {r['ema_momentum']:g} | {r['reduction']} | {r.get('text_anchor_weight', 0.0):g} | "
                     + " | ".join(cells) + " |")
    return lines


def words_table(rows: list[dict]) -> list[str]:
    """`WORDS_COLUMNS`' table where the world's classes have synonyms (none for the shapes world)."""
    return table_markdown(rows, WORDS_COLUMNS) if any(row["zs_synonyms"]["n"] for row in rows) else []


def section(text: str, table: list[str]) -> list[str]:
    """A paragraph and its table, or nothing when the table is empty (a world without those scores)."""
    return ["", text, "", *table] if table else []


def results_markdown(results: dict) -> str:
    config = results["config"]
    seeds = config["seeds"]
    chance = results["teacher"]["test"]["zeroshot"]["chance"]
    fashion = results.get("world") == "fashion"
    data = "the official test photos" if fashion else "single-object images"
    extra = ("; synonyms: each class asked by three other names, one ensemble over names × templates)." if fashion
             else "), retrieval = 1:1 R@1 on general scenes.")
    lines = [
        f"Command: `{results['command']}`  ",
        f"Environment: {environment_line(results['environment'])}. Teacher seed {config['teacher']['seed']}; seeds: "
        f"{seeds} (mean ± sd where more than one). All numbers are test-split percentages; ZS = zero-shot top-1 on "
        f"{data} ({len(ZERO_SHOT_TEMPLATES)}-template ensemble; translated: the same templates in "
        "German, French and Spanish" + extra,
        "",
        *table_markdown(results["table"], COLUMNS, time_column=True),
        *section(f"Other words for the classes (chance {100 * chance:.1f} % on {round(1 / chance)} classes): zero-shot "
                 "with synonyms and with the translated names, on the classes stage 2's image-text data showed "
                 "(seen) and held out of it:", words_table(results["table"])),
        *section("Zero-shot with the class names translated, per language:" if fashion else
                 f"Multilingual: zero-shot with the class prompts translated (chance {100 * chance:.1f} % on "
                 f"{round(1 / chance)} classes), how often its top-1 class has the right colour / shape (English for "
                 "reference), and retrieval with the short caption translated:",
                 table_markdown(results["table"], MULTILINGUAL_COLUMNS)),
        *section("Retrieval split by scenes with / without a held-out colour × shape (short and long captions):",
                 table_markdown(results["table"], HELD_COLUMNS)),
    ]
    lines += sweep_markdown(results)
    steps = results["steps"]
    lines += ["", "Wall time per step (s): " + ", ".join(
        f"{name} {record['wall_seconds']:.0f}" for name, record in steps.items() if record)]
    teacher = steps.get("teacher") or {}
    if teacher.get("source") == "released":
        lines.append(f"Teacher: the package's released teacher (`proclip_train/demo/released_teacher`, what `proclip demo "
                     f"--train-teacher` trains here in {teacher['teacher_train_seconds']:.0f} s on one thread), not "
                     "trained in this run.")
    for step, what in (("embed", "Embedding cache"), ("embed-stage0", "Embedding cache of the stage-0 LLM")):
        embed = steps.get(step) or {}
        if embed:
            long = (f", {embed.get('long_texts')} long captions in {embed.get('long_seconds')} s"
                    if embed.get("long_texts") else "")
            lines.append(f"{what}: {embed.get('short_texts')} short texts in {embed.get('short_seconds')} s{long} "
                         f"(bf16 autocast: {embed.get('bf16_autocast')}).")
    towers = results.get("text_tower_caption_retrieval") or {}
    if towers:
        n = next(iter(towers.values()))["num_images"]
        lines += ["", f"Caption retrieval accuracy of the text towers' own embeddings (test split, {n} scenes: each "
                  "short caption queries among the long captions; chance "
                  f"{100 / n:.1f} %; the CRA column above is the same in each model's joint space):", "",
                  "| Text tower | CRA short→long |", "|---|---|"]
        stage0 = results["config"].get("stage0") or {}
        attention = "bidirectional" if stage0.get("bidirectional", True) else "causal"
        for tower, label in TOWER_LABELS.items():
            if tower in towers:
                lines.append(f"| {label.format(attention=attention)} | {100 * towers[tower]['short_to_long']:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------------------------------

FIGURE_FILE = "comparison.png"
FIGURE_METRICS = (("zs_seen", "ZS seen"), ("zs_held", "ZS held-out"), ("long_t2i", "long-caption T→I R@1"),
                  ("zs_synonyms", "ZS synonyms"), ("zs_translated", "ZS translated (de/fr/es)"))
SHORT_LABELS = {
    "stage1": "stage 1 only", "direct": "direct alignment", "proclip": "ProCLIP", "proclip-nostruct": "w/o L_struct",
    "proclip-nodistill": "w/o self-distillation", "stage0-stage1": "stage 0 +\nstage 1 only",
    "stage0-proclip": "stage 0 +\nProCLIP",
}


def plot_comparison(rows: list[dict], path: str | Path, title: str) -> Path:
    """Grouped bars per model (`comparison_rows` but the teacher) of those `FIGURE_METRICS` the rows hold, error bars =
    sd over seeds (and teachers), the teacher's value of each metric as a dashed reference line; saved as PNG at
    `path`."""
    import matplotlib  # optional dependency (extras `train`, `demo`, `test`)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher = next(row for row in rows if row["row"] == "teacher")
    models = [row for row in rows if row["row"] != "teacher"]
    metrics = [(key, label) for key, label in FIGURE_METRICS if any(row[key]["n"] for row in rows)]
    width = 0.8 / len(metrics)
    figure, axes = plt.subplots(figsize=(1.6 * len(models) + 2.5, 4.2), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (key, label) in enumerate(metrics):
        means = [100 * row[key]["mean"] for row in models]
        sds = [100 * row[key]["sd"] if row[key]["n"] > 1 else 0.0 for row in models]
        positions = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(models))]
        axes.bar(positions, means, width, yerr=sds, capsize=2, label=label, color=colours[k])
        if teacher[key]["n"]:
            axes.axhline(100 * teacher[key]["mean"], color=colours[k], linestyle="--", linewidth=1,
                         label=f"teacher: {label}")
    axes.set_xticks(range(len(models)), [SHORT_LABELS.get(row["row"], row["row"]) for row in models], fontsize=8)
    axes.set_ylabel("% (test split)")
    axes.set_ylim(0, 100)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------------
# Several teachers: the spread that includes the teacher
# ---------------------------------------------------------------------------------------------------------------------

# (row A, row B): A - B per teacher and seed, on the headline columns.
DIFFERENCES = (("proclip", "direct"), ("proclip", "proclip-nodistill"), ("proclip", "proclip-nostruct"),
               ("proclip", "stage1"), ("teacher", "proclip"), ("stage0-proclip", "proclip"))
DIFFERENCE_COLUMNS = ("zs_all", "zs_seen", "zs_held", "short_t2i", "long_t2i", "zs_translated", "zs_synonyms")


def seed_records(result: dict, row: str) -> list[dict | None]:
    """A row's score records per seed in one demo's results (the teacher's one model stands for every seed; a row
    the demo did not train has none)."""
    if row == "teacher":
        return [result["teacher"]] * result["config"]["seeds"]
    return result["runs"].get(row) or []


def combine_results(results: list[dict]) -> dict:
    """The comparison over several demos that differ only in their teacher's seed (same world, recipe, text tower):
    every row's mean and sd over all teachers x seeds, and each headline difference A - B per (teacher, seed) pair,
    called robust when it has the same sign on every pair."""
    configs = [{k: v for k, v in r["config"].items() if k not in ("teacher", *ADDITIVE_FIELDS)} for r in results]
    if any(config != configs[0] for config in configs):
        raise ValueError("combine_results takes demos that differ only in the teacher (and sweep, rows, stage 0)")
    teachers = [r["teacher"] for r in results]
    runs = {}
    for r in results:
        for name, records in r["runs"].items():
            runs.setdefault(name, []).extend(records)
    columns = {key: get for key, _, get in ALL_COLUMNS}
    differences = []
    for a, b in DIFFERENCES:
        for key in DIFFERENCE_COLUMNS:
            values = []
            for r in results:
                pairs = zip(seed_records(r, a), seed_records(r, b))
                values += [value(columns[key], x["test"]) - value(columns[key], y["test"]) for x, y in pairs if x and y]
            values = [v for v in values if not math.isnan(v)]
            if values:
                stats = _stats(values)
                differences.append({"a": a, "b": b, "column": key, **stats, "min": min(values), "max": max(values),
                                    "robust": all(v > 0 for v in values) or all(v < 0 for v in values)})
    return {
        "world": results[0].get("world", "shapes"),
        "demos": [{"command": r["command"], "teacher_seed": r["config"]["teacher"]["seed"],
                   "environment": r["environment"]} for r in results],
        "environment": results[0]["environment"],
        "config": results[0]["config"],
        "teacher": teachers,
        "table": comparison_rows(teachers, runs),
        # recomputed from the runs, not read from each demo's table: a demo reported by an older version lacks columns
        "per_teacher": [{"teacher_seed": r["config"]["teacher"]["seed"], "table": comparison_rows(r["teacher"], r["runs"])}
                        for r in results],
        "differences": differences,
    }


def world_title(world: str) -> str:
    """What a figure's title adds for a world: nothing for the synthetic one."""
    return "" if world == "shapes" else f" ({world} world)"


def combined_markdown(combined: dict) -> str:
    headers = {key: header for key, header, _ in ALL_COLUMNS}
    keys = [key for key in DIFFERENCE_COLUMNS if any(row[key]["n"] for row in combined["table"])]
    seeds = {d["teacher_seed"] for d in combined["demos"]}
    n = len(combined["demos"]) * combined["config"]["seeds"]
    lines = [f"Teachers (teacher seeds) {sorted(seeds)} x {combined['config']['seeds']} seeds = {n} runs per row (the "
             f"teacher row: {len(seeds)} teachers); mean ± sd over all of them. Environment: "
             f"{environment_line(combined['environment'])}.", "",
             *table_markdown(combined["table"], COLUMNS), "",
             *table_markdown(combined["table"], MULTILINGUAL_COLUMNS), "",
             *words_table(combined["table"]), "",
             f"Per teacher (mean over seeds), {' / '.join(headers[key] for key in keys)}:", "",
             "| Model | " + " | ".join(f"teacher seed {d['teacher_seed']}" for d in combined["demos"]) + " |",
             "|---" * (len(combined["demos"]) + 1) + "|"]
    for i, row in enumerate(combined["table"]):
        cells = []
        for per in combined["per_teacher"]:
            match = next((r for r in per["table"] if r["row"] == row["row"]), None)
            cells.append("–" if match is None else " / ".join(f"{100 * match[key]['mean']:.1f}" for key in keys))
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines += ["", f"Differences A − B per (teacher, seed) pair ({n} pairs; the teacher row pairs its one model with "
              "each seed): robust = the same sign on every pair.", "",
              "| A − B | column | mean ± sd | min | max | robust |", "|---|---|---|---|---|---|"]
    for d in combined["differences"]:
        a, b = (SHORT_LABELS.get(name, name).replace("\n", " ") for name in (d["a"], d["b"]))
        lines.append(f"| {a} − {b} | "
                     f"{headers[d['column']]} | {100 * d['mean']:+.1f} ± {100 * d['sd']:.1f} | {100 * d['min']:+.1f} | "
                     f"{100 * d['max']:+.1f} | {'yes' if d['robust'] else 'no'} |")
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"
