"""Benchmark the model face against the libraries users compare it with, side by side in one run.

    python bench/bench_model.py [--repeats 20] [--threads N] [--equal-threads 2] [--text-only]

1. `ProCLIPModel.get_image_features` vs `CLIPModel.get_image_features` on the same weights (a ViT-B/32-shaped tower,
   random weights, 224 px): time ratio (aim <= 1.02).
2. Text encoding throughput of ProCLIP (the real all-MiniLM-L6-v2 as text tower, mean pooling, adapter included) vs
   sentence-transformers' `SentenceTransformer.encode` on the same weights and pooling, same captions, batch 32: through
   `model.encode_text` (the user's API: longest-first batches, inference mode), through `embed_joint_texts` (what
   `proclip eval` uses), and through the plain loop a user would write (`processor(text=batch)` +
   `get_text_features`, in input order, gradients on) (aim for `encode_text`: >= 1.0). Two cases in one run: captions
   of varied length at `--threads` threads, and captions of one token length (where sorting gains nothing) at
   `--equal-threads` threads.
Timings interleave the sides and report medians, so machine noise hits all alike; the text ratios are medians of
per-round ratios, the order of the sides reversed every other round.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
from transformers.utils.logging import disable_progress_bar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_onnx import interleaved_medians  # noqa: E402
from conftest import minilm_folder  # noqa: E402
from proclip_train.evaluation.tasks import embed_joint_texts  # noqa: E402

from modeling_proclip import ProCLIPModel, ProCLIPProcessor  # noqa: E402


def write_clip(workdir: Path) -> CLIPModel:
    """A ViT-B/32-shaped CLIPModel with random weights, saved to `workdir/clip` (both benchmarks' CLIP tower)."""
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=dict(image_size=224, patch_size=32), projection_dim=512)).eval()
    clip.save_pretrained(workdir / "clip")
    CLIPImageProcessor().save_pretrained(workdir / "clip")
    return clip


def bench_image(workdir: Path, clip: CLIPModel, repeats: int) -> dict:
    ours = ProCLIPModel.from_towers(vision=workdir / "clip", text=minilm_folder(), adapter_expansion=1).eval()
    pixels = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        times = interleaved_medians({"proclip": lambda: ours.get_image_features(pixels),
                                     "clip": lambda: clip.get_image_features(pixel_values=pixels)}, repeats)
    return {"proclip_s": times["proclip"], "clip_s": times["clip"], "ratio": times["proclip"] / times["clip"]}


COLOURS = ("red", "blue", "green", "yellow")
SHAPES = ("circle", "square", "triangle", "star")


def mixed_captions() -> list[str]:
    """256 captions of varied length (as real ones): sorting by length saves padding."""
    captions = [f"a photo of {n} red circles next to a small blue square number {n}" for n in range(256)]
    return [caption + " on a table" * (n % 5) for n, caption in enumerate(captions)]


def equal_captions() -> list[str]:
    """256 captions of one token length (the demo's templates): sorting by length gains nothing."""
    return [f"a photo of a {COLOURS[n % 4]} {SHAPES[n // 4 % 4]} next to a {COLOURS[n // 16 % 4]} {SHAPES[n // 64]}"
            for n in range(256)]


def bench_text(workdir: Path, captions: list[str], repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_folder()), device="cpu")
    ours = ProCLIPModel.from_towers(vision=workdir / "clip", text=minilm_folder(), adapter_expansion=1).eval()
    processor = ProCLIPProcessor.from_towers(workdir / "clip", minilm_folder(), ours.config)

    def plain_loop():
        return [ours.get_text_features(**processor(text=captions[i : i + 32])).pooler_output for i in range(0, 256, 32)]

    sides = {
        "encode_text": lambda: ours.encode_text(captions, batch_size=32, processor=processor),
        "embed_joint_texts": lambda: embed_joint_texts(ours, processor, captions, batch_size=32),
        "plain_loop": plain_loop,
        "sentence_transformers": lambda: st.encode(captions, batch_size=32, show_progress_bar=False),
    }
    with torch.inference_mode():
        check = processor(text=captions[:4])
        # all-MiniLM-L6-v2 ends with a Normalize module: compare directions
        ours_pooled = torch.nn.functional.normalize(ours.get_llm_embeddings(check["input_ids"], check["attention_mask"]), dim=-1)
        same = torch.allclose(ours_pooled, torch.as_tensor(st.encode(captions[:4])), atol=1e-4)
    times = alternating_rounds(sides, repeats)
    reference = times["sentence_transformers"]
    return {
        "same_embeddings": same,
        "captions_per_s": {name: len(captions) / statistics.median(runs) for name, runs in times.items()},
        "ratios": {name: statistics.median(st / t for st, t in zip(reference, runs)) for name, runs in times.items()},
    }


def alternating_rounds(sides: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of each callable in each round, after one warm-up each. Every other round runs the sides in reverse
    order, so no side always follows the same one; a round's times are paired, and a ratio is the median of the
    per-round ratios (load from other jobs shifts whole rounds, which pairing cancels)."""
    for fn in sides.values():
        fn()
    names, times = list(sides), {name: [] for name in sides}
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--text-only", action="store_true", help="time the text side only")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default 0: torch's default)")
    parser.add_argument("--equal-threads", type=int, default=2,
                        help="torch threads for the second text case, captions of one length (default 2; 0: skip it)")
    args = parser.parse_args()
    disable_progress_bar()  # embed_joint_texts shows one, as `proclip eval` does
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        clip = write_clip(Path(tmp))
        if not args.text_only:
            image = bench_image(Path(tmp), clip, args.repeats)
            print(f"get_image_features, 8 x 224 px, ViT-B/32 shape: ProCLIP {image['proclip_s'] * 1e3:.1f} ms, "
                  f"CLIPModel {image['clip_s'] * 1e3:.1f} ms, ratio {image['ratio']:.3f} (aim <= 1.02)")
        cases = [("varied lengths", mixed_captions(), torch.get_num_threads())]
        if args.equal_threads:
            cases.append(("one length", equal_captions(), args.equal_threads))
        for label, captions, threads in cases:
            torch.set_num_threads(threads)
            text = bench_text(Path(tmp), captions, args.repeats)
            print(f"MiniLM text tower, 256 captions of {label}, batch 32, {threads} thread(s): captions/s (median), and "
                  f"the median per-round ratio of speed to sentence-transformers (aim for encode_text >= 1.0); "
                  f"same embeddings: {text['same_embeddings']}")
            for name, rate in text["captions_per_s"].items():
                print(f"  {name:>22}: {rate:7.1f}/s  ({text['ratios'][name]:.3f})")


if __name__ == "__main__":
    main()
