"""`proclip space`: write a Gradio Space for a saved ProCLIP folder.

    proclip space --model DIR --out SPACE_DIR [--repo-id ORG/NAME] [--results JSON] [--images DATA]

Any ProCLIP folder gets a Space: zero-shot classification and image -> text ranking always; text -> image search
when there are images to search (the retrieval data the model was evaluated on, or --images), else that tab is left
out. What SPACE_DIR holds (upload it to a Gradio Space repo on the Hub, or run it locally):
    app.py             this package's `space_app.py`, copied: zero-shot classification, text -> image search over
                       the gallery, image -> text ranking; loads the model with AutoModel / AutoProcessor
                       (trust_remote_code) from the repo id in space_config.json, or from $PROCLIP_MODEL
    space_config.json  the model id, the languages its text tower reads, the examples, the evaluation scores shown
    gallery/           the images searched in the search tab, with their captions in metadata.jsonl (if any)
    examples/          the zero-shot examples' images
    requirements.txt   what app.py imports, at the versions this project tests with
    README.md          the Space card: front matter (sdk: gradio, sdk_version, app_file, models, short_description,
                       tags) and how to use the Space

The gallery and the examples come from the model's own evaluation data: the `proclip eval` results files in DIR
(any *.json with `task` and `metrics`), or those given with --results (e.g. `proclip eval --out` outside DIR), name
the data they scored. The gallery is up to --gallery-size images of the retrieval data (or of --images: a folder of
images, with captions if it has a metadata.jsonl, or any data `proclip eval --data` reads), spread evenly over it;
the search examples are captions of a few of them, one per caption column (short, long, translated), each labelled
with the model's text -> image R@1 on that column, so a visitor sees what the model is good and bad at; the zero-shot
examples are images of the zero-shot data with its class names as candidate labels.
"""

import dataclasses
import importlib.metadata
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import datasets
from huggingface_hub import SpaceCard, SpaceCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ...evaluation.tasks import class_names_and_labels, load_eval_dataset
from ...training.finite import require_finite_folder
from ...training.images import decode_image
from ..publish.card import languages_phrase, load_record_data, text_tower_languages
from ..publish.results import evaluations_from_record

SPACE_APP = Path(__file__).with_name("space_app.py")
CONFIG_FILE = "space_config.json"
GALLERY_DIR = "gallery"
EXAMPLES_DIR = "examples"
# The gradio this project's tests drive app.py with (pyproject's `space` extra pins the same); a Space's
# sdk_version and requirements.txt name it when the writing Python has no gradio.
GRADIO_VERSION = "6.31.0"
REQUIREMENTS = ("gradio", "torch", "transformers", "pillow", "safetensors")  # what app.py imports
SPACE_TAGS = ("proclip", "clip", "zero-shot-image-classification", "image-text-retrieval")
MAX_EXAMPLE_LABELS = 12


class SpaceError(ValueError):
    """The Space cannot be written: a bad argument, a folder that is not a ProCLIP checkpoint, no usable data."""


@dataclasses.dataclass
class SpaceOptions:
    """What goes into a Space besides the model.

    Args:
        repo_id: the model's Hub repo (`org/name`), which the Space loads; None: only `$PROCLIP_MODEL` runs it.
        results: `proclip eval --out` files; None: every results file in the model folder.
        gallery_size: the most images in the search gallery.
        caption_columns: the retrieval data's caption columns to take search examples from (default: those its
            results scored).
        example_images: gallery images whose captions become search examples (one per caption column) and image ->
            text examples; the zero-shot examples are twice as many images of different classes.
        title: the Space's title (default: the repo or folder name).
        images: data to build the search gallery from instead of the evaluated retrieval data: a folder of images
            (captions from its metadata.jsonl, if any) or anything `proclip eval --data` reads.
    """

    repo_id: str | None = None
    results: list[Path] | None = None
    gallery_size: int = 48
    caption_columns: list[str] | None = None
    example_images: int = 2
    title: str | None = None
    images: Path | None = None


# -- evaluation records and their data -----------------------------------------------------------------------------


def read_eval_records(model_dir: Path, results: list[Path] | None) -> list[dict]:
    """The `proclip eval` records (JSON objects with `task` and `metrics`) of `results`, or of the model folder."""
    paths = results if results is not None else sorted(model_dir.glob("*.json"))
    records = []
    for path in paths:
        try:
            record = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            if results is not None:
                raise SpaceError(f"--results {path}: {error}") from error
            continue
        if isinstance(record, dict) and isinstance(record.get("metrics"), dict) and record.get("task"):
            records.append({**record, "source": str(path)})
    return records


