"""Poisoned weights are never scored, exported or published (issue 25 item 2): one NaN in the adapter of a saved
folder made `proclip eval` exit 0 with R@1 0.0 / R@5 1.0 and `proclip export` leave its NaN ONNX files for `push`.
Every command that uses a saved folder refuses it in two lines naming the tensor (`training.finite`), and a failed
export leaves the folder as it was (`training.staged_folder`)."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from proclip_train.cli import main
from proclip_train.training.finite import (
    NonFiniteError,
    NonFiniteWeightsError,
    require_finite_embeddings,
    require_finite_folder,
)
from proclip_train.training.saved_weights import SavedWeights
from proclip_train.training.staged_folder import staged_folder
from safetensors.torch import load_file, save_file

POISONED = "text_adapter.proj.weight"


@pytest.fixture
def poisoned(tiny_proclip_dir, tmp_path):
    """A copy of the tiny ProCLIP folder, with a model card, and one NaN in its adapter's weights."""
    folder = tmp_path / "poisoned"
    shutil.copytree(tiny_proclip_dir, folder)
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags: [proclip]\n---\n# poisoned\n")
    weights = load_file(folder / "model.safetensors")
    assert POISONED in weights
    weights[POISONED][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture
def pairs(tmp_path):
    """`data/pairs.jsonl`: three images inside the folder and a caption each."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for index, colour in enumerate(((200, 30, 30), (20, 40, 220), (30, 200, 30))):
        PIL.Image.fromarray(np.full((32, 32, 3), colour, dtype=np.uint8)).save(data / f"{index}.png")
        rows.append({"image": f"{index}.png", "caption": f"a square number {index}"})
    (data / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data / "pairs.jsonl"


def test_the_check_names_the_tensor_in_two_lines(poisoned, tiny_proclip_dir):
    require_finite_folder(tiny_proclip_dir)  # the clean folder passes
    with pytest.raises(NonFiniteWeightsError) as refused:
        require_finite_folder(poisoned)
    problem, fix = str(refused.value).split("\n")
    assert problem == f"{poisoned} cannot be used: 1 of {len(SavedWeights(poisoned))} tensors hold NaN or infinite " \
                      f"values ({POISONED})."
    assert fix.startswith("Nothing is evaluated, exported or published from such weights")


def test_embeddings_are_checked_by_row(tiny_proclip_dir):
    embeds = torch.zeros(4, 3)
    embeds[2, 1] = float("inf")
    with pytest.raises(NonFiniteError, match=r"The image embeddings: 1 of 4 embeddings hold NaN or infinite values "
                       r"\(rows 12\)\.\nThe model overflows on them"):
        require_finite_embeddings(embeds, "The image embeddings", rows=[10, 11, 12, 13])


def run(capsys, *words) -> tuple[int, list[str]]:
    """`proclip WORDS` in this process: (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exited:
        main([str(word) for word in words])
    return exited.value.code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("command", ["eval", "export", "card", "space", "push"])
def test_every_command_that_uses_the_folder_refuses_it(command, poisoned, pairs, tmp_path, capsys):
    """Old code: eval exited 0 (R@1 0.0, R@5 1.0); export wrote NaN ONNX files; card, space and push went on."""
    results = tmp_path / "results.json"
    line = {
        "eval": ["eval", "--model", poisoned, "--task", "retrieval", "--data", pairs, "--out", results],
        "export": ["export", "--format", "onnx", "--model", poisoned],
        "card": ["card", "--model", poisoned],
        "space": ["space", "--model", poisoned, "--out", tmp_path / "space"],
        "push": ["push", "--model", poisoned, "--repo-id", "me/poisoned", "--dry-run"],
    }[command]
    before = sorted(path.name for path in poisoned.iterdir())
    card = (poisoned / "README.md").read_text()
    code, lines = run(capsys, *line)
    error = lines[-2:]  # after the data loader's progress bars
    assert code == 2 and not any("Traceback" in line for line in lines), lines
    assert "1 of" in error[0] and f"hold NaN or infinite values ({POISONED})" in error[0], error
    assert error[1].startswith("Nothing is evaluated, exported or published")
    assert sorted(path.name for path in poisoned.iterdir()) == before  # no onnx/, nothing hidden
    assert (poisoned / "README.md").read_text() == card
    assert not results.exists() and not (tmp_path / "space").exists()


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "onnx"
    target.mkdir()
    (target / "old.onnx").write_text("old")
    with pytest.raises(KeyboardInterrupt), staged_folder(target) as staging:
        (staging / "new.onnx").write_text("half")
        raise KeyboardInterrupt  # Ctrl-C, or a failed check, mid-write
    assert sorted(path.name for path in tmp_path.iterdir()) == ["onnx"]
    assert [path.name for path in target.iterdir()] == ["old.onnx"]
    with staged_folder(target) as staging:
        (staging / "new.onnx").write_text("new")
        assert [path.name for path in target.iterdir()] == ["old.onnx"]  # readers see the old files meanwhile
    assert sorted(path.name for path in tmp_path.iterdir()) == ["onnx"]
    assert [path.name for path in target.iterdir()] == ["new.onnx"]
