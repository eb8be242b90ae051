"""The released teacher (`proclip_train/demo/released_teacher`): it is the teacher the default demo's recipe trains
(the same recipe hash), intact (its sha256), installed as a finished teacher folder that transformers' CLIP classes
load, used by the demo's teacher step, and refused for any other recipe or with damaged weights."""

import json
import shutil

import pytest
import torch
from proclip_train.demo.release import (
    RELEASED_TEACHER_DIR,
    file_sha256,
    install_released_teacher,
    release_record,
    released_teacher,
)
from proclip_train.demo.run import Demo, DemoConfig
from proclip_train.demo.teacher import INFO_FILE, TeacherConfig, teacher_is_complete
from proclip_train.demo.world import COMPLETE_MARKER as WORLD_MARKER
from proclip_train.demo.world import WorldConfig
from transformers import CLIPModel, CLIPProcessor

REFRESH = "the teacher recipe changed: refresh the release (see proclip_train/demo/release.py)"


def world_marker(folder, config: WorldConfig):
    """A folder that names a finished world of `config` (all `teacher_hash` reads of a world)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WORLD_MARKER).write_text(config.config_hash() + "\n")
    return folder


def test_the_release_is_the_teacher_the_default_recipe_trains(tmp_path):
    full = DemoConfig.full()
    world = world_marker(tmp_path / "world", full.world)
    assert released_teacher(world, full.teacher) == RELEASED_TEACHER_DIR, REFRESH
    record = release_record()
    assert record["weights_sha256"] == file_sha256(RELEASED_TEACHER_DIR / "model.safetensors")
    assert record["teacher_hash"] == json.loads((RELEASED_TEACHER_DIR / INFO_FILE).read_text())["teacher_hash"]
    # Any other teacher seed, recipe or world is trained, not taken from the release.
    assert released_teacher(world, TeacherConfig(seed=1)) is None
    assert released_teacher(world, TeacherConfig(steps=2999)) is None
    assert released_teacher(world_marker(tmp_path / "quick", DemoConfig.quick().world), full.teacher) is None


def test_installed_release_is_a_finished_teacher_clip_loads(tmp_path):
    out = install_released_teacher(RELEASED_TEACHER_DIR, tmp_path / "teacher")
    assert teacher_is_complete(out, release_record()["teacher_hash"])
    model, processor = CLIPModel.from_pretrained(out), CLIPProcessor.from_pretrained(out)
    info = json.loads((out / INFO_FILE).read_text())
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    inputs = processor(text=["a red circle", "two blue squares"], images=[torch.zeros(3, 64, 64).numpy()],
                       return_tensors="pt", padding=True)
    assert model(**inputs).logits_per_image.shape == (1, 2)
    assert install_released_teacher(RELEASED_TEACHER_DIR, out) == out  # already there: left as it is


def test_damaged_release_weights_are_refused(tmp_path):
    release = tmp_path / "release"
    shutil.copytree(RELEASED_TEACHER_DIR, release)
    weights = release / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # e.g. a truncated download
    with pytest.raises(ValueError, match="--train-teacher"):
        install_released_teacher(release, tmp_path / "teacher")
    assert not (tmp_path / "teacher").exists()


def test_demo_teacher_step_installs_the_release(tmp_path):
    demo = Demo(tmp_path / "demo", DemoConfig.full(), progress=False)
    world_marker(demo.world_dir, demo.config.world)
    record = demo.step_teacher()
    assert record["source"] == "released" and record["teacher_train_seconds"] == release_record()["train_seconds"]
    assert (demo.teacher_dir / "model.safetensors").read_bytes() == (RELEASED_TEACHER_DIR / "model.safetensors").read_bytes()
    # --train-teacher on that folder would otherwise skip the finished step and keep the released teacher
    with pytest.raises(FileExistsError, match="released teacher.*--train-teacher"):
        Demo(demo.out, DemoConfig.full(), progress=False, train_teacher=True).step_teacher()
