"""Benchmark training: the embedding cache, the Trainer's overhead, and peak memory per stage.

    python bench/bench_training.py [--threads 2] [--batch-size 32] [--steps 6] [--stage2-steps 30] [--out FILE.json]
                                   [--parts stage1,stage2,memory]

Towers: the real SmolLM2-135M-Instruct (`training/packaged_towers.py`, mean pooling) as the LLM; a CLIP with a ViT-B/32-shaped
text encoder (12 layers, width 512, 77 tokens: the stage-1 teacher) and a small ViT (4 layers, width 256, 224 px,
patch 32) as the image tower, random weights. Captions are 15-30 words.

1. Stage-1 steps/s through `ProCLIPTrainer` with the LLM and the teacher run on the fly, with the LLM cached, and with
   both cached (`proclip embed`): the cache's speed-up (aim >= 10x).
2. Stage-2 step time through `ProCLIPTrainer` vs a plain PyTorch loop of the same math (same model, data loader and
   collator, AdamW, grad clipping, EMA teacher, self-distillation loss, logit-scale clamp), interleaved step by step in
   one process (a callback runs one plain step between two Trainer steps), medians (aim <= 1.10x).
3. Peak memory of each stage's `train()`, each in a fresh process: CUDA peak allocated on a GPU; on a CPU the peak
   resident set size (Linux VmHWM, reset before `train()`), and its increase over the resident size at that point.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from proclip_train.training.packaged_towers import packaged_tower_dir
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.cache import EmbeddingCache, build_embedding_cache
from proclip_train.training.losses import ContrastiveDistillationLoss
from proclip_train.training.stages import LOGIT_SCALE_MAX, EMATeacher
from proclip_train.training.trainer import ProCLIPTrainer
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    TrainerCallback,
)

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

WORDS = "red blue green small large circle square star above below beside a the of with and near two three".split()


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(15, 31))) + f" {i}" for i in range(n)]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (240, 256, 3), dtype=np.uint8)) for _ in range(n)]


def build_model_folder(workdir: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(packaged_tower_dir("minilm"))
    tokenizer.model_max_length = 77
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=32),
        projection_dim=512,
    )
    CLIPModel(clip_config).save_pretrained(workdir / "clip")
    tokenizer.save_pretrained(workdir / "clip")
    CLIPImageProcessor().save_pretrained(workdir / "clip")
    smollm2 = packaged_tower_dir("smollm2")
    model = ProCLIPModel.from_towers(vision=workdir / "clip", text=smollm2, pooling="mean")
    model.save_pretrained(workdir / "proclip")
    ProCLIPProcessor.from_towers(workdir / "clip", smollm2, model.config).save_pretrained(workdir / "proclip")
    return workdir / "proclip"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return list(np.diff(self.times))  # the first step (warm-up) has no predecessor and is left out


class PeakMemory:
    """Peak memory of a block.

    CUDA: peak allocated. CPU (Linux): the peak resident set size since a VmHWM reset, and the peak of its anonymous
    part (RssAnon, sampled every 5 ms): activations, gradients, optimizer state, teacher copies, but not the pages of
    memory-mapped safetensors weights, which count in the RSS as soon as they are read (e.g. by hashing them).
    """

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.start = _proc_status("VmRSS")
            self.anon_start = self.anon_peak = _proc_status("RssAnon")
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.anon_peak = max(self.anon_peak, _proc_status("RssAnon"))

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._sampler.join()
            self.peak = _proc_status("VmHWM")
            self.anon_peak = max(self.anon_peak, _proc_status("RssAnon"))

    def report(self) -> dict:
        if torch.cuda.is_available():
            return {"kind": "cuda_allocated", "peak_mib": self.peak / 2**20,
                    "increase_mib": (self.peak - self.start) / 2**20}
        return {"kind": "cpu_rss", "peak_mib": self.peak / 2**20, "increase_mib": (self.peak - self.start) / 2**20,
                "anon_peak_mib": self.anon_peak / 2**20, "anon_increase_mib": (self.anon_peak - self.anon_start) / 2**20}


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def args_for(workdir: Path, batch_size: int, steps: int, stage: int, **overrides) -> ProCLIPTrainingArguments:
    """Plain AdamW (torch's defaults, no decay, clipping at 1): the same update as `plain_stage2_loop`."""
    values = dict(
        output_dir=str(workdir / "run"), stage=stage, per_device_train_batch_size=batch_size, max_steps=steps,
        learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", adam_beta2=0.999,
        adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0, save_strategy="no", report_to="none",
        disable_tqdm=True, logging_steps=10**6, seed=0, dataloader_num_workers=0,
    )
    values.update(overrides)
    return ProCLIPTrainingArguments(**values)


def run_trainer(folder, processor, dataset, args, cache=None) -> tuple[list[float], dict]:
    model = ProCLIPModel.from_pretrained(folder)
    timer = StepTimer()
    trainer = ProCLIPTrainer(
        model, args, train_dataset=dataset, processing_class=processor, embedding_cache=cache, callbacks=[timer]
    )
    with PeakMemory() as memory:
        trainer.train()
    return timer.step_seconds(), memory.report()


def stage2_dataset(n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"image": images(n), "caption": captions(n)}).cast_column("image", datasets.Image())


