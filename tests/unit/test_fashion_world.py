"""The Fashion-MNIST world's parts that need no photos: the IDX reader, the lexicon (synonyms, translations), the
attribute words measured from pixels, the split plan and the config's checks."""

import gzip
import json

import numpy as np
import pytest
from proclip_train.demo.fashion import (
    LEXICON_FILE,
    SOURCE_VARIABLE,
    FashionDataMissing,
    FashionWorldConfig,
    attribute_words,
    garment_measures,
    load_lexicon,
    load_official,
    read_idx,
    split_indices,
)
from proclip_train.demo.languages import ZERO_SHOT_TEMPLATES


def write_idx(path, array: np.ndarray, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_idx_files_read_back_and_a_truncated_or_foreign_file_is_refused(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "images.gz", images)
    write_idx(tmp_path / "labels", np.arange(5, dtype=np.uint8), compress=False)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    assert read_idx(tmp_path / "labels").tolist() == [0, 1, 2, 3, 4]
    whole = gzip.decompress((tmp_path / "images.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(whole[:-10]))
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.gz")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "png")


def test_missing_photos_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv(SOURCE_VARIABLE, str(tmp_path))
    with pytest.raises(FashionDataMissing) as error:
        load_official("test")
    message = str(error.value)
    assert str(tmp_path) in message and "apt-get install dataset-fashion-mnist" in message and SOURCE_VARIABLE in message


def test_wrong_row_counts_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(SOURCE_VARIABLE, str(tmp_path))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="expected 10000 photos"):
        load_official("test")


def test_lexicon_has_ten_classes_with_three_unseen_synonyms_each():
    classes = load_lexicon()
    assert [c.name for c in classes] == ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt",
                                         "sneaker", "bag", "ankle boot"]  # Fashion-MNIST's label order
    english = {c.english for c in classes}
    for c in classes:
        assert len(set(c.synonyms)) == 3 and not set(c.synonyms) & english
    world = FashionWorldConfig()
    prompts = world.synonym_prompts()
    assert len(prompts) == 10 * 3 * len(ZERO_SHOT_TEMPLATES) == len(set(prompts))
    assert prompts[:2] == ["a photo of a tee.", "a picture of a tee."]


def test_a_lexicon_with_a_missing_synonym_or_a_wrong_gender_is_refused(tmp_path):
    entries = json.loads(LEXICON_FILE.read_text())
    entries["classes"][3]["synonyms"] = entries["classes"][3]["synonyms"][:2]
    (tmp_path / "a.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="dress needs exactly 3 synonyms"):
        load_lexicon(tmp_path / "a.json")
    entries = json.loads(LEXICON_FILE.read_text())
    entries["classes"][0]["fr"] = ["t-shirt", "n"]  # French has no neuter
    (tmp_path / "b.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="gender"):
        load_lexicon(tmp_path / "b.json")


def test_translated_prompts_decline_the_article_by_gender_and_case():
    world = FashionWorldConfig()
    de, fr, es = (world.translated_prompts(lang) for lang in ("de", "fr", "es"))
    t = len(ZERO_SHOT_TEMPLATES)
    trousers, dress, coat, bag = (t * world.classes.index(name) for name in ("trousers", "dress", "coat", "bag"))
    assert de[trousers] == "ein Foto von einer Hose."  # feminine dative
    assert de[dress] == "ein Foto von einem Kleid."  # neuter dative
    assert de[coat + t - 1] == "ein Mantel."  # the bare template: nominative
    assert fr[dress + 2] == "une image d'une robe." and fr[bag] == "une photo d'un sac."
    assert es[bag + 3] == "un dibujo de un bolso." and es[trousers + t - 1] == "un pantalón."
    assert len(set(de + fr + es)) == 3 * 10 * t


def test_attribute_words_come_from_the_pixels():
    canvas = np.zeros((3, 28, 28), np.uint8)
    canvas[0, 4:24, 2:26] = 240  # bright and wide
    canvas[1, 2:26, 10:18] = 60  # dark and narrow
    canvas[2, 5:20, 8:20] = 150  # in between
    tone, width = garment_measures(canvas)
    assert tone[0] == pytest.approx(240 / 255) and tone[1] == pytest.approx(60 / 255)
    assert width[0] == pytest.approx(24 / 20) and width[1] == pytest.approx(8 / 24)
    tone_thirds, width_thirds = (0.4, 0.7), (0.6, 0.9)
    assert attribute_words(tone[0], width[0], tone_thirds, width_thirds) == ["wide", "light"]
    assert attribute_words(tone[1], width[1], tone_thirds, width_thirds) == ["narrow", "dark"]
    assert attribute_words(tone[2], width[2], tone_thirds, width_thirds) == []
    classes = {c.name: c for c in load_lexicon()}
    assert classes["trousers"].english_with(["narrow", "dark"]) == "a pair of narrow dark trousers"
    assert classes["ankle boot"].english_with(["dark"]) == "a dark ankle boot"
    assert classes["coat"].english_with(["wide"]) == "a wide coat" and classes["coat"].english_with([]) == "a coat"


def test_splits_are_disjoint_and_stage_2_never_sees_a_held_out_class():
    labels = np.random.default_rng(1).integers(0, 10, 60000).astype(np.uint8)
    config = FashionWorldConfig.quick(val_per_class=7)
    splits = split_indices(config, labels)
    assert [len(splits[s]) for s in ("teacher-train", "align-train", "stage1-captions", "val")] == [3000, 1000, 1000, 70]
    everything = [i for indices in splits.values() for i in indices]
    assert len(everything) == len(set(everything))
    held = {config.classes.index(name) for name in config.held_out}
    assert not held & {int(labels[i]) for i in splits["align-train"]}
    assert held <= {int(labels[i]) for i in splits["teacher-train"]}
    assert sorted(np.bincount(labels[splits["val"]], minlength=10).tolist()) == [7] * 10


def test_config_checks_its_classes_and_its_size():
    with pytest.raises(ValueError, match="not Fashion-MNIST classes"):
        FashionWorldConfig(held_out=("bag", "hat"))
    with pytest.raises(ValueError, match="train set has 60000"):
        FashionWorldConfig(n_teacher_train=50000)
    with pytest.raises(ValueError, match="n_test"):
        FashionWorldConfig(n_test=0)
    assert FashionWorldConfig().config_hash() != FashionWorldConfig(held_out=("bag",)).config_hash()
    assert FashionWorldConfig.from_dict(FashionWorldConfig.quick().to_dict()) == FashionWorldConfig.quick()
