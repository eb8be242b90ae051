"""Benchmark ONNX Runtime against PyTorch eager on ProCLIP's two towers, side by side in one run.

    python bench/bench_onnx.py [--threads 1] [--repeats 7] [--demo DEMO_DIR] [--out bench_onnx.json]

Towers: a ViT-B/32-shaped image tower (CLIP defaults, patch 32, random weights, 224 px) and two real text towers,
all-MiniLM-L6-v2 (cls/mean encoder) and SmolLM2-135M-Instruct (decoder run bidirectionally, mean pooling with an
instruction left out of the mean, chat-template wrapping, left padding), each with ProCLIP's adapter. Each folder is
exported with `export_onnx(quantize="int8")`.

1. Parity: max |ONNX Runtime fp32 - PyTorch| of the image embeddings (8 x 224 px) and of the 256 captions' text
   embeddings; the int8 files' worst cosine to PyTorch.
2. Speed, same thread count on both sides (`torch.set_num_threads` = ONNX Runtime intra-op threads): image
   embeddings of 8 x 224 px images, and text embeddings of 256 captions through `embed_joint_texts` (the encoder
   `proclip eval` uses: longest first, batch 32, tokenizer included) with PyTorch eager, ONNX Runtime fp32 and
   int8. The three run interleaved, `--repeats` rounds; medians and the ratios PyTorch time / ONNX Runtime time.
3. `--demo DIR` (a `proclip demo` output): exports DIR/final (fp32 + int8) and scores zero-shot and retrieval on
   the world's test split (the demo's own protocol) and retrieval on its 600 training scenes (finer: one query =
   0.17 points) with PyTorch, ONNX fp32, ONNX int8, and the int8 image file with the fp32 text file; reports the
   deltas in points.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402
import torch  # noqa: E402
from proclip_train.training.packaged_towers import packaged_tower_dir  # noqa: E402
from proclip_train.demo.scores import LANGUAGES  # noqa: E402
from proclip_train.demo.languages import ZERO_SHOT_TEMPLATES, class_prompt  # noqa: E402
from proclip_train.demo.world import read_metadata  # noqa: E402
from proclip_train.evaluation.tasks import (  # noqa: E402
    embed_joint_texts,
    evaluate_retrieval,
    evaluate_zeroshot,
)
from proclip_train.hub.export.onnx import (  # noqa: E402
    OnnxExportOptions,
    OnnxProCLIP,
    export_onnx,
    onnx_paths,
    onnx_session,
)
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: E402

from modeling_proclip import ProCLIPModel, ProCLIPProcessor  # noqa: E402

CAPTIONS = [
    f"a photo of {n} red circles next to a small blue square" + " on a grey ground, seen from above" * (n % 4)
    for n in range(256)
]
TEXT_BATCH = 32
SMOLLM2_SETTINGS = dict(
    bidirectional=True, pooling="mean", prompt_template="<|im_start|>user\n{text}<|im_end|>",
    instruction="Represent this caption: ", padding_side="left",
)


def interleaved_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable, run in turn `repeats` times after one warm-up round."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def build_folder(out: Path, clip_dir: Path, text_dir: Path, **settings) -> Path:
    """A ProCLIP folder (model + processor) of the two towers, exported to ONNX fp32 and int8."""
    torch.manual_seed(0)
    model = ProCLIPModel.from_towers(vision=clip_dir, text=text_dir, **settings)
    model.save_pretrained(out)
    ProCLIPProcessor.from_towers(clip_dir, text_dir, model.config).save_pretrained(out)
    start = time.perf_counter()
    report = export_onnx(out, OnnxExportOptions(quantize="int8"))
    print(f"exported {out.name} in {time.perf_counter() - start:.0f} s: check batch {report.max_abs_diff}, "
          f"int8 {report.min_cosine}", flush=True)
    return out


def backends(folder: Path, threads: int) -> dict:
    return {
        "pytorch": ProCLIPModel.from_pretrained(folder).eval(),
        "onnx_fp32": OnnxProCLIP(folder, threads=threads),
        "onnx_int8": OnnxProCLIP(folder, "int8", threads=threads),
    }


def compare(embeds: dict[str, torch.Tensor], times: dict[str, float]) -> dict:
    reference = embeds["pytorch"]
    cosine = torch.nn.functional.cosine_similarity(embeds["onnx_int8"], reference, dim=-1)
    return {
        "max_abs_diff_fp32": (embeds["onnx_fp32"] - reference).abs().max().item(),
        "max_abs_embedding": reference.abs().max().item(),
        "min_cosine_int8": cosine.min().item(),
        "seconds": times,
        "speedup_fp32": times["pytorch"] / times["onnx_fp32"],
        "speedup_int8": times["pytorch"] / times["onnx_int8"],
    }


@torch.inference_mode()
def bench_image(folder: Path, threads: int, repeats: int) -> dict:
    pixels = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    runs = {name: (lambda m=model: m.get_image_features(pixel_values=pixels).pooler_output)
            for name, model in backends(folder, threads).items()}
    return compare({name: run() for name, run in runs.items()}, interleaved_medians(runs, repeats))


@torch.inference_mode()
def bench_text(folder: Path, threads: int, repeats: int) -> dict:
    processor = ProCLIPProcessor.from_pretrained(folder)
    runs = {name: (lambda m=model: embed_joint_texts(m, processor, CAPTIONS, batch_size=TEXT_BATCH))
            for name, model in backends(folder, threads).items()}
    return compare({name: run() for name, run in runs.items()}, interleaved_medians(runs, repeats))


def demo_datasets(world: Path) -> dict:
    """The demo's evaluation sets: zero-shot and retrieval on the test split (as `proclip demo` scores them), and
    retrieval on the training scenes."""
    test = read_metadata(world, "test")
    classes = [r for r in test if r["kind"] == "class"]
    columns = ["caption_short", *[f"caption_{language}" for language in LANGUAGES]]

    def scenes(rows):
        return datasets.Dataset.from_dict({"image": [r["image_path"] for r in rows], **{c: [r[c] for r in rows] for c in columns}})

    return {
        "zeroshot_test": datasets.Dataset.from_dict({"image": [r["image_path"] for r in classes],
                                                     "label": [class_prompt(r["label"]) for r in classes]}),
        "retrieval_test": scenes([r for r in test if r["kind"] == "scene"]),
        "retrieval_train": scenes([r for r in read_metadata(world, "align-train") if r["kind"] == "scene"]),
        "columns": columns,
    }


def scores(model, processor, sets: dict) -> dict[str, float]:
    """Flat `{metric name: value in points}` of one backend on the demo's sets."""
    flat = {}
    zeroshot = evaluate_zeroshot(model, processor, sets["zeroshot_test"], "image", "label", ZERO_SHOT_TEMPLATES)
    for key in ("top1_accuracy", "top5_accuracy"):
        flat[f"test zero-shot {key}"] = 100 * zeroshot["metrics"][key]
    for split in ("test", "train"):
        retrieval = evaluate_retrieval(model, processor, sets[f"retrieval_{split}"], "image", sets["columns"])
        for column, values in retrieval["metrics"].items():
            for key, value in values.items():
                if "R@" in key:
                    flat[f"{split} {column} {key}"] = 100 * value
    return flat