MEMORY_RUNS = {  # name -> (stage, cache folder name or None)
    "stage1_on_the_fly": (1, None),
    "stage1_all_cached": (1, "cache_all"),
    "stage2_on_the_fly": (2, None),
    "stage2_llm_cached": (2, "cache_llm"),
}


def memory_run(workdir: Path, name: str, batch_size: int) -> dict:
    """One short `train()` in this (fresh) process; its peak memory."""
    stage, cache_name = MEMORY_RUNS[name]
    folder = workdir / "proclip"
    processor = ProCLIPProcessor.from_pretrained(folder)
    dataset = datasets.Dataset.from_dict({"caption": captions(batch_size * 3)}) if stage == 1 else stage2_dataset(batch_size * 3)
    cache = EmbeddingCache(workdir / cache_name) if cache_name else None
    _, memory = run_trainer(folder, processor, dataset, args_for(workdir, batch_size, 3, stage), cache)
    return memory


def bench_memory(workdir: Path, batch_size: int, threads: int) -> dict:
    results = {}
    for name in MEMORY_RUNS:
        done = subprocess.run(
            [sys.executable, __file__, "--memory-run", name, "--workdir", str(workdir), "--batch-size", str(batch_size),
             "--threads", str(threads)],
            capture_output=True, text=True, check=True,
        )
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def bench_stage1(workdir, folder, processor, cache_dirs, batch_size, steps) -> dict:
    dataset = datasets.Dataset.from_dict({"caption": captions(batch_size * (steps + 1))})
    results = {}
    for name, cache_dir in (("on_the_fly", None), ("llm_cached", cache_dirs["llm"]), ("all_cached", cache_dirs["all"])):
        n = steps if cache_dir is None else steps * 5
        args = args_for(workdir, batch_size, n, 1, num_train_epochs=100)
        cache = EmbeddingCache(cache_dir) if cache_dir else None
        seconds, _ = run_trainer(folder, processor, dataset, args, cache)
        results[name] = {"steps_per_s": 1 / statistics.median(seconds), "step_s": statistics.median(seconds),
                         "timed_steps": len(seconds)}
    for name in ("llm_cached", "all_cached"):
        results[f"speedup_{name}"] = results[name]["steps_per_s"] / results["on_the_fly"]["steps_per_s"]
    return results


