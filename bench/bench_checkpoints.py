"""Benchmark Trainer checkpoints: whole-model checkpoints (transformers' default, before) vs lean ones (after).

    python bench/bench_checkpoints.py [--steps 4] [--threads 2] [--out FILE.json]

A stage-2 run of `ProCLIPTrainer` on the real SmolLM2-135M-Instruct (`training/packaged_towers.py`, float32, the
frozen LLM) and a small CLIP image tower built from a config (4 layers, width 256, 224 px, patch 32, random weights),
a checkpoint after every step, twice in one process, runs alternating: `lean_checkpoints = False` (the whole model in
every checkpoint, as before) and `True` (the trained tensors, a hash reference to the frozen LLM, the same optimizer,
scheduler, RNG, EMA and counter files). Per variant: the bytes of a checkpoint folder and the time `_save_checkpoint`
takes (the first lean checkpoint also hashes the frozen LLM, once per run: reported apart), and the bytes of the
trained parameters and of the optimizer state. Asserts a lean checkpoint is at most 1.2 x (trained parameters'
bytes + optimizer state), and resumes once from the last lean checkpoint to check that it loads.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from proclip_train.training.packaged_towers import packaged_tower_dir
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.trainer import ProCLIPTrainer
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

BUDGET = 1.2  # a lean checkpoint's bytes / (trained parameters' bytes + optimizer state bytes), at most


def build_model_folder(workdir: Path) -> Path:
    """ProCLIP from a config-built CLIP (small ViT; a 1-layer text side, unused by ProCLIP) and the real SmolLM2."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(packaged_tower_dir("smollm2"))
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )
    CLIPModel(clip_config).save_pretrained(workdir / "clip")
    CLIPImageProcessor().save_pretrained(workdir / "clip")
    tokenizer.save_pretrained(workdir / "clip")
    smollm2 = packaged_tower_dir("smollm2")
    model = ProCLIPModel.from_towers(vision=workdir / "clip", text=smollm2, pooling="mean")
    model.save_pretrained(workdir / "proclip")
    ProCLIPProcessor.from_towers(workdir / "clip", smollm2, model.config).save_pretrained(workdir / "proclip")
    return workdir / "proclip"


def image_caption_dataset(n: int) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (240, 256, 3), dtype=np.uint8)) for _ in range(n)]
    captions = [f"a picture of noise, number {i}, in red and blue" for i in range(n)]
    return datasets.Dataset.from_dict({"image": pictures, "caption": captions}).cast_column("image", datasets.Image())


class TimedTrainer(ProCLIPTrainer):
    """Records how long each `_save_checkpoint` takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_seconds = []

    def _save_checkpoint(self, model, trial):
        start = time.perf_counter()
        super()._save_checkpoint(model, trial)
        self.save_seconds.append(time.perf_counter() - start)


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def optimizer_state_bytes(optimizer) -> int:
    return sum(tensor_bytes(state.values()) for state in optimizer.state_dict()["state"].values())


def run(model_dir: Path, data, out_dir: Path, lean: bool, steps: int, resume_from: str | None = None):
    args = ProCLIPTrainingArguments(
        output_dir=str(out_dir), stage=2, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-4,
        save_strategy="steps", save_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, logging_steps=100,
        seed=0,
    )
    trainer = TimedTrainer(ProCLIPModel.from_pretrained(model_dir), args, train_dataset=data,
                           processing_class=ProCLIPProcessor.from_pretrained(model_dir))
    trainer.lean_checkpoints = lean
    trainer.train(resume_from_checkpoint=resume_from)
    return trainer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="steps (= checkpoints) per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="results JSON")
    options = parser.parse_args()
    torch.set_num_threads(options.threads)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = build_model_folder(workdir)
        data = image_caption_dataset(4 * options.steps)
        results = {}
        for index, lean in enumerate((False, True, False, True)):  # alternating: the disk's state affects both alike
            name = "lean" if lean else "whole"
            trainer = run(model_dir, data, workdir / f"{name}-{index}", lean, options.steps)
            checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{options.steps}"
            entry = results.setdefault(name, {"bytes": folder_bytes(checkpoint), "first_seconds": [], "later_seconds": []})
            entry["first_seconds"].append(trainer.save_seconds[0])
            entry["later_seconds"] += trainer.save_seconds[1:]
            model = trainer.model
            trained = tensor_bytes(p for p in model.parameters() if p.requires_grad)
            optimizer = optimizer_state_bytes(trainer.optimizer)
            ema = tensor_bytes(trainer.stage.ema.state_dict().values())
        resumed = run(model_dir, data, workdir / "resumed", True, options.steps + 1, resume_from=str(checkpoint))
        assert resumed.state.global_step == options.steps + 1

    budget = BUDGET * (trained + optimizer)
    summary = {
        "model": "SmolLM2-135M-Instruct (float32, frozen) + CLIP ViT 4x256 224px/32 (config-built)",
        "trained_parameter_bytes": trained,
        "optimizer_state_bytes": optimizer,
        "ema_teacher_bytes": ema,
        "whole_checkpoint_bytes": results["whole"]["bytes"],
        "lean_checkpoint_bytes": results["lean"]["bytes"],
        "lean_over_trained_plus_optimizer": results["lean"]["bytes"] / (trained + optimizer),
        "whole_save_seconds_median": statistics.median(results["whole"]["later_seconds"] + results["whole"]["first_seconds"]),
        "lean_save_seconds_median": statistics.median(results["lean"]["later_seconds"]),
        "lean_first_save_seconds": results["lean"]["first_seconds"],  # includes hashing the frozen LLM once
        "runs": results,
    }
    for key, value in summary.items():
        if key != "runs":
            print(f"{key}: {value}")
    if options.out:
        options.out.write_text(json.dumps(summary, indent=2) + "\n")
    assert results["lean"]["bytes"] <= budget, f"lean checkpoint {results['lean']['bytes']} B > {BUDGET} x {trained + optimizer} B"


if __name__ == "__main__":
    main()
