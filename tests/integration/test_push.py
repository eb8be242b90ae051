"""`proclip push`: the checks that guard an upload, `--dry-run`, and the Hub calls an upload makes.

No Hub is reachable here: the upload is checked against a recording stand-in for `HfApi` (a third-party boundary,
not our logic), and what it would send is recomputed with huggingface_hub's own pattern filter.
"""

import hashlib
import shutil
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from PIL import Image
from proclip_train import cli
from proclip_train.hub.publish.card import write_model_card
from proclip_train.hub.publish.push import (
    FolderNotReady,
    RemoteCodeError,
    check_remote_code_loads,
    files_to_upload,
    push_folder,
    run_python_without_project,
)

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

REPO_ID = "my-org/proclip-tiny"
# Written out here rather than imported: what a folder needs to work from the Hub.
REQUIRED = [
    "config.json", "model.safetensors", "configuration_proclip.py", "modeling_proclip.py", "processing_proclip.py",
    "images_proclip.py", "embedding_proclip.py", "pipeline_proclip.py", "saving_proclip.py",
    "handler.py", "processor_config.json", "tokenizer_config.json", "tokenizer.json", "README.md",
]  # fmt: skip


@pytest.fixture(scope="module")
def pushable(tmp_path_factory, tiny_proclip_dir):
    """The tiny folder with its card, plus the leftovers a training run writes next to it."""
    folder = tmp_path_factory.mktemp("push") / "proclip-tiny"
    shutil.copytree(tiny_proclip_dir, folder)
    write_model_card(folder, repo_id=REPO_ID)
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"0" * 100)
    (folder / "training_args.bin").write_bytes(b"pickle")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "modeling_proclip.cpython-311.pyc").write_bytes(b"pyc")
    return folder


def _copy(folder, tmp_path):
    copy = tmp_path / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_isolated_python_cannot_import_the_project():
    result = run_python_without_project("import transformers\nimport configuration_proclip")
    assert result.returncode != 0
    assert "No module named 'configuration_proclip' (blocked" in result.stderr
    for module in ("modeling_proclip", "proclip_train.hub.publish.card"):
        assert run_python_without_project(f"import {module}").returncode != 0


def test_dry_run_lists_every_required_file(pushable, capsys):
    cli.main(["push", "--model", str(pushable), "--repo-id", REPO_ID, "--dry-run"])
    out = capsys.readouterr().out
    listed = {line.split()[-2] if line.endswith("[required]") else line.split()[-1]: line
              for line in out.splitlines() if line.startswith("  ")}  # fmt: skip
    for name in REQUIRED:
        assert name in listed, name
        assert listed[name].endswith("[required]")
    amount, unit = listed["model.safetensors"].split()[:2]  # e.g. "253.2 KB": read back, it is the file's size
    scale = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[unit]
    assert float(amount) * scale == pytest.approx((pushable / "model.safetensors").stat().st_size, abs=0.05 * scale)
    assert not any(name.startswith(("checkpoint-10", "__pycache__")) or name == "training_args.bin" for name in listed)
    assert "checks passed" in out


def test_remote_code_check_can_run_the_zero_shot_pipeline_too(pushable, tmp_path):
    """One isolated process loads the folder, runs a forward pass, then the pipeline, whose scores are the softmax of
    the installed model's own logits."""
    image_path = tmp_path / "red.png"
    Image.new("RGB", (40, 36), (200, 30, 30)).save(image_path)
    labels = ["red circle", "blue square", "green triangle"]
    outcome = check_remote_code_loads(pushable, pipeline_image=image_path, candidate_labels=labels)
    assert outcome["model"] == "ProCLIPModel" and outcome["model_module"].startswith("transformers_modules.")
    model, processor = ProCLIPModel.from_pretrained(pushable).eval(), ProCLIPProcessor.from_pretrained(pushable)
    batch = processor(images=Image.open(image_path), text=[f"a photo of a {label}." for label in labels])
    with torch.inference_mode():
        probabilities = dict(zip(labels, model(**batch).logits_per_image.softmax(-1)[0].tolist()))
    scores = {entry["label"]: entry["score"] for entry in outcome["pipeline"]}
    assert scores == pytest.approx(probabilities, abs=1e-5)


