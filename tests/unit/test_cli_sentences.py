"""A sentence where a traceback was (issue 25 items 7 and 9): each case of the attack, run through `proclip` in this
process, exits 2 with what is wrong and the fix, and no traceback; zero-shot with one class warns."""

import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest
from proclip_train.cli import main
from proclip_train.evaluation.tasks import evaluate_zeroshot
from proclip_train.training.data import load_image_text_dataset


def run(capsys, *words) -> tuple[int, list[str]]:
    """`proclip WORDS` in this process: (exit code, the last two lines of stderr)."""
    with pytest.raises(SystemExit) as exited:
        main([str(word) for word in words])
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in lines), lines
    return exited.value.code, lines[-2:]


def write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(np.full((32, 32, 3), 120, dtype=np.uint8)).save(path)
    return path.name


def test_eval_with_no_readable_image(tiny_proclip_dir, tmp_path, capsys):
    """Old code: `ValueError: no readable image to evaluate` with its traceback."""
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = write_rows(tmp_path / "pairs.jsonl", [{"image": "broken.png", "caption": "a"}, {"image": "gone.png",
                                                                                           "caption": "b"}])
    code, error = run(capsys, "eval", "--model", tiny_proclip_dir, "--task", "retrieval", "--data", data)
    assert code == 2 and "None of the 2 images to evaluate could be read" in error[0], error
    assert error[1].startswith("Check the image column")


def test_eval_with_an_empty_label_column(tiny_proclip_dir, tmp_path, capsys):
    """Old code: a traceback ending "it is Value('float64')"."""
    data = write_rows(tmp_path / "pairs.jsonl", [{"image": image(tmp_path / f"{i}.png"), "label": None}
                                                 for i in range(2)])
    code, error = run(capsys, "eval", "--model", tiny_proclip_dir, "--task", "zeroshot", "--data", data)
    assert code == 2 and error[0].endswith("--label-column 'label' is empty: none of its 2 rows has a class name."), error
    assert error[1].startswith("Fill it with class names")


@pytest.mark.parametrize("weights", ["missing", "pickled"])
def test_eval_of_a_folder_without_safetensors_weights(weights, tiny_proclip_dir, tmp_path, capsys):
    """Old code: a traceback from `from_pretrained` (and a pickle is never to be loaded)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_proclip_dir, folder)
    (folder / "model.safetensors").unlink()
    if weights == "pickled":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that is never opened")
    data = write_rows(tmp_path / "pairs.jsonl", [{"image": image(tmp_path / "0.png"), "caption": "a"}])
    code, error = run(capsys, "eval", "--model", folder, "--task", "retrieval", "--data", data)
    assert code == 2, error
    expected = "holds its weights as pytorch_model.bin, a pickle" if weights == "pickled" else "has no model.safetensors"
    assert expected in error[0], error


def test_eval_of_a_config_that_does_not_fit_the_weights(tiny_proclip_dir, tmp_path, capsys):
    """Old code: a table of mismatched shapes, then a traceback allocating 256 GB."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_proclip_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["hidden_size"] = 10**9
    (folder / "config.json").write_text(json.dumps(config))
    data = write_rows(tmp_path / "pairs.jsonl", [{"image": image(tmp_path / "0.png"), "caption": "a"}])
    code, error = run(capsys, "eval", "--model", folder, "--task", "retrieval", "--data", data)
    assert code == 2 and "its weights do not fit its config.json" in error[0], error
    assert "config gives [" in error[0] and "1000000000" in error[0]
    assert error[1].startswith("The config.json was edited")


@pytest.mark.parametrize("case", ["csv-inside", "broken-line"])
def test_a_jsonl_that_is_not_json_names_file_line_and_fix(case, tmp_path):
    """Old code: "JSON parse error: Invalid value. in row 0" / "... in row 4" (0-based rows of a block, no file)."""
    path = tmp_path / "pairs.jsonl"
    if case == "csv-inside":
        path.write_text("image,caption\na.png,a cat\n")
        where, what = "line 1, column 1", "this looks like a CSV header; if the file is CSV, name it .csv"
    else:
        path.write_text("".join(json.dumps({"caption": c}) + "\n" for c in "abcd") + '{"caption": "e\n')
        where, what = "line 5, column 13", "repair or remove the line"
    with pytest.raises(ValueError) as refused:
        load_image_text_dataset(str(path), caption_columns="caption")
    assert str(refused.value).startswith(f"{path}, {where}: not a JSON object (")
    assert what in str(refused.value)


def test_an_imagefolder_without_its_images_says_they_are_missing(tmp_path):
    """Old code: "image column 'image' not found"."""
    write_rows(tmp_path / "data" / "metadata.jsonl", [{"file_name": "0001.png", "caption": "a cat"}])
    with pytest.raises(ValueError, match="the images of .* are missing: its metadata names them in file_name"):
        load_image_text_dataset(str(tmp_path / "data"), image_column="image", caption_columns="caption")


def test_zeroshot_with_one_class_warns(tmp_path, caplog, tiny_proclip_dir):
    """Old code: top-1 1.0 without a word."""
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    write_rows(tmp_path / "pairs.jsonl", [{"image": image(tmp_path / f"{i}.png"), "label": "cat"} for i in range(2)])
    dataset = load_image_text_dataset(str(tmp_path / "pairs.jsonl"), image_column="image", label_column="label")
    model, processor = ProCLIPModel.from_pretrained(tiny_proclip_dir), ProCLIPProcessor.from_pretrained(tiny_proclip_dir)
    with caplog.at_level(logging.WARNING):
        outcome = evaluate_zeroshot(model, processor, dataset, "image", "label", templates=["a photo of a {}."])
    assert outcome["metrics"]["top1_accuracy"] == 1.0
    assert "Zero-shot with one class ('cat'): every image is assigned to it, so top-1 accuracy is 1.0 by " \
           "construction" in caplog.text


def test_no_progress_leaves_the_callers_environment_as_it_was(tmp_path, capsys, monkeypatch):
    """`--no-progress` quiets bars through the environment while the command runs; `main` called in a process that
    goes on (this one) must not leave them quiet, nor lose a value the caller had set."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    code, lines = run(capsys, "eval", "--model", tmp_path / "missing", "--data", tmp_path, "--no-progress")
    assert code == 2 and "no such folder" in lines[0], lines
    assert "TQDM_DISABLE" not in os.environ and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "0"
