"""Tests of the data layer (proclip_train.training.data): loading every supported layout, CLIP-like transforms, both stages'
collators, and the counting of corrupt images and empty captions."""

import io
import json
import os
import pickle
import tarfile
from collections import Counter

import datasets
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch
from conftest import tiny_llm_tokenizer
from proclip_train.training.collators import ContrastiveCollator, InheritanceCollator
from proclip_train.training.data import DataSpec, load_image_text_dataset, split_names
from proclip_train.training.images import CLIPImageTransform
from proclip_train.training.skips import CORRUPT_IMAGE, EMPTY_CAPTION, SkipCounter
from transformers import CLIPImageProcessor

from modeling_proclip import to_rgb

datasets.disable_progress_bars()

# Six samples: four good images in four colour modes, one corrupt file, one blank caption (whitespace / empty).
GOOD, CORRUPT, BLANK = "good", "corrupt", "blank"
SAMPLES = [
    ("rgb.png", "RGB", (56, 40), "a red square", "a long caption about a red square on a table", GOOD),
    ("gray.png", "L", (40, 64), "a gray image", "a long caption about a gray image", GOOD),
    ("rgba.png", "RGBA", (48, 48), "a see-through thing", "a long caption about transparency", GOOD),
    ("palette.png", "P", (33, 37), "a palette image", "a long caption about a palette image", GOOD),
    ("corrupt.png", None, None, "a corrupt file", "a long caption about a broken file", CORRUPT),
    ("blank.png", "RGB", (36, 36), "   ", "", BLANK),
]
N_GOOD = sum(kind == GOOD for *_, kind in SAMPLES)
CAPTIONS = ("caption", "long_caption")


