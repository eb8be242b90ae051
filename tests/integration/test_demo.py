"""`proclip demo --quick` end to end (on MiniLM: conftest's `quick_demo`): world, teacher, text tower, both stages,
every variant, the Hub-ready folder, the environment and the figure; the translated zero-shot prompts; a text-anchor
sweep setting; the comparison over teachers (`--combine`)."""

import copy
import json
import shutil
import statistics
import time

import pytest
import torch
import transformers
from conftest import SMOLLM2, quick_demo_command, quick_demo_config, require_package
from huggingface_hub import ModelCard
from proclip_train.cli import build_parser, main
from proclip_train.cli.errors import UsageError
from proclip_train.demo.languages import ZERO_SHOT_TEMPLATES, noun_phrase
from proclip_train.demo.parallel import LOG_FILE, default_jobs
from proclip_train.demo.report import (
    FIGURE_FILE,
    STAGE0_TOWER_RUNS,
    STAGE1_RUNS,
    STAGE2_RUNS,
    combine_results,
    combined_markdown,
    results_markdown,
)
from proclip_train.demo.run import Demo, DemoConfig, Stage0DemoConfig, Stage2Setting
from proclip_train.demo.scores import LANGUAGES, zero_shot_prompts
from proclip_train.demo.world import WorldConfig, read_metadata
from proclip_train.evaluation.tasks import text_tower_caption_retrieval_accuracy

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def demo(quick_demo):
    return quick_demo


def test_cli_wires_demo():
    args = build_parser().parse_args(["demo", "--quick", "--out", "x", "--seeds", "2", "--text", "minilm"])
    assert args.quick and args.out == "x" and args.seeds == 2 and args.text == "minilm" and args.threads == 1
    assert args.func.__name__ == "run_demo"


def test_translated_prompts_are_the_templates_realised_by_the_lexicon():
    """Every translated prompt is one of the English templates' frames around the lexicon's noun phrase of its class
    (German: dative after "von", nominative alone), and the lexicon's English realisation is the English prompt."""
    world = WorldConfig()
    classes = world.classes
    assert world.translated_prompts("en") == zero_shot_prompts(world)
    frames = {"de": ("ein Foto von ", "ein Bild von ", "eine Abbildung von ", "eine Zeichnung von ", ""),
              "fr": ("une photo d'", "une illustration d'", "une image d'", "un dessin d'", ""),
              "es": ("una foto de ", "una ilustración de ", "una imagen de ", "un dibujo de ", "")}
    for lang in LANGUAGES:
        prompts = world.translated_prompts(lang)
        assert len(prompts) == len(classes) * len(ZERO_SHOT_TEMPLATES) == len(set(prompts))
        for c, name in enumerate(classes):
            colour, shape = name.split(" ")
            for t, frame in enumerate(frames[lang]):
                case = "dat" if lang == "de" and frame else "nom"
                phrase = noun_phrase(lang, colour, shape, case=case)
                expected = frame + (phrase if frame else phrase[:1].lower() + phrase[1:]) + "."
                assert prompts[c * len(ZERO_SHOT_TEMPLATES) + t] == expected
    assert world.translated_prompts("de")[0] == "ein Foto von einem roten Kreis."
    assert world.translated_prompts("fr")[5 * classes.index("green star") + 4] == "une étoile verte."


def test_sweep_settings_parse_and_keep_their_folder_names():
    assert Stage2Setting.parse("10,1,mean").name == "sweep-lambda10-momentum1-mean"
    assert Stage2Setting.parse("0,1,mean,0.001").name == "sweep-lambda0-momentum1-mean-lr0.001"
    setting = Stage2Setting.parse("10,1,mean,0.001,stage1,30")
    assert setting.text_anchor_weight == 30 and setting.name == "sweep-lambda10-momentum1-mean-lr0.001-anchor30"
    assert Stage2Setting.parse("0,1,mean,,fresh").start == "fresh"
    with pytest.raises(ValueError, match="stage1 or fresh"):
        Stage2Setting.parse("0,1,mean,,elsewhere")


def test_cli_wires_the_new_options():
    from proclip_train.cli.demo import demo_config

    args = build_parser().parse_args(["demo", "--teacher-seed", "1", "--text", "gemma3", "--mu", "3", "--stage0",
                                      "--stage0-attention", "causal", "--stage0-pairs", "shuffled",
                                      "--adapter-blocks", "2", "--sweep", "10,1,mean,0.001,stage1,30"])
    config = demo_config(args)
    assert config.teacher.seed == 1 and config.text == "gemma3" and config.text_anchor_weight == 3
    assert config.stage0.bidirectional is False and config.stage0.pairs == "shuffled" and config.adapter_blocks == 2
    assert config.sweep[-1] == Stage2Setting(10.0, 1.0, "mean", 0.001, "stage1", 30.0)
    assert config.stage0.description() == "60 steps, causal, shuffled pairs"


