"""`proclip demo --world fashion --quick` through the command line, on Fashion-MNIST's real photos (Debian's
dataset-fashion-mnist, which setup.sh installs): the world's splits and captions, the scores with class names, synonyms
and translations for every row, the report, the figure, the Hub-ready folder and its Space; and the one-line error
where the photos are missing."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMOLLM2, missing_requirement, require_package
from huggingface_hub import ModelCard
from proclip_train.cli import build_parser, main
from proclip_train.cli.demo import run_demo
from proclip_train.cli.errors import UsageError
from proclip_train.demo.fashion import IDX_FILES, SOURCE_VARIABLE, load_lexicon, source_folder
from proclip_train.demo.report import (
    STAGE1_RUNS,
    STAGE2_RUNS,
    combine_results,
    combined_markdown,
)
from proclip_train.demo.scores import LANGUAGES
from proclip_train.demo.world import read_metadata
from proclip_train.demo.worlds import load_world_config

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def fashion_demo(tmp_path_factory):
    """The quick Fashion-MNIST demo, run once through `proclip demo`: `(output folder, results)`."""
    if not all((source_folder() / name).is_file() for pair in IDX_FILES.values() for name in pair):
        missing_requirement(f"Fashion-MNIST is not in {source_folder()} (apt-get install dataset-fashion-mnist)")
    require_package(SMOLLM2.package, SMOLLM2.distribution)
    out = tmp_path_factory.mktemp("fashion") / "quick"
    main(["demo", "--world", "fashion", "--quick", "--out", str(out), "--no-progress", "--jobs", "1"])
    return out, json.loads((out / "results.json").read_text())


def test_world_holds_real_photos_with_captions_that_never_use_a_synonym(fashion_demo):
    out, _ = fashion_demo
    world = load_world_config(out / "world")
    assert world.world_name == "fashion" and world.held_out_classes == ["bag", "ankle boot"]
    align = read_metadata(out / "world", "align-train")
    assert len(align) == world.n_align_train and not {r["label"] for r in align} & set(world.held_out)
    test = read_metadata(out / "world", "test")
    assert len(test) == world.n_test and {r["label"] for r in test} == set(world.classes)
    assert all(r["held_out"] == (r["label"] in world.held_out) for r in test)
    synonyms = [s for c in load_lexicon() for s in c.synonyms]
    captions = [r["caption_short"] for split in ("teacher-train", "align-train", "stage1-captions", "val", "test")
                for r in read_metadata(out / "world", split)]
    assert not [c for c in captions for s in synonyms if re.search(rf"\b{re.escape(s)}\b", c)]
    # the attribute words vary within a class: the captions tell photos of one class apart
    coats = {r["caption_short"].rstrip(".").split(" of ")[-1] for r in test if r["label"] == "coat"}
    assert {"a coat", "a wide coat", "a narrow dark coat"} <= coats or len(coats) >= 5


def test_every_row_is_scored_with_names_synonyms_and_translations(fashion_demo):
    _, results = fashion_demo
    assert results["world"] == "fashion"
    for record in [results["teacher"], *[r for name in (*STAGE1_RUNS, *STAGE2_RUNS) for r in results["runs"][name]]]:
        test = record["test"]
        assert test["zeroshot"]["num_images"] == 500 and test["zeroshot"]["chance"] == pytest.approx(0.1)
        for scores in (test["zeroshot"], test["zeroshot_synonyms"], *test["zeroshot_translated"].values()):
            assert 0 <= scores["top1_seen"] <= 1 and 0 <= scores["top1_held_out"] <= 1
        assert set(test["zeroshot_translated"]) == set(LANGUAGES)
        assert test["retrieval"] == {} and "caption_retrieval" not in test  # single photos: no scenes to retrieve
    teacher = results["teacher"]["test"]["zeroshot"]
    assert teacher["top1_seen"] > 0.35 and teacher["top1_held_out"] > 0.35  # the teacher saw every class


def test_report_and_figure_show_the_words_and_leave_out_retrieval(fashion_demo):
    out, results = fashion_demo
    markdown = (out / "results.md").read_text()
    assert "ZS synonyms" in markdown and "synonyms held-out" in markdown and "translated held-out (mean)" in markdown
    assert "chance 10.0 % on 10 classes" in markdown
    assert "T→I" not in markdown and "CRA" not in markdown and "colour right" not in markdown
    assert (out / "comparison.png").stat().st_size > 10_000
    rows = {row["row"]: row for row in results["table"]}
    assert rows["teacher"]["zs_synonyms"]["n"] == 1 and rows["proclip"]["long_t2i"]["n"] == 0


def test_combine_compares_synonyms_translations_and_held_out_classes_per_pair(fashion_demo):
    _, results = fashion_demo
    other = copy.deepcopy(results)
    other["config"]["teacher"]["seed"] = 1
    for record in other["runs"]["proclip"]:
        record["test"]["zeroshot_synonyms"]["top1"] = 1.0  # the second teacher's ProCLIP: every synonym right
    combined = combine_results([results, other])
    differences = {(d["a"], d["b"], d["column"]): d for d in combined["differences"]}
    assert {("teacher", "proclip", "zs_synonyms"), ("teacher", "proclip", "zs_translated"),
            ("teacher", "proclip", "zs_all"), ("proclip", "direct", "zs_held")} <= set(differences)
    assert not any(column in ("short_t2i", "long_t2i") for _, _, column in differences)
    synonyms = differences["teacher", "proclip", "zs_synonyms"]
    teacher = results["teacher"]["test"]["zeroshot_synonyms"]["top1"]
    assert synonyms["n"] == 2 and synonyms["min"] == pytest.approx(teacher - 1.0)
    markdown = combined_markdown(combined)
    assert "ZS synonyms" in markdown and "synonyms held-out" in markdown and "nan" not in markdown
    assert combined["world"] == "fashion"


def test_final_folder_card_and_space_name_fashion_mnist(fashion_demo):
    out, _ = fashion_demo
    final = out / "final"
    record = json.loads((final / "eval_zeroshot.json").read_text())
    assert record["data"]["spec"] == "zalando-datasets/fashion_mnist" and record["data"]["num_rows"] == 500
    assert not (final / "eval_retrieval.json").exists()
    card = ModelCard.load(final / "README.md")
    assert "zalando-datasets/fashion_mnist" in card.text and "decoder LLM" in card.text  # SmolLM2, the default tower
    assert card.data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    space = json.loads((out / "space" / "space_config.json").read_text())
    assert space["gallery"] and space["classify_examples"]
    gallery = [json.loads(line) for line in (out / "space" / space["gallery"] / "metadata.jsonl").read_text().splitlines()]
    assert gallery and all(set(row["captions"]) == {"caption_short"} for row in gallery)


def test_stage0_is_refused_in_a_world_without_long_captions():
    with pytest.raises(UsageError, match="--stage0 --world fashion"):
        run_demo(build_parser().parse_args(["demo", "--world", "fashion", "--quick", "--stage0"]))


def test_missing_photos_end_in_two_lines_and_exit_2(tmp_path):
    env = {**os.environ, SOURCE_VARIABLE: str(tmp_path / "nowhere")}
    completed = subprocess.run([sys.executable, "-m", "proclip_train.cli", "demo", "--world", "fashion", "--quick",
                                "--out", str(tmp_path / "demo"), "--no-progress"], env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr and len(completed.stderr.strip().splitlines()) <= 2
    assert "apt-get install dataset-fashion-mnist" in completed.stderr and SOURCE_VARIABLE in completed.stderr
    assert not Path(tmp_path / "demo" / "world" / ".world-complete").exists()
