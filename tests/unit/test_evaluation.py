"""`proclip eval` on a tiny exported model and tiny image folders, against an independent computation here.

The independent side calls only the model, its processor and plain Python: no `proclip_train.evaluation.metrics`.
"""

import io
import json
import shlex
import shutil
import sys
import tarfile

import datasets
import pytest
import torch
from PIL import Image
from proclip_train import cli
from proclip_train.evaluation.tasks import default_split, load_eval_dataset
from proclip_train.evaluation.templates import OPENAI_IMAGENET_TEMPLATES
from proclip_train.training.images import decode_image

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def _save_image(path, colour, seed):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(-40, 40, (32, 32, 3), generator=generator)
    pixels = (torch.tensor(colour).view(1, 1, 3) + noise).clamp(0, 255).to(torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)


def _run_cli(monkeypatch, args):
    monkeypatch.setattr(sys, "argv", ["proclip", *args])
    cli.main(args)


@torch.inference_mode()
def _reference_embeddings(model_dir, images, texts):
    """Unit-norm embeddings: images one at a time, texts in one batch in their given order (the runner batches
    both its own way, texts sorted by length)."""
    model = ProCLIPModel.from_pretrained(model_dir).eval()
    processor = ProCLIPProcessor.from_pretrained(model_dir)

    def unit(vector):
        return vector / vector.norm()

    image_embeds = [unit(model.get_image_features(**processor(images=[image])).pooler_output[0]) for image in images]
    encoded = processor(text=texts)
    text_embeds = model.get_text_features(encoded["input_ids"], encoded["attention_mask"]).pooler_output
    return image_embeds, [unit(vector) for vector in text_embeds]


def _reference_rank(scores, correct):
    """How many wrong items score at least as high as the best correct one (ties count against the query)."""
    best = max(scores[item] for item in correct)
    return sum(1 for item, score in enumerate(scores) if item not in correct and score >= best)


def _dot(a, b):
    return float((a * b).sum())


# -- retrieval ---------------------------------------------------------------------------------------------------


@pytest.fixture
def retrieval_folder(tmp_path):
    """Five images with a list column (several captions) and a string column (1:1), plus three bad rows."""
    folder = tmp_path / "retrieval"
    rows = [
        ("red.png", "red", ["a red square", "a crimson tile"], "a large red square with rough, noisy edges"),
        ("green.png", "green", ["a green field", "", "grass"], "a green patch that fills the whole picture"),
        ("blue.png", "blue", ["a blue sky"], "a blue square, darker near the bottom"),
        ("yellow.png", "yellow", ["a yellow lemon", "sunlight", "a banana"], "yellow light on a plain wall"),
        ("red2.png", "red", ["a red apple", "a tomato"], "a red fruit seen from above"),
        ("blank.png", "blue", ["a blue box"], "   "),  # empty long caption: the row is skipped
        ("nothing.png", "green", ["", ""], "a caption without usable short captions"),  # skipped
    ]
    metadata = []
    for seed, (name, colour, captions, long_caption) in enumerate(rows):
        _save_image(folder / name, COLOURS[colour], seed)
        metadata.append({"file_name": name, "caption": captions, "long": long_caption})
    (folder / "broken.png").write_bytes(b"not a png at all")  # unreadable: skipped
    metadata.append({"file_name": "broken.png", "caption": ["a broken file"], "long": "a broken file"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in metadata) + "\n")
    return folder, rows[:5]


