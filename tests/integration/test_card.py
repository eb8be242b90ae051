"""`proclip card` on folders written by the real `proclip train`, with results written by the real `proclip eval`.

Expectations are built from the results JSON as written, not through the card module's own reader. Cards of an
own-data run (the real MiniLM as text tower) and of the quick demo are checked to be fit to publish.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import minilm_folder
from huggingface_hub import ModelCard
from PIL import Image
from proclip_train import cli
from proclip_train.hub.publish.card import (
    EXAMPLE_IMAGE_FILE,
    PLOT_FILE,
    build_model_card,
    languages_phrase,
    text_tower_languages,
)
from proclip_train.hub.publish.push import run_python_without_project
from proclip_train.hub.publish.results import read_results

REPO_ID = "my-org/proclip-tiny"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _save_image(path, colour, seed):
    noise = torch.randint(-40, 40, (32, 32, 3), generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((torch.tensor(colour) + noise).clamp(0, 255).to(torch.uint8).numpy()).save(path)


@pytest.fixture(scope="module")
def results_files(tmp_path_factory, tiny_proclip_dir):
    """A zero-shot and a two-column retrieval results file from `proclip eval` on tiny image folders."""
    root = tmp_path_factory.mktemp("eval")
    metadata = []
    for seed, (name, colour) in enumerate(COLOURS.items()):
        for image in range(2):
            _save_image(root / "classes" / name / f"{image}.png", colour, 10 * seed + image)
            _save_image(root / "pairs" / f"{name}{image}.png", colour, 10 * seed + image)
            metadata.append({"file_name": f"{name}{image}.png", "caption": [f"a {name} square", f"{name} noise"],
                             "long": f"a long description of noisy {name} picture number {image}"})
    (root / "pairs" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in metadata) + "\n")
    (root / "templates.txt").write_text("a photo of a {}.\na {} thing.\n")
    zeroshot, retrieval = root / "zeroshot.json", root / "retrieval.json"
    model = ["--model", str(tiny_proclip_dir)]
    cli.main(["eval", *model, "--task", "zeroshot", "--data", str(root / "classes"),
              "--templates", str(root / "templates.txt"), "--out", str(zeroshot)])  # fmt: skip
    cli.main(["eval", *model, "--task", "retrieval", "--data", str(root / "pairs"),
              "--caption-column", "caption", "--caption-column", "long", "--out", str(retrieval)])  # fmt: skip
    return zeroshot, retrieval


def train_run(model_dir, data, out, stage: int, *extra: str) -> None:
    """A real two-step `proclip train` run (checkpoints after each step, so the card reads the newest's state)."""
    image = ["--image-column", "image"] if stage == 2 else []
    cli.main(["train", "--stage", str(stage), "--model", str(model_dir), "--data", str(data), "--out", str(out),
              *image, "--caption-column", "caption", "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--learning_rate", "0.001", "--save_strategy", "steps", "--save_steps", "1", "--use_cpu",
              "--disable_tqdm", "true", "--seed", "1234", *extra])  # fmt: skip


@pytest.fixture(scope="module")
def carded_folder(tmp_path_factory, tiny_proclip_dir, results_files):
    """Stage 2 of the tiny folder trained by `proclip train`, and its card written by `proclip card`."""
    folder = tmp_path_factory.mktemp("carded") / "proclip-tiny"
    train_run(tiny_proclip_dir, results_files[0].parent / "pairs", folder, 2, "--distill_weight", "1.0")
    cli.main(["card", "--model", str(folder), "--repo-id", REPO_ID, "--dataset", "my-org/captions",
              "--dataset", "/data/local_pairs.jsonl", "--results", str(results_files[0]),
              "--results", str(results_files[1])])  # fmt: skip
    return folder


def _expected_scores(results_files):
    """(task type, dataset, config, split, metric, value) for every score in the raw results JSON."""
    expected = set()
    for path in results_files:
        raw = json.loads(path.read_text())
        dataset = raw["data"]["spec"].rstrip("/").rsplit("/", 1)[-1]
        if raw["task"] == "zeroshot":
            groups = {None: raw["metrics"]}
            task = "zero-shot-image-classification"
        else:
            groups = raw["metrics"]  # one object per caption column
            task = "feature-extraction"
        for config, metrics in groups.items():
            for key, value in metrics.items():
                if isinstance(value, float | int) and not key.startswith("num_"):
                    expected.add((task, dataset, config, raw["data"]["split"], key, value))
    return expected


def test_card_metadata_parses_back(carded_folder):
    card = ModelCard.load(carded_folder / "README.md")
    data = card.data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.license == "apache-2.0"
    assert {"proclip", "clip", "custom_code"} <= set(data.tags)
    # Only Hub ids (org/name) go to the metadata; the run's local folder and a local file are named in the text only.
    assert data.datasets == ["my-org/captions"]
    assert "`local_pairs.jsonl`" in card.text and "`pairs`" in card.text and "/data/" not in card.text
    # The widget shows an image of the model's own zero-shot data, shipped in the folder, with that data's classes.
    assert data.widget == [{"src": f"https://huggingface.co/{REPO_ID}/resolve/main/{EXAMPLE_IMAGE_FILE}",
                            "candidate_labels": "blue, green, red", "example_title": "Example"}]  # fmt: skip
    with Image.open(carded_folder / EXAMPLE_IMAGE_FILE) as image:  # the first image of the zero-shot data: blue/0.png
        assert image.getpixel((16, 16))[2] > 150
    # The tiny towers are local folders: no base_model, and the text says why.
    assert data.get("base_model") is None
    assert "lists only the towers that are Hub ids" in card.text
    assert data.metrics == ["accuracy", "recall"]
    assert data.model_name == "proclip-tiny"


def test_model_index_round_trips_the_results(carded_folder, results_files):
    parsed = ModelCard.load(carded_folder / "README.md").data.eval_results
    found = {
        (r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type, r.metric_value) for r in parsed
    }
    expected = _expected_scores(results_files)
    assert len(expected) == 3 + 2 * 6  # top-1, top-5, mean per-class; R@1/5/10 both ways for two columns
    assert found == expected
    assert len(parsed) == len(expected)


def test_results_reader_accepts_lists_and_per_class_lists(tmp_path):
    record = {"task": "zeroshot", "data": {"spec": "org/flowers:v2", "split": "test"},
              "protocol": {"class_names": ["rose", "tulip"]},
              "metrics": {"num_images": 4, "top1_accuracy": 0.5, "per_class_top1_accuracy": [1.0, 0.0]}}  # fmt: skip
    for payload in ([record, record], {"results": [record, record]}):
        path = tmp_path / "results.json"
        path.write_text(json.dumps(payload))
        evaluations = read_results(path)
        assert len(evaluations) == 2
        (first, _) = evaluations
        assert (first.dataset_id, first.dataset_config, first.is_hub_dataset) == ("org/flowers", "v2", True)
        assert first.scores == {"top1_accuracy": 0.5} and first.counts == {"num_images": 4}
        assert first.per_class == {"rose": 1.0, "tulip": 0.0}
    path.write_text(json.dumps({"task": "zeroshot"}))
    with pytest.raises(ValueError, match="no `metrics` object"):
        read_results(path)


def test_card_embeds_the_results_plot(carded_folder):
    readme = (carded_folder / "README.md").read_text()
    assert re.search(rf"!\[[^\]]*\]\({PLOT_FILE}\)", readme)
    with Image.open(carded_folder / PLOT_FILE) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 400


def test_card_has_the_training_recipe_of_the_run(carded_folder):
    """Read from the files the trainer itself wrote (training_args.json, the newest checkpoint's state, the report)."""
    text = ModelCard.load(carded_folder / "README.md").text
    report = json.loads((carded_folder / "training_report.json").read_text())
    assert "### Stage 2: contrastive tuning with self-distillation" in text
    assert "| distill_weight | 1 |" in text and "| learning_rate | 0.001 |" in text
    assert "| per_device_train_batch_size | 4 |" in text and "| seed | 1234 |" in text
    assert "| data | pairs |" in text  # a local folder, by its name
    assert "| optimizer steps | 2 |" in text  # checkpoint-2's trainer_state.json, not checkpoint-1's
    assert "`training_args.json`, `checkpoint-2/trainer_state.json`, `training_report.json`" in text
    contrastive = report["last_loss_components"]["contrastive"]
    assert f"| last_loss_components.contrastive | {contrastive:.4g} |" in text  # rounded as the tables are


def test_usage_snippets_run_against_the_tiny_folder(carded_folder, tmp_path):
    """The card's transformers and pipeline snippets, with the repo id and image URL pointed at local files, run
    where this project cannot be imported (remote code, offline). The sentence-transformers one is the lead's."""
    readme = (carded_folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 3 and "SentenceTransformer(" in blocks[2]
    example_url = f"https://huggingface.co/{REPO_ID}/resolve/main/{EXAMPLE_IMAGE_FILE}"
    code = "\n".join(blocks[:2]).replace(example_url, str(carded_folder / EXAMPLE_IMAGE_FILE))
    code = code.replace(REPO_ID, str(carded_folder))
    assert REPO_ID not in code and "https://" not in code

    result = run_python_without_project(code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probabilities, similarities, pipeline_output = result.stdout.strip().splitlines()[-3:]
    assert set(eval(probabilities)) == set(COLOURS)
    assert similarities.startswith("tensor([[")
    assert {row["label"] for row in eval(pipeline_output)} == set(COLOURS)


def test_base_model_keeps_hub_ids_and_card_without_results(tmp_path, tiny_proclip_dir):
    folder = tmp_path / "hub-towers"
    shutil.copytree(tiny_proclip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_name_or_path"] = "openai/clip-vit-base-patch32"
    (folder / "config.json").write_text(json.dumps(config))
    card, plot = build_model_card(folder)

    assert card.data.base_model == ["openai/clip-vit-base-patch32"]  # the text tower is a local folder
    assert "[openai/clip-vit-base-patch32](https://huggingface.co/openai/clip-vit-base-patch32)" in card.text
    local_text = config["text_name_or_path"]
    assert f"`{Path(local_text).name}`" in card.text and local_text not in card.text  # its name, never its path
    assert card.data.get("eval_results") is None and "model-index" not in str(card)
    assert plot is None and "has not been scored here" in card.text
    assert "No training record" in card.text
    assert "your-org/hub-towers" in card.text  # the default repo id in the snippets
    assert "transformers 4.51.3 to 4.57.x and 5.x" in card.text  # the range tests/integration/test_versions.py runs


def test_languages_come_from_the_text_towers_own_card(tmp_path, tiny_proclip_dir):
    """A tower's card that declares languages is believed; a tower without one gets no language claimed."""
    folder = tmp_path / "declared"
    shutil.copytree(tiny_proclip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    tower = Path(config["text_name_or_path"])
    assert text_tower_languages(folder) == [] and not (tower / "README.md").exists()
    card, _ = build_model_card(folder, plot=False)
    assert card.data.get("language") is None and "any language" not in card.text
    assert "read in the languages named in the text tower's own model card" in card.text

    declared = tmp_path / "tower"
    shutil.copytree(tower, declared)
    (declared / "README.md").write_text("---\nlanguage:\n- de\n- fr\n---\n# a tower\n")
    config["text_name_or_path"] = str(declared)
    (folder / "config.json").write_text(json.dumps(config))
    assert text_tower_languages(folder) == ["de", "fr"] and languages_phrase(["de", "fr"]) == "German, French"
    card, _ = build_model_card(folder, plot=False)
    assert card.data.language == ["de", "fr"] and "read in German, French" in card.text


def test_card_refuses_a_folder_that_is_not_proclip(tiny_clip_dir, tmp_path):
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip)
    with pytest.raises(ValueError, match="holds a 'clip' model, not a ProCLIP one"):
        build_model_card(clip)
    assert not (clip / "README.md").exists()


# The Hub's pipeline tags (huggingface.js packages/tasks/src/pipelines.ts, PIPELINE_DATA): a model-index task type
# or a pipeline_tag outside them is not a task the Hub knows.
HUB_PIPELINE_TAGS = frozenset("""
text-classification token-classification table-question-answering question-answering zero-shot-classification
translation summarization feature-extraction text-generation fill-mask sentence-similarity text-to-speech
text-to-audio automatic-speech-recognition audio-to-audio audio-classification audio-text-to-text
voice-activity-detection depth-estimation image-classification object-detection image-segmentation text-to-image
image-to-text image-to-image image-to-video unconditional-image-generation video-classification
reinforcement-learning robotics tabular-classification tabular-regression tabular-to-text table-to-text
multiple-choice text-ranking text-retrieval time-series-forecasting text-to-video image-text-to-text
visual-question-answering document-question-answering zero-shot-image-classification graph-ml mask-generation
zero-shot-object-detection text-to-3d image-to-3d image-feature-extraction video-text-to-text keypoint-detection
visual-document-retrieval any-to-any video-to-video other
""".split())


def assert_hub_metadata(readme: Path, base_model: list[str], languages: list[str], repo_id: str) -> dict:
    """The card's front matter as huggingface_hub reads it, held to the rules the Hub applies: known task types,
    Hub ids for base models and datasets, a widget with an image URL and the model's own labels."""
    from huggingface_hub import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results
    from huggingface_hub.utils import validate_repo_id

    metadata = metadata_load(readme)
    assert metadata["pipeline_tag"] in HUB_PIPELINE_TAGS
    _, results = model_index_to_eval_results(metadata["model-index"])
    assert results and {r.task_type for r in results} <= HUB_PIPELINE_TAGS, {r.task_type for r in results}
    assert metadata["base_model"] == base_model
    for repo in [*metadata["base_model"], *metadata.get("datasets", [])]:
        validate_repo_id(repo)
    assert metadata["language"] == languages
    (widget,) = metadata["widget"]
    assert widget["src"] == f"https://huggingface.co/{repo_id}/resolve/main/{EXAMPLE_IMAGE_FILE}"
    assert widget["candidate_labels"] and widget["example_title"]
    return metadata


def assert_fit_to_publish(card: ModelCard, machine_paths: list[str]) -> None:
    """What a published card must never show, whatever produced it."""
    text = str(card)
    for path in machine_paths:
        assert path not in text, f"the card publishes a path of this machine: {path}"
    assert "playing music" not in text and "cat-dog" not in text  # someone else's example
    assert "(unknown)" not in text and "templates (unknown" not in text
    # More than 5 significant digits in the text is an unrounded float (model-index keeps exact values).
    unrounded = re.findall(r".{0,40}\b\d+\.0*[1-9]\d{5,}", card.text)
    assert not unrounded, unrounded
    assert all(re.fullmatch(r"[\w.-]+/[\w.-]+(:[\w.-]+)?", d) for d in card.data.datasets or [])  # Hub ids only
    assert "| learning_rate |" in text and "| per_device_train_batch_size |" in text  # the recipe that ran


@pytest.mark.real_weights
def test_own_data_card_with_minilm_is_fit_to_publish(tmp_path, tiny_clip_dir, results_files):
    """A user's own run: real all-MiniLM-L6-v2 as text tower (an encoder), stages 1 and 2, evaluated, carded."""
    init, stage1, stage2 = tmp_path / "init", tmp_path / "stage1", tmp_path / "stage2"
    cli.main(["init", "--vision", str(tiny_clip_dir), "--text", str(minilm_folder()), "--out", str(init),
              "--adapter-expansion", "1"])  # fmt: skip
    pairs = results_files[0].parent / "pairs"
    train_run(init, pairs, stage1, 1, "--reduction", "mean")
    train_run(stage1, pairs, stage2, 2, "--distill_weight", "10")
    results = []
    templates = ["--templates", str(results_files[0].parent / "templates.txt")]
    for task, data, extra in (("zeroshot", "classes", templates), ("retrieval", "pairs", ["--caption-column", "long"])):
        results.append(tmp_path / f"{task}.json")
        cli.main(["eval", "--model", str(stage2), "--task", task, "--data", str(results_files[0].parent / data),
                  "--out", str(results[-1]), *extra])  # fmt: skip
    cli.main(["card", "--model", str(stage2), "--results", str(results[0]), "--results", str(results[1]),
              "--run", str(stage1), "--run", str(stage2), "--dataset", "my-pairs"])  # fmt: skip
    card = ModelCard.load(stage2 / "README.md")
    assert_fit_to_publish(card, [str(tmp_path), str(Path.home()), str(minilm_folder())])
    text = card.text
    assert "bert encoder" in text and "bidirectional attention (an encoder)" in text
    assert "causal" not in text and "decoder LLM" not in text and "The text tower is an LLM" not in text
    assert "### Stage 1: representation inheritance" in text and "| reduction | mean |" in text
    assert "2 prompt templates: `a photo of a {}.`, `a {} thing.`" in text  # the set used, named
    # No repo id given: the widget shows the example from the placeholder repo the snippets name (push warns).
    metadata = assert_hub_metadata(stage2 / "README.md", ["sentence-transformers/all-MiniLM-L6-v2"], ["en"],
                                   "your-org/stage2")
    assert metadata["widget"][0]["candidate_labels"] == "blue, green, red"  # the classes of its zero-shot data
    assert "read in English" in text and "any language" not in text
    assert (stage2 / EXAMPLE_IMAGE_FILE).is_file() and "my-pairs" in text and card.data.get("datasets") is None


@pytest.mark.real_weights
def test_quick_demo_card_is_fit_to_publish(quick_demo):
    out, _ = quick_demo
    card = ModelCard.load(out / "final" / "README.md")
    assert_fit_to_publish(card, [str(out.parent), str(Path.home())])
    labels = card.data.eval_results and {r.dataset_type for r in card.data.eval_results}
    assert labels and card.data.get("datasets") is None  # `synthetic-world` is named in the text, not as a Hub id
    assert "`synthetic-world`" in card.text and "bert encoder" in card.text and "decoder LLM" not in card.text
    metadata = assert_hub_metadata(out / "final" / "README.md", ["sentence-transformers/all-MiniLM-L6-v2"], ["en"],
                                   "your-org/proclip-demo")
    # The model's own labels: its zero-shot classes ("a red circle" in the prompts, "red circle" in the data).
    classes = json.loads((out / "final" / "eval_zeroshot.json").read_text())["protocol"]["class_names"]
    labels = metadata["widget"][0]["candidate_labels"].split(", ")
    assert len(labels) == 3 and {f"a {label}" for label in labels} <= set(classes), (labels, classes)
    assert "any language" not in card.text and "read in English" in card.text
    assert "5 prompt templates: `a photo of {}.`" in card.text or "5 prompt templates: `" in card.text
    assert (out / "final" / EXAMPLE_IMAGE_FILE).is_file()