def _image_bytes(mode, size, seed):
    if mode is None:
        return np.random.default_rng(seed).bytes(300)  # not an image, but named .png
    rng = np.random.default_rng(seed)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    image = rgb.convert("P") if mode == "P" else rgb.convert(mode)
    if mode == "RGBA":
        image.putalpha(PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One folder with the six samples in every layout `load_image_text_dataset` reads."""
    root = tmp_path_factory.mktemp("data")
    images = root / "imagefolder"
    images.mkdir()
    rows = []
    for i, (name, mode, size, caption, long_caption, _) in enumerate(SAMPLES):
        (images / name).write_bytes(_image_bytes(mode, size, seed=i))
        rows.append({"file_name": name, "caption": caption, "long_caption": long_caption})
    with open(images / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)

    # Tables listing image paths relative to their own folder (the root, which holds imagefolder/).
    table = [{"image_path": f"imagefolder/{r['file_name']}", **{c: r[c] for c in CAPTIONS}} for r in rows]
    pd.DataFrame(table).to_csv(root / "pairs.csv", index=False)
    pd.DataFrame(table).to_parquet(root / "pairs.parquet")
    with open(root / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in table)

    # A webdataset shard: 0000.png, 0000.txt, 0000.long.txt, ...
    shards = root / "shards"
    shards.mkdir()
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        for i, (name, *_) in enumerate(SAMPLES):
            members = {
                "png": (images / name).read_bytes(),
                "txt": rows[i]["caption"].encode(),
                "long.txt": rows[i]["long_caption"].encode(),
            }
            for suffix, payload in members.items():
                info = tarfile.TarInfo(f"{i:04d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    (root / "captions.txt").write_text("a caption\n\nanother caption\n")
    return root


# (spec relative to data_root, image column, caption columns, streaming)
LAYOUTS = {
    "imagefolder": ("imagefolder", "image", CAPTIONS, False),
    "imagefolder-streaming": ("imagefolder", "image", CAPTIONS, True),
    "csv": ("pairs.csv", "image_path", CAPTIONS, False),
    "csv-streaming": ("pairs.csv", "image_path", CAPTIONS, True),
    "jsonl": ("pairs.jsonl", "image_path", CAPTIONS, False),
    "parquet-glob": ("*.parquet", "image_path", CAPTIONS, False),
    "webdataset": ("shards/*.tar", "png", ("txt", "long.txt"), False),
    "webdataset-streaming": ("shards/*.tar", "png", ("txt", "long.txt"), True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_llm_tokenizer()


@pytest.fixture(scope="module")
def image_processor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _load(data_root, tmp_path, layout):
    spec, image_column, caption_columns, streaming = LAYOUTS[layout]
    dataset = load_image_text_dataset(
        str(data_root / spec),
        streaming=streaming,
        image_column=image_column,
        caption_columns=caption_columns,
        cache_dir=str(tmp_path / "hf_cache"),
    )
    return dataset, image_column, caption_columns


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_lazily_and_collates(data_root, tmp_path, tokenizer, image_processor, layout):
    dataset, image_column, caption_columns = _load(data_root, tmp_path, layout)
    assert isinstance(dataset, datasets.IterableDataset if LAYOUTS[layout][3] else datasets.Dataset)
    assert dataset.features[image_column] == datasets.Image(decode=False)
    rows = list(dataset)  # iterating must not decode, so the corrupt file does not raise here
    assert len(rows) == len(SAMPLES)
    assert all(set(caption_columns) <= set(row) for row in rows)

    collator = ContrastiveCollator(
        tokenizer, CLIPImageTransform(image_processor, train=True), image_column, caption_columns, max_length=64
    )
    batch = collator(rows)
    assert batch["pixel_values"].shape == (N_GOOD, 3, 32, 32)
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["input_ids"].shape[0] == batch["attention_mask"].shape[0] == N_GOOD
    assert len(batch["captions"]) == N_GOOD
    good_captions = {c for *_, cap, long, kind in SAMPLES if kind == GOOD for c in (cap, long)}
    assert set(batch["captions"]) <= good_captions
    assert batch["skipped"] == {CORRUPT_IMAGE: 1, EMPTY_CAPTION: 1}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_and_empty_caption_are_skipped_and_counted_to_the_end(
    data_root, tmp_path, tokenizer, image_processor, num_workers
):
    dataset, image_column, caption_columns = _load(data_root, tmp_path, "imagefolder")
    collator = ContrastiveCollator(tokenizer, CLIPImageTransform(image_processor), image_column, caption_columns)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collator, num_workers=num_workers)
    counter, seen = SkipCounter(), 0
    for _epoch in range(2):
        for batch in loader:
            counter.update(batch.pop("skipped"))
            seen += batch["pixel_values"].shape[0]
    assert seen == 2 * N_GOOD
    assert counter.as_dict() == {CORRUPT_IMAGE: 2, EMPTY_CAPTION: 2}
    assert counter.all_reduce() == counter.as_dict()
    assert counter.summary() == "skipped 4 samples: 2 corrupt_image, 2 empty_caption"


def test_a_batch_of_only_bad_rows_is_empty_not_an_error(data_root, tmp_path, tokenizer, image_processor):
    dataset, image_column, caption_columns = _load(data_root, tmp_path, "imagefolder")
    bad = [row for row, sample in zip(dataset, SAMPLES) if sample[-1] != GOOD]
    batch = ContrastiveCollator(tokenizer, CLIPImageTransform(image_processor), image_column, caption_columns)(bad)
    assert batch["pixel_values"].shape == (0, 3, 32, 32)
    assert batch["input_ids"].shape == (0, 0) and batch["captions"] == []
    assert batch["skipped"] == {CORRUPT_IMAGE: 1, EMPTY_CAPTION: 1}


def test_stage1_reads_captions_only_with_noise_view_and_teacher(data_root, tmp_path, tokenizer):
    dataset = load_image_text_dataset(
        str(data_root / "pairs.csv"),
        caption_columns="caption",
        noise_caption_column="long_caption",
        cache_dir=str(tmp_path / "hf_cache"),
    )
    collator = InheritanceCollator(
        tokenizer, "caption", noise_caption_column="long_caption", max_length=32, teacher_tokenizer=tokenizer
    )
    batch = collator(list(dataset))
    kept = len(SAMPLES) - 1  # the corrupt image does not matter without images; the blank caption does
    assert batch["captions"] == [s[3] for s in SAMPLES if s[-1] != BLANK]
    assert batch["noise_captions"] == [s[4] for s in SAMPLES if s[-1] != BLANK]
    for prefix in ("", "noise_", "teacher_", "noise_teacher_"):
        assert batch[f"{prefix}input_ids"].shape[0] == batch[f"{prefix}attention_mask"].shape[0] == kept
    assert "pixel_values" not in batch
    assert batch["skipped"] == {CORRUPT_IMAGE: 0, EMPTY_CAPTION: 1}

    captions_only = InheritanceCollator(None, "caption")(list(dataset))
    assert set(captions_only) == {"captions", "skipped", "sources", "random_state"}

    text = load_image_text_dataset(str(data_root / "captions.txt"), caption_columns="text")
    batch = InheritanceCollator(tokenizer, "text")(list(text))
    assert batch["captions"] == ["a caption", "another caption"] and batch["skipped"][EMPTY_CAPTION] == 1


def test_long_captions_are_truncated_by_the_tokenizer(tokenizer):
    rows = [{"caption": "word " * 300}, {"caption": "short"}]
    batch = InheritanceCollator(tokenizer, "caption", max_length=16)(rows)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"].sum(1).tolist()[0] == 16


def test_caption_choice_is_seeded_and_covers_every_column(tokenizer):
    rows = [{"short": f"short {i}", "long": f"long {i}", "alt": [f"alt {i}", ""]} for i in range(8)]

    def chosen(seed, batches=25, columns=("short", "long")):
        collator = InheritanceCollator(tokenizer=None, caption_columns=columns, seed=seed)
        return [c for _ in range(batches) for c in collator(rows)["captions"]]

    first = chosen(seed=7)
    assert first == chosen(seed=7)  # reproducible
    assert first != chosen(seed=8)  # and the seed matters
    kinds = Counter(caption.split()[0] for caption in first)
    assert set(kinds) == {"short", "long"} and min(kinds.values()) > 0.35 * len(first)
    # Each row gets a fresh draw each time it is seen, so both columns show up for the same row.
    assert {c for c in first if c.endswith(" 0")} == {"short 0", "long 0"}
    # List-valued columns count each non-blank string; blanks are never chosen.
    assert set(chosen(seed=0, columns=("short", "alt"))) == {f"{k} {i}" for k in ("short", "alt") for i in range(8)}


def test_stage2_caption_choice_is_seeded(tokenizer, image_processor):
    image = PIL.Image.new("RGB", (40, 40), (10, 200, 30))
    rows = [{"image": image, "short": f"short {i}", "long": f"long {i}"} for i in range(6)]
    transform = CLIPImageTransform(image_processor, train=True)
    runs = []
    for _ in range(2):
        collator = ContrastiveCollator(tokenizer, transform, "image", ("short", "long"), seed=3)
        runs.append([collator(rows) for _ in range(4)])
    for a, b in zip(*runs):
        assert a["captions"] == b["captions"]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert {c.split()[0] for batch in runs[0] for c in batch["captions"]} == {"short", "long"}
    # A collator that went to a DataLoader worker starts a fresh per-process generator (generators do not pickle).
    assert pickle.loads(pickle.dumps(collator))._generator is None


def test_grayscale_rgba_palette_become_rgb(image_processor):
    gray = PIL.Image.new("L", (8, 8), 128)
    rgba = PIL.Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white, as CLIP's processor
    palette = PIL.Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    assert to_rgb(gray).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(palette).getpixel((0, 0)) == (0, 0, 255)
    for transform in (CLIPImageTransform(image_processor, train=True), CLIPImageTransform(image_processor, False)):
        for image in (gray, rgba, palette):
            assert transform(image).shape == (3, 32, 32)


@pytest.mark.parametrize("size", [(56, 40), (40, 70), (32, 32), (20, 24)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_eval_transform_matches_clip_image_processor(image_processor, size, mode):
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA").convert(mode)
    expected = image_processor(images=image, return_tensors="pt")["pixel_values"][0]
    actual = CLIPImageTransform(image_processor, train=False)(image)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_train_transform_is_a_seeded_random_resized_crop(image_processor):
    transform = CLIPImageTransform(image_processor, train=True)
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    out = transform(image, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32)
    assert torch.equal(out, transform(image, generator=torch.Generator().manual_seed(0)))
    generator = torch.Generator().manual_seed(1)
    boxes = [transform.random_resized_crop_box(80, 60, generator) for _ in range(200)]
    for top, left, h, w in boxes:
        assert 0 <= top <= 60 - h and 0 <= left <= 80 - w
        assert 0.85 <= h * w / (80 * 60) <= 1.0  # scale 0.9-1.0, up to rounding
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    assert len(set(boxes)) > 20
    # The mean / std are the model processor's (OpenAI's): a mid-gray image maps to about (0.5 - mean) / std.
    gray = transform(PIL.Image.new("RGB", (40, 40), (128, 128, 128)))
    expected = (128 / 255 - torch.tensor(image_processor.image_mean)) / torch.tensor(image_processor.image_std)
    torch.testing.assert_close(gray.mean((1, 2)), expected, atol=1e-5, rtol=0)


def test_missing_columns_are_named_with_the_available_ones(data_root, tmp_path):
    cache = str(tmp_path / "hf_cache")
    expected = r"caption column 'captoin' not found.*Available columns: image_path, caption, long_caption"
    with pytest.raises(ValueError, match=expected):
        load_image_text_dataset(
            str(data_root / "pairs.csv"), image_column="image_path", caption_columns="captoin", cache_dir=cache
        )
    expected = r"image column 'jpg' not found.*Available columns: png, txt, long\.txt"
    with pytest.raises(ValueError, match=expected):
        load_image_text_dataset(
            str(data_root / "shards/*.tar"), image_column="jpg", caption_columns="txt", streaming=True, cache_dir=cache
        )


def test_dataspec_parse(data_root):
    assert DataSpec.parse(data_root / "imagefolder").kind == "folder"
    files = DataSpec.parse(str(data_root / "*.csv"))
    assert (files.kind, files.builder, files.root) == ("files", "csv", str(data_root))
    assert DataSpec.parse(str(data_root / "shards/shard-000.tar")).builder == "webdataset"
    hub = DataSpec.parse("someone/pairs:long")
    assert (hub.kind, hub.name, hub.config, hub.root) == ("hub", "someone/pairs", "long", None)
    assert DataSpec.parse("someone/pairs").config is None
    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        DataSpec.parse(str(data_root / "nothing.csv"))
    with pytest.raises(ValueError, match="Cannot tell the data format"):
        DataSpec.parse(str(data_root / "pairs.*"))


def test_a_folder_of_tables_resolves_paths_against_each_table(data_root, tmp_path, tokenizer, image_processor):
    folder = tmp_path / "tables"
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "pairs.csv").write_text(
        "image_path,caption\n" + "".join(f"{data_root}/imagefolder/{s[0]},{s[3]}\n" for s in SAMPLES[:2])
    )
    (folder / "more.csv").write_text("image_path,caption\n../imagefolder/rgb.png,a relative path\n")
    os.symlink(data_root / "imagefolder", tmp_path / "imagefolder")  # more.csv's "../imagefolder" is this one
    dataset = load_image_text_dataset(  # every path here leaves the folder: absolute, or ../
        str(folder), image_column="image_path", cache_dir=str(tmp_path / "hf_cache"), allow_paths_outside_data=True
    )
    paths = sorted(row["image_path"]["path"] for row in dataset)
    relative = str(tmp_path / "tables" / "../imagefolder/rgb.png")
    assert paths == sorted([relative] + [f"{data_root}/imagefolder/{s[0]}" for s in SAMPLES[:2]])
    collator = ContrastiveCollator(tokenizer, CLIPImageTransform(image_processor, train=False), "image_path")
    batch = collator(list(dataset))
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and sum(batch["skipped"].values()) == 0
    # A column the rows lack (a typo, or a Trainer that removed unused columns) is an error, not 3 skipped rows.
    expected = r"reads column\(s\) 'image', but the rows have only 'image_path', 'caption'.*remove_unused_columns"
    with pytest.raises(ValueError, match=expected):
        ContrastiveCollator(tokenizer, CLIPImageTransform(image_processor))(list(dataset))


def test_hub_names_go_to_load_dataset_with_their_config(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs["split"], kwargs["streaming"]))
        return datasets.Dataset.from_dict({"jpg": [b"not an image"], "txt": ["a caption"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dataset = load_image_text_dataset("someone/pairs:long", split="validation", image_column="jpg", caption_columns="txt")
    assert calls == [("someone/pairs", "long", "validation", False)]
    assert dataset.features["jpg"] == datasets.Image(decode=False)


def test_splits_are_listed_and_a_missing_one_is_named(data_root, tmp_path):
    assert split_names(str(data_root / "*.parquet")) == ["train"]  # files hold one split
    folder = tmp_path / "splits"
    for split, count in (("train", 3), ("test", 2)):
        (folder / split).mkdir(parents=True)
        for i in range(count):
            PIL.Image.new("RGB", (8, 8), (i, 0, 0)).save(folder / split / f"{i}.png")
    assert sorted(split_names(folder)) == ["test", "train"]
    assert len(load_image_text_dataset(folder, split="test", image_column="image", cache_dir=str(tmp_path / "c"))) == 2
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has (train, test|test, train)"):
        load_image_text_dataset(folder, split="validation")
    with pytest.raises(ValueError, match="label column 'class' not found"):
        load_image_text_dataset(folder, label_column="class", cache_dir=str(tmp_path / "c"))