def test_eval_retrieval_matches_an_independent_computation(monkeypatch, tmp_path, tiny_proclip_dir, retrieval_folder):
    folder, kept = retrieval_folder
    out = tmp_path / "results.json"
    args = ["eval", "--model", str(tiny_proclip_dir), "--task", "retrieval", "--data", str(folder),
            "--caption-column", "caption", "--caption-column", "long", "--out", str(out),
            "--batch-size", "3", "--chunk-size", "2"]  # fmt: skip
    _run_cli(monkeypatch, args)
    results = json.loads(out.read_text())

    assert results["task"] == "retrieval"
    assert results["model"] == str(tiny_proclip_dir.resolve())
    assert results["data"]["spec"] == str(folder.resolve())
    assert results["data"]["split"] == "train"
    assert results["data"]["num_rows"] == 8
    assert results["data"]["skipped_rows"] == {"empty_caption": 2, "unreadable_image": 1}
    assert results["data"]["num_rows_evaluated"] == len(kept) == 5  # the rows scored, not the 8 read
    assert results["data"]["dropped_empty_captions"] == 1
    assert results["command"] == shlex.join(["proclip", *args])
    assert results["protocol"]["caption_columns"]["long"] == "1:1"
    assert results["protocol"]["caption_columns"]["caption"].startswith("several captions per image")
    assert results["timestamp"]

    images = [Image.open(folder / name).convert("RGB") for name, *_ in kept]
    short_captions = [(image, caption) for image, (_, _, captions, _) in enumerate(kept) for caption in captions if caption]
    long_captions = [(image, row[3]) for image, row in enumerate(kept)]
    for column, pairs in (("caption", short_captions), ("long", long_captions)):
        image_embeds, text_embeds = _reference_embeddings(tiny_proclip_dir, images, [text for _, text in pairs])
        owners = [owner for owner, _ in pairs]
        similarity = [[_dot(image, text) for text in text_embeds] for image in image_embeds]
        image_ranks = [
            _reference_rank(similarity[image], {t for t, owner in enumerate(owners) if owner == image})
            for image in range(len(images))
        ]
        text_ranks = [_reference_rank([row[t] for row in similarity], {owners[t]}) for t in range(len(pairs))]
        expected = {"num_images": 5, "num_captions": len(pairs)}
        for k in (1, 5, 10):
            expected[f"image_to_text_R@{k}"] = sum(rank < k for rank in image_ranks) / len(image_ranks)
            expected[f"text_to_image_R@{k}"] = sum(rank < k for rank in text_ranks) / len(text_ranks)
        assert results["metrics"][column] == pytest.approx(expected), column


# -- zero-shot ---------------------------------------------------------------------------------------------------


@pytest.fixture
def class_folder(tmp_path):
    """Three classes, two images each, one of them with an underscore in its name, plus an unreadable file."""
    folder = tmp_path / "classes"
    for class_index, (name, colour) in enumerate((("red_square", "red"), ("green", "green"), ("blue_sky", "blue"))):
        for image in range(2):
            _save_image(folder / name / f"{image}.png", COLOURS[colour], 10 * class_index + image)
    (folder / "green" / "broken.png").write_bytes(b"\x89PNG truncated")
    return folder


