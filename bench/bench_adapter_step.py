"""Benchmark the cached stage-1 step at the paper's size through `ProCLIPTrainer`, against the machine's GEMM peak.

    python bench/bench_adapter_step.py [--batch-size 256] [--steps 3] [--rounds 2] [--threads N]
                                       [--variants fp32-stock,fp32,bf16-autocast,bf16] [--profile] [--out FILE.json]

The model: a `ProCLIPModel` built from configs with upstream's adapter (H = 4096, D = 1280, expansion 8, one block:
273.7 M parameters): a tiny CLIP (2-layer towers, `projection_dim` 1280) and a one-layer Llama of hidden size 4096
whose other sizes are tiny (it runs only to fill the cache). `proclip embed`'s `build_embedding_cache` stores its
pooled embeddings and the CLIP teacher's, so a stage-1 step is the adapter's forward and backward, the loss, gradient
clipping and the optimiser update: the recipe's defaults (fused AdamW, weight decay 0.05, clipping at 5, cosine).

Variants (`ProCLIPTrainingArguments` options; "-stock" and "-autocast" are the settings before this benchmark):

    fp32-stock       float32, keep_freed_memory=False
    fp32             float32, keep_freed_memory=True (the default)
    fp32-foreach     as fp32 with the for-each AdamW (optim=adamw_torch) instead of the fused one
    bf16-autocast    --bf16, bf16_master_weights=False, keep_freed_memory=False: autocast over float32 weights
    bf16             --bf16 with the defaults: bfloat16 working weights, float32 masters, keep_freed_memory=True

Each variant runs `--rounds` times in a fresh process (the allocator setting is process-wide), the variants in turn,
each run one warm-up step and `--steps` timed steps. After every step, in the same process, the reference products
run: the step's own GEMMs bare (the forward, input-gradient and weight-gradient products of each linear layer of the
adapter, in autograd's memory layouts, so the same FLOPs as the step, which a `FlopCounterMode` count confirms;
preallocated outputs) in the step's precision, and a square 4096^3 GEMM in float32 and in bfloat16: the machine's peak at that moment.

Reported per variant (medians): step time, achieved GFLOP/s, % of the float32 and bfloat16 peaks, the share of the
step its own GEMMs would take bare; and bf16 vs fp32 speed-ups, each variant's step time taken relative to the float32
peak GEMM measured beside it (the machine is shared: that ratio cancels its load). `--profile` adds one profiled step
per variant (torch.profiler): the step split into GEMMs, the optimiser step, gradient clipping, and the rest.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from proclip_train.training.bpe import train_tokenizer
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.cache import EmbeddingCache, build_embedding_cache
from proclip_train.training.losses import InheritanceLoss
from proclip_train.training.stages import load_clip_text_teacher
from proclip_train.training.trainer import ProCLIPTrainer
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, LlamaConfig, LlamaModel, TrainerCallback

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

HIDDEN, PROJECTION = 4096, 1280
PEAK_SIZE = 4096
WORDS = "red blue green small large circle square star above below beside a the of with and near two three".split()
VARIANTS = {
    "fp32-stock": dict(bf16=False, keep_freed_memory=False),
    "fp32": dict(bf16=False),
    "fp32-foreach": dict(bf16=False, optim="adamw_torch"),
    "bf16-autocast": dict(bf16=True, bf16_master_weights=False, keep_freed_memory=False),
    "bf16": dict(bf16=True),
}
GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
CLIP_OPS = {"aten::_foreach_norm", "aten::_foreach_mul_"}  # clip_grad_norm_'s, the only for-each ops outside the optimiser


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(8, 16))) + f" {i}" for i in range(n)]


def build(workdir: Path, texts: list[str]) -> tuple[Path, Path]:
    """The paper-size ProCLIP folder and an embedding cache of `texts` (LLM and teacher embeddings)."""
    torch.manual_seed(0)
    tokenizer = train_tokenizer(texts[:200], vocab_size=300, max_length=77)
    clip_config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=PROJECTION,
    )
    for folder in ("clip", "llm"):
        tokenizer.save_pretrained(workdir / folder)
    CLIPModel(clip_config).save_pretrained(workdir / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(workdir / "clip")
    LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )).save_pretrained(workdir / "llm")
    model = ProCLIPModel.from_towers(vision=workdir / "clip", text=workdir / "llm", pooling="mean")
    processor = ProCLIPProcessor.from_towers(workdir / "clip", workdir / "llm", model.config)
    folder = workdir / "proclip"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    teacher = load_clip_text_teacher(str(workdir / "clip"))
    build_embedding_cache(model, processor.tokenizer, texts, workdir / "cache", teacher=teacher,
                          teacher_tokenizer=AutoTokenizer.from_pretrained(workdir / "clip"), progress=False)
    return folder, workdir / "cache"


# ---------------------------------------------------------------------------------------------------------------------
# The reference products
# ---------------------------------------------------------------------------------------------------------------------


class ReferenceGEMMs:
    """The step's own matrix products, bare, in `dtype`, laid out as autograd lays them out: for each linear layer
    (in -> out, weight W of shape (out, in)) at batch B, the forward x W^T, the input gradient g W and the weight
    gradient g^T x, each into a preallocated output; and square `PEAK_SIZE` GEMMs in float32 and bfloat16."""

    def __init__(self, adapter: nn.Module, batch_size: int, dtype: torch.dtype):
        self.products, self.flops = [], 0
        for linear in [m for m in adapter.modules() if isinstance(m, nn.Linear)]:
            n_in, n_out = linear.in_features, linear.out_features
            x, g = torch.randn(batch_size, n_in, dtype=dtype), torch.randn(batch_size, n_out, dtype=dtype)
            weight = torch.randn(n_out, n_in, dtype=dtype)
            self.products += [
                (x, weight.t(), torch.empty(batch_size, n_out, dtype=dtype)),
                (g, weight, torch.empty(batch_size, n_in, dtype=dtype)),
                (g.t(), x, torch.empty(n_out, n_in, dtype=dtype)),
            ]
            self.flops += 3 * 2 * batch_size * n_in * n_out
        self.square = {
            name: [torch.randn(PEAK_SIZE, PEAK_SIZE, dtype=d) for _ in range(3)]
            for name, d in (("fp32", torch.float32), ("bf16", torch.bfloat16))
        }

    def step_gemms_s(self) -> float:
        start = time.perf_counter()
        for a, b, out in self.products:
            torch.mm(a, b, out=out)
        return time.perf_counter() - start

    def peak_gflops(self, name: str) -> float:
        a, b, out = self.square[name]
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        return 2 * PEAK_SIZE**3 / (time.perf_counter() - start) / 1e9


def counted_step_flops(model: ProCLIPModel, batch_size: int) -> int:
    """FLOPs of one stage-1 forward and backward of the adapter, counted by torch (FlopCounterMode)."""
    loss = InheritanceLoss()
    llm, teacher = torch.randn(batch_size, HIDDEN), torch.randn(batch_size, PROJECTION)
    with FlopCounterMode(display=False) as counter:
        loss(model.get_text_features(llm_embeds=llm).pooler_output, teacher)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------------------
# One run (a fresh process)
# ---------------------------------------------------------------------------------------------------------------------


class StepClock(TrainerCallback):
    """Step times (from the end of the previous step's reference products to the end of this step: data included),
    the reference products after each step, and optionally a profile of the last step."""

    def __init__(self, references: ReferenceGEMMs, profile_last: bool):
        self.references, self.profile_last = references, profile_last
        self.step_s, self.step_gemms_s, self.peak = [], [], {"fp32": [], "bf16": []}
        self.phases, self.profiler, self.mark = [], None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._pre_optimizer = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_done = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        end = time.perf_counter()
        if self.profiler is not None:
            self.profiler.stop()
            self.phases.append({"forward_backward_clip_s": self._pre_optimizer - self.mark,
                                "optimizer_s": self._optimizer_done - self._pre_optimizer,
                                "after_optimizer_s": end - self._optimizer_done, "step_s": end - self.mark})
            return
        self.step_s.append(end - self.mark)
        self.step_gemms_s.append(self.references.step_gemms_s())
        for name in self.peak:
            self.peak[name].append(self.references.peak_gflops(name))
        if self.profile_last and state.global_step == state.max_steps - 1:
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profiler.start()
        self.mark = time.perf_counter()


def profile_split(profiler, step_s: float) -> dict:
    """Seconds of the profiled step in GEMMs (self time), the optimiser step, gradient clipping, and the rest."""
    events = profiler.key_averages()
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    optimizer = sum(e.cpu_time_total for e in events if e.key.startswith("Optimizer.step#")) / 1e6
    clip = sum(e.cpu_time_total for e in events if e.key in CLIP_OPS) / 1e6
    return {"gemm_s": gemm, "optimizer_s": optimizer, "clip_s": clip, "other_s": step_s - gemm - optimizer - clip,
            "step_s": step_s}


def run_variant(workdir: Path, variant: str, batch_size: int, steps: int, with_profile: bool) -> dict:
    folder = workdir / "proclip"
    processor = ProCLIPProcessor.from_pretrained(folder)
    model = ProCLIPModel.from_pretrained(folder)
    flops = counted_step_flops(model, batch_size)
    options = VARIANTS[variant]
    references = ReferenceGEMMs(model.text_adapter, batch_size, torch.bfloat16 if options["bf16"] else torch.float32)
    clock = StepClock(references, with_profile)
    args = ProCLIPTrainingArguments(
        output_dir=str(workdir / "run"), stage=1, per_device_train_batch_size=batch_size,
        max_steps=1 + steps + int(with_profile), learning_rate=1e-5, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, logging_steps=10_000, dataloader_num_workers=0, **options,
    )
    texts = json.loads((workdir / "captions.json").read_text())
    trainer = ProCLIPTrainer(
        model, args, train_dataset=datasets.Dataset.from_dict({"caption": texts}), processing_class=processor,
        embedding_cache=EmbeddingCache(workdir / "cache"), callbacks=[clock],
    )
    trainer.train()
    assert trainer.report["embedding_cache"].get("llm_misses", 0) == 0, trainer.report
    result = {
        "variant": variant, "options": options, "threads": torch.get_num_threads(), "step_flops": flops,
        "reference_flops": references.flops, "step_s": clock.step_s[1:], "step_gemms_s": clock.step_gemms_s[1:],
        "peak_gflops": {name: rates[1:] for name, rates in clock.peak.items()},
    }
    if with_profile:
        result["profile"] = profile_split(clock.profiler, clock.phases[-1]["step_s"])
        result["profile"]["phases"] = clock.phases[-1]
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------------


def summarise(runs: list[dict]) -> dict:
    """Per variant: medians over all timed steps of all its runs, and its step time relative to the fp32 peak."""
    summary = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        mine = [run for run in runs if run["variant"] == variant]
        step_s = statistics.median(s for run in mine for s in run["step_s"])
        flops = mine[0]["step_flops"]
        peak = {name: statistics.median(r for run in mine for r in run["peak_gflops"][name]) for name in ("fp32", "bf16")}
        # Each step against the fp32 peak GEMM measured right after it: step time in units of "peak fp32 time".
        relative = statistics.median(
            s * rate * 1e9 / flops for run in mine for s, rate in zip(run["step_s"], run["peak_gflops"]["fp32"])
        )
        summary[variant] = {
            "step_s": step_s, "gflops": flops / step_s / 1e9, "peak_gflops": peak,
            "percent_of_fp32_peak": 100 * flops / step_s / 1e9 / peak["fp32"],
            "percent_of_bf16_peak": 100 * flops / step_s / 1e9 / peak["bf16"],
            "own_gemms_share": statistics.median(g / s for run in mine for g, s in zip(run["step_gemms_s"], run["step_s"])),
            "step_in_fp32_peak_units": relative,
            "profile": next((run["profile"] for run in mine if "profile" in run), None),
        }
    for slow, fast in (("fp32", "bf16"), ("bf16-autocast", "bf16"), ("fp32-stock", "fp32"), ("fp32", "bf16-autocast")):
        if slow in summary and fast in summary:
            summary[f"speedup_{fast}_vs_{slow}"] = (
                summary[slow]["step_in_fp32_peak_units"] / summary[fast]["step_in_fp32_peak_units"]
            )
    return summary


def print_summary(summary: dict, flops: int, batch_size: int) -> None:
    print(f"stage-1 step, batch {batch_size}, {flops / 1e9:.0f} GFLOP (FlopCounterMode)")
    for variant, s in summary.items():
        if not isinstance(s, dict):
            continue
        print(f"{variant:14s} {s['step_s']:6.2f} s  {s['gflops']:6.1f} GFLOP/s = {s['percent_of_fp32_peak']:5.1f} % of fp32 "
              f"peak ({s['peak_gflops']['fp32']:.0f}), {s['percent_of_bf16_peak']:5.1f} % of bf16 peak "
              f"({s['peak_gflops']['bf16']:.0f}); its GEMMs bare: {100 * s['own_gemms_share']:.0f} % of the step")
        if s["profile"]:
            p = s["profile"]
            print(" " * 15 + "profile: " + ", ".join(
                f"{key[:-2]} {p[key]:.2f} s ({100 * p[key] / p['step_s']:.0f} %)"
                for key in ("gemm_s", "optimizer_s", "clip_s", "other_s")))
    for key, value in summary.items():
        if key.startswith("speedup_"):
            print(f"{key}: {value:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per variant, the variants in turn")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--variants", default="fp32-stock,fp32,bf16-autocast,bf16")
    parser.add_argument("--profile", action="store_true", help="one more, profiled step per variant (first round)")
    parser.add_argument("--out", help="write the runs and the summary as JSON")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: one variant in this (fresh) process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        result = run_variant(Path(args.workdir), args.run, args.batch_size, args.steps, args.profile)
        print("RESULT " + json.dumps(result))
        return 0
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose among {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        texts = captions(args.batch_size * (args.steps + 3))
        (workdir / "captions.json").write_text(json.dumps(texts))
        build(workdir, texts)
        runs = []
        for round_index in range(args.rounds):
            for variant in variants:
                command = [sys.executable, __file__, "--run", variant, "--workdir", str(workdir), "--batch-size",
                           str(args.batch_size), "--steps", str(args.steps)]
                command += ["--threads", str(args.threads)] * bool(args.threads)
                command += ["--profile"] * (args.profile and round_index == 0)
                done = subprocess.run(command, capture_output=True, text=True, env={**os.environ})
                if done.returncode != 0:
                    sys.exit(f"{variant} failed:\n{done.stderr[-4000:]}")
                result = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
                runs.append(result)
                print(f"round {round_index} {variant}: steps {[round(s, 2) for s in result['step_s']]} s", flush=True)
    summary = summarise(runs)
    print_summary(summary, runs[0]["step_flops"], args.batch_size)
    if args.out:
        Path(args.out).write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