def evenly_spaced(count: int, k: int) -> list[int]:
    """`min(k, count)` indices spread evenly over `range(count)`, first and last included."""
    if k >= count:
        return list(range(count))
    if k == 1:
        return [0]
    return [round(i * (count - 1) / (k - 1)) for i in range(k)]


def first_caption(cell) -> str:
    """A caption cell's first non-empty caption ("" if none): cells hold a string or a list of strings."""
    captions = [cell] if isinstance(cell, str) else list(cell or [])
    return next((c.strip() for c in captions if isinstance(c, str) and c.strip()), "")


class GallerySource(NamedTuple):
    """The data the search gallery is drawn from; `description` names it in messages."""

    dataset: datasets.Dataset
    image_column: str
    caption_columns: list[str]
    description: str


def gallery_source(records: list[dict], options: SpaceOptions) -> GallerySource | None:
    """The data of the gallery: `options.images` when given, else the first retrieval record whose data is on this
    machine; None when there are no images to search."""
    if options.images is not None:
        if not Path(options.images).exists():
            raise SpaceError(f"--images {options.images} does not exist; give a folder of images (with a "
                             "metadata.jsonl for captions) or a data file")
        try:  # images are checked as any data's are: none from outside the folder, no URLs fetched
            dataset = load_eval_dataset(str(options.images), image_column="image")[0]
        except ValueError as error:
            raise SpaceError(f"--images {options.images}: {error}") from error
        texts = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
        return GallerySource(dataset, "image", options.caption_columns or texts, f"--images {options.images}")
    for record in (r for r in records if r["task"] == "retrieval"):
        image_column = record["data"].get("image_column", "image")
        dataset = load_record_data(record, image_column)
        if dataset is not None:
            columns = options.caption_columns or record["data"].get("caption_columns") or list(record["metrics"])
            return GallerySource(dataset, image_column, columns, f"the data of {record['source']}")
    return None


def write_gallery(source: GallerySource, out: Path, size: int) -> list[dict]:
    """Copy up to `size` images of `source`, evenly spread over the rows whose caption columns all hold a caption,
    into `out/gallery` as PNG, with `metadata.jsonl` (`file_name`, `captions` by column). Returns the metadata rows."""
    dataset, image_column, columns, what = source
    missing = [c for c in [image_column, *columns] if c not in dataset.column_names]
    if missing:
        raise SpaceError(f"{what} has no column {', '.join(missing)}; it has {', '.join(dataset.column_names)}")
    captions = {c: [first_caption(cell) for cell in dataset[c]] for c in columns}
    usable = [row for row in range(len(dataset)) if all(captions[c][row] for c in columns)]
    folder = out / GALLERY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in (usable[i] for i in evenly_spaced(len(usable), size)):
        file_name = f"{len(rows):03d}.png"
        decode_image(dataset[index][image_column]).save(folder / file_name)
        rows.append({"file_name": file_name, "captions": {c: captions[c][index] for c in columns}})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return rows


def write_classify_examples(record: dict, out: Path, count: int) -> list[dict]:
    """Zero-shot examples from the data of a zero-shot `record`: one image for each of `count` classes spread over
    the class list, saved into `out/examples`, with up to `MAX_EXAMPLE_LABELS` class names as candidate labels."""
    image_column = record["data"].get("image_column", "image")
    dataset = load_record_data(record, image_column)
    if dataset is None:
        return []
    label_column = record["data"].get("label_column", "label")
    if image_column not in dataset.column_names or label_column not in dataset.column_names:
        return []
    names, labels = class_names_and_labels(dataset, label_column)
    folder = out / EXAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    examples = []
    for name_index in evenly_spaced(len(names), count):
        row = labels.index(name_index) if name_index in labels else None
        if row is None:
            continue
        shown = range(len(names)) if len(names) <= MAX_EXAMPLE_LABELS else \
            sorted(set(evenly_spaced(len(names), MAX_EXAMPLE_LABELS - 1)) | {name_index})
        file_name = f"classify-{len(examples):02d}.png"
        decode_image(dataset[row][image_column]).save(folder / file_name)
        examples.append({"image": f"{EXAMPLES_DIR}/{file_name}", "labels": ", ".join(names[i] for i in shown),
                         "answer": names[name_index]})
    return examples


# -- what the page shows -------------------------------------------------------------------------------------------


def percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def text_to_image_recall(record: dict, column: str) -> float | None:
    """The text -> image R@1 a retrieval record measured on caption column `column`, if it did."""
    scores = record["metrics"].get(column) if record["task"] == "retrieval" else None
    return scores.get("text_to_image_R@1") if isinstance(scores, dict) else None


