"""The project's released teacher CLIP: what `proclip demo` starts from, as ProCLIP starts from a released CLIP.

Training the full demo's teacher (3 000 steps x 256 images) is the demo's longest step: 29 min on one core of the
project's 2-core machine. The package ships the teacher that `proclip demo --train-teacher` trains for the default
world and recipe (`released_teacher/`: a normal Hugging Face CLIP folder, 5.4 MB), with the sha256 of its weights
and the versions it was trained with; with torch 2.13 / transformers 5.24 on one thread, training it again gives
the same bytes. The demo uses it only when its recipe hash (`teacher.teacher_hash`: world config and teacher
config) is the one asked for; any other world, teacher seed or recipe is trained.

Refresh it after a change to the teacher's recipe or format (its hash then no longer matches, and a test says so):

    proclip demo --train-teacher --out DIR   # or just the teacher step of it
    python -m proclip_train.demo.release DIR/teacher
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from huggingface_hub.utils.sha import sha_fileobj

from .report import environment_description
from .teacher import (
    COMPLETE_MARKER,
    INFO_FILE,
    TeacherConfig,
    teacher_hash,
    teacher_is_complete,
)

RELEASED_TEACHER_DIR = Path(__file__).with_name("released_teacher")
RELEASE_FILE = "release.json"
TEACHER_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
                 "tokenizer_config.json", INFO_FILE)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return sha_fileobj(handle).hex()


def release_record(folder: Path = RELEASED_TEACHER_DIR) -> dict | None:
    path = Path(folder) / RELEASE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def released_teacher(world_dir: str | Path, config: TeacherConfig, folder: Path = RELEASED_TEACHER_DIR) -> Path | None:
    """`folder` if it holds the teacher that `train_teacher(world_dir, ..., config)` would train, else `None`."""
    record = release_record(folder)
    if record is None or record["teacher_hash"] != teacher_hash(world_dir, config):
        return None
    return Path(folder)


def install_released_teacher(release: Path, out_dir: str | Path) -> Path:
    """Copy the released teacher into `out_dir` as a finished teacher folder (as `train_teacher` leaves one), after
    checking its weights against the release's sha256 (a truncated or pointer-only file is an error, not a teacher)."""
    record, out = release_record(release), Path(out_dir)
    weights = Path(release) / "model.safetensors"
    if file_sha256(weights) != record["weights_sha256"]:
        raise ValueError(f"{weights} does not match its release record (sha256 {record['weights_sha256']}); "
                         "reinstall the package, or pass --train-teacher to train the teacher here")
    if teacher_is_complete(out, record["teacher_hash"]):
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not the released teacher; choose another folder or delete it")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in TEACHER_FILES:
        shutil.copy(Path(release) / name, partial / name)
    (partial / COMPLETE_MARKER).write_text(record["teacher_hash"] + "\n")
    if out.exists():
        out.rmdir()  # empty, checked above
    partial.rename(out)
    return out


def release_teacher(teacher_dir: str | Path, folder: Path = RELEASED_TEACHER_DIR) -> dict:
    """Make the finished teacher in `teacher_dir` the released one: its files, the sha256 of its weights and the
    environment that trained it (`release.json`)."""
    teacher_dir = Path(teacher_dir)
    if not teacher_is_complete(teacher_dir):
        raise FileNotFoundError(f"{teacher_dir} is not a finished teacher folder (no {COMPLETE_MARKER})")
    info = json.loads((teacher_dir / INFO_FILE).read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in TEACHER_FILES:
        shutil.copy(teacher_dir / name, folder / name)
    record = {"teacher_hash": info["teacher_hash"], "world_hash": info["world_hash"],
              "weights_sha256": file_sha256(folder / "model.safetensors"), "train_seconds": info["train_seconds"],
              "trained_with": environment_description(info.get("threads"))}
    (folder / RELEASE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m proclip_train.demo.release",
                                     description="Make a finished demo teacher folder the package's released teacher.")
    parser.add_argument("teacher_dir", help="a demo's teacher folder, e.g. proclip_demo/teacher")
    args = parser.parse_args(argv)
    try:
        record = release_teacher(args.teacher_dir)
    except FileNotFoundError as error:
        parser.exit(2, f"error: {error}\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
