"""`proclip demo --quick` end to end: world, teacher, SmolLM2, both stages, every variant, the Hub-ready folder."""

import json
import time

import pytest
from proclip_train.cli import build_parser
from proclip_train.demo.report import (
    STAGE0_TOWER_RUNS,
    STAGE1_RUNS,
    STAGE2_RUNS,
    results_markdown,
)
from proclip_train.demo.run import Demo, DemoConfig, Stage0DemoConfig
from proclip_train.demo.world import read_metadata
from proclip_train.evaluation.tasks import text_tower_caption_retrieval_accuracy

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def demo(quick_demo):
    return quick_demo


def test_cli_wires_demo():
    args = build_parser().parse_args(["demo", "--quick", "--out", "x", "--seeds", "2", "--text", "minilm"])
    assert args.quick and args.out == "x" and args.seeds == 2 and args.text == "minilm" and args.threads == 1
    assert args.func.__name__ == "run_demo"


def test_every_artefact_exists(demo):
    out, _ = demo
    assert (out / "world" / ".world-complete").is_file()
    assert (out / "teacher" / ".teacher-complete").is_file()
    assert (out / "init" / "config.json").is_file()
    assert list((out / "embedding_cache").glob("*.safetensors"))
    for name in (*STAGE1_RUNS, *STAGE2_RUNS):
        assert (out / "runs" / "seed0" / name / "done.json").is_file(), name
        assert (out / "runs" / "seed0" / name / "weights.safetensors").is_file(), name
    final = out / "final"
    for name in ("config.json", "model.safetensors", "modeling_proclip.py", "README.md", "eval_zeroshot.json",
                 "eval_retrieval.json", "processor_config.json"):
        assert (final / name).is_file(), name
    assert (out / "results.json").is_file() and (out / "results.md").is_file()


def test_final_folder_loads_through_remote_code_and_the_pipeline(demo):
    out, results = demo
    # step_final runs push.check_remote_code_loads and the zero-shot pipeline where the project is blocked; it
    # raises if either fails, and records what it saw.
    checks = results["steps"]["final"]["checks"]
    assert checks["remote_code"] and checks["pipeline"]
    assert checks["pipeline_module"].startswith("transformers_modules.")


def test_proclip_zero_shot_is_above_chance(demo):
    out, results = demo
    row = next(r for r in results["table"] if r["row"] == "proclip")
    chance = results["teacher"]["test"]["zeroshot"]["chance"]
    assert row["zs_seen"]["mean"] > chance
    # `proclip eval` through the LLM itself agrees with the cached-embedding scoring of the same model
    online = json.loads((out / "final" / "eval_zeroshot.json").read_text())["metrics"]["top1_accuracy"]
    cached = results["runs"]["proclip"][0]["test"]["zeroshot"]["top1"]
    assert online > chance
    assert online == pytest.approx(cached, abs=0.05)


def test_table_has_every_row_and_column(demo):
    _, results = demo
    assert [r["row"] for r in results["table"]] == ["teacher", "stage1", *STAGE2_RUNS]
    markdown = results_markdown(results)
    for header in ("ZS top-1 seen", "ZS top-1 held-out", "short I→T", "long T→I", "de T→I", "es T→I"):
        assert header in markdown
    assert "proclip demo --quick" in markdown


def test_rerun_skips_finished_steps(demo):
    out, results = demo
    started = time.perf_counter()
    again = Demo(out, DemoConfig.quick(), progress=False, command="proclip demo --quick").run()
    assert time.perf_counter() - started < 120
    assert again["table"] == results["table"]


def test_another_config_in_the_same_folder_is_refused(demo):
    out, _ = demo
    with pytest.raises(FileExistsError):
        Demo(out, DemoConfig.quick(distill_weight=0.5), progress=False).run()


# --- `--stage0`: LLM2CLIP's stage 0 on SmolLM2, then ProCLIP on the tuned LLM, added to the finished demo -----------


@pytest.fixture(scope="module")
def demo_with_stage0(demo):
    out, _ = demo
    config = DemoConfig.quick(stage0=Stage0DemoConfig.quick())
    results = Demo(out, config, progress=False, command="proclip demo --quick --stage0").run()
    return out, results


def test_cli_wires_stage0():
    args = build_parser().parse_args(["demo", "--quick", "--stage0", "--stage0-steps", "7"])
    assert args.stage0 and args.stage0_steps == 7


def test_stage0_rows_join_the_finished_demo(demo, demo_with_stage0):
    out, results = demo_with_stage0
    assert results["runs"]["proclip"] == demo[1]["runs"]["proclip"]  # reused, not retrained
    assert [r["row"] for r in results["table"]] == ["teacher", "stage1", *STAGE2_RUNS, *STAGE0_TOWER_RUNS]
    row = next(r for r in results["table"] if r["row"] == "stage0-proclip")
    assert list(row["stage_seconds"]) == ["stage 0", "stage 1", "stage 2"]
    assert all(stat["n"] == 1 and stat["mean"] > 0 for stat in row["stage_seconds"].values())
    record = results["runs"]["stage0-proclip"][0]
    assert record["text_tower"] == "stage0" and record["starts_from"] == "stage0-stage1"
    # stage 0 records bidirectional attention in its export, and the ProCLIP model built on it uses it
    assert json.loads((out / "stage0" / "proclip_text_tower.json").read_text())["bidirectional"] is True
    assert json.loads((out / "init-stage0" / "config.json").read_text())["bidirectional"] is True
    assert json.loads((out / "init" / "config.json").read_text())["bidirectional"] is False
    markdown = (out / "results.md").read_text()
    assert "ProCLIP on the stage-0 LLM" in markdown and "LLM after stage 0" in markdown


def test_text_tower_caption_retrieval_matches_the_llm_itself(demo_with_stage0):
    """The demo's CRA of the raw LLM comes from its embedding cache (bf16 autocast); `text_tower_caption_retrieval_accuracy`
    runs SmolLM2 itself in float32 on the same test captions: each scene's short caption among the long ones."""
    out, results = demo_with_stage0
    towers = results["text_tower_caption_retrieval"]
    assert set(towers) == {"teacher", "llm", "stage0"}
    n = towers["llm"]["num_images"]
    assert n == DemoConfig.quick().n_long_test
    scenes = [r for r in read_metadata(out / "world", "test") if r["kind"] == "scene"][:n]
    direct = text_tower_caption_retrieval_accuracy(results["steps"]["init"]["text"], [r["caption_short"] for r in scenes],
                                           [r["caption_long"] for r in scenes], max_text_length=256)
    assert towers["llm"]["short_to_long"] == pytest.approx(direct, abs=2.5 / n)  # at most two queries differ
