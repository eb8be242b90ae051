"""The synthetic world: determinism, captions, held-out structure, and loading through `datasets`."""

import hashlib
import json
import re

import pytest
from proclip_train.demo.languages import (
    COLOURS,
    NUMBERS,
    SHAPES,
    SIZES,
    noun_phrase,
    realise_short_caption,
)
from proclip_train.demo.world import (
    COMPLETE_MARKER,
    SPLITS,
    WorldConfig,
    generate_scenes,
    load_world_split,
    read_metadata,
    render_scene,
    write_world,
)
from proclip_train.demo.worlds import load_world_config


def small_config(**overrides):
    values = dict(n_teacher_train=120, n_align_train=120, n_stage1_captions=80, n_val_scenes=10, n_test_scenes=40,
                  val_per_class=1, test_per_class=3)
    values.update(overrides)
    return WorldConfig.quick(**values)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    config = small_config()
    return write_world(tmp_path_factory.mktemp("world") / "w", config, progress=False), config


def all_rows(world_dir):
    return {split: read_metadata(world_dir, split) for split in SPLITS}


def tree_digest(root):
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    config = small_config(n_teacher_train=30, n_align_train=30, n_stage1_captions=20, n_test_scenes=10)
    a = write_world(tmp_path / "a", config, progress=False)
    b = write_world(tmp_path / "b", small_config(n_teacher_train=30, n_align_train=30, n_stage1_captions=20,
                                                 n_test_scenes=10), progress=False)
    c = write_world(tmp_path / "c", small_config(seed=1, n_teacher_train=30, n_align_train=30,
                                                 n_stage1_captions=20, n_test_scenes=10), progress=False)
    assert tree_digest(a) == tree_digest(b)
    assert (a / "teacher/train/00000.png").read_bytes() != (c / "teacher/train/00000.png").read_bytes()


def test_rerun_reuses_the_folder_and_refuses_another_config(world, tmp_path):
    world_dir, config = world
    marker = world_dir / COMPLETE_MARKER
    assert marker.read_text().strip() == config.config_hash()
    before = {p: p.stat().st_mtime_ns for p in world_dir.rglob("*") if p.is_file()}
    write_world(world_dir, config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in world_dir.rglob("*") if p.is_file()} == before
    assert load_world_config(world_dir) == config
    with pytest.raises(FileExistsError, match="another config"):
        write_world(world_dir, small_config(seed=7), progress=False)


def test_config_validation():
    with pytest.raises(ValueError, match="lexicon"):
        WorldConfig(colours=("red", "mauve"))
    with pytest.raises(ValueError, match="held-out"):
        WorldConfig(held_out=(("red", "hexagon"),))
    assert WorldConfig.from_dict(json.loads(json.dumps(WorldConfig().to_dict()))) == WorldConfig()


def test_split_sizes_and_columns(world):
    world_dir, config = world
    rows = all_rows(world_dir)
    n_classes = len(config.classes)
    assert len(rows["teacher-train"]) == config.n_teacher_train
    assert len(rows["align-train"]) == config.n_align_train
    assert len(rows["stage1-captions"]) == config.n_stage1_captions
    assert len(rows["val"]) == n_classes * config.val_per_class + config.n_val_scenes
    assert len(rows["test"]) == n_classes * config.test_per_class + config.n_test_scenes
    for row in rows["test"]:
        assert {"file_name", "caption_short", "caption_long", "caption_de", "caption_fr", "caption_es", "label",
                "n_objects", "held_out", "kind", "objects"} <= set(row)
        assert 1 <= row["n_objects"] <= config.max_objects == 4
        assert (row["label"] != "") == (row["n_objects"] == 1)
    info = json.loads((world_dir / "world.json").read_text())
    assert info["classes"] == config.classes and info["held_out_classes"] == ["red square", "blue triangle"]


def test_held_out_combinations_absent_from_alignment_data_present_elsewhere(world):
    world_dir, config = world
    held = {tuple(pair) for pair in config.held_out}
    rows = all_rows(world_dir)

    def combos(row):
        return {(o["colour"], o["shape"]) for o in row["objects"]}

    for row in rows["align-train"]:
        assert not combos(row) & held and not row["held_out"]
    for split in ("teacher-train", "stage1-captions", "test"):
        flagged = [row for row in rows[split] if row["held_out"]]
        assert flagged, split
        assert all(combos(row) & held for row in flagged)
        assert all(not combos(row) & held for row in rows[split] if not row["held_out"])
    # zero-shot: single-object test images of every class, held-out classes included
    labels = {row["label"] for row in rows["test"] if row["kind"] == "class"}
    assert labels == set(config.classes)
    assert {"red square", "blue triangle"} <= {row["label"] for row in rows["test"] if row["held_out"]}


def test_caption_lengths_and_coverage(world):
    world_dir, config = world
    for split, rows in all_rows(world_dir).items():
        for row in rows:
            assert len(row["caption_short"].split()) <= 12, row["caption_short"]
            long = row["caption_long"]
            assert len(long.split()) >= 60, long
            for o in row["objects"]:  # every object, with its attributes
                assert f"{o['size']} {o['colour']} {o['shape']}" in long
            if row["n_objects"] > 1:
                assert "to the left of" in long


def test_long_caption_details_lie_beyond_32_tokens(world):
    """Every token is at least one word piece, so if the first 32 words name no attribute, a 32-token window
    cannot either (the teacher-tokenizer version of this check is in test_teacher.py)."""
    world_dir, config = world
    attribute_words = set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBERS["en"].values())
    heads = set()
    for row in read_metadata(world_dir, "test"):
        head = row["caption_long"].split()[:32]
        assert not attribute_words & {re.sub(r"\W", "", w.lower()) for w in head}, head
        heads.add(" ".join(head))
    assert len(heads) <= 3  # one of a few generic preambles: nothing in it tells images apart


