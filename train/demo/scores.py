"""What every demo model is scored on: a split's images and texts (`EvalSet`), embedded once, and `score`.

Zero-shot classification uses the single-object images (seen and held-out classes apart), with English class prompts,
with the same prompts translated (German, French, Spanish: the world's lexicon realises them) and, where the world has
them (Fashion-MNIST), with synonyms of the class names; retrieval uses the general scenes 1:1 with their short, long and
translated captions (the Fashion-MNIST world has none). Text embeddings come from the embedding cache (the LLM's
pooled states through the model's adapter, or the teacher CLIP's own text embeddings). `clip_zeroshot_top1` scores a
CLIP folder (the teacher) straight from its own towers. Every accuracy is `evaluation.metrics`' (pessimistic ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

from modeling_proclip import embed_images, embed_in_batches, image_embedder, open_image

from ..evaluation.metrics import (
    caption_retrieval_accuracy,
    class_embeddings,
    retrieval_ranks,
    zeroshot_accuracy,
)
from .languages import ZERO_SHOT_TEMPLATES
from .world import read_metadata
from .worlds import load_world_config

LANGUAGES = ("de", "fr", "es")


def zero_shot_prompts(world) -> list[str]:
    """Class-major list of C x T prompts of a world's classes ("a photo of a red circle.")."""
    return [template.format(world.class_phrase(name)) for name in world.classes for template in ZERO_SHOT_TEMPLATES]


@dataclass
class EvalSet:
    """A split's images (as pixel tensors) and texts, loaded once and scored against every variant.

    Zero-shot uses the single-object images (`kind == "class"`); retrieval uses the general scenes 1:1, each with
    its short, translated and (for the first `n_long` scenes) long caption. `synonym_prompts` (C x S x T, or None)
    asks for each class by S other names; `attributes` are the halves of a class name scored apart.
    """

    classes: list[str]
    held_out_classes: list[str]
    class_pixels: torch.Tensor
    class_labels: torch.Tensor
    scene_pixels: torch.Tensor | None
    scene_held_out: torch.Tensor
    captions: dict[str, list[str]]  # column -> one caption per scene (long: the first n_long scenes)
    prompts: list[str]
    translated_prompts: dict[str, list[str]]  # language -> the prompts in that language
    synonym_prompts: list[str] | None = None
    attributes: tuple[str, ...] = ()

    @classmethod
    def load(cls, world_dir: Path, split: str, processor, n_long: int) -> "EvalSet":
        world = load_world_config(world_dir)
        rows = read_metadata(world_dir, split)
        class_rows = [r for r in rows if r["kind"] == "class"]
        scene_rows = [r for r in rows if r["kind"] == "scene"]

        def pixels(chosen):
            if not chosen:  # no general scenes (Fashion-MNIST): nothing to retrieve
                return None
            images = [open_image(r["image_path"]) for r in chosen]
            return processor(images=images, return_tensors="pt")["pixel_values"]

        captions = {"short": [r["caption_short"] for r in scene_rows],
                    "long": [r["caption_long"] for r in scene_rows[:n_long]]}
        captions.update({lang: [r[f"caption_{lang}"] for r in scene_rows] for lang in LANGUAGES})
        return cls(
            classes=world.classes,
            held_out_classes=world.held_out_classes,
            class_pixels=pixels(class_rows),
            class_labels=torch.tensor([world.classes.index(r["label"]) for r in class_rows]),
            scene_pixels=pixels(scene_rows),
            scene_held_out=torch.tensor([bool(r["held_out"]) for r in scene_rows]),
            captions=captions,
            prompts=zero_shot_prompts(world),
            translated_prompts={lang: world.translated_prompts(lang) for lang in LANGUAGES},
            synonym_prompts=world.synonym_prompts(),
            attributes=world.attributes,
        )

    def short_texts(self) -> list[str]:
        """Every text but the long captions: prompts (English and translated), short and translated captions."""
        texts = self.prompts + [p for prompts in self.translated_prompts.values() for p in prompts]
        texts += self.synonym_prompts or []
        return texts + [c for column, captions in self.captions.items() if column != "long" for c in captions]


def image_features(model, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, D) float32 image embeddings of preprocessed `pixel_values` (N, 3, H, W), through the embedding service."""
    model.eval()
    embed = image_embedder(model)
    return embed_in_batches(pixel_values, lambda batch: embed(torch.stack(batch)), batch_size=batch_size).embeds


@torch.no_grad()
def cached_embeddings(cache, texts: list[str], table: str = "llm") -> torch.Tensor:
    """(N, D) rows of a cache table: the LLM's pooled embeddings (`llm`) or the teacher CLIP's (`teacher`)."""
    embeds, found = cache.lookup(texts, table)
    if not bool(found.all()):
        missing = [t for t, f in zip(texts, found.tolist()) if not f][:3]
        raise KeyError(f"{int((~found).sum())} texts are not in the embedding cache, e.g. {missing}")
    return embeds.float()


@torch.no_grad()
def cached_text_features(model, cache, texts: list[str], table: str = "llm") -> torch.Tensor:
    """Joint-space text embeddings from the cache: the LLM table through the model's adapter, or the teacher's
    own text embeddings (`table="teacher"`, the teacher CLIP's row)."""
    embeds = cached_embeddings(cache, texts, table)
    if table == "teacher":
        return embeds
    model.eval()
    return model.get_text_features(llm_embeds=embeds).pooler_output.float()


def short_to_long_retrieval(short: torch.Tensor, long: torch.Tensor) -> dict:
    """Caption retrieval accuracy on the scenes that have a long caption (the first N): each one's short caption
    queries among the long captions. `short` (>= N, D) and `long` (N, D) embeddings, scene-aligned."""
    n = len(long)
    accuracy = caption_retrieval_accuracy(torch.cat([short[:n], long]), torch.arange(n).repeat(2))
    return {"short_to_long": accuracy, "num_images": n}


def attribute_accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor,
                       classes: list[str], attributes=("colour", "shape")) -> dict:
    """How often the top-1 class (cosine argmax) has the right colour, and the right shape: which half of a class
    name ("red circle") a text tower reads. (N, D), (C, D), (N,) -> fractions."""
    predicted = (F.normalize(image_embeds, dim=-1) @ F.normalize(class_embeds, dim=-1).T).argmax(-1)
    parts = [name.split(" ", 1) for name in classes]
    return {f"{attribute}_correct": sum(parts[p][i] == parts[t][i] for p, t in zip(predicted.tolist(), labels.tolist()))
            / len(labels) for i, attribute in enumerate(attributes)}


