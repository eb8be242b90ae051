"""Trainer checkpoints without the frozen towers (issue 13, item 5) and `--resume_from_checkpoint` (issue 12, item 4).

What is checked:
- a run stopped after a checkpoint and resumed ends with the same weights and EMA as an uninterrupted run (in the
  main process and with DataLoader workers, with and without gradient accumulation);
- a stage-2 checkpoint holds exactly the trained tensors (adapter, image tower, projection, logit scale) plus a
  reference (source folder, sha256) to the frozen LLM, and no whole model; stage 1's holds the adapter (and the
  4-byte logit scale, which lives outside every frozen submodule) and refers to the LLM and the image tower; the
  final output folder is a whole model;
- resuming into a model whose frozen LLM differs is refused, naming both hashes (`proclip train`: exit 2, one line);
- `--resume_from_checkpoint` without a value (or `True`) resumes from the latest checkpoint in `--out`, and says so in
  one line when there is none;
- stage 0 (peft) checkpoints hold the LoRA weights only;
- (slow) two DDP ranks resumed with the flag alone end bit-identical to an uninterrupted two-rank run.
"""

import json
import os
import socket
import subprocess
import sys

import datasets
import pytest
import torch
from proclip_train.cli import main
from proclip_train.training.cache import weights_sha256
from proclip_train.training.checkpoints import (
    FROZEN_REFERENCE_FILE,
    TRAINED_WEIGHTS_FILE,
    CheckpointMismatchError,
)
from proclip_train.training.stage0 import run_stage0
from proclip_train.training.trainer import ProCLIPTrainer
from safetensors.torch import load_file
from training_data import (
    captions_split,
    image_dataset,
    image_folder,
    snapshot,
    tensors_under,
    training_args,
)
from transformers import TrainerCallback

from modeling_proclip import ProCLIPModel

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0", "--learning_rate", "1e-3"]


def train_with_checkpoints(tmp_path, processor, model, stage, out="out", **overrides):
    values = dict(stage=stage, output_dir=str(tmp_path / out), max_steps=2, save_strategy="steps", save_steps=1)
    data = image_dataset(8) if stage == 2 else datasets.Dataset.from_dict({"caption": captions_split()[0][:8]})
    trainer = ProCLIPTrainer(model, training_args(tmp_path, **{**values, **overrides}), train_dataset=data,
                             processing_class=processor)
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "stage, trained, frozen",
    [(2, ("text_adapter", "vision_model", "visual_projection", "logit_scale"), ("text_model",)),
     (1, ("text_adapter", "logit_scale"), ("text_model", "vision_model", "visual_projection"))],
)
def test_a_checkpoint_keeps_what_trains_and_refers_to_the_frozen_towers(
    tmp_path, processor, tiny_proclip_dir, stage, trained, frozen
):
    model = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    trainer = train_with_checkpoints(tmp_path, processor, model, stage)
    checkpoint = tmp_path / "out" / "checkpoint-2"

    saved = load_file(checkpoint / TRAINED_WEIGHTS_FILE)
    assert set(saved) == tensors_under(model, trained)
    assert all(torch.equal(saved[name], model.state_dict()[name]) for name in saved)
    reference = json.loads((checkpoint / FROZEN_REFERENCE_FILE).read_text())
    assert reference == {
        "source": str(tiny_proclip_dir), "weights_sha256": {name: weights_sha256(getattr(model, name)) for name in frozen}
    }
    assert not (checkpoint / "model.safetensors").exists() and not (checkpoint / "config.json").exists()
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "proclip_counters.json",
                 "data_random_state.safetensors"):
        assert (checkpoint / name).is_file(), name
    assert (checkpoint / "stage_state.safetensors").is_file() == (stage == 2)  # the EMA teacher

    trainer.save_model(str(tmp_path / "final"))  # the output folder stays a whole, loadable model
    final = ProCLIPModel.from_pretrained(tmp_path / "final")
    assert all(torch.equal(final.state_dict()[name], value) for name, value in model.state_dict().items())
    frozen_bytes = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n.split(".")[0] in frozen)
    whole = (tmp_path / "final" / "model.safetensors").stat().st_size
    assert (checkpoint / TRAINED_WEIGHTS_FILE).stat().st_size < whole - frozen_bytes + 4096