def plain_stage2_loop(folder, dataset, batch_size, collator, distill_weight, momentum):
    """The same math as ProCLIPTrainer's stage 2, as a plain loop: a generator that runs one step per `next()`."""
    model = ProCLIPModel.from_pretrained(folder)
    model.train()
    model.text_model.eval()
    trainable = ("text_adapter", "vision_model", "visual_projection", "logit_scale")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.split(".")[0] in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = EMATeacher(model, momentum)
    loss_fn = ContrastiveDistillationLoss(distill_weight)
    generator = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collator,
                                         generator=generator)
    while True:
        for batch in loader:
            pixel_values = batch["pixel_values"]
            image = model.get_image_features(pixel_values).pooler_output
            text = model.get_text_features(llm_embeds=batch["llm_embeds"]).pooler_output
            loss = loss_fn(image, text, model.logit_scale, ema(pixel_values))["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)
            ema.update(model)
            yield


class Interleave(TrainerCallback):
    """Between two Trainer steps, run one plain-loop step: both sides see the same machine load, step by step.

    A Trainer step is timed from the end of the plain step before it (so it includes its data loading) to its own end.
    """

    def __init__(self, plain_loop):
        self.plain_loop = plain_loop
        self.trainer_s, self.plain_s = [], []
        self.mark = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.mark is None:
            self.mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.trainer_s.append(now - self.mark)
        next(self.plain_loop)
        self.mark = time.perf_counter()
        self.plain_s.append(self.mark - now)


def bench_stage2(workdir, folder, processor, cache_dir, batch_size, steps) -> dict:
    dataset = stage2_dataset(batch_size * 4)
    cache = EmbeddingCache(cache_dir)

    def make_trainer(callbacks):
        return ProCLIPTrainer(
            ProCLIPModel.from_pretrained(folder),
            args_for(workdir, batch_size, steps + 1, 2, num_train_epochs=100, distill_weight=1.0, ema_momentum=0.999),
            train_dataset=dataset, processing_class=processor, embedding_cache=cache, callbacks=callbacks,
        )

    # The plain loop uses the collator the trainer builds (captions looked up in the cache, images decoded, cropped).
    plain_loop = plain_stage2_loop(folder, dataset, batch_size, make_trainer([]).data_collator, 1.0, 0.999)
    interleave = Interleave(plain_loop)
    make_trainer([interleave]).train()
    trainer_s, plain_s = interleave.trainer_s[1:], interleave.plain_s[1:]  # the first step of each warms up
    return {"trainer_step_s": statistics.median(trainer_s), "plain_loop_step_s": statistics.median(plain_s),
            "ratio": statistics.median(trainer_s) / statistics.median(plain_s),
            "ratio_of_means": statistics.mean(trainer_s) / statistics.mean(plain_s), "timed_steps_each": len(trainer_s)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per stage-1 on-the-fly / stage-2 run")
    parser.add_argument("--stage2-steps", type=int, default=30, help="timed stage-2 steps on each side")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--parts", default="stage1,stage2,memory", help="comma-separated subset of stage1,stage2,memory")
    parser.add_argument("--memory-run", choices=list(MEMORY_RUNS), help=argparse.SUPPRESS)  # internal: one fresh process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.memory_run:
        print(json.dumps(memory_run(Path(args.workdir), args.memory_run, args.batch_size)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        folder = build_model_folder(workdir)
        processor = ProCLIPProcessor.from_pretrained(folder)
        model = ProCLIPModel.from_pretrained(folder)
        from proclip_train.training.stages import load_clip_text_teacher

        teacher = load_clip_text_teacher(str(workdir / "clip"))
        teacher_tokenizer = AutoTokenizer.from_pretrained(workdir / "clip")
        parts = set(args.parts.split(","))
        stage1_texts = captions(args.batch_size * (args.steps * 5 + 1)) if parts & {"stage1", "memory"} else []
        texts = stage1_texts + captions(args.batch_size * 4)  # stage 2 reads the first batch_size * 4 of them
        start = time.perf_counter()
        build_embedding_cache(model, processor.tokenizer, texts, workdir / "cache_llm", batch_size=64, progress=False)
        embed_s = time.perf_counter() - start
        if stage1_texts:
            build_embedding_cache(model, processor.tokenizer, stage1_texts, workdir / "cache_all", teacher=teacher,
                                  teacher_tokenizer=teacher_tokenizer, batch_size=64, progress=False)
        del model, teacher

        results = {
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "embed_llm_captions_per_s": len(set(texts)) / embed_s,
        }
        if "stage1" in parts:
            caches = {"llm": workdir / "cache_llm", "all": workdir / "cache_all"}
            results["stage1"] = bench_stage1(workdir, folder, processor, caches, args.batch_size, args.steps)
        if "stage2" in parts:
            results["stage2"] = bench_stage2(
                workdir, folder, processor, workdir / "cache_llm", args.batch_size, args.stage2_steps
            )
        if "memory" in parts:
            results["memory"] = bench_memory(workdir, args.batch_size, torch.get_num_threads())
    print(f"device {results['device']}, {results['threads']} threads, batch {args.batch_size}")
    print(f"proclip embed (SmolLM2-135M, fp32): {results['embed_llm_captions_per_s']:.1f} captions/s")
    if "stage1" in results:
        s1 = results["stage1"]
        for name in ("on_the_fly", "llm_cached", "all_cached"):
            print(f"stage 1 {name:11s}: {s1[name]['steps_per_s']:8.2f} steps/s")
        print(f"stage 1 speed-up: LLM cached {s1['speedup_llm_cached']:.1f}x, LLM + teacher cached "
              f"{s1['speedup_all_cached']:.1f}x")
    if "stage2" in results:
        s2 = results["stage2"]
        print(f"stage 2: Trainer {s2['trainer_step_s'] * 1000:.0f} ms/step vs plain loop "
              f"{s2['plain_loop_step_s'] * 1000:.0f} ms/step = {s2['ratio']:.3f}x")
    for name, memory in results.get("memory", {}).items():
        line = f"memory {name:18s}: peak {memory['peak_mib']:6.0f} MiB ({memory['kind']})"
        if "anon_peak_mib" in memory:
            line += f", anonymous peak {memory['anon_peak_mib']:6.0f} MiB (+{memory['anon_increase_mib']:.0f} in train())"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