def test_push_refuses_a_folder_whose_remote_code_does_not_load(pushable, tmp_path, capsys):
    """Code that imports this project works where it is installed, but not on a Hub user's machine (the change is
    allowed here, so that the isolated load is reached)."""
    broken = _copy(pushable, tmp_path)
    modeling = broken / "modeling_proclip.py"
    source = modeling.read_text()
    anchor = next(line for line in source.splitlines(keepends=True) if line.startswith("from .processing_proclip"))
    modeling.write_text(source.replace(anchor, anchor + "from proclip_train.evaluation.metrics import recall_at_k\n"))
    with pytest.raises(SystemExit) as refused:
        cli.main(["push", "--model", str(broken), "--repo-id", REPO_ID, "--dry-run", "--allow-modified-code"])
    output = capsys.readouterr()
    message = output.err
    assert refused.value.code == 2 and message.startswith("proclip push: error: refused:")
    assert "does not load through remote code" in message
    assert "No module named 'proclip_train' (blocked" in message  # the subprocess's stderr tail
    assert "dry run: would upload" not in output.out


def test_push_refuses_missing_files_and_cards_that_are_not_ours(pushable, tmp_path):
    """These refusals come before the remote-code check: no subprocess, no Hub call."""
    incomplete = _copy(pushable, tmp_path)
    (incomplete / "processing_proclip.py").unlink()
    (incomplete / "README.md").unlink()
    with pytest.raises(FolderNotReady) as refused:
        push_folder(incomplete, REPO_ID, dry_run=True)
    assert "missing processing_proclip.py" in str(refused.value)
    assert "missing README.md" in str(refused.value) and "proclip card" in str(refused.value)
    assert not isinstance(refused.value, RemoteCodeError)

    trainer_card = incomplete.parent / "trainer-card"
    shutil.copytree(pushable, trainer_card)
    trainer_readme = "---\nlibrary_name: transformers\ntags:\n- generated_from_trainer\n---\n# Model\n"
    (trainer_card / "README.md").write_text(trainer_readme)
    with pytest.raises(FolderNotReady, match="Trainer's auto-generated card"):
        push_folder(trainer_card, REPO_ID, dry_run=True)
    (trainer_card / "README.md").write_text("# A card without metadata\n")
    with pytest.raises(FolderNotReady, match="no metadata block"):
        push_folder(trainer_card, REPO_ID, dry_run=True)
    with pytest.raises(ValueError, match="not a Hub repo id"):
        push_folder(pushable, "not a repo id!", dry_run=True)


class RecordingHubApi:
    """Stands in for `huggingface_hub.HfApi`: records the calls, uploads nothing."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0")


def test_upload_creates_the_repo_and_uploads_the_folder_with_its_card(pushable):
    card_before = hashlib.sha256((pushable / "README.md").read_bytes()).hexdigest()
    api = RecordingHubApi()
    commit = push_folder(pushable, REPO_ID, private=True, revision="v1", api=api)

    assert commit.commit_url.startswith(f"https://huggingface.co/{REPO_ID}")
    assert [(name, repo) for name, repo, _ in api.calls] == [
        ("create_repo", REPO_ID), ("create_branch", REPO_ID), ("upload_folder", REPO_ID)
    ]
    assert api.calls[0][2] == {"repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][2] == {"repo_type": "model", "branch": "v1", "exist_ok": True}
    upload = api.calls[2][2]
    assert upload["folder_path"] == str(pushable) and upload["revision"] == "v1"

    # What upload_folder sends under those patterns is what --dry-run lists: the required files, the card as is.
    files = sorted(p.relative_to(pushable).as_posix() for p in pushable.glob("**/*") if p.is_file())
    sent = list(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"] + DEFAULT_IGNORE_PATTERNS))
    assert sent == [path for path, _ in files_to_upload(pushable)]
    assert set(REQUIRED) <= set(sent)
    assert not any(path.startswith(("checkpoint-", "__pycache__")) or path == "training_args.bin" for path in sent)
    assert hashlib.sha256((pushable / "README.md").read_bytes()).hexdigest() == card_before

