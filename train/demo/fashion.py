"""A world of real photographs: Fashion-MNIST, captioned in English from its labels and its pixels.

The synthetic world (`world.py`) tests ProCLIP's claims on drawn shapes; this one puts them to real product photos:
Zalando's Fashion-MNIST (70,000 grayscale 28 x 28 photos, 10 classes, MIT licence), read from the IDX files of
Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist/`, or the folder in
`$PROCLIP_FASHION_MNIST`). No captioned photos exist here, so the captions are English templates: the class's name
(`fashion_lexicon.json`) with what the pixels say where it tells photos of one class apart, the tone (dark / light,
the garment's mean brightness against the whole set's thirds) and the width (wide / narrow, its outline's width over
height against its own class's thirds): "a photo of a wide dark coat.".

What the world tests is the LLM's language knowledge: the teacher CLIP reads only these English captions, so it knows
ten class names; the same classes asked with **synonyms** ("a jumper") or **translated** ("ein Foto von einem
Pullover") are words it never read, and an LLM has. Both lists are in `fashion_lexicon.json`, fixed before any run.

Splits, written in `world.py`'s layout (so the demo reads both worlds alike), all photos single-object (`kind ==
"class"`, zero-shot data):

    teacher-train     the teacher's photos: the first `n_teacher_train` of the official train set (after val)
    align-train       stage 2's image-text data: the next photos, without the `held_out` classes
    stage1-captions   stage 1's captions (text only, every class): captions of the photos after those
    val               `val_per_class` photos of each class from the end of the official train set
    test              the official test set (its first `n_test` photos: all 10,000 by default)
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .languages import ZERO_SHOT_TEMPLATE_FRAMES, ZERO_SHOT_TEMPLATES, english_article, framed, indefinite_noun
from .world import COMPLETE_MARKER, SPLITS, world_is_complete

FASHION_FORMAT_VERSION = 1
DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
SOURCE_VARIABLE = "PROCLIP_FASHION_MNIST"
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
OFFICIAL_ROWS = {"train": 60000, "test": 10000}
LEXICON_FILE = Path(__file__).with_name("fashion_lexicon.json")
TRANSLATED = ("de", "fr", "es")
OBJECT_THRESHOLD = 16  # a pixel above this (of 255) belongs to the garment: Fashion-MNIST's background is 0


class FashionDataMissing(FileNotFoundError):
    """The Fashion-MNIST IDX files are not on this machine."""


def source_folder() -> Path:
    """Where the IDX files are read from: `$PROCLIP_FASHION_MNIST`, else Debian's package folder."""
    return Path(os.environ.get(SOURCE_VARIABLE) or DEFAULT_SOURCE)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or plain) as a uint8 array: (N, rows, cols) images or (N,) labels. The header is checked
    against the file's size, so a truncated or foreign file is an error, not a short dataset."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says {shape}, the file holds {len(data) - offset} values")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def load_official(split: str, folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The official `train` (60,000) or `test` (10,000) photos (N, 28, 28) and labels (N,)."""
    folder = folder or source_folder()
    paths = [folder / name for name in IDX_FILES[split]]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FashionDataMissing(
            f"Fashion-MNIST is not in {folder} (missing {', '.join(missing)}). Install it with `apt-get install "
            f"dataset-fashion-mnist`, or set {SOURCE_VARIABLE} to a folder holding the four IDX files of "
            "https://github.com/zalandoresearch/fashion-mnist")
    images, labels = (read_idx(p) for p in paths)
    if len(images) != OFFICIAL_ROWS[split] or len(labels) != len(images) or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder}: expected {OFFICIAL_ROWS[split]} photos of 28 x 28 and as many labels in the "
                         f"{split} files, found {images.shape} and {labels.shape}")
    return images, labels


# ---------------------------------------------------------------------------------------------------------- lexicon


@dataclass(frozen=True)
class FashionClass:
    label: int
    name: str  # the class name in results ("ankle boot")
    english: str  # its phrase with article ("an ankle boot"), what captions say
    synonyms: tuple[str, ...]  # what a person might write instead, never in a caption
    translations: dict  # language -> (noun, gender)

    def english_with(self, adjectives: list[str]) -> str:
        """The English phrase with adjectives before the head noun: "a wide dark coat", "a pair of dark trousers"."""
        if not adjectives:
            return self.english
        head = self.english.split(" ", 1)[1]
        if head.startswith("pair of "):
            return f"a pair of {' '.join(adjectives)} {head[len('pair of '):]}"
        words = " ".join(adjectives)
        return f"{english_article(words)} {words} {head}"


