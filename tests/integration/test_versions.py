"""The remote code of a checkpoint folder on every transformers version its users' tools run (issue 23 item 2).

The Inference Endpoints toolkit pins transformers 4.51.3, optimum installs 4.57.x, and this project trains with
5.x. An exported tiny folder is loaded through `trust_remote_code=True` alone (`AutoModel`, `AutoProcessor`,
`pipeline("zero-shot-image-classification")`, the Endpoints handler) in an isolated environment per version
(`tests/venvs.py`: the same torch build, no ProCLIP), and its answers must equal those of transformers 5 in this
Python's interpreter, run the same way.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llm
from isolation import run_without_project
from PIL import Image
from venvs import REMOTE_CODE_REQUIREMENTS, TRANSFORMERS_VERSIONS, venv_python_or_skip

TOLERANCE = 1e-5
OUTPUTS_SCRIPT = Path(__file__).with_name("remote_code_outputs.py")


def remote_code_outputs(python, image: Path, folders: list[Path]) -> dict:
    """`remote_code_outputs.py` run by `python` where ProCLIP cannot be imported: its JSON answer."""
    return run_without_project(OUTPUTS_SCRIPT.read_text(), timeout=600, args=[image, *folders], python=python)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_clip_dir) -> list[Path]:
    """Two exported tiny folders: a causal Llama tower with a rotary base other than the class default (which
    transformers 4 reads under another key), and an LLM2CLIP-style one (bidirectional, left padding, instruction)."""
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    llm = build_tiny_llm(tmp_path_factory.mktemp("llm_rope"), rope_theta=500.0)
    built = []
    for name, settings in {
        "causal": {},
        "bidirectional": {"bidirectional": True, "padding_side": "left", "instruction": "Retrieve the image: "},
    }.items():
        out = tmp_path_factory.mktemp(name)
        torch.manual_seed(0)
        model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=llm, adapter_expansion=2, **settings)
        torch.nn.init.normal_(model.text_adapter.proj.bias, std=0.1)  # no zero weights that would hide a difference
        model.save_pretrained(out)
        ProCLIPProcessor.from_towers(tiny_clip_dir, llm, model.config).save_pretrained(out)
        built.append(out)
    return built


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("image") / "image.png"
    pixels = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 256, (40, 56, 3), generator=pixels, dtype=torch.uint8).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def reference(folders, image) -> dict:
    """What transformers 5 (this Python's) answers through the same remote code."""
    return remote_code_outputs(sys.executable, image, folders)


def max_abs_diff(a, b) -> float:
    return (torch.tensor(a) - torch.tensor(b)).abs().max().item()


def assert_same_ranking(answer: list[dict], expected: list[dict], what: str) -> None:
    assert [row["label"] for row in answer] == [row["label"] for row in expected], what
    for row, want in zip(answer, expected):
        assert math.isclose(row["score"], want["score"], abs_tol=TOLERANCE), f"{what}: {row} vs {want}"


@pytest.mark.parametrize("version", TRANSFORMERS_VERSIONS)
def test_remote_code_answers_as_on_transformers_5(version, folders, image, reference):
    python = venv_python_or_skip((f"transformers=={version}", *REMOTE_CODE_REQUIREMENTS))
    answer = remote_code_outputs(python, image, folders)
    assert answer["transformers"] == version and answer["torch"] == torch.__version__
    assert reference["transformers"].startswith("5.")
    for folder, got, want in zip(folders, answer["folders"], reference["folders"]):
        assert got["classes"] == ["transformers_modules"] * 2, f"{folder.name}: not loaded from the folder's code"
        for key in ("logits_per_image", "text_embeds", "image_embeds"):
            assert max_abs_diff(got[key], want[key]) <= TOLERANCE, f"{folder.name} {key} on transformers {version}"
        assert_same_ranking(got["pipeline"], want["pipeline"], f"{folder.name} pipeline on {version}")
        assert_same_ranking(got["handler"], want["handler"], f"{folder.name} handler on {version}")