def test_resuming_into_another_frozen_llm_is_refused_naming_both_hashes(tmp_path, processor, tiny_proclip_dir, capsys):
    train_with_checkpoints(tmp_path, processor, ProCLIPModel.from_pretrained(tiny_proclip_dir), stage=2)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    other = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    with torch.no_grad():
        other.text_model.embed_tokens.weight[3, 0] += 1.0
    original = weights_sha256(ProCLIPModel.from_pretrained(tiny_proclip_dir).text_model)
    changed = weights_sha256(other.text_model)

    trainer = ProCLIPTrainer(other, training_args(tmp_path, stage=2, max_steps=2), train_dataset=image_dataset(8),
                             processing_class=processor)
    with pytest.raises(CheckpointMismatchError, match=f"frozen text_model with sha256 {original}.*now has {changed}"):
        trainer.train(resume_from_checkpoint=str(checkpoint))

    other.save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    image_folder(tmp_path / "data", 8)
    with pytest.raises(SystemExit) as exit:
        main(["train", "--stage", "2", "--model", str(tmp_path / "other"), "--data", str(tmp_path / "data"),
              "--out", str(tmp_path / "out"), "--resume_from_checkpoint", str(checkpoint), *COMMON])  # fmt: skip
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and original in stderr and changed in stderr and "Traceback" not in stderr


def test_resume_from_checkpoint_without_a_value_takes_the_latest(tmp_path, tiny_proclip_dir, capsys):
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"caption": c}) for c in captions_split()[0][:32]))
    out = tmp_path / "out"
    command = ["train", "--stage", "1", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "captions.jsonl"),
               "--out", str(out), "--per_device_train_batch_size", "4", "--save_steps", "1", *COMMON]  # fmt: skip

    for flag in (["--resume_from_checkpoint"], ["--resume_from_checkpoint", "True"]):
        with pytest.raises(SystemExit) as exit:  # nothing to resume yet
            main([*command, "--max_steps", "1", *flag])
        assert exit.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"proclip train: error: --resume_from_checkpoint: no checkpoint-* folder in {out} to resume from.\n"
            "Start without the flag, or name a checkpoint folder."
        )

    main([*command, "--max_steps", "2"])
    counters_file = out / "checkpoint-2" / "proclip_counters.json"  # mark the latest checkpoint's counters
    counters = json.loads(counters_file.read_text())
    counters["steps"]["samples_trained"] += 1000
    counters_file.write_text(json.dumps(counters))
    for max_steps, flag in ((3, ["--resume_from_checkpoint"]), (3, ["--resume_from_checkpoint", "True"])):
        main([*command, "--max_steps", str(max_steps), *flag, "--save_strategy", "no"])
        report = json.loads((out / "training_report.json").read_text())
        assert report["global_step"] == 3 and report["samples_trained"] == 1000 + 3 * 4  # resumed from checkpoint-2


def test_stage0_checkpoints_hold_the_lora_weights_only(tmp_path, tiny_llm_dir):
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"a": f"a {c} picture", "b": f"the picture is {c}"}) + "\n" for c in captions_split()[0][:16]
    ))
    run_stage0(tiny_llm_dir, tmp_path / "pairs.jsonl", ["a", "b"], tmp_path / "stage0", max_steps=1, save_steps=1,
               save_strategy="steps", per_device_train_batch_size=8, use_cpu=True, disable_tqdm=True, report_to="none")
    checkpoint = tmp_path / "stage0" / "checkpoint-1"
    lora = load_file(checkpoint / "adapter_model.safetensors")
    assert lora and all("lora_" in name for name in lora)
    assert not (checkpoint / "model.safetensors").exists()
    assert (tmp_path / "stage0" / "model.safetensors").is_file()  # the exported text tower is whole (merged)


