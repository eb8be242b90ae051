"""`proclip space`: the files it writes; app.py served on 127.0.0.1 where this project cannot be imported, called
through gradio_client; the quick demo's Space in a real browser (Playwright driving Debian's chromium).

Every request goes to a loopback port of an app this module starts; the browser aborts any other request, and the
test fails if the page tried one.
"""

import json
import shutil
import sys
from pathlib import Path

import gradio
import pytest
import tomllib
import torch
from conftest import screenshot_dir
from huggingface_hub import SpaceCard
from PIL import Image, ImageDraw
from proclip_train import cli
from proclip_train.hub.publish.push import BLOCK_PROJECT
from proclip_train.hub.serving.serve import free_port, running
from proclip_train.hub.space.space import (
    GRADIO_VERSION,
    SPACE_APP,
    SpaceOptions,
    installed_version,
    write_space,
)

REPO_ID = "my-org/proclip-tiny"
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 220), "yellow": (230, 210, 40),
           "purple": (140, 40, 160), "orange": (240, 140, 20)}  # fmt: skip
GERMAN = {"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber", "purple": "lila",
          "orange": "oranger"}
SHAPES = {"circle": "Kreis", "square": "Würfel"}


# -- a checkpoint with evaluation results, and its Space ------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    """An imagefolder of 12 coloured shapes with a class label, an English and a German caption."""
    folder = tmp_path_factory.mktemp("shapes")
    rows = []
    for colour, rgb in COLOURS.items():
        for shape, german in SHAPES.items():
            image = Image.new("RGB", (48, 40), (235, 235, 230))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((10, 6, 38, 34), fill=rgb)
            file_name = f"{colour}-{shape}.png"
            image.save(folder / file_name)
            rows.append({"file_name": file_name, "label": f"{colour} {shape}", "caption": f"a {colour} {shape}",
                         "caption_de": f"ein {GERMAN[colour]} {german}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_proclip_dir, eval_data) -> Path:
    """The tiny checkpoint with the results of `proclip eval` (retrieval and zero-shot) on `eval_data`."""
    folder = tmp_path_factory.mktemp("evaluated") / "proclip-tiny"
    shutil.copytree(tiny_proclip_dir, folder)
    cli.main(["eval", "--model", str(folder), "--task", "retrieval", "--data", str(eval_data), "--caption-column",
              "caption", "--caption-column", "caption_de", "--out", str(folder / "eval_retrieval.json")])
    cli.main(["eval", "--model", str(folder), "--task", "zeroshot", "--data", str(eval_data),
              "--out", str(folder / "eval_zeroshot.json")])
    return folder


@pytest.fixture(scope="module")
def space(tmp_path_factory, evaluated) -> Path:
    out = tmp_path_factory.mktemp("spaces") / "tiny-space"
    cli.main(["space", "--model", str(evaluated), "--out", str(out), "--repo-id", REPO_ID, "--gallery-size", "10"])
    return out


def pixels(path: Path) -> tuple:
    image = Image.open(path).convert("RGB")
    return image.size, image.tobytes()


def read_config(space: Path) -> dict:
    return json.loads((space / "space_config.json").read_text(encoding="utf-8"))


def read_gallery(space: Path) -> list[dict]:
    return [json.loads(line) for line in (space / "gallery" / "metadata.jsonl").read_text().splitlines()]


def test_space_holds_the_app_the_card_and_pinned_requirements(space):
    assert (space / "app.py").read_bytes() == SPACE_APP.read_bytes()
    card = SpaceCard.load(space / "README.md").data
    assert card.sdk == "gradio" and card.app_file == "app.py" and card.models == [REPO_ID]
    assert card.sdk_version == gradio.__version__ == GRADIO_VERSION
    assert 0 < len(card.short_description) <= 60 and "proclip" in card.tags
    requirements = (space / "requirements.txt").read_text().splitlines()
    for package in ("gradio", "torch", "transformers", "pillow", "safetensors"):
        assert f"{package}=={installed_version(package)}" in requirements, package
    assert REPO_ID in (space / "README.md").read_text()


def test_gallery_and_examples_come_from_the_evaluation_data(space, evaluated, eval_data):
    rows = [json.loads(line) for line in (eval_data / "metadata.jsonl").read_text().splitlines()]
    gallery = read_gallery(space)
    assert len(gallery) == 10  # --gallery-size of 12 rows, spread evenly: the first and the last included
    assert gallery[0]["captions"] == {"caption": rows[0]["caption"], "caption_de": rows[0]["caption_de"]}
    assert gallery[-1]["captions"]["caption_de"] == rows[-1]["caption_de"]
    for row in gallery:
        source = next(r for r in rows if r["caption"] == row["captions"]["caption"])
        assert pixels(space / "gallery" / row["file_name"]) == pixels(eval_data / source["file_name"])

    config = read_config(space)
    assert config["model"] == REPO_ID
    classes = sorted(r["label"] for r in rows)
    for example in config["classify_examples"]:
        assert example["labels"].split(", ") == classes
        source = next(r for r in rows if r["label"] == example["answer"])
        assert pixels(space / example["image"]) == pixels(eval_data / source["file_name"])
    assert len(config["classify_examples"]) == 4

    recall = json.loads((evaluated / "eval_retrieval.json").read_text())["metrics"]
    searches = config["search_examples"]
    assert [e["query"] for e in searches[:2]] == list(gallery[0]["captions"].values())
    for example, column in zip(searches, ["caption", "caption_de"] * 2):
        assert example["label"].startswith(f"{column} → ")
        assert f"R@1 {100 * recall[column]['text_to_image_R@1']:.1f} %" in example["label"]
    assert any("Zero-shot top-1 accuracy" in note for note in config["scores"])
    assert any("caption_de" in note for note in config["scores"])


def test_pyproject_pins_the_gradio_the_tests_drive():
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert f"gradio=={GRADIO_VERSION}" in extras["space"]
    included = {name.strip() for entry in extras["test"] if entry.startswith("proclip[")
                for name in entry.removeprefix("proclip[").removesuffix("]").split(",")}
    assert "space" in included  # the test extra installs the Space's pinned gradio


def test_space_command_refuses_what_it_cannot_use(tmp_path, capsys, tiny_clip_dir, tiny_proclip_dir, evaluated):
    cases = [
        (["--model", str(tiny_clip_dir)], "not a ProCLIP folder"),
        (["--model", str(evaluated), "--repo-id", "not a repo!"], "is not a Hub repo id"),
        (["--model", str(evaluated), "--results", str(tmp_path / "missing.json")], "missing.json"),
        (["--model", str(evaluated), "--images", str(tmp_path / "no-such-images")], "no such folder or file"),
        (["--model", str(evaluated), "--caption-column", "nope"], "has no column nope"),  # found while writing
    ]
    for arguments, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["space", *arguments, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert message in error and "Traceback" not in error and len(error.splitlines()) <= 2, error
        assert not (tmp_path / "out").exists()  # a refused Space leaves no folder behind
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main(["space", "--model", str(evaluated), "--out", str(tmp_path / "taken")])
    assert "is not a Space written by `proclip space`" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def bare_space(tmp_path_factory, tiny_proclip_dir) -> Path:
    """The Space of a folder with no evaluation results at all."""
    out = tmp_path_factory.mktemp("spaces") / "bare-space"
    cli.main(["space", "--model", str(tiny_proclip_dir), "--out", str(out)])
    return out


def test_any_proclip_folder_gets_a_space_without_search_when_nothing_to_search(bare_space):
    config = read_config(bare_space)
    assert config["gallery"] is None and not (bare_space / "gallery").exists()
    assert config["classify_examples"] == config["search_examples"] == config["rank_examples"] == []
    readme = (bare_space / "README.md").read_text()
    assert "/classify" in readme and "/rank" in readme and "/search" not in readme
    assert "any language" not in readme


def test_images_flag_makes_the_gallery_of_a_folder_without_results(tmp_path, tiny_proclip_dir, eval_data):
    rows = [json.loads(line) for line in (eval_data / "metadata.jsonl").read_text().splitlines()]
    out = tmp_path / "space"
    cli.main(["space", "--model", str(tiny_proclip_dir), "--out", str(out), "--images", str(eval_data),
              "--gallery-size", "5"])
    gallery = read_gallery(out)
    assert len(gallery) == 5
    assert gallery[0]["captions"] == {"label": rows[0]["label"], "caption": rows[0]["caption"],
                                      "caption_de": rows[0]["caption_de"]}  # the metadata's text columns
    assert pixels(out / "gallery" / gallery[0]["file_name"]) == pixels(eval_data / rows[0]["file_name"])
    assert read_config(out)["search_examples"] and read_config(out)["rank_examples"]

    plain = tmp_path / "plain"  # images alone, no metadata: a gallery without captions, searchable all the same
    plain.mkdir()
    for row in rows[:3]:
        shutil.copy(eval_data / row["file_name"], plain / row["file_name"])
    cli.main(["space", "--model", str(tiny_proclip_dir), "--out", str(tmp_path / "plain-space"), "--images",
              str(plain)])
    config = read_config(tmp_path / "plain-space")
    assert config["gallery"] == "gallery" and len(read_gallery(tmp_path / "plain-space")) == 3
    assert config["search_examples"] == config["rank_examples"] == []


# -- app.py served, through gradio_client ----------------------------------------------------------------------------


def app_command() -> list[str]:
    """`python app.py` where this project cannot be imported (as on a Space)."""
    return [sys.executable, "-c", BLOCK_PROJECT + "import runpy\nrunpy.run_path('app.py', run_name='__main__')"]


def app_env(model: Path, port: int, scratch: Path) -> dict:
    return {"PROCLIP_MODEL": str(model), "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
            "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "GRADIO_TEMP_DIR": str(scratch / "gradio"), "PROCLIP_SPACE_CACHE": str(scratch / "cache"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def app(space, evaluated, tmp_path_factory):
    """The tiny Space's app.py on a free loopback port: `(url, log path, cache folder)`."""
    scratch, port = tmp_path_factory.mktemp("app"), free_port()
    url = f"http://127.0.0.1:{port}/"
    with running(app_command(), url, app_env(evaluated, port, scratch), startup_timeout=180, cwd=space) as log:
        yield url, log, scratch / "cache"


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False)


@pytest.fixture(scope="module")
def classifier(evaluated):
    from transformers import pipeline

    return pipeline("zero-shot-image-classification", model=str(evaluated), trust_remote_code=True)


def confidences(answer: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in answer["confidences"]}


def test_classify_endpoint_equals_the_pipeline(client, classifier, eval_data):
    from gradio_client import handle_file

    image = eval_data / "blue-circle.png"
    typed = "blue circle, ein roter Kreis，猫、 red square ,blue circle"  # ASCII, fullwidth and ideographic commas
    labels = ["blue circle", "ein roter Kreis", "猫", "red square"]
    for template in (None, "", "a drawing of {}."):  # None: not sent; the API's default is the pipeline's
        arguments = (handle_file(image), typed) if template is None else (handle_file(image), typed, template)
        answer = client.predict(*arguments, api_name="/classify")
        expected = classifier(str(image), candidate_labels=labels,
                              **({"hypothesis_template": template} if template else {}))
        assert answer["label"] == expected[0]["label"]
        assert confidences(answer) == pytest.approx({r["label"]: r["score"] for r in expected}, abs=1e-5)


def test_rank_endpoint_is_the_pipeline_on_whole_captions(client, classifier, eval_data):
    from gradio_client import handle_file

    captions = ["a red square, drawn small", "ein gelber Kreis", "a green circle"]
    answer = client.predict(handle_file(eval_data / "green-circle.png"), "\n".join(captions) + "\n\n",
                            api_name="/rank")
    expected = classifier(str(eval_data / "green-circle.png"), candidate_labels=captions, hypothesis_template="{}")
    assert confidences(answer) == pytest.approx({r["label"]: r["score"] for r in expected}, abs=1e-5)


def test_search_endpoint_ranks_the_gallery_as_the_model_does(client, space, evaluated):
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    gallery = read_gallery(space)
    model, processor = ProCLIPModel.from_pretrained(evaluated).eval(), ProCLIPProcessor.from_pretrained(evaluated)
    query = gallery[3]["captions"]["caption_de"]
    with torch.inference_mode():
        images = [Image.open(space / "gallery" / row["file_name"]) for row in gallery]
        image_embeds = model.get_image_features(processor(images=images)["pixel_values"]).pooler_output
        text_embeds = model.get_text_features(**processor(text=[query])).pooler_output
    scores = torch.nn.functional.cosine_similarity(text_embeds, image_embeds)
    expected = scores.argsort(descending=True)[:5].tolist()
    hits = client.predict(query, 5, api_name="/search")
    assert [hit["caption"].split(" ")[1] for hit in hits] == [gallery[i]["file_name"] for i in expected]
    shown = [float(hit["caption"].rsplit(" ", 1)[1]) for hit in hits]
    assert shown == pytest.approx(scores[expected].tolist(), abs=2e-3)


def test_bad_input_gets_a_readable_message_and_the_app_keeps_serving(client, eval_data, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    image = handle_file(eval_data / "red-circle.png")
    fake = tmp_path / "photo.png"
    fake.write_text("not an image, only text")
    thin = tmp_path / "thin.png"  # 1 kB; CLIP's resize would make it 224 x 67 million pixels (4.1 GB)
    Image.new("RGB", (1, 300_000), (90, 90, 90)).save(thin, optimize=True)
    cases = [
        ((None, "a, b", ""), "/classify", "Upload an image first"),
        ((image, " , ", ""), "/classify", "Type at least one candidate label"),
        ((image, ", ".join(f"label {i}" for i in range(200)), ""), "/classify", "200 labels is too many"),
        ((image, "a, b", "a photo"), "/classify", "must contain {} exactly once"),
        ((handle_file(fake), "a, b", ""), "/classify", "photo.png is not an image this app can read"),
        ((handle_file(thin), "a, b", ""), "/classify", "1 x 300000 pixels; the limit is 10000 per side"),
        ((handle_file(thin), "a circle"), "/rank", "1 x 300000 pixels; the limit is 10000 per side"),
        (("   ", 4), "/search", "Type a query"),
        (("x" * 10_000, 4), "/search", "A query of 10000 characters is too long"),
        ((image, ""), "/rank", "Type at least one caption"),
    ]
    for arguments, endpoint, message in cases:
        with pytest.raises(AppError, match=message.replace("{}", r"\{\}")):
            client.predict(*arguments, api_name=endpoint)
    answer = client.predict(image, "red circle, blue square", "", api_name="/classify")
    assert set(confidences(answer)) == {"red circle", "blue square"}


def test_a_space_without_gallery_serves_classify_and_rank_only(bare_space, tiny_proclip_dir, eval_data,
                                                              tmp_path_factory):
    from gradio_client import Client, handle_file
    from transformers import pipeline

    scratch, port = tmp_path_factory.mktemp("bare-app"), free_port()
    url = f"http://127.0.0.1:{port}/"
    with running(app_command(), url, app_env(tiny_proclip_dir, port, scratch), startup_timeout=180, cwd=bare_space):
        client = Client(url, verbose=False)
        assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {"/classify",
                                                                                                  "/rank"}
        image = eval_data / "red-square.png"
        answer = client.predict(handle_file(image), "red square, blue circle", api_name="/classify")
        ranked = client.predict(handle_file(image), "a red square\na blue circle", api_name="/rank")
    classifier = pipeline("zero-shot-image-classification", model=str(tiny_proclip_dir), trust_remote_code=True)
    expected = classifier(str(image), candidate_labels=["red square", "blue circle"])
    assert confidences(answer) == pytest.approx({r["label"]: r["score"] for r in expected}, abs=1e-5)
    expected = classifier(str(image), candidate_labels=["a red square", "a blue circle"], hypothesis_template="{}")
    assert confidences(ranked) == pytest.approx({r["label"]: r["score"] for r in expected}, abs=1e-5)


def load_app_module(space: Path):
    """app.py imported in this process (for its gallery cache)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_app_under_test", space / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # gradio inspects the module of its component subclasses
    spec.loader.exec_module(module)
    return module


def test_gallery_is_embedded_once_and_cached_on_disk(app, space, evaluated, monkeypatch, caplog):
    _, log, cache_dir = app
    assert "10 images embedded, saved to" in log.read_text()
    (cache_file,) = cache_dir.glob("gallery-*.safetensors")
    monkeypatch.setenv("PROCLIP_MODEL", str(evaluated))
    module = load_app_module(space)
    config = read_config(space)
    with caplog.at_level("WARNING", logger="proclip-space"):
        again = module.ProCLIPSpace(config, cache_dir)
    assert f"10 embeddings read from {cache_file}" in caplog.text
    fresh = again.image_embeddings(again.gallery_paths)
    torch.testing.assert_close(again.gallery_embeds, fresh, atol=1e-5, rtol=1e-4)

    # Embeddings of another model under the same images' file name are not reused.
    from safetensors.torch import save_file

    save_file({"embeds": torch.nn.functional.normalize(torch.randn_like(fresh), dim=-1)}, str(cache_file))
    caplog.clear()
    with caplog.at_level("WARNING", logger="proclip-space"):
        recomputed = module.ProCLIPSpace(config, cache_dir)
    assert "10 images embedded" in caplog.text
    torch.testing.assert_close(recomputed.gallery_embeds, fresh, atol=1e-5, rtol=1e-4)


# -- the quick demo's Space -------------------------------------------------------------------------------------------


@pytest.mark.real_weights
def test_demo_writes_its_space_and_proclip_space_rewrites_it(quick_demo, tmp_path):
    out, results = quick_demo
    demo_space = out / "space"
    assert results["steps"]["final"]["space"] == str(demo_space)
    config = read_config(demo_space)
    gallery = read_gallery(demo_space)
    assert list(gallery[0]["captions"]) == ["caption_short", "caption_long", "caption_de", "caption_fr", "caption_es"]
    test_split = out / "world" / "align" / "test"
    world = [json.loads(line) for line in (test_split / "metadata.jsonl").read_text().splitlines()]
    assert gallery[0]["captions"]["caption_long"] == world[0]["caption_long"]
    assert pixels(demo_space / "gallery" / "000.png") == pixels(test_split / world[0]["file_name"])
    assert any(e["label"].startswith("caption_de → ") and "R@1" in e["label"] for e in config["search_examples"])

    again = tmp_path / "space"
    cli.main(["space", "--model", str(out / "final"), "--out", str(again), "--repo-id", "your-org/proclip-demo",
              *[arg for column in gallery[0]["captions"] for arg in ("--caption-column", column)]])
    assert read_config(again) == config
    assert read_gallery(again) == gallery
    assert write_space(out / "final", tmp_path / "default", SpaceOptions())["model"] is None


@pytest.fixture(scope="module")
def demo_app(quick_demo, tmp_path_factory):
    out, _ = quick_demo
    scratch, port = tmp_path_factory.mktemp("demo-app"), free_port()
    url = f"http://127.0.0.1:{port}/"
    with running(app_command(), url, app_env(out / "final", port, scratch), startup_timeout=300, cwd=out / "space"):
        yield url, out


def ranked_first_caption(out: Path, gallery: list[dict]) -> dict:
    """A gallery row whose short caption the demo's model ranks its own image first for (computed here)."""
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    model = ProCLIPModel.from_pretrained(out / "final").eval()
    processor = ProCLIPProcessor.from_pretrained(out / "final")
    with torch.inference_mode():
        images = [Image.open(out / "space" / "gallery" / row["file_name"]) for row in gallery]
        image_embeds = torch.nn.functional.normalize(
            model.get_image_features(processor(images=images)["pixel_values"]).pooler_output, dim=-1)
        captions = [row["captions"]["caption_short"] for row in gallery]
        text_embeds = torch.nn.functional.normalize(model.get_text_features(**processor(text=captions)).pooler_output,
                                                    dim=-1)
    best = (text_embeds @ image_embeds.T).argmax(-1).tolist()
    hits = [row for index, row in enumerate(gallery) if best[index] == index]
    assert hits, "the demo model ranks no gallery image first for its own short caption"
    return hits[len(hits) // 2]


@pytest.mark.real_weights
def test_demo_space_in_a_browser(demo_app, browser_page, tmp_path):
    from playwright.sync_api import expect
    from transformers import pipeline

    url, out = demo_app
    page, blocked = browser_page
    shots = screenshot_dir(tmp_path)
    config = read_config(out / "space")
    example = config["classify_examples"][0]
    labels = example["labels"] + ", ein blauer Kreis"
    classifier = pipeline("zero-shot-image-classification", model=str(out / "final"), trust_remote_code=True)
    expected = classifier(str(out / "space" / example["image"]), candidate_labels=labels.split(", "))

    page.goto(url)
    page.locator("#classify-image input[type=file]").set_input_files(out / "space" / example["image"])
    page.locator("#classify-labels textarea").fill(labels)
    page.click("#classify-button")
    top = page.locator("#classify-result [data-testid=label-output-value]")
    expect(top).to_have_text(expected[0]["label"])
    expect(page.locator(f'#classify-result [data-testid="{expected[1]["label"]}-confidence-set"]')).to_be_visible()
    page.screenshot(path=shots / "space-classify.png", full_page=True)

    row = ranked_first_caption(out, read_gallery(out / "space"))
    page.get_by_role("tab", name="Text → image search").click()
    page.locator("#search-query textarea").fill(row["captions"]["caption_short"])
    page.click("#search-button")
    first = page.locator("#search-results .caption-label").first
    expect(first).to_contain_text(f"1. {row['file_name']} · ")
    page.screenshot(path=shots / "space-search.png", full_page=True)

    fake = tmp_path / "holiday.png"
    fake.write_text("a text file named like a picture")
    page.get_by_role("tab", name="Zero-shot classification").click()
    bad_inputs = [  # (what to do, the message the page must show)
        (lambda: page.locator("#classify-image button[aria-label='Remove Image']").click(), "Upload an image first"),
        (lambda: page.locator("#classify-image input[type=file]").set_input_files(fake),
         "holiday.png is not an image this app can read"),
        (lambda: (page.locator("#classify-image input[type=file]").set_input_files(out / "space" / example["image"]),
                  page.locator("#classify-labels textarea").fill(" , ")), "Type at least one candidate label"),
        (lambda: page.locator("#classify-labels textarea").fill(", ".join(f"label {i}" for i in range(200))),
         "200 labels is too many"),
    ]
    for act, message in bad_inputs:
        act()
        page.click("#classify-button")
        expect(page.locator(".toast-body").filter(has_text=message)).to_be_visible()
    page.screenshot(path=shots / "space-bad-input.png", full_page=True)
    page.get_by_role("tab", name="Text → image search").click()
    for query, message in (("", "Type a query"), ("x" * 10_000, "A query of 10000 characters is too long")):
        page.locator("#search-query textarea").fill(query)
        page.click("#search-button")
        expect(page.locator(".toast-body").filter(has_text=message)).to_be_visible()

    # still serving: a new classification shows its own labels
    page.get_by_role("tab", name="Zero-shot classification").click()
    page.locator("#classify-labels textarea").fill("yellow triangle, ein roter Kreis")
    page.click("#classify-button")
    expect(page.locator('#classify-result [data-testid="yellow triangle-confidence-set"]')).to_be_visible()
    assert blocked == [], f"the page tried to reach other hosts: {blocked}"
