"""A bad run never saves a model and never exits 0 (issue 12, items 1 and 5).

- One NaN row among 32 cached caption embeddings: `proclip train` stops with exit code 1 and a message naming the
  step and that row, and writes no model and no checkpoint; with `--skip_nonfinite_steps` it finishes, counts the
  skipped step and the samples trained, and saves finite weights.
- An exploding learning rate: the first non-finite loss stops training, naming the step and the micro-batch's rows;
  with `--skip_nonfinite_steps` the steps are skipped and counted. Weights holding a NaN or an infinity are never
  saved (`save_model` names the tensors).
- A dataset whose every row is bad: exit code 1, nothing saved, and no weight changed (no weight decay either).
"""

import json
import math

import datasets
import pytest
import torch
from proclip_train.cli import main
from proclip_train.training.finite import NonFiniteWeightsError
from proclip_train.training.trainer import (
    NonFiniteLossError,
    NoSamplesTrainedError,
    ProCLIPTrainer,
)
from safetensors.torch import load_file
from training_data import (
    COMMON,
    image_dataset,
    image_folder,
    poison_cached_row,
    snapshot,
    training_args,
)

from modeling_proclip import ProCLIPModel

pytestmark = pytest.mark.usefixtures("one_thread")

def run_train(argv, capsys) -> tuple[int, str]:
    """`proclip train ...` in this process: (exit code, stderr)."""
    try:
        main(["train", *argv, *COMMON])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def test_a_nan_cached_embedding_stops_training_and_saves_nothing(tmp_path, tiny_proclip_dir, capsys):
    captions = image_folder(tmp_path / "data", 32)
    main(["embed", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "data"), "--no-teacher"])
    poisoned = captions[13]
    poison_cached_row(tmp_path / "data" / "proclip_embedding_cache", poisoned)
    stage2 = ["--stage", "2", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "data"), "--learning_rate", "1e-3"]

    out = tmp_path / "stopped"
    code, stderr = run_train([*stage2, "--out", str(out), "--max_steps", "2", "--per_device_train_batch_size", "32",
                              "--save_steps", "1"], capsys)  # fmt: skip
    assert code == 1
    assert "Non-finite loss (nan) at step 1" in stderr
    assert f"13.png: {poisoned!r} (llm_embeds)" in stderr  # the row, its image and the input that is not finite
    assert "--skip_nonfinite_steps" in stderr and "Traceback" not in stderr
    assert not (out / "model.safetensors").exists() and not list(out.glob("checkpoint-*"))

    out = tmp_path / "skipping"
    code, stderr = run_train([*stage2, "--out", str(out), "--max_steps", "4", "--per_device_train_batch_size", "8",
                              "--skip_nonfinite_steps"], capsys)  # fmt: skip
    assert code == 0, stderr
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps_skipped_nonfinite"] == 1  # the one batch of the epoch that holds the NaN row
    assert report["samples_trained"] == 3 * 8 and report["global_step"] == 4
    assert math.isfinite(report["train_loss"])
    weights, start = load_file(out / "model.safetensors"), load_file(tiny_proclip_dir / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not torch.equal(weights["text_adapter.proj.weight"], start["text_adapter.proj.weight"])  # it trained


def test_an_exploding_learning_rate_stops_at_the_first_non_finite_loss(tmp_path, processor, tiny_proclip_dir):
    def trainer(**overrides):
        args = training_args(tmp_path, stage=2, max_steps=4, optim="sgd", learning_rate=1e38, max_grad_norm=0.0,
                             **overrides)
        return ProCLIPTrainer(ProCLIPModel.from_pretrained(tiny_proclip_dir), args, train_dataset=image_dataset(32),
                              processing_class=processor)

    stopping = trainer()
    with pytest.raises(NonFiniteLossError, match=r"at step 2, micro-batch 1\. Its 8 rows: 'a \w+ picture, number \d+'"):
        stopping.train()

    skipping = trainer(skip_nonfinite_steps=True)
    skipping.train()  # step 1 throws the weights far off; steps 2-4 give NaN losses and are skipped
    assert (skipping.report["samples_trained"], skipping.report["steps_skipped_nonfinite"]) == (8, 3)


def test_weights_with_a_nan_are_never_saved(tmp_path, processor, tiny_proclip_dir):
    trainer = ProCLIPTrainer(
        ProCLIPModel.from_pretrained(tiny_proclip_dir), training_args(tmp_path, stage=2, max_steps=1),
        train_dataset=image_dataset(8), processing_class=processor,
    )
    trainer.train()
    with torch.no_grad():
        trainer.model.text_adapter.proj.weight[0, 0] = float("nan")
        trainer.model.vision_model.post_layernorm.bias[1] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"2 of \d+ tensors hold NaN or infinite values") as error:
        trainer.save_model(str(tmp_path / "final"))
    assert "text_adapter.proj.weight" in str(error.value) and "vision_model.post_layernorm.bias" in str(error.value)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_a_dataset_of_bad_rows_is_an_error_and_changes_no_weight(tmp_path, processor, tiny_proclip_dir, stage):
    """Every caption blank (stage 1) or every image unreadable (stage 2): no sample trains, so no step may change a
    weight (weight decay included), no checkpoint is written, and the run ends with an error instead of a model."""
    rows = {"caption": ["  "] * 8} if stage == 1 else {"image": [b"not an image"] * 8, "caption": ["a caption"] * 8}
    model = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    start = snapshot(model)
    trainer = ProCLIPTrainer(
        model, training_args(tmp_path, stage=stage, max_steps=3, save_strategy="steps", save_steps=1, weight_decay=0.1),
        train_dataset=datasets.Dataset.from_dict(rows), processing_class=processor,
    )
    with pytest.raises(NoSamplesTrainedError, match="trained on no sample in 3 steps .*skipped 24 samples"):
        trainer.train()
    assert trainer.step_counts["steps_without_samples"] == 3
    assert [name for name, value in snapshot(model).items() if not torch.equal(value, start[name])] == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_proclip_train_on_bad_rows_exits_1_and_saves_nothing(tmp_path, tiny_proclip_dir, capsys):
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps({"caption": " "}) for _ in range(6)))
    out = tmp_path / "out"
    code, stderr = run_train(["--stage", "1", "--model", str(tiny_proclip_dir), "--data", str(tmp_path / "captions.jsonl"),
                              "--out", str(out), "--max_steps", "2", "--per_device_train_batch_size", "3"], capsys)  # fmt: skip
    assert code == 1
    assert "trained on no sample in 2 steps (skipped 6 samples: 6 empty_caption)" in stderr
    assert "Traceback" not in stderr
    assert not (out / "model.safetensors").exists() and not (out / "training_report.json").exists()


