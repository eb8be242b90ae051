"""Results files of `proclip eval`, read for model cards and Spaces: `Evaluation`s, their Hub `EvalResult`s, and
how a card may name what they scored (Hub ids as they are, local paths by their last part only)."""

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import EvalResult

logger = logging.getLogger(__name__)

# `proclip eval --task` -> (model-index task type, task name)
# model-index task types are the Hub's pipeline tags (huggingface.js `PIPELINE_DATA`), which name no image-text
# retrieval: retrieval scores the embeddings, so it is filed under feature extraction, caption-to-caption retrieval
# under sentence similarity; the task name says what was measured.
TASKS = {
    "zeroshot": ("zero-shot-image-classification", "Zero-shot image classification"),
    "retrieval": ("feature-extraction", "Image-text retrieval"),
    "caption-retrieval": ("sentence-similarity", "Caption-to-caption retrieval"),
}
OTHER_TASK_TYPE = "feature-extraction"
# Numbers in a results file that describe the data, not the model: kept for tables, left out of model-index.
COUNT_PREFIXES = ("num_", "n_")

# Hub repos live under an owner (`org/name`); a bare name is a local data set or folder as far as a card knows.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")



@dataclass
class Evaluation:
    """One scored setting of a results file: a task on one dataset, split and (retrieval) caption column.

    Scores are fractions in [0, 1], as `proclip eval` writes them.
    """

    task: str
    data: str
    split: str | None = None
    subset: str | None = None  # the caption column, when a retrieval file scores several
    scores: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, float | None] = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    command: str | None = None
    source: str | None = None

    @property
    def dataset_id(self) -> str:
        """The dataset's Hub id (without `:config`), or the local file or folder's name."""
        spec = self.data
        if is_local_path(spec):
            return Path(spec).stem if Path(spec).suffix else Path(spec).name
        return spec.partition(":")[0]

    @property
    def dataset_config(self) -> str | None:
        """`name:config` -> config; a retrieval subset (caption column) is appended, since model-index groups
        metrics by dataset and config and the columns' scores must not merge."""
        config = None if is_local_path(self.data) else (self.data.partition(":")[2] or None)
        if self.subset is None:
            return config
        return f"{config}/{self.subset}" if config else self.subset

    @property
    def is_hub_dataset(self) -> bool:
        return hub_id(self.data.partition(":")[0]) is not None

    @property
    def label(self) -> str:
        """A short human name: dataset, config/column, split."""
        parts = [self.dataset_id] + [p for p in (self.dataset_config, self.split) if p]
        return " / ".join(parts)


def is_local_path(value: str) -> bool:
    """Whether a recorded tower or data spec names a local path rather than a Hub id."""
    value = str(value)
    return (
        os.path.isabs(value)
        or value.startswith((".", "~"))
        or os.path.exists(value)
        or value.count("/") > 1
        or "\\" in value
    )


def hub_id(value) -> str | None:
    """`value` if it looks like a Hub repo id (`org/name`, not an existing path), else None."""
    if not value or is_local_path(str(value)):
        return None
    return str(value) if _HUB_ID.match(str(value)) else None


def public_name(value) -> str:
    """What a card may say about a tower or data spec: a Hub id as it is, a local path by its last part only."""
    value = str(value)
    return value if hub_id(value.partition(":")[0]) else (Path(value.rstrip("/\\")).name or value)


def format_value(value) -> str:
    """A recorded value for a table: floats to 4 significant digits, local paths by name, lists joined."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, str) and is_local_path(value):
        return public_name(value)
    return str(value)


def is_score(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def infer_task(task, protocol, metrics: dict) -> str:
    """The record's `task`, else a string protocol or its `task`, else guessed from the metric names."""
    named = protocol.get("task") if isinstance(protocol, dict) else protocol
    for value in (task, named):
        if isinstance(value, str) and value:
            return value
    keys = " ".join([*metrics, *(k for v in metrics.values() if isinstance(v, dict) for k in v)])
    if "R@" in keys:
        return "retrieval"
    if "accuracy" in keys:
        return "zeroshot"
    return "unknown"


def _group(metrics: dict, protocol: dict) -> tuple[dict, dict, dict]:
    """Split one metrics object into (scores, counts, per_class)."""
    scores, counts, per_class = {}, {}, {}
    for key, value in metrics.items():
        if key.startswith("per_class"):
            if isinstance(value, dict):
                per_class = dict(value)
            elif isinstance(value, list):
                names = protocol.get("class_names") if isinstance(protocol, dict) else None
                if not isinstance(names, list) or len(names) != len(value):
                    names = [f"class {index}" for index in range(len(value))]
                per_class = dict(zip(names, value))
        elif is_score(value):
            if key.startswith(COUNT_PREFIXES):
                counts[key] = value
            elif math.isfinite(value):
                scores[key] = value
            else:
                logger.warning("Leaving out %s=%s: not a finite number", key, value)
    return scores, counts, per_class


