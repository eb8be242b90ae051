"""`proclip card` on the tiny exported folder, with results written by the real `proclip eval`.

Expectations are built from the results JSON as written, not through the card module's own reader.
"""

import json
import re
import shutil

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from proclip_train import cli
from proclip_train.hub.card import (
    EXAMPLE_IMAGE_URL,
    PLOT_FILE,
    build_model_card,
    read_results,
)
from proclip_train.hub.push import run_python_without_project

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


@pytest.fixture(scope="module")
def carded_folder(tmp_path_factory, tiny_proclip_dir, results_files):
    """A copy of the tiny folder with the records a training run leaves, and its card written by `proclip card`."""
    folder = tmp_path_factory.mktemp("carded") / "proclip-tiny"
    shutil.copytree(tiny_proclip_dir, folder)
    (folder / "proclip_arguments.json").write_text(json.dumps({
        "stage": "2", "model": "runs/stage1", "data": "my-org/captions", "config": None, "caption_column": ["caption"],
        "distill_weight": 1.0,
    }))  # fmt: skip
    (folder / "training_args.json").write_text(json.dumps({"learning_rate": 3e-05, "seed": 1234, "bf16": False}))
    (folder / "checkpoint-5").mkdir()  # older: "checkpoint-5" sorts after "checkpoint-40" as text, not as a step
    (folder / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5, "log_history": []}))
    (folder / "checkpoint-40").mkdir()
    (folder / "checkpoint-40" / "trainer_state.json").write_text(json.dumps({
        "global_step": 40, "epoch": 2.0, "train_batch_size": 8,
        "log_history": [{"loss": 2.5, "step": 20}, {"loss": 1.7654, "step": 40}, {"train_runtime": 12.0, "step": 40}],
    }))  # fmt: skip
    (folder / "training_report.json").write_text(json.dumps({
        "stage": "contrastive", "global_step": 40, "train_loss": 1.9,
        "skipped": {"corrupt_image": 3}, "last_loss_components": {"info_nce": 1.5, "self_distillation": 0.26},
    }))  # fmt: skip
    cli.main(["card", "--model", str(folder), "--repo-id", REPO_ID, "--dataset", "/data/local_pairs.jsonl",
              "--results", str(results_files[0]),
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
            task = "image-text-retrieval"
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
    assert data.datasets == ["my-org/captions"]  # from proclip_arguments.json; the local file is in the text only
    assert "`/data/local_pairs.jsonl`" in card.text
    assert data.widget == [{"src": EXAMPLE_IMAGE_URL, "candidate_labels": "playing music, playing sports",
                            "example_title": "Example"}]  # fmt: skip
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
    text = ModelCard.load(carded_folder / "README.md").text
    assert "### Stage 2: contrastive tuning with self-distillation" in text
    assert "| distill_weight | 1.0 |" in text and "| config |" not in text  # proclip_arguments.json
    assert "| learning_rate | 3e-05 |" in text  # training_args.json
    assert "| optimizer steps | 40 |" in text  # the newest checkpoint's trainer_state.json
    assert "`proclip_arguments.json`, `training_args.json`, `checkpoint-40/trainer_state.json`" in text
    assert "| last logged training loss | 1.765 |" in text
    assert "| last_loss_components.self_distillation | 0.26 |" in text  # training_report.json


def test_usage_snippets_run_against_the_tiny_folder(carded_folder, tmp_path):
    """The card's transformers and pipeline snippets, with the repo id and image URL pointed at local files, run
    where this project cannot be imported (remote code, offline). The sentence-transformers one is the lead's."""
    readme = (carded_folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert len(blocks) == 3 and "SentenceTransformer(" in blocks[2]
    image = tmp_path / "example.png"
    _save_image(image, COLOURS["red"], 0)
    code = "\n".join(blocks[:2]).replace(REPO_ID, str(carded_folder)).replace(EXAMPLE_IMAGE_URL, str(image))
    assert REPO_ID not in code and "https://" not in code

    result = run_python_without_project(code, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    probabilities, similarities, pipeline_output = result.stdout.strip().splitlines()[-3:]
    assert set(eval(probabilities)) == {"playing music", "playing sports"}
    assert similarities.startswith("tensor([[")
    assert {row["label"] for row in eval(pipeline_output)} == {"playing music", "playing sports"}


def test_base_model_keeps_hub_ids_and_card_without_results(tmp_path, tiny_proclip_dir):
    folder = tmp_path / "hub-towers"
    shutil.copytree(tiny_proclip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_name_or_path"] = "openai/clip-vit-base-patch32"
    (folder / "config.json").write_text(json.dumps(config))
    card, plot = build_model_card(folder)

    assert card.data.base_model == ["openai/clip-vit-base-patch32"]  # the text tower is a local folder
    assert f"`{config['text_name_or_path']}`" in card.text
    assert card.data.get("eval_results") is None and "model-index" not in str(card)
    assert plot is None and "has not been scored here" in card.text
    assert "No training record" in card.text
    assert "your-org/hub-towers" in card.text  # the default repo id in the snippets