def bench_demo_accuracy(demo_dir: Path, threads: int) -> dict:
    final = demo_dir / "final"
    report = export_onnx(final, OnnxExportOptions(quantize="int8"))
    processor = ProCLIPProcessor.from_pretrained(final)
    sets = demo_datasets(demo_dir / "world")
    models = backends(final, threads)
    # The image tower's int8 file beside the text tower's fp32 one (dynamic int8 suits CLIP towers better than LLMs).
    models["onnx_int8_image_fp32_text"] = OnnxProCLIP(final, threads=threads)
    models["onnx_int8_image_fp32_text"].vision = onnx_session(onnx_paths(final, "int8")["vision"], threads)
    with torch.inference_mode():
        results = {name: scores(model, processor, sets) for name, model in models.items()}
    deltas = {
        name: {metric: results[name][metric] - value for metric, value in results["pytorch"].items()}
        for name in models if name != "pytorch"
    }
    return {"export_check": {"max_abs_diff": report.max_abs_diff, "min_cosine": report.min_cosine},
            "scores": results, "deltas": deltas,
            "max_abs_delta": {name: max(map(abs, values.values())) for name, values in deltas.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--demo", type=Path, help="a `proclip demo` output folder: int8 accuracy deltas on its data")
    parser.add_argument("--skip-speed", action="store_true", help="only the --demo accuracy deltas")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "repeats": args.repeats}
    if not args.skip_speed:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            torch.manual_seed(0)
            clip = CLIPModel(CLIPConfig(vision_config=dict(image_size=224, patch_size=32), projection_dim=512))
            clip.save_pretrained(work / "clip")
            CLIPImageProcessor().save_pretrained(work / "clip")
            minilm = build_folder(work / "minilm", work / "clip", packaged_tower_dir("minilm"))
            results["image_vit_b32_8x224"] = bench_image(minilm, args.threads, args.repeats)
            results["text_minilm_256"] = bench_text(minilm, args.threads, args.repeats)
            smollm2 = build_folder(work / "smollm2", work / "clip", packaged_tower_dir("smollm2"), **SMOLLM2_SETTINGS)
            results["text_smollm2_256"] = bench_text(smollm2, args.threads, args.repeats)
        for name in ("image_vit_b32_8x224", "text_minilm_256", "text_smollm2_256"):
            r = results[name]
            s = r["seconds"]
            print(f"{name}: PyTorch {s['pytorch'] * 1e3:.0f} ms, ONNX fp32 {s['onnx_fp32'] * 1e3:.0f} ms "
                  f"({r['speedup_fp32']:.2f}x), int8 {s['onnx_int8'] * 1e3:.0f} ms ({r['speedup_int8']:.2f}x); "
                  f"fp32 max abs diff {r['max_abs_diff_fp32']:.1e} (|embedding| <= {r['max_abs_embedding']:.2f}), "
                  f"int8 min cosine {r['min_cosine_int8']:.4f}")
    if args.demo:
        results["demo"] = bench_demo_accuracy(args.demo, args.threads)
        for name, values in results["demo"]["deltas"].items():
            print(f"{name} - PyTorch on {args.demo}, points: max |delta| {results['demo']['max_abs_delta'][name]:.2f}")
            for metric, delta in values.items():
                print(f"    {metric}: {results['demo']['scores']['pytorch'][metric]:.2f} {delta:+.2f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