def score_notes(records: list[dict]) -> list[str]:
    """One Markdown line per evaluation: zero-shot top-1 with the best and worst classes, text -> image R@1 per
    caption column."""
    lines = []
    for record in records:
        evaluations = evaluations_from_record(record, record["source"])
        if record["task"] == "zeroshot" and "top1_accuracy" in evaluations[0].scores:
            evaluation = evaluations[0]
            ranked = sorted(((v, k) for k, v in evaluation.per_class.items() if v is not None), reverse=True)
            extremes = ""
            if len(ranked) >= 4:
                best, worst = (", ".join(f"{name} {percent(value)}" for value, name in pairs)
                               for pairs in (ranked[:2], ranked[-2:]))
                extremes = f" (best: {best}; worst: {worst})"
            lines.append(f"Zero-shot top-1 accuracy on {evaluation.label}: "
                         f"**{percent(evaluation.scores['top1_accuracy'])}** over {len(ranked)} classes{extremes}.")
        elif record["task"] == "retrieval":
            recalls = {column: text_to_image_recall(record, column) for column in record["metrics"]}
            cells = [f"{column} **{percent(value)}**" for column, value in recalls.items() if value is not None]
            if cells:
                images = evaluations[0].counts.get("num_images")
                where = " / ".join(p for p in (evaluations[0].dataset_id, evaluations[0].split) if p)
                lines.append(f"Text → image R@1 on {where}" + (f" ({images} images)" if images else "") + ": "
                             + ", ".join(cells) + ".")
    return lines


def search_examples(gallery: list[dict], records: list[dict], count: int) -> list[dict]:
    """Captions of `count` gallery images, one per caption column, each labelled with its column, the image it
    describes and the model's text -> image R@1 on that column (when a results file has it)."""
    examples = []
    for row in (gallery[i] for i in evenly_spaced(len(gallery), count)):
        for column, caption in row["captions"].items():
            score = next((v for r in records if (v := text_to_image_recall(r, column)) is not None), None)
            measured = f"R@1 {percent(score)} in evaluation" if score is not None else "not in the evaluation results"
            short = caption if len(caption) <= 48 else caption[:47] + "…"
            examples.append({"query": caption, "answer": row["file_name"],
                             "label": f"{column} → {row['file_name']} ({measured}): {short}"})
    return examples


