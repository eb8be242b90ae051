"""Embedding cache: rows equal the on-the-fly embeddings, training reads them instead of running the LLM (and the
teacher), misses fall back to the towers, stale caches are refused with what differs, `proclip embed` fills it."""

import json

import datasets
import pytest
import torch
from conftest import build_tiny_clip
from proclip_train.training.arguments import ProCLIPTrainingArguments
from proclip_train.training.cache import (
    DEFAULT_CACHE_FOLDER,
    EmbeddingCache,
    StaleCacheError,
    build_embedding_cache,
    caption_key,
)
from proclip_train.training.stages import load_clip_text_teacher
from proclip_train.training.trainer import ProCLIPTrainer
from safetensors import safe_open

from modeling_proclip import ProCLIPModel

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green", "white") for s in ("cat", "dog", "car", "tree") for b in ("grey", "black")]


@pytest.fixture(scope="module")
def teacher(tiny_clip_dir):
    from transformers import AutoTokenizer

    return load_clip_text_teacher(str(tiny_clip_dir)), AutoTokenizer.from_pretrained(tiny_clip_dir)


@pytest.fixture(scope="module")
def full_cache(tmp_path_factory, model, processor, teacher):
    folder = tmp_path_factory.mktemp("cache")
    build_embedding_cache(
        model, processor.tokenizer, CAPTIONS + CAPTIONS[:5], folder, teacher=teacher[0], teacher_tokenizer=teacher[1],
        batch_size=7, progress=False,
    )
    return folder


def train_stage1(tmp_path, tiny_proclip_dir, processor, cache=None, break_towers=False):
    model = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    args = ProCLIPTrainingArguments(
        output_dir=str(tmp_path / "out"), stage=1, per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )
    trainer = ProCLIPTrainer(
        model, args, train_dataset=datasets.Dataset.from_dict({"caption": CAPTIONS}),
        processing_class=processor, embedding_cache=cache,
    )
    if break_towers:  # with a full cache neither the LLM nor the teacher may run
        def refuse(*args, **kwargs):
            raise AssertionError("a frozen tower ran although its embeddings are cached")

        model.text_model.forward = refuse
        trainer.stage.teacher.forward = refuse
    trainer.train()
    return trainer


