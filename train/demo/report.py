"""The demo's comparison: which runs make its rows, and the tables of `results.md` (mean +- sd over seeds)."""

from __future__ import annotations

import math
import os
import platform
import statistics

import torch

from .scores import LANGUAGES
from .teacher import ZERO_SHOT_TEMPLATES

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
    "stage0": "LLM after stage 0 (mean, bidirectional, LoRA merged)",
}


def machine_description() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


COLUMNS = (  # (key, header, getter on a `score` result)
    ("zs_seen", "ZS top-1 seen", lambda r: r["zeroshot"]["top1_seen"]),
    ("zs_held", "ZS top-1 held-out", lambda r: r["zeroshot"]["top1_held_out"]),
    ("short_i2t", "short I→T", lambda r: r["retrieval"]["short"]["i2t_R@1"]),
    ("short_t2i", "short T→I", lambda r: r["retrieval"]["short"]["t2i_R@1"]),
    ("long_i2t", "long I→T", lambda r: r["retrieval"]["long"]["i2t_R@1"]),
    ("long_t2i", "long T→I", lambda r: r["retrieval"]["long"]["t2i_R@1"]),
    ("cra", "CRA short→long", lambda r: r["caption_retrieval"]["short_to_long"]),
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


def comparison_rows(teacher: dict, runs: dict, teacher_seconds: float | None = None,
                    stage0_seconds: float | None = None) -> list[dict]:
    """One row per model: each column's mean and sd over seeds, and the training wall time of each stage (stage 0,
    when the row's LLM went through it, is one run shared by every seed)."""
    rows = [{"row": "teacher", "label": ROW_LABELS["teacher"],
             **{key: _stats([get(teacher["test"])]) for key, _, get in COLUMNS + HELD_COLUMNS},
             "stage_seconds": {"teacher": _stats([teacher_seconds] if teacher_seconds else [])}}]
    for name in ("stage1", *STAGE2_RUNS, *STAGE0_TOWER_RUNS):
        records = [r for r in runs.get(name, []) if r]
        if not records:
            continue
        row = {"row": name, "label": ROW_LABELS[name]}
        for key, _, get in COLUMNS + HELD_COLUMNS:
            row[key] = _stats([get(r["test"]) for r in records])
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


def results_markdown(results: dict) -> str:
    config = results["config"]
    seeds = config["seeds"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}. Seeds: {seeds} (mean ± sd where more than one). "
        "All numbers are test-split percentages; ZS = zero-shot top-1 on single-object images "
        f"({len(ZERO_SHOT_TEMPLATES)}-template ensemble), retrieval = 1:1 R@1 on general scenes.",
        "",
        "| Model | " + " | ".join(header for _, header, _ in COLUMNS) + " | training wall time (s) |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for row in results["table"]:
        time_cell = " + ".join(f"{stage} {format_stat(stat, percent=False)}" for stage, stat in row["stage_seconds"].items())
        lines.append(f"| {row['label']} | " + " | ".join(format_stat(row[key]) for key, _, _ in COLUMNS) + f" | {time_cell} |")
    lines += ["", "Retrieval split by scenes with / without a held-out colour × shape (short and long captions):", "",
              "| Model | " + " | ".join(header for _, header, _ in HELD_COLUMNS) + " |",
              "|---" * (len(HELD_COLUMNS) + 1) + "|"]
    for row in results["table"]:
        lines.append(f"| {row['label']} | " + " | ".join(format_stat(row[key]) for key, _, _ in HELD_COLUMNS) + " |")
    sweep = [r for r in results.get("sweep") or [] if r]
    if sweep:
        main = next(r for r in results["runs"]["proclip"] if r)
        lines += ["", "Stage-2 settings on seed 0 (choose on val; test shown for reference):", "",
                  "| starts from | lr | lambda | EMA momentum | reduction | val ZS seen | val ZS held-out | "
                  "val short T→I | test ZS seen | test ZS held-out | test short T→I |", "|---" * 11 + "|"]
        stage2_lr = results["config"]["stage2"]["lr"]
        for r in [main, *sweep]:
            v, t = r["val"], r["test"]
            lines.append(
                f"| {r['starts_from'] or 'fresh adapter'} | {r.get('lr', stage2_lr):g} | "
                f"{r['distill_weight']:g} | {r['ema_momentum']:g} | {r['reduction']} | "
                f"{100 * v['zeroshot']['top1_seen']:.1f} | {100 * v['zeroshot']['top1_held_out']:.1f} | "
                f"{100 * v['retrieval']['short']['t2i_R@1']:.1f} | {100 * t['zeroshot']['top1_seen']:.1f} | "
                f"{100 * t['zeroshot']['top1_held_out']:.1f} | {100 * t['retrieval']['short']['t2i_R@1']:.1f} |")
    steps = results["steps"]
    lines += ["", "Wall time per step (s): " + ", ".join(
        f"{name} {record['wall_seconds']:.0f}" for name, record in steps.items() if record)]
    for step, what in (("embed", "Embedding cache"), ("embed-stage0", "Embedding cache of the stage-0 LLM")):
        embed = steps.get(step) or {}
        if embed:
            lines.append(f"{what}: {embed.get('short_texts')} short texts in {embed.get('short_seconds')} s, "
                         f"{embed.get('long_texts')} long captions in {embed.get('long_seconds')} s "
                         f"(bf16 autocast: {embed.get('bf16_autocast')}).")
    towers = results.get("text_tower_caption_retrieval") or {}
    if towers:
        n = next(iter(towers.values()))["num_images"]
        lines += ["", f"Caption retrieval accuracy of the text towers' own embeddings (test split, {n} scenes: each "
                  "short caption queries among the long captions; chance "
                  f"{100 / n:.1f} %; the CRA column above is the same in each model's joint space):", "",
                  "| Text tower | CRA short→long |", "|---|---|"]
        for tower, label in TOWER_LABELS.items():
            if tower in towers:
                lines.append(f"| {label} | {100 * towers[tower]['short_to_long']:.1f} |")
    return "\n".join(lines) + "\n"