def test_runs_and_sweep_seeds_are_wired_and_checked():
    from proclip_train.cli.demo import demo_config
    from proclip_train.cli.errors import UsageError

    config = demo_config(build_parser().parse_args(["demo", "--runs", "proclip, direct", "--sweep-seeds", "2"]))
    assert config.runs == ["proclip", "direct"] and config.sweep_seeds == 2
    for runs, message in (("proclip,stage2", "stage2 is not a row"), ("stage0-proclip", "Add --stage0")):
        with pytest.raises(UsageError, match=message):
            demo_config(build_parser().parse_args(["demo", "--runs", runs]))
    with pytest.raises(UsageError, match="--sweep-seeds 4"):
        demo_config(build_parser().parse_args(["demo", "--seeds", "3", "--sweep-seeds", "4"]))
    # a kept stage-2 row brings the stage-1 run it starts from, a sweep from stage 1 brings stage1
    demo = Demo("unused", DemoConfig.quick(runs=["proclip-nostruct", "direct"], stage0=Stage0DemoConfig.quick()))
    assert demo.stage1_runs() == ["stage1-nostruct"] and demo.stage2_runs() == ["direct", "proclip-nostruct"]
    demo = Demo("unused", DemoConfig.quick(runs=["stage0-proclip"], stage0=Stage0DemoConfig.quick(),
                                           sweep=[Stage2Setting(1.0)]))
    assert demo.stage1_runs() == ["stage1", "stage0-stage1"] and demo.stage2_runs() == ["stage0-proclip"]


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
    assert (out / FIGURE_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_results_record_the_environment(demo):
    _, results = demo
    environment = results["environment"]
    assert environment["packages"]["torch"] == torch.__version__.split("+")[0] or environment["packages"]["torch"] == torch.__version__
    assert environment["packages"]["transformers"] == transformers.__version__
    assert environment["packages"]["tokenizers"] and environment["packages"]["numpy"] and environment["cpu"]
    assert environment["torch_threads"] == 1
    markdown = results_markdown(results)
    assert f"transformers {transformers.__version__}" in markdown and environment["cpu"] in markdown


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


@pytest.mark.slow
def test_the_readme_quick_demo_runs_on_smollm2(tmp_path):
    """`proclip demo --quick` as README gives it, on SmolLM2-135M (about 5 min on 2 AVX2 cores): the card names the
    decoder LLM, and ProCLIP's zero-shot through the final folder is above chance and agrees with the cached scores."""
    require_package(SMOLLM2.package, SMOLLM2.distribution)
    out = tmp_path / "quick"
    main(["demo", "--quick", "--out", str(out), "--no-progress"])
    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(out / "final" / "README.md")
    assert "decoder LLM" in card.text and card.data.base_model == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    chance = results["teacher"]["test"]["zeroshot"]["chance"]
    online = json.loads((out / "final" / "eval_zeroshot.json").read_text())["metrics"]["top1_accuracy"]
    assert online > chance
    assert online == pytest.approx(results["runs"]["proclip"][0]["test"]["zeroshot"]["top1"], abs=0.05)


def test_table_has_every_row_and_column(demo):
    _, results = demo
    assert [r["row"] for r in results["table"]] == ["teacher", "stage1", *STAGE2_RUNS]
    markdown = results_markdown(results)
    for header in ("ZS top-1 seen", "ZS top-1 held-out", "short I→T", "long T→I", "de T→I", "es T→I",
                   "ZS translated (de/fr/es mean)", "de ZS", "fr ZS", "es ZS", "es colour right", "es shape right"):
        assert header in markdown
    assert "synonyms" not in markdown and "Other words" not in markdown  # the shapes world has no synonyms
    for row in results["runs"]["proclip"]:
        for lang in LANGUAGES:
            translated = row["test"]["zeroshot_translated"][lang]
            assert 0 <= translated["top1"] <= translated["colour_correct"] <= 1
            assert translated["num_images"] == row["test"]["zeroshot"]["num_images"]
    assert "proclip demo --quick" in markdown


def test_rerun_skips_finished_steps(demo):
    out, results = demo
    started = time.perf_counter()
    again = Demo(out, quick_demo_config(), progress=False, command=quick_demo_command()).run()
    assert time.perf_counter() - started < 120
    assert again["table"] == results["table"]


def test_another_config_in_the_same_folder_is_refused(demo):
    from proclip_train.cli.demo import run_demo

    out, _ = demo
    with pytest.raises(FileExistsError):
        Demo(out, quick_demo_config(distill_weight=0.5), progress=False).run()
    with pytest.raises(UsageError, match="holds a demo of another configuration; pick another --out"):  # 2 lines
        run_demo(build_parser().parse_args(["demo", "--quick", "--out", str(out), "--lambda", "0.5"]))


def test_a_text_anchor_setting_joins_the_sweep_of_the_finished_demo(demo):
    out, results = demo
    setting = Stage2Setting(10.0, lr=1e-3, text_anchor_weight=10.0)
    again = Demo(out, quick_demo_config(sweep=[setting]), progress=False, command=quick_demo_command()).run()
    assert again["runs"]["proclip"] == results["runs"]["proclip"]  # reused
    record = again["sweep"][0]
    assert record["text_anchor_weight"] == 10.0 and record["lr"] == 1e-3 and record["starts_from"] == "stage1"
    assert record["last_loss_components"]["text_anchor"] >= 0
    report = json.loads((out / "runs" / "seed0" / setting.name / "trainer" / "training_report.json").read_text())
    assert report["embedding_cache"]["anchor_llm_misses"] == 0 and report["embedding_cache"]["anchor_llm_hits"] > 0
    assert "| mu |" in results_markdown(again) and "| mean | 10 |" in results_markdown(again)


def test_chosen_rows_and_a_sweep_over_two_seeds_extend_a_copy_of_the_demo(demo, tmp_path):
    """`--runs proclip --seeds 2 --sweep-seeds 2` on a finished demo trains seed 1's stage1 and proclip and the
    sweep setting on seed 1, nothing else; the sweep table gives mean +- sd over both seeds."""
    source, out = demo[0], tmp_path / "demo"
    for part in ("world", "teacher", "embedding_cache", "steps", "runs/seed0"):
        shutil.copytree(source / part, out / part)
    shutil.copy(source / "demo_config.json", out)
    (out / "init").symlink_to(source / "init")  # read only (the final folder's step is done: not copied)
    setting = Stage2Setting(10.0, lr=1e-3)
    config = quick_demo_config(seeds=2, runs=["proclip"], sweep=[setting], sweep_seeds=2)
    results = Demo(out, config, progress=False, command=quick_demo_command()).run()
    assert sorted(path.name for path in (out / "runs" / "seed1").iterdir()) == sorted(["stage1", "proclip", setting.name])
    assert [r["row"] for r in results["table"]] == ["teacher", "stage1", "proclip"]
    assert results["runs"]["proclip"][0] == demo[1]["runs"]["proclip"][0]  # seed 0 reused
    records = results["sweep_runs"][setting.name]
    assert [r["seed"] for r in records] == [0, 1] and records[1]["starts_from"] == "stage1"
    markdown = results_markdown(results)
    assert "Stage-2 settings on seeds 0–1, mean ± sd (choose on val" in markdown
    held = [100 * r["val"]["zeroshot"]["top1_held_out"] for r in records]
    row = next(line for line in markdown.splitlines() if line.startswith("| stage1 | 0.001 | 10 |"))
    assert f"{statistics.fmean(held):.1f} ± {statistics.stdev(held):.1f}" in row


def test_runs_trained_in_two_worker_processes_are_the_same_bytes(demo, tmp_path):
    """`--jobs 2` retrains seed 0's stage1, direct and proclip (which waits for stage1) of a copy of the demo in two
    worker processes: the same weights byte for byte, the same table; each run's trainer output is in its log."""
    source, out = demo[0], tmp_path / "demo"
    for part in ("world", "teacher", "embedding_cache", "steps", "runs/seed0"):
        shutil.copytree(source / part, out / part)
    shutil.copy(source / "demo_config.json", out)
    (out / "init").symlink_to(source / "init")
    retrained = ("stage1", "direct", "proclip")
    for name in retrained:
        shutil.rmtree(out / "runs" / "seed0" / name)
    results = Demo(out, quick_demo_config(), progress=False, command=quick_demo_command(), jobs=2).run()
    for name in retrained:
        folder, before = out / "runs" / "seed0" / name, source / "runs" / "seed0" / name
        assert (folder / "weights.safetensors").read_bytes() == (before / "weights.safetensors").read_bytes(), name
        assert "train_runtime" in (folder / LOG_FILE).read_text()
    proclip = results["runs"]["proclip"][0]
    assert proclip["starts_from"] == "stage1" and proclip["test"] == demo[1]["runs"]["proclip"][0]["test"]

    def scores(table):
        return [{k: v for k, v in row.items() if k != "stage_seconds"} for row in table]

    assert scores(results["table"]) == scores(demo[1]["table"])


def test_jobs_are_checked_and_the_teacher_flag_wired():
    from proclip_train.cli.demo import run_demo

    args = build_parser().parse_args(["demo", "--quick", "--train-teacher"])
    assert args.train_teacher and args.jobs == default_jobs() >= 1
    with pytest.raises(UsageError, match="--jobs 0"):
        run_demo(build_parser().parse_args(["demo", "--quick", "--jobs", "0"]))


def test_combine_pools_teachers_and_seeds_and_marks_robust_differences(demo, tmp_path):
    _, results = demo
    other = copy.deepcopy(results)
    other["config"]["teacher"]["seed"] = 1
    for records in other["runs"].values():
        for record in records:
            record["test"]["zeroshot"]["top1_held_out"] += 0.5  # the second teacher's runs: far better on held-out
    combined = combine_results([results, other])
    proclip = next(row for row in combined["table"] if row["row"] == "proclip")
    assert proclip["zs_held"]["n"] == 2 and next(r for r in combined["table"] if r["row"] == "teacher")["zs_seen"]["n"] == 2
    first = results["runs"]["proclip"][0]["test"]["zeroshot"]["top1_held_out"]
    assert proclip["zs_held"]["mean"] == pytest.approx(first + 0.25)
    held = next(d for d in combined["differences"] if (d["a"], d["b"], d["column"]) == ("teacher", "proclip", "zs_held"))
    assert held["robust"] == (held["min"] > 0 or held["max"] < 0)
    assert held["max"] - held["min"] == pytest.approx(0.5)
    # the quick demo has no stage-0 rows yet: no stage-0 difference, and none made up from the teacher's scores
    assert not any(d["a"] == "stage0-proclip" for d in combined["differences"])
    markdown = combined_markdown(combined)
    assert "teacher seed 0" in markdown and "teacher seed 1" in markdown and "robust" in markdown
    mismatched = copy.deepcopy(other)
    mismatched["config"]["seeds"] = 7
    with pytest.raises(ValueError, match="differ only in the teacher"):
        combine_results([results, mismatched])


# --- `--stage0`: LLM2CLIP's stage 0 on the text tower, then ProCLIP on the tuned tower, added to the finished demo --


@pytest.fixture(scope="module")
def demo_with_stage0(demo):
    out, _ = demo
    config = quick_demo_config(stage0=Stage0DemoConfig.quick())
    results = Demo(out, config, progress=False, command=quick_demo_command("--stage0")).run()
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
    assert "ProCLIP on the stage-0 LLM" in markdown and "LLM after stage 0 (mean, bidirectional" in markdown
    causal = copy.deepcopy(results)
    causal["config"]["stage0"]["bidirectional"] = False
    assert "LLM after stage 0 (mean, causal" in results_markdown(causal)
    other = copy.deepcopy(results)
    other["config"]["teacher"]["seed"] = 1
    stage0_gain = [d for d in combine_results([results, other])["differences"] if d["a"] == "stage0-proclip"]
    expected = (results["runs"]["stage0-proclip"][0]["test"]["retrieval"]["long"]["t2i_R@1"]
                - results["runs"]["proclip"][0]["test"]["retrieval"]["long"]["t2i_R@1"])
    long = next(d for d in stage0_gain if d["column"] == "long_t2i")
    assert long["b"] == "proclip" and long["n"] == 2 and long["mean"] == pytest.approx(expected)


def test_text_tower_caption_retrieval_matches_the_llm_itself(demo_with_stage0):
    """The demo's CRA of the raw text tower comes from its embedding cache; `text_tower_caption_retrieval_accuracy` runs
    the tower itself in float32 on the same test captions: each scene's short caption among the long ones."""
    out, results = demo_with_stage0
    towers = results["text_tower_caption_retrieval"]
    assert set(towers) == {"teacher", "llm", "stage0"}
    n = towers["llm"]["num_images"]
    assert n == quick_demo_config().n_long_test
    scenes = [r for r in read_metadata(out / "world", "test") if r["kind"] == "scene"][:n]
    direct = text_tower_caption_retrieval_accuracy(results["steps"]["init"]["text"], [r["caption_short"] for r in scenes],
                                           [r["caption_long"] for r in scenes], max_text_length=256)
    assert towers["llm"]["short_to_long"] == pytest.approx(direct, abs=2.5 / n)  # at most two queries differ