@pytest.mark.slow  # three torchrun launches: about 90 s on 2 shared cores
def test_two_ranks_resume_bit_identical_with_the_flag_alone(tmp_path, tiny_proclip_dir):
    """`torchrun` with 2 gloo ranks, the augmenting stage-2 collator and a constant learning rate: 2 steps, then
    `--resume_from_checkpoint` (no value) up to 4, equals 4 steps in one go, bit for bit; each rank continued its own
    random draws (3 steps an epoch: the resume is mid-epoch)."""
    image_folder(tmp_path / "data", 24)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def torchrun(out, max_steps, *flags):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
             "-m", "proclip_train.cli", "train", "--stage", "2", "--model", str(tiny_proclip_dir), "--data",
             str(tmp_path / "data"), "--out", str(tmp_path / out), "--per_device_train_batch_size", "4",
             "--max_steps", str(max_steps), "--lr_scheduler_type", "constant", "--warmup_steps", "0",
             "--ema_momentum", "0.9", *COMMON, *flags],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]

    torchrun("whole", 4, "--save_strategy", "no")
    torchrun("resumed", 2, "--save_steps", "2")
    torchrun("resumed", 4, "--save_steps", "2", "--resume_from_checkpoint")
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert [name for name in whole if not torch.equal(whole[name], resumed[name])] == []
    assert load_file(tmp_path / "resumed" / "checkpoint-4" / "stage_state.safetensors")  # the EMA teacher travels
    assert json.loads((tmp_path / "resumed" / "training_report.json").read_text())["samples_trained"] == 4 * 8


def two_caption_dataset(n: int) -> datasets.Dataset:
    """`image_dataset` with a second caption column, so the collator draws a caption per image as well as a crop."""
    return image_dataset(n).add_column("long", [f"a long description of picture {i}" for i in range(n)])


def resumable_run(tmp_path, processor, load_model, out, workers=0, accumulate=1, resume_from=None, stop_at=None):
    """Stage 2 with the default (augmenting) collator: 12 images, batch 4 (3 micro-batches an epoch), 5 steps of
    `accumulate` micro-batches, a lean checkpoint every step; `stop_at` ends the run after that step's checkpoint, as a
    killed process would."""

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == stop_at:
                control.should_training_stop = True

    trainer = ProCLIPTrainer(
        load_model(),
        training_args(tmp_path, stage=2, output_dir=str(tmp_path / out), per_device_train_batch_size=4, max_steps=5,
                      learning_rate=1e-3, save_strategy="steps", save_steps=1, lr_scheduler_type="linear",
                      ema_momentum=0.9, caption_column=["caption", "long"], dataloader_num_workers=workers,
                      gradient_accumulation_steps=accumulate),
        train_dataset=two_caption_dataset(12), processing_class=processor, callbacks=[Stop()],
    )
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, processor, tiny_proclip_dir):
    """The uninterrupted run's final weights and EMA, per number of DataLoader workers and of accumulated
    micro-batches (computed once each)."""
    runs = {}

    def get(workers, accumulate):
        if (workers, accumulate) not in runs:
            tmp = tmp_path_factory.mktemp(f"uninterrupted{workers}-{accumulate}")
            trainer = resumable_run(tmp, processor, lambda: ProCLIPModel.from_pretrained(tiny_proclip_dir), "full",
                                    workers, accumulate)
            ema = {k: v.clone() for k, v in trainer.stage.ema.state_dict().items()}
            runs[workers, accumulate] = (snapshot(trainer.model), ema)
        return runs[workers, accumulate]

    return get


