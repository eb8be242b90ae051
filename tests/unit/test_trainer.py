"""ProCLIPTrainer on tiny towers: each stage learns what it should, trains only what it should, and survives a restart.

What is checked:
- stage 1 lowers L_ins and L_struct on held-out captions and raises the held-out cosine between ProCLIP's text
  embeddings and the CLIP teacher's; only the adapter changes (tensor by tensor);
- stage 2 changes exactly the adapter, the image tower, its projection and the logit scale; the EMA teacher follows
  ema <- m * ema + (1 - m) * param after every step; the logit scale is clamped to [0, ln 100];
- a large lambda keeps the image tower near its start, lambda = 0 lets it move (measured distance);
- gradient accumulation: the update is -lr * the mean of the micro-batch gradients, each micro-batch with its own
  negatives, and the logged loss is the mean of the micro-batch losses;
- a dataset with a corrupt image and an empty caption trains to the end and reports both counts;
- `proclip train` (with a --config file) writes a loadable, Hub-ready folder.
"""

import json
import math
import warnings

import datasets
import pytest
import torch
import torch.nn.functional as F
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.data import load_image_text_dataset
from proclip_train.training.losses import InheritanceLoss
from proclip_train.training.registry import canonical_stage
from proclip_train.training.stages import LOGIT_SCALE_MAX, ContrastiveStage
from proclip_train.training.trainer import ProCLIPTrainer
from training_data import (
    captions_split,
    changed_tensors,
    image_dataset,
    image_rows,
    snapshot,
    tensors_under,
    training_args,
)
from transformers import TrainerCallback

from modeling_proclip import ProCLIPModel

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER = ("text_adapter",)
STAGE2_TRAINABLE = ("text_adapter", "vision_model", "visual_projection", "logit_scale")


# ---------------------------------------------------------------------------------------------------------------------


def test_stage_names():
    assert canonical_stage(1) == canonical_stage("inheritance") == "inheritance"
    assert canonical_stage("2") == "contrastive" and canonical_stage(0) == "caption-contrastive"
    with pytest.raises(ValueError, match="Unknown stage"):
        canonical_stage(3)
    with pytest.raises(ValueError, match="Unknown stage"):
        ProCLIPTrainingArguments(output_dir="x", stage="3")


def test_stage1_aligns_to_the_teacher_and_trains_only_the_adapter(tmp_path, processor, load_model):
    train, held_out = captions_split()
    model = load_model()
    before = snapshot(model)
    trainer = ProCLIPTrainer(
        model, training_args(tmp_path, stage=1, per_device_train_batch_size=32, max_steps=40, learning_rate=3e-3),
        train_dataset=datasets.Dataset.from_dict({"caption": train}), processing_class=processor,
    )
    teacher, teacher_tokenizer = trainer.stage.teacher, trainer.stage.teacher_tokenizer
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    @torch.no_grad()
    def held_out_metrics():
        student = model.get_text_features(**processor.tokenizer(held_out, padding=True, return_tensors="pt"))
        target = teacher(**teacher_tokenizer(held_out, padding=True, return_tensors="pt")).text_embeds
        losses = InheritanceLoss()(student.pooler_output, target)
        return F.cosine_similarity(student.pooler_output, target).mean().item(), losses

    cosine_before, losses_before = held_out_metrics()
    trainer.train()
    cosine_after, losses_after = held_out_metrics()

    assert cosine_before < 0.3 and cosine_after > 0.8, (cosine_before, cosine_after)
    assert losses_after["instance"] < 0.3 * losses_before["instance"]
    assert losses_after["structure"] < 0.5 * losses_before["structure"]
    # Both components are logged, and the logged total is their sum.
    logged = [entry for entry in trainer.state.log_history if "loss_instance" in entry]
    assert len(logged) == 40
    assert logged[-1]["loss"] == pytest.approx(logged[-1]["loss_instance"] + logged[-1]["loss_structure"], rel=1e-4)
    assert changed_tensors(before, snapshot(model)) == tensors_under(model, ADAPTER)
    assert trainer.report["skipped"] == {"corrupt_image": 0, "empty_caption": 0}


