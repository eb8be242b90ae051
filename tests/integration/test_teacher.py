"""The teacher CLIP: a quick one trained here must be far above chance and load with the standard CLIP classes."""

import json
import re
import time

import pytest
import torch
from proclip_train.demo.languages import COLOURS, SHAPES, SIZES
from proclip_train.demo.scores import clip_zeroshot_top1
from proclip_train.demo.teacher import (
    COMPLETE_MARKER,
    INFO_FILE,
    TeacherConfig,
    _pixel_tensor,
    normalise_pixels,
    train_teacher,
)
from proclip_train.demo.world import WorldConfig, read_metadata, write_world
from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick world and its quick teacher (about a minute on one CPU core)."""
    root = tmp_path_factory.mktemp("teacher")
    world_config = WorldConfig.quick()
    world_dir = write_world(root / "world", world_config, progress=False)
    started = time.perf_counter()
    teacher_dir = train_teacher(world_dir, root / "teacher", TeacherConfig.quick(), progress=False, num_threads=1)
    return world_dir, teacher_dir, world_config, time.perf_counter() - started


def test_quick_teacher_is_far_above_chance(quick):
    world_dir, teacher_dir, world_config, _ = quick
    result = clip_zeroshot_top1(teacher_dir, world_dir)
    assert result["chance"] == pytest.approx(1 / len(world_config.classes))
    single_objects = [row for row in read_metadata(world_dir, "test") if row["label"]]
    assert result["num_images"] == len(single_objects) > 0
    assert any(row["label"] in world_config.held_out_classes for row in single_objects)
    assert result["top1"] >= 4 * result["chance"], result
    assert result["top1_seen"] >= 3 * result["chance"] and result["top1_held_out"] >= 3 * result["chance"], result


def test_folder_loads_with_the_standard_clip_classes(quick):
    from transformers import (
        AutoTokenizer,
        CLIPModel,
        CLIPProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionModelWithProjection,
    )

    world_dir, teacher_dir, world_config, _ = quick
    model = CLIPModel.from_pretrained(teacher_dir).eval()
    processor = CLIPProcessor.from_pretrained(teacher_dir)
    text_tower = CLIPTextModelWithProjection.from_pretrained(teacher_dir).eval()
    vision_tower = CLIPVisionModelWithProjection.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)

    assert model.config.text_config.max_position_embeddings == 32 == tokenizer.model_max_length
    assert type(tokenizer).__name__ == "CLIPTokenizer"
    assert tokenizer.eos_token_id == model.config.text_config.eos_token_id != 2  # 2 = transformers' legacy pooling
    image_processor = processor.image_processor
    assert image_processor.crop_size == {"height": world_config.image_size, "width": world_config.image_size}
    assert list(image_processor.image_mean) == pytest.approx(OPENAI_CLIP_MEAN)
    assert list(image_processor.image_std) == pytest.approx(OPENAI_CLIP_STD)

    wanted = ["red circle", "green square", "blue triangle", "yellow circle"]
    rows = [next(r for r in read_metadata(world_dir, "test") if r["label"] == label) for label in wanted]
    from PIL import Image

    images = [Image.open(r["image_path"]) for r in rows]
    inputs = processor(text=[r["caption_short"] for r in rows], images=images, padding=True, truncation=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        text = text_tower(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).text_embeds
        image = vision_tower(pixel_values=inputs["pixel_values"]).image_embeds
    torch.testing.assert_close(out.text_embeds, torch.nn.functional.normalize(text, dim=-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.image_embeds, torch.nn.functional.normalize(image, dim=-1), atol=1e-5, rtol=1e-4)
    # four objects of four colours: even the quick teacher pairs each image with its own caption
    assert out.logits_per_image.argmax(-1).tolist() == [0, 1, 2, 3]
    # the processor does what training did to the pixels
    torch.testing.assert_close(inputs["pixel_values"], normalise_pixels(_pixel_tensor([r["image_path"] for r in rows])),
                               atol=1e-5, rtol=1e-5)


def test_tokenizer_is_english_and_the_long_caption_details_lie_beyond_its_window(quick):
    from transformers import AutoTokenizer

    world_dir, teacher_dir, _, _ = quick
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    assert tokenizer.tokenize("A large red circle.") == ["a</w>", "large</w>", "red</w>", "circle</w>", ".</w>"]
    assert len(tokenizer.tokenize("Ein großer roter Kreis.")) > 6  # never seen: falls apart into pieces
    attribute_words = set(COLOURS) | set(SHAPES) | set(SIZES)
    for row in read_metadata(world_dir, "test"):
        ids = tokenizer(row["caption_long"], truncation=True)["input_ids"]
        assert len(ids) == 32
        seen = set(re.findall(r"[a-z]+", tokenizer.decode(ids, skip_special_tokens=True)))
        assert not seen & attribute_words


def test_teacher_training_repeats_exactly(quick, tmp_path):
    """Same world and config, two fresh folders: the same weights and tokenizer, so the demo's table reproduces (a
    20-step recipe: every step draws the same batches, shifts and dropout the longer one does)."""
    world_dir = quick[0]
    first, again = (train_teacher(world_dir, tmp_path / name, TeacherConfig.quick(steps=20), progress=False,
                                  num_threads=1) for name in ("first", "again"))
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_teacher_is_cached_and_refuses_a_foreign_folder(quick, tmp_path):
    world_dir, teacher_dir, _, _ = quick
    weights = teacher_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert train_teacher(world_dir, teacher_dir, TeacherConfig.quick(), progress=False) == teacher_dir
    assert time.perf_counter() - started < 5 and weights.stat().st_mtime_ns == before
    info = json.loads((teacher_dir / INFO_FILE).read_text())
    assert info["teacher_hash"] == (teacher_dir / COMPLETE_MARKER).read_text().strip()
    assert info["config"]["steps"] == TeacherConfig.quick().steps and info["train_seconds"] > 0
    with pytest.raises(FileExistsError):
        train_teacher(world_dir, teacher_dir, TeacherConfig.quick(steps=3), progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("somebody's files")
    with pytest.raises(FileExistsError):
        train_teacher(world_dir, tmp_path / "busy", TeacherConfig.quick(steps=3), progress=False)


def test_quick_teacher_fits_its_time_budget(quick):
    *_, seconds = quick
    assert seconds < 150  # about a minute on a free core; leave room for a busy shared machine


@pytest.mark.slow
def test_full_teacher_zero_shot_at_least_80_percent(tmp_path_factory):
    """The demo's teacher: the default world and TeacherConfig() (several minutes on 2 CPU cores)."""
    root = tmp_path_factory.mktemp("full-teacher")
    world_dir = write_world(root / "world", WorldConfig(), progress=False)
    teacher_dir = train_teacher(world_dir, root / "teacher", TeacherConfig(), progress=False, num_threads=1)
    result = clip_zeroshot_top1(teacher_dir, world_dir)
    assert result["top1"] >= 0.80, result