@pytest.mark.parametrize(
    "workers, accumulate, stop_at",
    [(0, 1, 2), (0, 1, 3), (2, 1, 1), (2, 1, 2), (0, 2, 1), (2, 2, 3)],
    ids=["main-process-mid-epoch", "main-process-epoch-end", "2-workers-first-batches", "2-workers-mid-epoch",
         "accumulating-mid-epoch", "2-workers-accumulating"],
)
def test_kill_and_resume_ends_bit_identical_to_an_uninterrupted_run(
    tmp_path, processor, load_model, uninterrupted, workers, accumulate, stop_at
):
    """The default stage-2 collator draws random crops and a random caption per image: a resumed run continues those
    draws (in the main process or in DataLoader workers, mid-epoch or at an epoch's end, with gradient accumulation)
    and ends with every weight and the EMA teacher equal, bit for bit, to an uninterrupted run's."""
    full_weights, full_ema = uninterrupted(workers, accumulate)
    interrupted = resumable_run(tmp_path, processor, load_model, "resumed", workers, accumulate, stop_at=stop_at)
    assert interrupted.state.global_step == stop_at
    checkpoint = tmp_path / "resumed" / f"checkpoint-{stop_at}"
    resumed = resumable_run(tmp_path, processor, load_model, "resumed", workers, accumulate,
                            resume_from=str(checkpoint))
    assert resumed.state.global_step == 5

    weights = snapshot(resumed.model)
    assert [name for name in full_weights if not torch.equal(weights[name], full_weights[name])] == []
    ema = resumed.stage.ema.state_dict()
    assert [name for name in full_ema if not torch.equal(ema[name], full_ema[name])] == []
    # The EMA really was restored, not rebuilt from the resumed weights.
    fresh = load_model().vision_model.state_dict()
    assert not all(torch.equal(full_ema[f"vision_model.{k}"], v) for k, v in fresh.items())
    # The interrupted run's samples count too: 5 steps; an epoch's 3 micro-batches of 4 go to steps `accumulate` at a time.
    per_epoch = [min(accumulate, 3 - first) for first in range(0, 3, accumulate)]
    assert resumed.report["samples_trained"] == 4 * sum((per_epoch * 5)[:5])


KILL_DURING_CHECKPOINT = """
import os, signal, sys
from proclip_train.cli import main
from proclip_train.training.trainer import ProCLIPTrainer

write_rng_state = ProCLIPTrainer._save_rng_state


def killed_at_step(self, output_dir):  # mid-checkpoint: weights and optimizer written, RNG and trainer state not yet
    if self.state.global_step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    write_rng_state(self, output_dir)


ProCLIPTrainer._save_rng_state = killed_at_step
main(sys.argv[1:])
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_to_resume_from(tmp_path, tiny_proclip_dir):
    """`kill -9` while checkpoint-6 is being written: no `checkpoint-6` appears (it is written under a hidden name and
    renamed when complete), and `--resume_from_checkpoint` resumes from checkpoint-3, saying so, to the end."""
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"caption": c}) for c in captions_split()[0][:32]))
    out = tmp_path / "out"
    command = ["train", "--stage", "1", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "captions.jsonl"),
               "--out", str(out), "--per_device_train_batch_size", "4", "--save_steps", "3", "--max_steps", "8",
               *COMMON]  # fmt: skip
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_CHECKPOINT, *command], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "KILL_AT_STEP": "6", "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = subprocess.run([sys.executable, "-m", "proclip_train.cli", *command, "--resume_from_checkpoint"],
                             capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from {out / 'checkpoint-3'}" in resumed.stderr
    report = json.loads((out / "training_report.json").read_text())
    assert report["global_step"] == 8 and report["samples_trained"] == 8 * 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # the killed run's partial write is gone


def test_resume_skips_an_incomplete_checkpoint_and_names_it(tmp_path, tiny_proclip_dir, capsys):
    """A `checkpoint-N` without trainer_state.json (written by a Trainer that was killed mid-write, or damaged): the
    flag alone resumes from the newest complete one and says why it passed the other; named directly, it is refused."""
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"caption": c}) for c in captions_split()[0][:32]))
    out = tmp_path / "out"
    command = ["train", "--stage", "1", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "captions.jsonl"),
               "--out", str(out), "--per_device_train_batch_size", "4", "--save_steps", "1", *COMMON]  # fmt: skip
    main([*command, "--max_steps", "2"])
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    capsys.readouterr()
    main([*command, "--max_steps", "3", "--resume_from_checkpoint", "--save_strategy", "no"])
    err = capsys.readouterr().err
    assert f"Resuming from {out / 'checkpoint-1'}" in err
    assert "checkpoint-2 is incomplete (no trainer_state.json" in err
    assert json.loads((out / "training_report.json").read_text())["global_step"] == 3
    with pytest.raises(SystemExit) as exit:
        main([*command, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert exit.value.code == 2
    assert "checkpoint-2 is incomplete (no trainer_state.json" in capsys.readouterr().err