def test_stage2_trains_the_intended_tensors_and_the_ema_follows_its_formula(tmp_path, processor, load_model):
    momentum = 0.9
    model = load_model()
    before = snapshot(model)
    history = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            history.append((
                {k: v.detach().clone() for k, v in model.vision_model.named_parameters()},
                {k: v.detach().clone() for k, v in trainer.stage.ema.vision_model.named_parameters()},
            ))

    trainer = ProCLIPTrainer(
        model, training_args(tmp_path, stage=2, max_steps=2, learning_rate=1e-3, ema_momentum=momentum,
                             distill_weight=1.0),
        train_dataset=image_dataset(16), processing_class=processor, callbacks=[Record()],
    )
    ema_start = {k: v.detach().clone() for k, v in trainer.stage.ema.vision_model.named_parameters()}
    assert all(torch.equal(ema_start[k], v) for k, v in model.vision_model.named_parameters())
    trainer.train()

    assert changed_tensors(before, snapshot(model)) == tensors_under(model, STAGE2_TRAINABLE)
    previous_ema = ema_start
    for params, ema in history:
        for name, value in ema.items():
            expected = momentum * previous_ema[name] + (1 - momentum) * params[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        previous_ema = ema
    logged = trainer.state.log_history[0]
    for key in ("loss_contrastive", "loss_instance", "loss_structure", "loss_distillation", "logit_scale"):
        assert key in logged
    # The teacher belongs to the trainer: the saved model has no EMA weights.
    trainer.save_model(str(tmp_path / "saved"))
    saved = ProCLIPModel.from_pretrained(tmp_path / "saved")
    assert set(saved.state_dict()) == set(model.state_dict())


def test_logit_scale_is_clamped_after_each_step(load_model):
    model = load_model()
    stage = ContrastiveStage(ProCLIPTrainingArguments(output_dir="unused", stage=2, ema_momentum=1.0))
    stage.setup(model, torch.device("cpu"))
    for value, expected in ((7.0, LOGIT_SCALE_MAX), (-1.0, 0.0), (2.0, 2.0)):
        model.logit_scale.data.fill_(value)
        stage.after_optimizer_step(model)
        assert model.logit_scale.item() == pytest.approx(expected)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_micro_batch_emptied_by_the_collator_still_reaches_every_trainable_parameter(tmp_path, processor, load_model, stage):
    """All rows dropped: the loss is 0 but connected to every trainable parameter (DDP then reduces zero gradients)."""
    model = load_model()
    trainer = ProCLIPTrainer(
        model, training_args(tmp_path, stage=stage), train_dataset=image_dataset(4), processing_class=processor
    )
    bad_rows = [{"image": {"bytes": b"not an image", "path": None}, "caption": " "}, {"caption": ""}]
    batch = trainer.data_collator(bad_rows)
    assert len(batch["captions"]) == 0
    batch.pop("skipped")
    loss = trainer.stage.compute(model, batch)["loss"]
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert loss.item() == 0 and trainable and all(p.grad is not None and not p.grad.any() for p in trainable)


def test_large_lambda_keeps_the_image_tower_near_its_start(tmp_path, processor, load_model):
    data = image_dataset(32)

    def distance_moved(distill_weight):
        model = load_model()
        start = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
        ProCLIPTrainer(
            model, training_args(tmp_path, stage=2, max_steps=40, learning_rate=1e-4, distill_weight=distill_weight,
                                 ema_momentum=1.0),
            train_dataset=data, processing_class=processor,
        ).train()
        return math.sqrt(sum((v - start[k]).pow(2).sum().item() for k, v in model.vision_model.state_dict().items()))

    free, anchored = distance_moved(0.0), distance_moved(1000.0)
    assert free > 0.1, free
    assert anchored < 0.25 * free, (anchored, free)


def test_gradient_accumulation_averages_micro_batch_gradients(tmp_path, processor, load_model):
    train, _ = captions_split()
    model = load_model()
    start = snapshot(model)
    trainer = ProCLIPTrainer(
        model,
        training_args(tmp_path, stage=1, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=1,
                      optim="sgd", learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0),
        train_dataset=datasets.Dataset.from_dict({"caption": train[:8]}), processing_class=processor,
    )
    micro_batches = []
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: micro_batches.append(collate(rows)) or micro_batches[-1]
    trainer.train()
    assert len(micro_batches) == 2

    reference = load_model()
    trainer.stage.freeze(reference)
    grads, losses = [], []
    for batch in micro_batches:
        batch = {k: v for k, v in batch.items() if k != "skipped"}
        reference.zero_grad()
        loss = trainer.stage.compute(reference, batch)["loss"]
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in reference.named_parameters() if p.requires_grad})
    for name, parameter in model.named_parameters():
        if name in grads[0]:
            expected = start[name] - 0.5 * (grads[0][name] + grads[1][name]) / 2
            torch.testing.assert_close(parameter.detach(), expected, rtol=1e-5, atol=1e-6)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)