def evaluations_from_record(record: dict, source: str | None = None) -> list["Evaluation"]:
    """The `Evaluation`s of one results object (what `proclip eval --out` writes).

    Read: `task`, `data` (`spec` or `name`/`path`, `split`; or a plain string), `protocol`, `command`, and
    `metrics`: either scores at the top level (zero-shot), or one object of scores per caption column
    (retrieval). `per_class_*` entries (a {class: score} object, or a list named by `protocol.class_names`)
    feed the plot; `num_*` entries are counts. Anything else in the record is ignored.
    """
    metrics = record.get("metrics")
    if not isinstance(metrics, dict):
        raise ValueError(f"{source or 'results'}: no `metrics` object; is it a `proclip eval --out` file?")
    protocol = record.get("protocol") if isinstance(record.get("protocol"), dict) else {}
    data = record.get("data")
    if isinstance(data, dict):
        spec = data.get("spec") or data.get("name") or data.get("path") or data.get("dataset") or "unknown"
        split = data.get("split")
    else:
        spec, split = (str(data) if data else "unknown"), None
    common = dict(
        task=infer_task(record.get("task"), record.get("protocol"), metrics),
        data=str(spec),
        split=split,
        protocol=protocol,
        command=record.get("command"),
        source=source,
    )
    scores, counts, per_class = _group(metrics, protocol)
    subsets = {k: v for k, v in metrics.items() if isinstance(v, dict) and not k.startswith("per_class")}
    if subsets and not scores:
        evaluations = []
        for name, sub_metrics in subsets.items():
            sub_scores, sub_counts, sub_per_class = _group(sub_metrics, protocol)
            evaluations.append(
                Evaluation(**common, subset=name if len(subsets) > 1 else None, scores=sub_scores,
                           counts={**counts, **sub_counts}, per_class=sub_per_class)
            )
        return evaluations
    return [Evaluation(**common, scores=scores, counts=counts, per_class=per_class)]


def read_results(path: str | os.PathLike) -> list[Evaluation]:
    """Read a results JSON: one `proclip eval` record, a list of them, or `{"results": [...]}`."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    records = raw["results"] if isinstance(raw, dict) and isinstance(raw.get("results"), list) else raw
    records = records if isinstance(records, list) else [records]
    evaluations = []
    for record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}: expected JSON objects, found {type(record).__name__}")
        evaluations.extend(evaluations_from_record(record, source=str(path)))
    return evaluations


def metric_display_name(key: str) -> str:
    """`image_to_text_R@1` -> `Image→text R@1`, `top5_accuracy` -> `Top-5 accuracy`."""
    if match := re.fullmatch(r"image_to_text_R@(\d+)", key):
        return f"Image→text R@{match[1]}"
    if match := re.fullmatch(r"text_to_image_R@(\d+)", key):
        return f"Text→image R@{match[1]}"
    if match := re.fullmatch(r"top(\d+)_accuracy", key):
        return f"Top-{match[1]} accuracy"
    if key == "mean_per_class_top1_accuracy":
        return "Mean per-class top-1 accuracy"
    return key.replace("_", " ")


def hub_metric_id(key: str) -> str:
    """The Hub metric (hf.co/metrics) a results key measures: `top1_accuracy` -> `accuracy`, `*_R@K` -> `recall`."""
    if "accuracy" in key:
        return "accuracy"
    if "_R@" in key:
        return "recall"
    return key


def eval_results(evaluations: list[Evaluation]) -> list[EvalResult]:
    """One `EvalResult` per score: metric type = the results file's key, value = its number, unchanged."""
    results = []
    for evaluation in evaluations:
        task_type, task_name = TASKS.get(evaluation.task, (OTHER_TASK_TYPE, evaluation.task))
        for key, value in evaluation.scores.items():
            results.append(
                EvalResult(
                    task_type=task_type,
                    task_name=task_name,
                    dataset_type=evaluation.dataset_id,
                    dataset_name=evaluation.dataset_id,
                    dataset_config=evaluation.dataset_config,
                    dataset_split=evaluation.split,
                    metric_type=key,
                    metric_name=metric_display_name(key),
                    metric_value=value,
                )
            )
    return results