def rank_examples(gallery: list[dict], count: int) -> list[dict]:
    """Gallery images with their own captions (every column) after the first caption of another image."""
    examples = []
    if not any(row["captions"] for row in gallery):
        return examples
    for position in evenly_spaced(len(gallery), count):
        row, other = gallery[position], gallery[(position + len(gallery) // 2) % len(gallery)]
        captions = [next(iter(other["captions"].values())), *row["captions"].values()]
        examples.append({"image": f"{GALLERY_DIR}/{row['file_name']}", "captions": "\n".join(dict.fromkeys(captions)),
                         "answer": next(iter(row["captions"].values()))})
    return examples


# -- the files -----------------------------------------------------------------------------------------------------


def installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements_text() -> str:
    """requirements.txt: each package app.py imports, pinned to the version installed here (gradio: the tested one
    when it is not installed)."""
    lines = ["# What app.py imports, at the versions the Space was written and tested with."]
    for package in REQUIREMENTS:
        version = installed_version(package) or (GRADIO_VERSION if package == "gradio" else None)
        lines.append(f"{package}=={version}" if version else package)
    return "\n".join(lines) + "\n"


def space_card(title: str, model_dir: Path, options: SpaceOptions, config: dict) -> SpaceCard:
    """README.md of the Space: the Hub's front matter and how to use and run the Space."""
    data = SpaceCardData(
        title=title, sdk="gradio", sdk_version=installed_version("gradio") or GRADIO_VERSION, app_file="app.py",
        models=[options.repo_id] if options.repo_id else None, tags=list(SPACE_TAGS),
        short_description="ProCLIP: zero-shot labels and image search", emoji="🔎", colorFrom="indigo",
        colorTo="blue", pinned=False,
    )
    model = options.repo_id or "the model in $PROCLIP_MODEL"
    search = config["gallery"] is not None
    lines = [
        f"# {title}", "",
        f"A demo of the ProCLIP model [{model}]" + (f"(https://huggingface.co/{options.repo_id})" if options.repo_id
                                                    else "") + ": an LLM text tower aligned to CLIP's image tower. "
        f"Its text tower reads {config['text_languages']}.",
        "", "- **Zero-shot classification**: an image and candidate labels, comma-separated.",
        *(["- **Text → image search** over the example gallery (`gallery/`), with queries of any length."]
          if search else []),
        "- **Image → text ranking** of captions, one per line.", "",
        "## Scores of this model", "",
        *[f"- {note}" for note in config["scores"] or ["No evaluation results were found."]], "",
        "## Run it locally", "", "```bash", "pip install -r requirements.txt",
        *([f"python app.py   # loads {options.repo_id}; http://127.0.0.1:7860 (GRADIO_SERVER_PORT sets the port)"]
          if options.repo_id else []),
        f"PROCLIP_MODEL={model_dir.resolve()} python app.py   # a local folder", "```", "",
        "## Call it from Python", "", "```python", "from gradio_client import Client, handle_file", "",
        'client = Client("http://127.0.0.1:7860")  # or the Space\'s id',
        'scores = client.predict(handle_file("cat.png"), "cat, dog", api_name="/classify")  # template optional',
        *(['hits = client.predict("a red circle above a blue square", 8, api_name="/search")'] if search else []),
        'ranked = client.predict(handle_file("cat.png"), "a cat\\na dog", api_name="/rank")', "```", "",
        "Written by `proclip space` from the model's folder.", "",
    ]
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def check_model_folder(model_dir: Path) -> None:
    config = model_dir / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, json.JSONDecodeError):
        model_type = None
    if model_type != "proclip":
        raise SpaceError(f"{model_dir} is not a saved ProCLIP folder (its config.json must say model_type "
                         "\"proclip\"); point --model at the output of `proclip train` or `proclip demo`")


def prepare_out(out: Path) -> None:
    """Create `out`, or clear the gallery and examples of a Space written there before (its cache stays)."""
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_FILE).is_file():
        raise SpaceError(f"{out} exists and is not a Space written by `proclip space`; pick an empty or new folder")
    for name in (GALLERY_DIR, EXAMPLES_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_space(model_dir: str | os.PathLike, out: str | os.PathLike, options: SpaceOptions | None = None) -> dict:
    """Write the Space of the ProCLIP folder `model_dir` into `out` (see the module docstring).

    Returns:
        The Space's config (what `space_config.json` holds).

    Raises:
        SpaceError: the folder is not a ProCLIP checkpoint, `out` is another folder's, a bad repo id, results file
            or --images; `out` is then left as it was (a new one is removed).
        NonFiniteWeightsError: the weights hold NaN or infinite values (`training.finite`).
    """
    model_dir, out, options = Path(model_dir), Path(out), options or SpaceOptions()
    check_model_folder(model_dir)
    require_finite_folder(model_dir)
    if options.repo_id:
        try:
            validate_repo_id(options.repo_id)
        except HFValidationError as error:
            raise SpaceError(f"--repo-id {options.repo_id!r} is not a Hub repo id (ORG/NAME)") from error
    if options.gallery_size < 1:
        raise SpaceError(f"--gallery-size must be at least 1, not {options.gallery_size}")
    records = read_eval_records(model_dir, options.results)
    created = not out.exists()
    prepare_out(out)
    try:
        return fill_space(model_dir, out, options, records)
    except BaseException:
        if created:  # a refused Space leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def fill_space(model_dir: Path, out: Path, options: SpaceOptions, records: list[dict]) -> dict:
    """Write the gallery, the examples, app.py, its config, requirements and card into the prepared `out`."""
    source = gallery_source(records, options)
    gallery = write_gallery(source, out, options.gallery_size) if source else []
    classify = next((ex for r in records if r["task"] == "zeroshot"
                     if (ex := write_classify_examples(r, out, options.example_images * 2))), [])
    title = options.title or f"ProCLIP {(options.repo_id or model_dir.resolve().name).rsplit('/', 1)[-1]}"
    notes, languages = score_notes(records), text_tower_languages(model_dir)
    config = {
        "model": options.repo_id,
        "title": title,
        "languages": languages,
        "text_languages": languages_phrase(languages),
        "gallery": GALLERY_DIR if gallery else None,
        "classify_examples": classify,
        "search_examples": search_examples(gallery, records, options.example_images) if gallery else [],
        "rank_examples": rank_examples(gallery, options.example_images) if gallery else [],
        "scores": notes,
    }
    shutil.copy(SPACE_APP, out / "app.py")
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "requirements.txt").write_text(requirements_text(), encoding="utf-8")
    space_card(title, model_dir, options, config).save(out / "README.md")
    return config


def run_instructions(model_dir: str | os.PathLike, out: str | os.PathLike) -> str:
    """How to run the Space in `out` locally on the model in `model_dir`."""
    out = Path(out)
    return "\n".join([
        "Run the Space locally (then open http://127.0.0.1:7860; GRADIO_SERVER_PORT sets the port):",
        f"  pip install -r {out / 'requirements.txt'}",
        f"  cd {out} && PROCLIP_MODEL={Path(model_dir).resolve()} python app.py",
    ])


# -- command line --------------------------------------------------------------------------------------------------