def test_corrupt_image_and_empty_caption_train_to_the_end_and_are_reported(tmp_path, processor, load_model):
    folder = tmp_path / "data"
    folder.mkdir()
    rows = image_rows(7)
    metadata = []
    for i, (image, caption) in enumerate(zip(rows["image"], rows["caption"])):
        image.save(folder / f"{i}.png")
        metadata.append({"file_name": f"{i}.png", "caption": caption})
    (folder / "broken.png").write_bytes(b"this is not a PNG")
    metadata.append({"file_name": "broken.png", "caption": "a broken picture"})
    rows["image"][0].save(folder / "uncaptioned.png")
    metadata.append({"file_name": "uncaptioned.png", "caption": "   "})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in metadata))

    dataset = load_image_text_dataset(folder, image_column="image", caption_columns="caption")
    assert len(dataset) == 9
    trainer = ProCLIPTrainer(
        load_model(), training_args(tmp_path, stage=2, per_device_train_batch_size=3, max_steps=-1, num_train_epochs=1),
        train_dataset=dataset, processing_class=processor,
    )
    trainer.train()
    assert trainer.state.global_step == 3
    report = json.loads((tmp_path / "out" / "training_report.json").read_text())
    assert report["skipped"] == {"corrupt_image": 1, "empty_caption": 1}
    assert report["global_step"] == 3


def test_proclip_train_command_writes_a_hub_ready_folder(tmp_path, tiny_proclip_dir):
    from proclip_train.cli import main

    train, _ = captions_split()
    datasets.Dataset.from_dict({"text": train[:32], "alt": train[32:64]}).to_json(tmp_path / "captions.jsonl")
    config = tmp_path / "stage1.yaml"
    config.write_text(
        f"stage: 1\nmodel: {tiny_proclip_dir}\ncaption_column: [text]\nmax_steps: 3\nper_device_train_batch_size: 8\n"
        "learning_rate: 0.001\nuse_cpu: true\nreduction: mean\n"
    )
    out = tmp_path / "stage1"
    main(["train", "--config", str(config), "--data", str(tmp_path / "captions.jsonl"), "--out", str(out),
          "--caption-column", "text", "alt", "--max_steps", "2", "--save_strategy", "no", "--disable_tqdm", "true"])

    report = json.loads((out / "training_report.json").read_text())
    assert report["global_step"] == 2  # the command line wins over the file
    arguments = json.loads((out / "training_args.json").read_text())  # the recipe, as model cards read it
    assert arguments["caption_column"] == ["text", "alt"] and arguments["reduction"] == "mean"
    assert arguments["stage"] == "inheritance" and arguments["learning_rate"] == 0.001 and arguments["max_steps"] == 2
    for name in ("config.json", "model.safetensors", "modeling_proclip.py", "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    trained, start = ProCLIPModel.from_pretrained(out), ProCLIPModel.from_pretrained(tiny_proclip_dir)
    assert not torch.equal(trained.text_adapter.proj.weight, start.text_adapter.proj.weight)
    assert torch.equal(trained.vision_model.post_layernorm.weight, start.vision_model.post_layernorm.weight)




def test_no_pinned_memory_without_an_accelerator(tmp_path):
    """Pinned memory only helps copies to an accelerator: on a CPU run the Trainer's DataLoader must not ask for it
    (torch warns "'pin_memory' argument is set as true but no accelerator is found" at every stage-2 run)."""
    args = ProCLIPTrainingArguments(output_dir=str(tmp_path), stage=2)  # no --use_cpu: as `proclip train` runs
    assert args.dataloader_pin_memory is torch.accelerator.is_available()
    assert ProCLIPTrainingArguments(output_dir=str(tmp_path), stage=2, use_cpu=True).dataloader_pin_memory is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        list(torch.utils.data.DataLoader([1, 2], pin_memory=args.dataloader_pin_memory))


def test_after_ctrl_c_proclip_train_names_the_checkpoint_to_resume_from(tmp_path):
    """What `proclip train` says after Ctrl-C when --out holds checkpoints: the newest complete one (an incomplete
    newer one, without trainer_state.json, is passed over), and how to resume; an --out it created empty is removed."""
    from proclip_train.cli.train import _after_interrupt

    out = tmp_path / "out"
    for step, state in ((2, True), (4, False)):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / ("trainer_state.json" if state else "optimizer.pt")).write_text("{}")
    assert _after_interrupt(out, existed=True) == (
        f"{out} keeps checkpoint-2: add --resume_from_checkpoint to the command to go on from it."
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _after_interrupt(empty, existed=False).startswith(f"removed {empty}") and not empty.exists()
