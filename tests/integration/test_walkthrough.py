"""README's own-data walk-through, run line by line as written (init -> embed -> train 1 -> train 2 -> eval -> card ->
push --dry-run) on a tiny image-caption folder, with a tiny CLIP as the demo folder's teacher and the packaged real
MiniLM as the text tower; then the messages that training gives instead of silently running slow or misaligned.

Only the step counts and batch size are appended to the train lines (argparse keeps the last value), so that the
walk-through takes seconds.
"""

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import require_package
from PIL import Image
from proclip_train.cli import main
from proclip_train.hub.build.init import UNTRAINED_ADAPTER_FILE
from proclip_train.training.registry import MINILM

README = Path(__file__).resolve().parents[2] / "README.md"
FAST_TRAINING = ["--max-steps", "3", "--per-device-train-batch-size", "8", "--logging-steps", "1"]
COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (20, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle", "star", "cross")

pytestmark = pytest.mark.real_weights


def walkthrough_lines() -> list[list[str]]:
    """The words of each `proclip` line between README's walk-through markers (comments dropped)."""
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", README.read_text(), re.S)
    assert block, "README.md has no walk-through block"
    lines = [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
    assert all(words[0] == "proclip" for words in lines)
    return [words[1:] for words in lines]


def write_pairs(folder: Path, count: int = 16) -> Path:
    """An imagefolder of noisy flat-colour images with `metadata.jsonl` captions."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        colour, shape = list(COLOURS)[index % 4], SHAPES[index // 4 % 4]
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.png")
        rows.append({"file_name": f"{index:04d}.png", "caption": f"a {colour} {shape} number {index}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@pytest.fixture(scope="module")
def walked(tmp_path_factory, tiny_clip_dir):
    """A folder where README's walk-through ran: (folder, {verb or 'train 1'/'train 2': captured output})."""
    require_package(MINILM.package, MINILM.distribution)
    root = tmp_path_factory.mktemp("walkthrough")
    shutil.copytree(tiny_clip_dir, root / "proclip_demo_quick" / "teacher")  # what `proclip demo --quick` leaves
    write_pairs(root / "my_pairs")
    outputs = {}
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for words in walkthrough_lines():
            name = words[0] if words[0] != "train" else f"train {words[words.index('--stage') + 1]}"
            extra = FAST_TRAINING if words[0] == "train" else []
            result = subprocess.run([sys.executable, "-m", "proclip_train.cli", *words, *extra, "--no-progress"],
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"proclip {shlex.join(words)}:\n{result.stderr[-3000:]}"
            outputs[name] = result
    finally:
        os.chdir(cwd)
    return root, outputs


def test_the_walkthrough_runs_as_written(walked):
    root, outputs = walked
    assert (root / "my_pairs" / "proclip_embedding_cache").is_dir()  # where the README's comment says
    for stage in ("my-stage1", "my-stage2"):
        report = json.loads((root / stage / "training_report.json").read_text())
        assert report["global_step"] == 3 and report["samples_trained"] == 24
        assert report["embedding_cache"]["llm_misses"] == 0 and report["embedding_cache"]["llm_hits"] > 0
    results = json.loads((root / "my-results.json").read_text())
    assert results["task"] == "retrieval" and results["metrics"]["caption"]["num_images"] == 16
    card = (root / "my-stage2" / "README.md").read_text()
    assert "image_to_text_R@1" in card and str(root) not in card  # the results are in, no machine path
    assert "dry run: would upload" in outputs["push"].stdout
    space = json.loads((root / "my-space" / "space_config.json").read_text())
    assert space["gallery"] == "gallery" and len(list((root / "my-space" / "gallery").glob("*.png"))) == 16
    assert not (root / "my-stage1" / UNTRAINED_ADAPTER_FILE).exists()
    for result in outputs.values():  # --no-progress: no bar, not even transformers' weight loading
        assert "Loading weights" not in result.stderr and "it/s]" not in result.stderr
        assert "warning:" not in result.stderr and "note:" not in result.stderr
        # Noise of the libraries, not of the run: transformers' torchvision fallback, torch's pin_memory on a CPU.
        assert "requires torchvision" not in result.stderr and "pin_memory" not in result.stderr


def train_in_process(words: list[str], capsys, caplog) -> str:
    """`proclip train WORDS` in this process (the walk-through above runs the command line as a user does; these
    follow-ups ask only what training says, without paying for a new interpreter each): its stderr and warnings."""
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        main(["train", *words, *FAST_TRAINING, "--disable-tqdm", "true"])
    return capsys.readouterr().err + caplog.text


def test_stage2_from_an_untrained_adapter_is_called_direct_alignment(walked, tmp_path, capsys, caplog):
    root, _ = walked
    words = ["--stage", "2", "--model", str(root / "my-init"), "--data", str(root / "my_pairs")]
    warned = train_in_process([*words, "--out", str(tmp_path / "direct")], capsys, caplog)
    assert "never had stage 1, so this stage 2 is direct alignment" in warned
    assert "--from-scratch-adapter" in warned
    assert (tmp_path / "direct" / "model.safetensors").is_file()
    meant = train_in_process([*words, "--out", str(tmp_path / "meant"), "--from-scratch-adapter"], capsys, caplog)
    assert "direct alignment" not in meant
    assert (tmp_path / "meant" / "model.safetensors").is_file()


def test_a_cache_built_for_other_data_is_pointed_out(walked, tmp_path, capsys, caplog):
    """`embed` ran on my_pairs/; stage 1 on a captions file beside it finds no cache where it looks: the note says
    where it looked and names the one next door. A cache of other captions: the first batch's misses are warned."""
    root, _ = walked
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": f"a new caption {i}"}) + "\n" for i in range(16)))
    words = ["--stage", "1", "--model", str(root / "my-init"), "--data", str(captions)]
    uncached = train_in_process([*words, "--out", str(tmp_path / "uncached")], capsys, caplog)
    assert f"no embedding cache in {root / 'proclip_embedding_cache'}" in uncached
    assert f"A cache exists in {root / 'my_pairs' / 'proclip_embedding_cache'}" in uncached

    missed = train_in_process([*words, "--out", str(tmp_path / "missed"), "--cache-dir",
                               str(root / "my_pairs" / "proclip_embedding_cache")], capsys, caplog)
    assert "holds 0 of the first 8 captions" in missed
    assert "the others go through the frozen text tower" in missed
    assert json.loads((tmp_path / "missed" / "training_report.json").read_text())["global_step"] == 3
