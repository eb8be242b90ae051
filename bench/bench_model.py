"""Benchmark the model face against the libraries users compare it with, side by side in one run.

    python bench/bench_model.py [--repeats 20]

1. `ProCLIPModel.get_image_features` vs `CLIPModel.get_image_features` on the same weights (a ViT-B/32-shaped tower,
   random weights, 224 px): time ratio (aim <= 1.02).
2. Text encoding throughput of ProCLIP (the real all-MiniLM-L6-v2 as text tower, mean pooling, through
   `proclip_train.evaluation.tasks.embed_texts`, the encoder `proclip eval` uses: longest-first batches, adapter included)
   vs sentence-transformers' `SentenceTransformer.encode` on the same weights and pooling (aim >= 1.0).
Timings interleave the two sides and report medians, so machine noise hits both alike.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import minilm_folder  # noqa: E402
from proclip_train.evaluation.tasks import embed_texts  # noqa: E402

from modeling_proclip import ProCLIPModel, ProCLIPProcessor  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(repeats):
        a.append(median_seconds(fn_a, 1))
        b.append(median_seconds(fn_b, 1))
    return statistics.median(a), statistics.median(b)


def bench_image(workdir: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(vision_config=dict(image_size=224, patch_size=32), projection_dim=512)).eval()
    clip.save_pretrained(workdir / "clip")
    CLIPImageProcessor().save_pretrained(workdir / "clip")
    ours = ProCLIPModel.from_towers(vision=workdir / "clip", text=minilm_folder(), adapter_expansion=1).eval()
    pixels = torch.randn(8, 3, 224, 224)
    with torch.inference_mode():
        t_ours, t_clip = interleaved(
            lambda: ours.get_image_features(pixels), lambda: clip.get_image_features(pixel_values=pixels), repeats
        )
    return {"proclip_s": t_ours, "clip_s": t_clip, "ratio": t_ours / t_clip}


def bench_text(workdir: Path, repeats: int) -> dict:
    from sentence_transformers import SentenceTransformer

    captions = [f"a photo of {n} red circles next to a small blue square number {n}" for n in range(256)]
    st = SentenceTransformer(str(minilm_folder()), device="cpu")
    ours = ProCLIPModel.from_towers(vision=workdir / "clip", text=minilm_folder(), adapter_expansion=1).eval()
    tokenizer = ProCLIPProcessor.from_towers(workdir / "clip", minilm_folder(), ours.config).tokenizer  # for the check

    processor = ProCLIPProcessor.from_towers(workdir / "clip", minilm_folder(), ours.config)

    def encode_ours():
        embed_texts(ours, processor, captions, batch_size=32)

    with torch.inference_mode():
        check = tokenizer(captions[:4], padding=True, return_tensors="pt")
        # all-MiniLM-L6-v2 ends with a Normalize module: compare directions
        ours_pooled = torch.nn.functional.normalize(ours.get_llm_embeddings(check["input_ids"], check["attention_mask"]), dim=-1)
        same = torch.allclose(ours_pooled, torch.as_tensor(st.encode(captions[:4])), atol=1e-4)
        t_ours, t_st = interleaved(
            encode_ours, lambda: st.encode(captions, batch_size=32, show_progress_bar=False), repeats
        )
    return {"same_embeddings": same, "proclip_captions_per_s": len(captions) / t_ours,
            "sentence_transformers_captions_per_s": len(captions) / t_st, "ratio": t_st / t_ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        image = bench_image(Path(tmp), args.repeats)
        print(f"get_image_features, 8 x 224 px, ViT-B/32 shape: ProCLIP {image['proclip_s'] * 1e3:.1f} ms, "
              f"CLIPModel {image['clip_s'] * 1e3:.1f} ms, ratio {image['ratio']:.3f} (aim <= 1.02)")
        text = bench_text(Path(tmp), args.repeats)
        print(f"MiniLM text tower, 256 captions, batch 32: ProCLIP {text['proclip_captions_per_s']:.0f}/s, "
              f"sentence-transformers {text['sentence_transformers_captions_per_s']:.0f}/s, "
              f"ratio {text['ratio']:.3f} (aim >= 1.0); same embeddings: {text['same_embeddings']}")


if __name__ == "__main__":
    main()
