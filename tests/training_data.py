"""Data and arguments the training tests share: flat-colour and noisy single-colour images with captions,
compositional caption splits, a small `ProCLIPTrainingArguments` (and the flags `proclip train` runs take), state-dict
snapshots, and NaN written into a cached embedding behind the cache's back."""

import itertools
import json
import os
import random

import datasets
import numpy as np
import torch
from PIL import Image
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.cache import (
    EmbeddingCache,
    caption_key,
    read_safetensors_header,
    shard_paths,
)
from safetensors import safe_open

COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 230), "yellow": (240, 230, 30),
    "black": (10, 10, 10), "white": (245, 245, 245), "purple": (130, 20, 150), "orange": (250, 140, 20),
}
COMMON = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1", "--seed", "0"]
SHAPES = ("circle", "square", "star", "triangle", "cross", "heart")


def flat_colour_images(folder):
    """An imagefolder of flat-colour images (random crops leave them unchanged), captions of different lengths."""
    folder.mkdir()
    metadata = []
    for i, rgb in enumerate(COLOURS.values()):
        Image.fromarray(np.full((40, 40, 3), rgb, np.uint8)).save(folder / f"{i}.png")
        metadata.append({"file_name": f"{i}.png", "caption": f"colour number {i} " * (i % 3 + 1)})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in metadata))
    return folder


def captions_split():
    """Compositional captions, shuffled: 512 to train on, 64 held out."""
    captions = [
        f"a {c} {s} above a {c2} {s2}"
        for c, s, c2, s2 in itertools.product(COLOURS, SHAPES, COLOURS, SHAPES)
        if (c, s) != (c2, s2)
    ]
    random.Random(0).shuffle(captions)
    return captions[:512], captions[-64:]


def image_rows(n: int, seed: int = 0) -> dict:
    """n noisy single-colour 40x40 images, captioned with their colour."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(n):
        name, rgb = list(COLOURS.items())[i % len(COLOURS)]
        pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-30, 30, (40, 40, 3)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels))
        captions.append(f"a {name} picture, number {i}")
    return {"image": images, "caption": captions}


def image_dataset(n: int, seed: int = 0) -> datasets.Dataset:
    return datasets.Dataset.from_dict(image_rows(n, seed)).cast_column("image", datasets.Image())


def training_args(tmp_path, **overrides) -> ProCLIPTrainingArguments:
    values = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=0,
    )
    values.update(overrides)
    return ProCLIPTrainingArguments(**values)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed_tensors(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def tensors_under(model, prefixes) -> set[str]:
    return {name for name in model.state_dict() if name.split(".")[0] in prefixes}


def image_folder(folder, n: int):
    """An imagefolder of `n` noisy single-colour PNGs with a `caption` column; returns the captions."""
    folder.mkdir()
    rows = image_rows(n)
    metadata = []
    for i, (image, caption) in enumerate(zip(rows["image"], rows["caption"])):
        image.save(folder / f"{i}.png")
        metadata.append({"file_name": f"{i}.png", "caption": caption})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in metadata))
    return rows["caption"]


def poison_cached_row(cache_dir, caption: str) -> None:
    """Write NaN over the cached LLM embedding of `caption`, in place in its shard, after the cache has checked and
    stamped the file, and stamp the damaged file as verified: damage the cache's once-per-file check cannot see (a
    row spoiled between the check and its use), so the NaN reaches the trainer as a cache hit and the trainer's own
    guard must catch it."""
    EmbeddingCache(cache_dir)  # the first open checks every shard whole and stamps it
    for path in shard_paths(cache_dir):
        stat = os.stat(path)
        with safe_open(str(path), "pt") as shard:
            keys = shard.get_tensor("keys").numpy()
        rows = np.nonzero((keys == np.frombuffer(caption_key(caption), np.uint8)).all(1))[0]
        if len(rows):
            header, data_start = read_safetensors_header(path)
            info = header["llm"]
            assert info["dtype"] == "F32"
            width = info["shape"][1]
            with open(path, "r+b") as f:
                f.seek(data_start + info["data_offsets"][0] + int(rows[0]) * width * 4)
                f.write(np.full(width, np.nan, np.float32).tobytes())
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            stamp = path.with_name(f".{path.name}.verified")
            stamp.write_text(json.dumps({**json.loads(stamp.read_text()), "ctime_ns": os.stat(path).st_ctime_ns}))
            return
    raise AssertionError(f"{caption!r} is not in the cache")