def zeroshot_top1(
    image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor, held_out: torch.Tensor
) -> dict:
    """Zero-shot top-1 accuracy (`metrics.zeroshot_accuracy`: cosine, ties counted against the image) over all images,
    and over the images of seen and of held-out classes (NaN where there are none).

    Args:
        image_embeds: (N, D). class_embeds: (C, D). labels: (N,) class indices.
        held_out: (C,) bool, the classes held out from align-train.
    """
    on_held = held_out[labels]

    def top1(rows: torch.Tensor) -> float:
        if not bool(rows.any()):
            return float("nan")
        return zeroshot_accuracy(image_embeds[rows], class_embeds, labels[rows], ks=(1,))["top1_accuracy"]

    return {"top1": top1(torch.ones_like(on_held)), "top1_seen": top1(~on_held), "top1_held_out": top1(on_held),
            "num_images": len(labels), "chance": 1 / len(class_embeds)}


@torch.no_grad()
def clip_zeroshot_top1(model_dir: str | Path, world_dir: str | Path, split: str = "test", batch_size: int = 256) -> dict:
    """`zeroshot_top1` of a CLIP folder (the teacher) on the world's single-object images of `split`, through its own
    towers: a class vector is the normalised mean of the normalised text embeddings of its `ZERO_SHOT_TEMPLATES`."""
    world = load_world_config(world_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    prompts = processor(text=zero_shot_prompts(world), padding="max_length", truncation=True, return_tensors="pt")
    text = model.get_text_features(**prompts).pooler_output
    classes = class_embeddings(text.reshape(len(world.classes), len(ZERO_SHOT_TEMPLATES), -1))
    rows = [row for row in read_metadata(world_dir, split) if row["label"]]
    images = embed_images([row["image_path"] for row in rows], processor.image_processor, image_embedder(model),
                          batch_size=batch_size).embeds
    labels = torch.tensor([world.classes.index(row["label"]) for row in rows])
    held_out = torch.tensor([name in world.held_out_classes for name in world.classes])
    return zeroshot_top1(images, classes, labels, held_out)


def score(model, evalset: EvalSet, cache, table: str = "llm") -> dict:
    """Zero-shot top-1 (all / seen / held-out classes) with English and with translated prompts (and how often the
    prediction has the right colour / shape), 1:1 retrieval R@1 per caption column (all scenes, and scenes with /
    without a held-out object), and caption retrieval accuracy (short caption -> long caption of the scenes that have
    one) in the joint space, as fractions."""
    held = torch.tensor([name in evalset.held_out_classes for name in evalset.classes])
    image = image_features(model, evalset.class_pixels)

    def zeroshot(prompts: list[str]) -> dict:
        """Each class's vector: the normalised mean of its prompts' (the templates, or synonyms x templates)."""
        texts = cached_text_features(model, cache, prompts, table)
        classes = class_embeddings(texts.reshape(len(evalset.classes), -1, texts.shape[-1]))
        return {**zeroshot_top1(image, classes, evalset.class_labels, held),
                **attribute_accuracy(image, classes, evalset.class_labels, evalset.classes, evalset.attributes)}

    result = {"zeroshot": zeroshot(evalset.prompts),
              "zeroshot_translated": {lang: zeroshot(p) for lang, p in evalset.translated_prompts.items()}}
    if evalset.synonym_prompts:
        result["zeroshot_synonyms"] = zeroshot(evalset.synonym_prompts)
    result["retrieval"], features = {}, {}
    if evalset.scene_pixels is None:
        return result
    scenes = image_features(model, evalset.scene_pixels)
    for column, texts in evalset.captions.items():
        n = len(texts)
        if n == 0:
            continue
        text = features[column] = cached_text_features(model, cache, texts, table)
        target = torch.arange(n)
        i2t = (retrieval_ranks(scenes[:n], text, target) == 0).float()
        t2i = (retrieval_ranks(text, scenes[:n], target) == 0).float()
        held_scene = evalset.scene_held_out[:n]
        entry = {"num_images": n}
        for name, hits in (("i2t", i2t), ("t2i", t2i)):
            entry[f"{name}_R@1"] = hits.mean().item()
            entry[f"{name}_R@1_seen"] = hits[~held_scene].mean().item() if (~held_scene).any() else float("nan")
            entry[f"{name}_R@1_held_out"] = hits[held_scene].mean().item() if held_scene.any() else float("nan")
        result["retrieval"][column] = entry
    if "long" in features:
        result["caption_retrieval"] = short_to_long_retrieval(features["short"], features["long"])
    return result