def test_cached_rows_are_the_towers_embeddings(full_cache, model, processor, teacher):
    cache = EmbeddingCache(full_cache)
    assert len(cache) == len(CAPTIONS) and cache.has_teacher  # repeats are embedded once
    llm, found = cache.lookup(CAPTIONS[::-1] + ["never embedded"])
    assert found.tolist() == [True] * len(CAPTIONS) + [False]
    with torch.no_grad():
        encoded = processor.tokenizer(CAPTIONS[::-1], padding=True, return_tensors="pt")
        expected = model.get_llm_embeddings(encoded["input_ids"], encoded["attention_mask"])
        target = teacher[0](**teacher[1](CAPTIONS[::-1], padding=True, return_tensors="pt")).text_embeds
    torch.testing.assert_close(llm[:-1], expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(llm[-1], torch.zeros_like(llm[-1]))
    teacher_rows, _ = cache.lookup(CAPTIONS[::-1], "teacher")
    torch.testing.assert_close(teacher_rows, target, rtol=1e-4, atol=1e-5)

    # A shard is an ordinary safetensors file keyed by sha256 of the caption.
    (path,) = full_cache.glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = f.get_tensor("keys")
        assert f.metadata()["llm_identity"] and f.metadata()["teacher_fingerprint"]
    assert bytes(keys[0].tolist()) in {caption_key(c) for c in CAPTIONS}


def test_training_with_a_full_cache_skips_both_towers_and_matches_training_without(
    tmp_path, tiny_proclip_dir, processor, full_cache
):
    plain = train_stage1(tmp_path / "plain", tiny_proclip_dir, processor)
    cached = train_stage1(
        tmp_path / "cached", tiny_proclip_dir, processor, cache=EmbeddingCache(full_cache), break_towers=True
    )
    for name, value in plain.model.text_adapter.state_dict().items():
        torch.testing.assert_close(cached.model.text_adapter.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    assert cached.report["embedding_cache"] == {
        "llm_hits": 32, "llm_misses": 0, "teacher_hits": 32, "teacher_misses": 0,
    }


def test_captions_missing_from_the_cache_are_embedded_on_the_fly(
    tmp_path, tiny_proclip_dir, model, processor, teacher
):
    folder = tmp_path / "partial"
    build_embedding_cache(
        model, processor.tokenizer, CAPTIONS[:20], folder, teacher=teacher[0], teacher_tokenizer=teacher[1],
        progress=False,
    )
    plain = train_stage1(tmp_path / "plain", tiny_proclip_dir, processor)
    partial = train_stage1(tmp_path / "partial_run", tiny_proclip_dir, processor, cache=EmbeddingCache(folder))
    for name, value in plain.model.text_adapter.state_dict().items():
        torch.testing.assert_close(partial.model.text_adapter.state_dict()[name], value, rtol=1e-4, atol=1e-5)
    stats = partial.report["embedding_cache"]
    assert stats["llm_hits"] + stats["llm_misses"] == 32 and stats["llm_misses"] == 12


def test_a_stale_cache_is_refused_naming_what_differs(
    tmp_path, tiny_proclip_dir, processor, full_cache, tiny_llm_dir
):
    def trainer_for(model, teacher=None):
        args = ProCLIPTrainingArguments(output_dir=str(tmp_path / "out"), stage=1, use_cpu=True, teacher=teacher)
        return ProCLIPTrainer(
            model, args, train_dataset=datasets.Dataset.from_dict({"caption": CAPTIONS}),
            processing_class=processor, embedding_cache=EmbeddingCache(full_cache),
        )

    other_pooling = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    other_pooling.config.pooling = "last_token"
    with pytest.raises(StaleCacheError, match=r"(?s)refused.*pooling: 'mean' \(cache\) vs 'last_token' \(now\)"):
        trainer_for(other_pooling)

    other_weights = ProCLIPModel.from_pretrained(tiny_proclip_dir)
    with torch.no_grad():
        other_weights.text_model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(StaleCacheError, match="weights_sha256"):
        trainer_for(other_weights)

    other_teacher = build_tiny_clip(tmp_path / "other_clip", seed=1)
    with pytest.raises(StaleCacheError, match="stage-1 teacher differs in weights_sha256"):
        trainer_for(ProCLIPModel.from_pretrained(tiny_proclip_dir), teacher=str(other_teacher))

    # The embed step refuses to extend a stale cache too.
    with pytest.raises(StaleCacheError, match="pooling"):
        build_embedding_cache(other_pooling, processor.tokenizer, ["new"], full_cache, progress=False)


def test_embedding_is_incremental_and_stores_half_precision(tmp_path, model, processor):
    folder = tmp_path / "bf16"
    first = build_embedding_cache(model, processor.tokenizer, CAPTIONS[:10], folder, dtype=torch.bfloat16, progress=False)
    second = build_embedding_cache(model, processor.tokenizer, CAPTIONS, folder, dtype=torch.bfloat16, progress=False)
    assert first != second and build_embedding_cache(model, processor.tokenizer, CAPTIONS, folder, progress=False) is None
    cache = EmbeddingCache(folder)
    assert sorted(s.num_rows for s in cache.shards) == [10, len(CAPTIONS) - 10]
    rows, found = cache.lookup(CAPTIONS)
    assert bool(found.all()) and not cache.has_teacher
    with torch.no_grad():
        encoded = processor.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
        expected = model.get_llm_embeddings(encoded["input_ids"], encoded["attention_mask"])
    torch.testing.assert_close(rows, expected.to(torch.bfloat16).float())


def test_proclip_embed_then_train_uses_the_cache_for_both_caption_views(tmp_path, tiny_proclip_dir):
    from proclip_train.cli import main

    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_dict({"short": CAPTIONS[:16], "long": CAPTIONS[16:]}).to_json(data / "captions.jsonl")
    main(["embed", "--model", str(tiny_proclip_dir), "--data", str(data / "captions.jsonl"),
          "--caption-column", "short", "--noise-caption-column", "long", "--batch-size", "8"])
    cache = EmbeddingCache(data / DEFAULT_CACHE_FOLDER)
    assert len(cache) == len(CAPTIONS) and cache.has_teacher

    out = tmp_path / "out"
    main(["train", "--stage", "1", "--model", str(tiny_proclip_dir), "--data", str(data / "captions.jsonl"),
          "--caption_column", "short", "--noise_caption_column", "long", "--out", str(out), "--max_steps", "2",
          "--per_device_train_batch_size", "4", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"])
    report = json.loads((out / "training_report.json").read_text())
    assert report["embedding_cache"] == {"llm_hits": 16, "llm_misses": 0, "teacher_hits": 16, "teacher_misses": 0}
    assert set(report["last_loss_components"]) == {"instance", "structure", "instance_extra"}