@pytest.mark.parametrize("custom_templates", [False, True], ids=["openai-80", "templates-file"])
def test_eval_zeroshot_matches_an_independent_computation(
    monkeypatch, tmp_path, tiny_proclip_dir, class_folder, custom_templates
):
    out = tmp_path / "zeroshot.json"
    args = ["eval", "--model", str(tiny_proclip_dir), "--task", "zeroshot", "--data", str(class_folder),
            "--out", str(out), "--batch-size", "4", "--chunk-size", "1"]  # fmt: skip
    templates = list(OPENAI_IMAGENET_TEMPLATES)
    if custom_templates:
        templates = ["a photo of a {}.", "{}, seen from far away"]
        template_file = tmp_path / "templates.txt"
        template_file.write_text("# mine\n" + "\n".join(templates) + "\n\n")
        args += ["--templates", str(template_file)]
    _run_cli(monkeypatch, args)
    results = json.loads(out.read_text())

    names = ["blue sky", "green", "red square"]  # imagefolder sorts the folders; underscores become spaces
    assert results["protocol"]["class_names"] == names
    assert results["protocol"]["num_templates"] == len(templates)
    # OpenAI's set by name; any other set as the templates themselves (what a model card shows of the protocol).
    expected_templates = templates if custom_templates else "openai_imagenet_80"
    assert results["protocol"]["templates"] == expected_templates
    assert results["data"]["skipped_rows"] == {"missing_label": 0, "unreadable_image": 1}
    assert results["data"]["num_rows_evaluated"] == results["metrics"]["num_images"] == 6  # scored, not the 7 read
    assert results["command"] == shlex.join(["proclip", *args])

    folders = ["blue_sky", "green", "red_square"]
    labelled = [(label, class_folder / folder / f"{image}.png") for label, folder in enumerate(folders) for image in range(2)]
    prompts = [template.format(name) for name in names for template in templates]
    image_embeds, prompt_embeds = _reference_embeddings(tiny_proclip_dir, [Image.open(p).convert("RGB") for _, p in labelled], prompts)
    class_vectors = []
    for c in range(len(names)):
        mean = torch.stack(prompt_embeds[c * len(templates) : (c + 1) * len(templates)]).mean(dim=0)
        class_vectors.append(mean / mean.norm())
    ranks = [_reference_rank([_dot(image, vector) for vector in class_vectors], {label})
             for image, (label, _) in zip(image_embeds, labelled)]  # fmt: skip
    per_class = {name: sum(ranks[2 * c + i] < 1 for i in range(2)) / 2 for c, name in enumerate(names)}

    metrics = results["metrics"]
    assert metrics["num_images"] == 6 and metrics["num_classes"] == 3
    assert metrics["top1_accuracy"] == pytest.approx(sum(rank < 1 for rank in ranks) / 6)
    assert metrics["top5_accuracy"] == 1.0  # three classes
    assert metrics["per_class_top1_accuracy"] == pytest.approx(per_class)
    assert metrics["mean_per_class_top1_accuracy"] == pytest.approx(sum(per_class.values()) / 3)


# -- data specs --------------------------------------------------------------------------------------------------


def test_csv_spec_resolves_image_paths_relative_to_the_file(tmp_path):
    data_dir = tmp_path / "data"
    _save_image(data_dir / "images" / "a.png", COLOURS["red"], 0)
    (data_dir / "pairs.csv").write_text("path,text\nimages/a.png,a red square\n")
    dataset, split, num_rows = load_eval_dataset(str(data_dir / "pairs.csv"), image_column="path")
    assert (split, num_rows, dataset["text"]) == ("train", 1, ["a red square"])
    assert decode_image(dataset[0]["path"]).size == (32, 32)
    with pytest.raises(ValueError, match="no split 'test'"):
        load_eval_dataset(str(data_dir / "pairs.csv"), split="test")


def test_the_default_split_is_the_only_one_else_test(monkeypatch, retrieval_folder):
    assert default_split(retrieval_folder[0]) == "train"  # a folder without split names holds one split
    listed = {"someone/one": ["validation"], "someone/three": ["train", "validation", "test"]}
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda path, config_name=None, **kwargs: listed[path])
    assert (default_split("someone/one"), default_split("someone/three")) == ("validation", "test")


def test_a_missing_column_is_a_user_error_with_exit_code_2(monkeypatch, tmp_path, tiny_proclip_dir, retrieval_folder, capsys):
    folder, _ = retrieval_folder
    with pytest.raises(SystemExit) as exit_info:
        _run_cli(monkeypatch, ["eval", "--model", str(tiny_proclip_dir), "--task", "retrieval", "--data", str(folder),
                               "--caption-column", "captoin", "--out", str(tmp_path / "r.json")])
    assert exit_info.value.code == 2
    assert "caption column 'captoin' not found" in capsys.readouterr().err


# -- every layout `proclip train --data` reads ---------------------------------------------------------------------


def _metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _jsonl_glob(tmp_path, folder):
    """The rows split over two jsonl files in two folders, image paths relative to each file's folder (the images sit
    beside the two folders, inside the data folder `parts/` they share)."""
    shutil.copytree(folder, tmp_path / "parts" / "images", ignore=shutil.ignore_patterns("*.jsonl"))
    for part, rows in (("a", _metadata(folder)[:4]), ("b", _metadata(folder)[4:])):
        (tmp_path / "parts" / part).mkdir(parents=True)
        lines = [json.dumps({"image": f"../images/{row['file_name']}", "caption": row["caption"],
                             "long": row["long"]}) for row in rows]  # fmt: skip
        (tmp_path / "parts" / part / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "parts" / "*" / "*.jsonl"), ["--image-column", "image"]