def test_short_captions_are_translations(world):
    world_dir, _ = world
    for row in read_metadata(world_dir, "test"):
        assert row["caption_de"] != row["caption_short"] != row["caption_fr"] != row["caption_es"]
        for key in ("caption_short", "caption_de", "caption_fr", "caption_es"):
            assert row[key][0].isupper() and row[key].endswith(".")
    de = [row["caption_de"] for row in read_metadata(world_dir, "test")]
    assert any(re.search(r"\b(ein|eine)\b", c, re.I) for c in de)


@pytest.mark.parametrize("lang, args, expected", [
    ("en", ("orange", "star", None), "an orange star"),
    ("en", ("red", "circle", "large"), "a large red circle"),
    ("de", ("red", "circle", "large"), "ein großer roter Kreis"),
    ("de", ("green", "diamond", "small"), "eine kleine grüne Raute"),
    ("de", ("blue", "triangle", None), "ein blaues Dreieck"),
    ("fr", ("green", "star", "large"), "une grande étoile verte"),
    ("fr", ("white", "cross", "medium"), "une croix blanche de taille moyenne"),
    ("fr", ("blue", "square", "small"), "un petit carré bleu"),
    ("es", ("red", "star", "small"), "una estrella roja pequeña"),
    ("es", ("yellow", "circle", "large"), "un círculo amarillo grande"),
])
def test_noun_phrases_agree(lang, args, expected):
    assert noun_phrase(lang, *args) == expected


def test_relations_and_lists_are_grammatical():
    pair = {"kind": "pair", "objects": [("red", "circle", "large"), ("green", "star", "small")], "relation": "left"}
    assert realise_short_caption(pair, "en") == "A large red circle to the left of a small green star."
    assert realise_short_caption(pair, "de") == "Ein großer roter Kreis links von einem kleinen grünen Stern."
    assert realise_short_caption(pair, "fr") == "Un grand cercle rouge à gauche d'une petite étoile verte."
    assert realise_short_caption(pair, "es") == "Un círculo rojo grande a la izquierda de una estrella verde pequeña."
    above = dict(pair, relation="above", objects=[("blue", "square", None), ("yellow", "diamond", None)])
    assert realise_short_caption(above, "de") == "Ein blaues Quadrat über einer gelben Raute."
    assert realise_short_caption(above, "fr") == "Un carré bleu au-dessus d'un losange jaune."
    photo = {"kind": "single", "object": ("red", "triangle", "small"), "frame": "photo"}
    assert realise_short_caption(photo, "de") == "Ein Foto von einem kleinen roten Dreieck."
    assert realise_short_caption(photo, "fr") == "Une photo d'un petit triangle rouge."
    image = dict(photo, frame="image", object=("orange", "star", None))
    assert realise_short_caption(image, "en") == "An image of an orange star."
    assert realise_short_caption(image, "de") == "Eine Abbildung von einem orangefarbenen Stern."
    assert realise_short_caption(image, "es") == "Una imagen de una estrella naranja."
    assert realise_short_caption(dict(image, frame="drawing"), "fr") == "Un dessin d'une étoile orange."
    many = {"kind": "many", "count": 5, "objects": [("red", "circle", None), ("purple", "star", None)]}
    assert realise_short_caption(many, "en") == "Five shapes, among them a red circle and a purple star."
    assert realise_short_caption(many, "es") == "Cinco figuras, entre ellas un círculo rojo y una estrella morada."
    listed = {"kind": "list", "objects": [("red", "circle", None), ("blue", "square", None), ("green", "star", None)]}
    assert realise_short_caption(listed, "de") == "Ein roter Kreis, ein blaues Quadrat und ein grüner Stern."


def test_render_is_the_scene():
    config = small_config()
    scene = generate_scenes(config, "test")[0]  # the first single-object image of the first class
    assert scene.kind == "class" and scene.objects[0].name == config.classes[0] == "red circle"
    image = render_scene(scene, config)
    assert image.size == (config.image_size, config.image_size) and image.mode == "RGB"
    o = scene.objects[0]
    r, g, b = image.getpixel((int(o.x * config.image_size), int(o.y * config.image_size)))
    assert r > 150 and g < 90 and b < 90
    corner = image.getpixel((0, 0))  # plain light background
    assert min(corner) > 180 and max(corner) - min(corner) < 20


def test_splits_load_with_datasets(world, tmp_path):
    from datasets import load_dataset

    world_dir, config = world
    cache = str(tmp_path / "hf-cache")
    align = load_dataset("imagefolder", data_dir=str(world_dir / "align"), cache_dir=cache)
    assert set(align) == {"train", "validation", "test"}
    assert align["train"].num_rows == config.n_align_train
    example = align["test"][0]
    assert example["image"].size == (config.image_size, config.image_size)
    assert example["caption_short"] and example["caption_long"] and example["caption_es"]
    assert example["label"] == "red circle" and example["held_out"] is False
    teacher = load_world_split(world_dir, "teacher-train", cache_dir=cache)
    assert teacher.num_rows == config.n_teacher_train and "image" in teacher.column_names
    captions = load_world_split(world_dir, "stage1-captions", cache_dir=cache)
    assert captions.num_rows == config.n_stage1_captions and "image" not in captions.column_names