def load_lexicon(path: Path = LEXICON_FILE) -> list[FashionClass]:
    """The ten classes of `fashion_lexicon.json` in label order, checked: every class has three synonyms (the
    zero-shot ensemble needs as many per class) and a noun with a gender in each translated language."""
    entries = json.loads(path.read_text(encoding="utf-8"))["classes"]
    classes = [FashionClass(e["label"], e["name"], e["en"], tuple(e["synonyms"]),
                            {lang: tuple(e[lang]) for lang in TRANSLATED}) for e in entries]
    if [c.label for c in classes] != list(range(10)):
        raise ValueError(f"{path}: the classes must be labels 0-9 in order")
    for c in classes:
        if len(c.synonyms) != 3:
            raise ValueError(f"{path}: {c.name} needs exactly 3 synonyms, has {len(c.synonyms)}")
        if any(gender not in ("m", "f", "n") or (lang != "de" and gender == "n")
               for lang, (_, gender) in c.translations.items()):
            raise ValueError(f"{path}: {c.name} has a grammatical gender its language lacks")
    return classes


# ------------------------------------------------------------------------------------------------------- attributes


def garment_measures(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per photo (N, 28, 28): the garment's mean brightness in [0, 1] (its pixels above `OBJECT_THRESHOLD`), and its
    outline's width over height (bounding box of those pixels). (N,) each."""
    mask = images > OBJECT_THRESHOLD
    counts = np.maximum(mask.sum(axis=(1, 2)), 1)
    tone = (images * mask).sum(axis=(1, 2)) / counts / 255.0
    cols, rows = mask.any(axis=1), mask.any(axis=2)

    def extent(present):
        first = present.argmax(axis=1)
        last = present.shape[1] - 1 - present[:, ::-1].argmax(axis=1)
        return np.maximum(last - first + 1, 1)

    return tone, extent(cols) / extent(rows)


def thirds(values: np.ndarray) -> tuple[float, float]:
    """The 1/3 and 2/3 quantiles of `values`."""
    low, high = np.quantile(values, [1 / 3, 2 / 3])
    return float(low), float(high)


def attribute_words(tone: float, width: float, tone_thirds, width_thirds) -> list[str]:
    """The words a caption adds for one photo: its width ("wide" / "narrow") then its tone ("dark" / "light"), each
    only where the photo is in the lower or upper third (none in the middle third)."""
    words = []
    if width <= width_thirds[0] or width >= width_thirds[1]:
        words.append("narrow" if width <= width_thirds[0] else "wide")
    if tone <= tone_thirds[0] or tone >= tone_thirds[1]:
        words.append("dark" if tone <= tone_thirds[0] else "light")
    return words


# ----------------------------------------------------------------------------------------------------------- config


@dataclass
class FashionWorldConfig:
    """Everything that determines a Fashion-MNIST world; equal configs give byte-identical worlds.

    Args:
        seed: the captions' frames (each photo has its own RNG from `(seed, split, index)`).
        held_out: class names kept out of `align-train` (stage 2's image-text data).
        n_teacher_train / n_align_train / n_stage1_captions: photos (captions) in those splits; they are consecutive
            ranges of the official train set after val, so they must fit in its 60,000 photos.
        val_per_class: photos of each class in val (from the end of the official train set).
        n_test: the first `n_test` photos of the official test set.
    """

    seed: int = 0
    held_out: tuple[str, ...] = ("bag", "ankle boot")
    n_teacher_train: int = 30000
    n_align_train: int = 8000
    n_stage1_captions: int = 10000
    val_per_class: int = 50
    n_test: int = 10000

    def __post_init__(self):
        self.held_out = tuple(self.held_out)
        names = [c.name for c in self.lexicon]
        unknown = [name for name in self.held_out if name not in names]
        if unknown:
            raise ValueError(f"held-out classes {unknown} are not Fashion-MNIST classes; they are {names}")
        if not 1 <= len(self.held_out) < len(names):
            raise ValueError("hold out at least one class and keep at least one for stage 2")
        train_rows = 10 * self.val_per_class + self.n_teacher_train + self.n_stage1_captions
        # align-train skips the held-out classes' photos: about a tenth of the photos per held-out class
        align_rows = int(self.n_align_train / (1 - len(self.held_out) / 10) * 1.1) + 100
        if train_rows + align_rows > OFFICIAL_ROWS["train"]:
            raise ValueError(f"the splits need about {train_rows + align_rows} photos; Fashion-MNIST's train set "
                             f"has {OFFICIAL_ROWS['train']}")
        if not 1 <= self.n_test <= OFFICIAL_ROWS["test"]:
            raise ValueError(f"n_test must be in 1..{OFFICIAL_ROWS['test']}, got {self.n_test}")

    @classmethod
    def quick(cls, **overrides) -> "FashionWorldConfig":
        """A small world for tests and `--quick` runs (the same photos' first few thousand)."""
        values = dict(n_teacher_train=3000, n_align_train=1000, n_stage1_captions=1000, val_per_class=10, n_test=500)
        values.update(overrides)
        return cls(**values)

    @cached_property
    def lexicon(self) -> list[FashionClass]:
        return load_lexicon()

    world_name = "fashion"  # world.json's "world", what `world.load_world_config` dispatches on
    image_size = 28
    attributes = ()  # class names are not colour x shape: no per-attribute zero-shot scores
    dataset_name = "zalando-datasets/fashion_mnist"  # its Hub id, what a model card names

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict) -> "FashionWorldConfig":
        return cls(**values)

    def config_hash(self) -> str:
        """The config's identity, with the lexicon's bytes: captions are realised from it."""
        payload = json.dumps({"format": FASHION_FORMAT_VERSION, **self.to_dict(),
                              "lexicon": hashlib.sha256(LEXICON_FILE.read_bytes()).hexdigest()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def classes(self) -> list[str]:
        return [c.name for c in self.lexicon]

    @property
    def held_out_classes(self) -> list[str]:
        return list(self.held_out)

    def class_phrase(self, name: str) -> str:
        """The class's English phrase with its article, for `ZERO_SHOT_TEMPLATES`: "an ankle boot"."""
        return self.lexicon[self.classes.index(name)].english

    def translated_prompts(self, lang: str) -> list[str]:
        """The zero-shot templates' frames around the class's name in `lang` ("ein Foto von einem Pullover."), class
        major, C x T, lower-case first as the English templates."""
        prompts = []
        for c in self.lexicon:
            noun, gender = c.translations[lang]
            dative = indefinite_noun(lang, noun, gender, "dat") if lang == "de" else None
            for frame in ZERO_SHOT_TEMPLATE_FRAMES:
                text = framed(lang, frame, indefinite_noun(lang, noun, gender), dative)
                prompts.append(text[:1].lower() + text[1:] + ".")
        return prompts

    def synonym_prompts(self) -> list[str]:
        """Every class's synonyms in every template, class major: C x (3 synonyms x T)."""
        return [template.format(synonym) for c in self.lexicon for synonym in c.synonyms
                for template in ZERO_SHOT_TEMPLATES]

    def write(self, out_dir: str | Path, progress: bool = True) -> Path:
        return write_fashion_world(out_dir, self, progress)


# ------------------------------------------------------------------------------------------------------------ splits


def split_indices(config: FashionWorldConfig, labels: np.ndarray) -> dict[str, list[int]]:
    """Indices into the official train set of each train-side split: val from the end (`val_per_class` per class),
    then from the start teacher-train, align-train (skipping held-out classes) and stage1-captions, disjoint."""
    held = {config.classes.index(name) for name in config.held_out}
    val, taken = [], {k: 0 for k in range(10)}
    for index in range(len(labels) - 1, -1, -1):
        if taken[int(labels[index])] < config.val_per_class:
            taken[int(labels[index])] += 1
            val.append(index)
        if len(val) == 10 * config.val_per_class:
            break
    val_set = set(val)
    rest = iter(i for i in range(len(labels)) if i not in val_set)
    teacher = [next(rest) for _ in range(config.n_teacher_train)]
    align = []
    while len(align) < config.n_align_train:
        index = next(rest)
        if int(labels[index]) not in held:
            align.append(index)
    stage1 = [next(rest) for _ in range(config.n_stage1_captions)]
    return {"teacher-train": teacher, "align-train": align, "stage1-captions": stage1, "val": sorted(val)}


def caption(config: FashionWorldConfig, split: str, index: int, label: int, words: list[str]) -> str:
    """The English short caption of one photo: a template frame (or none) around the class phrase with its words."""
    rng = random.Random(f"proclip-fashion/{config.seed}/{split}/{index}")
    frame = rng.choice(ZERO_SHOT_TEMPLATE_FRAMES)
    return framed("en", frame, config.lexicon[label].english_with(words)) + "."


def _records(config, split, images, labels, indices, tone_thirds, width_thirds) -> list[dict]:
    held = set(config.held_out)
    tone, width = garment_measures(images[indices])
    rows = []
    for k, (index, t, w) in enumerate(zip(indices, tone, width)):
        label = int(labels[index])
        name = config.classes[label]
        words = attribute_words(t, w, tone_thirds, width_thirds[label])
        rows.append({"caption_short": caption(config, split, k, label, words), "caption_long": "",
                     "label": name, "label_id": label, "held_out": name in held, "kind": "class",
                     "attributes": words, "source_index": int(index)})
    return rows


def write_fashion_world(out_dir: str | Path, config: FashionWorldConfig | None = None, progress: bool = True) -> Path:
    """Write every split of the Fashion-MNIST world to `out_dir` (as `world.write_world` does the synthetic one: the
    same layout, idempotent for the same config, an error for another config's finished world). Returns `out_dir`."""
    config = config or FashionWorldConfig()
    out = Path(out_dir)
    if world_is_complete(out, config):
        return out
    if (out / COMPLETE_MARKER).is_file():
        raise FileExistsError(f"{out} holds a world of another config (hash "
                              f"{(out / COMPLETE_MARKER).read_text().strip()}, wanted {config.config_hash()}); write "
                              "this one to another folder or delete that one")
    train_images, train_labels = load_official("train")
    test_images, test_labels = load_official("test")
    # The attribute thresholds come from the whole official train set: the same for every split and config.
    tone, width = garment_measures(train_images)
    tone_thirds = thirds(tone)
    width_thirds = [thirds(width[train_labels == k]) for k in range(10)]
    out.mkdir(parents=True, exist_ok=True)
    for top in ("teacher", "align", "stage1"):
        shutil.rmtree(out / top, ignore_errors=True)
    indices = split_indices(config, train_labels)
    indices["test"] = list(range(config.n_test))
    counts = {}
    for split, (rel, is_images) in SPLITS.items():
        images, labels = (test_images, test_labels) if split == "test" else (train_images, train_labels)
        rows = _records(config, split, images, labels, indices[split], tone_thirds, width_thirds)
        counts[split] = len(rows)
        target = out / rel
        if not is_images:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            continue
        target.mkdir(parents=True, exist_ok=True)
        width_digits = max(5, len(str(len(rows) - 1)))
        with open(target / "metadata.jsonl", "w", encoding="utf-8") as f:
            for i, row in enumerate(tqdm(rows, desc=f"fashion world {split}", disable=not progress, leave=False)):
                file_name = f"{i:0{width_digits}d}.png"
                Image.fromarray(images[row["source_index"]], mode="L").save(target / file_name, format="PNG")
                f.write(json.dumps({"file_name": file_name, **row}, ensure_ascii=False) + "\n")
    info = {
        "world": config.world_name,
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "format_version": FASHION_FORMAT_VERSION,
        "source": {"dataset": "Fashion-MNIST (Zalando Research, MIT licence)", "folder": str(source_folder())},
        "classes": config.classes,
        "held_out_classes": config.held_out_classes,
        "attribute_thresholds": {"tone_thirds": tone_thirds,
                                 "width_thirds": dict(zip(config.classes, width_thirds))},
        "splits": {name: {"path": rel, "rows": counts[name]} for name, (rel, _) in SPLITS.items()},
    }
    (out / "world.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / COMPLETE_MARKER).write_text(config.config_hash() + "\n")
    return out


__all__ = ["FashionClass", "FashionDataMissing", "FashionWorldConfig", "attribute_words", "garment_measures",
           "load_lexicon", "load_official", "read_idx", "split_indices", "write_fashion_world"]