def _parquet(tmp_path, folder):
    """One parquet file holding the image bytes in an `Image` column, as Hub datasets store them."""
    rows = _metadata(folder)
    table = {"image": [{"bytes": (folder / row["file_name"]).read_bytes(), "path": None} for row in rows],
             "caption": [row["caption"] for row in rows], "long": [row["long"] for row in rows]}  # fmt: skip
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string")), "long": datasets.Value("string")}
    )
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(tmp_path / "pairs.parquet"))
    return str(tmp_path / "pairs.parquet"), ["--image-column", "image"]


def _webdataset(tmp_path, folder):
    """Two webdataset shards: `KEY.png` and `KEY.txt` (the long caption) per row; the list column has no member."""
    rows = _metadata(folder)
    (tmp_path / "shards").mkdir()
    for shard, chunk in enumerate((rows[:3], rows[3:])):
        with tarfile.open(tmp_path / "shards" / f"shard-{shard}.tar", "w") as tar:
            for row in chunk:
                key = row["file_name"].removesuffix(".png")
                for suffix, payload in (("png", (folder / row["file_name"]).read_bytes()), ("txt", row["long"].encode())):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(tmp_path / "shards" / "*.tar"), ["--image-column", "png"]


@pytest.mark.parametrize("layout", [_jsonl_glob, _parquet, _webdataset], ids=["jsonl-glob", "parquet", "webdataset"])
def test_eval_reads_what_training_reads_with_the_same_results(monkeypatch, tmp_path, tiny_proclip_dir, retrieval_folder, layout):
    """The same rows as a glob of jsonl files, a parquet file with image bytes, or webdataset shards score exactly as
    the imagefolder does (which `test_eval_retrieval_matches_an_independent_computation` checks by hand)."""
    folder, _ = retrieval_folder
    spec, image_args = layout(tmp_path, folder)
    columns = [("long", "txt")] if layout is _webdataset else [("caption", "caption"), ("long", "long")]
    results = {}
    for name, data, args in (("folder", str(folder), []), ("layout", spec, image_args)):
        out = tmp_path / f"{name}.json"
        caption_args = [word for folder_column, layout_column in columns
                        for word in ("--caption-column", layout_column if name == "layout" else folder_column)]  # fmt: skip
        _run_cli(monkeypatch, ["eval", "--model", str(tiny_proclip_dir), "--task", "retrieval", "--data", data,
                               *args, *caption_args, "--out", str(out), "--batch-size", "3"])  # fmt: skip
        results[name] = json.loads(out.read_text())
    folder_results, layout_results = results["folder"], results["layout"]
    assert layout_results["data"]["split"] == "train" and layout_results["data"]["num_rows"] == 8
    assert layout_results["data"]["skipped_rows"] == folder_results["data"]["skipped_rows"]
    for folder_column, layout_column in columns:
        assert layout_results["metrics"][layout_column] == pytest.approx(folder_results["metrics"][folder_column])


def test_streaming_eval_reads_only_the_rows_it_scores(monkeypatch, tmp_path, tiny_proclip_dir, retrieval_folder):
    folder, _ = retrieval_folder
    spec, image_args = _webdataset(tmp_path, folder)
    dataset, split, num_rows = load_eval_dataset(spec, streaming=True, max_samples=4, image_column="png",
                                                 caption_columns=["txt"])  # fmt: skip
    assert isinstance(dataset, datasets.Dataset) and (len(dataset), split, num_rows) == (4, "train", None)
    assert dataset.features["png"] == datasets.Image(decode=False)
    out = tmp_path / "streamed.json"
    _run_cli(monkeypatch, ["eval", "--model", str(tiny_proclip_dir), "--task", "retrieval", "--data", spec, *image_args,
                           "--caption-column", "txt", "--streaming", "--max-samples", "4", "--out", str(out)])  # fmt: skip
    data = json.loads(out.read_text())["data"]
    assert (data["num_rows"], data["num_rows_evaluated"]) == (None, 4)
