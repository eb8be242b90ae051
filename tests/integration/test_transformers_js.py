"""`proclip export --format transformers.js`: the folder loaded by transformers.js itself (the
`@huggingface/transformers` npm package, installed from npm into a cache folder), in Node and in Chromium, against
PyTorch on the same inputs.

Node runs `transformers_js/classify.mjs` (the zero-shot pipeline, AutoTokenizer, AutoProcessor and the two tower
classes); the browser loads `transformers_js/index.html` from a static server on 127.0.0.1, every script, wasm and
model file from that origin (any other request is aborted, and fails the test).
"""

import contextlib
import functools
import hashlib
import io
import json
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

import pytest
import torch
from conftest import missing_requirement, require_module, screenshot_dir
from PIL import Image, ImageDraw
from venvs import transformers_js_modules

require_module("onnxruntime")
require_module("onnxscript")

from proclip_train.cli import main  # noqa: E402
from proclip_train.hub.export.transformers_js import (  # noqa: E402
    INT8_WARN_COSINE,
    TRANSFORMERS_JS_VERSION,
    TransformersJsReport,
    default_dtype,
)

from modeling_proclip import ProCLIPModel, ProCLIPProcessor  # noqa: E402

HERE = Path(__file__).resolve().parent / "transformers_js"
REPO = Path(__file__).resolve().parents[1]
LABELS = ["a red circle", "a blue square", "a green star", "a yellow heart"]
TEMPLATE = "This is a photo of {}."
PROMPT_TEMPLATE = "<|im_start|>user\n{text}<|im_end|>"
# Captions for the tokenizer comparison: one short, one long, so that the batch is padded (left, in this checkpoint).
TEXTS = ["a red circle", "two small blue squares beside a large green triangle, seen from above on a grey ground"]


# -- what the tests run: transformers.js from npm, a tiny exported checkpoint, two images ----------------------------


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """transformers.js (TRANSFORMERS_JS_VERSION) from npm, installed once (`venvs.transformers_js_modules`)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing_requirement("node and npm are missing (apt-get install nodejs npm, as scripts/setup.sh does)")
    try:
        return transformers_js_modules(TRANSFORMERS_JS_VERSION)
    except RuntimeError as error:
        missing_requirement(str(error))


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_clip_dir, tiny_llm_dir) -> Path:
    """A tiny ProCLIP folder whose text side has everything transformers.js must reproduce: a chat template and an
    instruction in the tokenizer's post-processor, EOS, left padding, mean pooling over a bidirectional decoder."""
    folder = tmp_path_factory.mktemp("proclip")
    torch.manual_seed(0)
    model = ProCLIPModel.from_towers(
        vision=tiny_clip_dir, text=tiny_llm_dir, adapter_expansion=2, bidirectional=True, pooling="mean",
        instruction="Represent this caption: ", prompt_template=PROMPT_TEMPLATE, padding_side="left",
    )
    model.save_pretrained(folder)
    ProCLIPProcessor.from_towers(tiny_clip_dir, tiny_llm_dir, model.config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """`proclip export --format transformers.js` (default dtypes: fp32 and q8) of `checkpoint`: (web folder, what the
    command printed, the checkpoint's file digests before and after)."""
    before = file_digests(checkpoint)
    out = tmp_path_factory.mktemp("web") / "proclip-web"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["export", "--format", "transformers.js", "--model", str(checkpoint), "--out", str(out)])
    return out, printed.getvalue(), before, file_digests(checkpoint)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """`at_size`: a 32 px PNG (the model's size: no resizing, so transformers.js's pixels equal PIL's);
    `to_resize`: a 53 x 41 one that each library resizes its own way."""
    folder = tmp_path_factory.mktemp("images")
    at_size = Image.new("RGB", (32, 32), (235, 235, 230))
    ImageDraw.Draw(at_size).ellipse((6, 6, 26, 26), fill=(220, 30, 30))
    to_resize = Image.new("RGB", (53, 41), (235, 235, 230))
    ImageDraw.Draw(to_resize).rectangle((12, 8, 40, 32), fill=(40, 60, 220))
    at_size.save(folder / "at_size.png")
    to_resize.save(folder / "to_resize.png")
    return {"at_size": folder / "at_size.png", "to_resize": folder / "to_resize.png"}


@functools.cache
def pytorch_scores(checkpoint: Path, image: Path) -> list[dict]:
    """The checkpoint's own zero-shot pipeline (remote code, PyTorch) on `image`."""
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    return classifier(str(image), candidate_labels=LABELS, hypothesis_template=TEMPLATE)


def assert_same_scores(got: list[dict], expected: list[dict], atol: float) -> None:
    """Same labels in the same order, each score within `atol`."""
    assert [row["label"] for row in got] == [row["label"] for row in expected], (got, expected)
    for mine, theirs in zip(got, expected):
        assert abs(mine["score"] - theirs["score"]) <= atol, (got, expected)


def run_node(node_modules: Path, scratch: Path, request: dict) -> dict:
    """classify.mjs on `request`, run from a folder whose node_modules is the npm install (Node resolves packages
    next to the script)."""
    scratch.mkdir(parents=True, exist_ok=True)
    shutil.copy(HERE / "classify.mjs", scratch / "classify.mjs")
    (scratch / "node_modules").unlink(missing_ok=True)
    (scratch / "node_modules").symlink_to(node_modules, target_is_directory=True)
    (scratch / "request.json").write_text(json.dumps(request))
    result = subprocess.run(["node", "classify.mjs", "request.json"], cwd=scratch, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- the folder ------------------------------------------------------------------------------------------------------


def test_export_writes_a_separate_clip_folder_and_leaves_the_checkpoint_alone(exported, checkpoint):
    out, printed, before, after = exported
    assert before == after  # the remote-code folder is only read
    assert "logits_per_image: max |ONNX Runtime - PyTorch|" in printed and "model_quantized.onnx: min cosine" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "clip" and config["proclip"]["prompt_template"] == PROMPT_TEMPLATE
    # q8 is what browsers and Node load by default where it stays within INT8_WARN_COSINE of PyTorch. That depends on
    # the CPU's int8 kernels: this checkpoint measured above 0.99 with VNNI (Intel), 0.9872 on an AVX2-only AMD EPYC.
    cosine = float(re.search(r"model_quantized\.onnx: min cosine to PyTorch = ([0-9.]+)", printed).group(1))
    expected = "q8" if cosine >= INT8_WARN_COSINE else "fp32"
    assert config["transformers.js_config"] == {"dtype": expected}
    assert ("loads q8 when no dtype is given" in printed) == (expected == "q8")
    # and a tower that int8 hurts (the quick demo's SmolLM2: cosine 0.78) gets fp32
    assert default_dtype(TransformersJsReport(min_cosine={"model_quantized.onnx": 0.78})) == "fp32"
    assert json.loads((out / "preprocessor_config.json").read_text())["image_processor_type"] == "CLIPImageProcessor"
    assert sorted(p.name for p in (out / "onnx").iterdir()) == sorted(
        f"{graph}{suffix}.onnx" for graph in ("model", "text_model", "vision_model") for suffix in ("", "_quantized")
    )
    for name in ("tokenizer_config.json", "preprocessor_config.json"):
        assert not {"auto_map", "processor_class"} & set(json.loads((out / name).read_text()))
    # the checkpoint still loads as it did, and transformers reads the export's tokenizer to the same ids
    from transformers import AutoTokenizer

    processor = ProCLIPProcessor.from_pretrained(checkpoint)
    assert AutoTokenizer.from_pretrained(out)(TEXTS)["input_ids"] == processor.tokenizer(TEXTS)["input_ids"]


def test_cli_refuses_what_it_cannot_write(checkpoint, exported, tmp_path, capsys):
    out = exported[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in (["--out", str(checkpoint)], ["--out", str(foreign)], [], ["--out", str(out), "--dtype", "q3"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["export", "--format", "transformers.js", "--model", str(checkpoint), *extra])
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, (extra, stderr)
        assert "Traceback" not in stderr
        assert [line for line in stderr.splitlines() if line.startswith("proclip export")], stderr
        if not extra:
            assert "--format transformers.js writes a new folder: name it with --out" in stderr
    with pytest.raises(SystemExit) as exit_info:  # --out with the ONNX export, which writes into the checkpoint
        main(["export", "--format", "onnx", "--model", str(checkpoint), "--out", str(tmp_path / "web")])
    assert exit_info.value.code == 2
    assert "--out is for --format transformers.js; --format onnx writes into the checkpoint's onnx/ folder" in (
        capsys.readouterr().err
    )
    assert (foreign / "notes.txt").read_text() == "mine" and not (foreign / "onnx").exists()
    assert (out / "onnx" / "model.onnx").is_file()  # a refused --dtype leaves the earlier export alone


# -- Node ------------------------------------------------------------------------------------------------------------


def node_request(out: Path, image: Path, dtype: str) -> dict:
    return {"model_dir": str(out), "image": str(image), "labels": LABELS, "template": TEMPLATE, "dtype": dtype,
            "texts": TEXTS}


@torch.inference_mode()
def test_node_pipeline_tokenizer_processor_and_towers_equal_pytorch(exported, checkpoint, images, node_modules,
                                                                    tmp_path):
    out = exported[0]
    got = run_node(node_modules, tmp_path / "node", node_request(out, images["at_size"], "fp32"))
    assert_same_scores(got["scores"], pytorch_scores(checkpoint, images["at_size"]), atol=1e-4)

    processor = ProCLIPProcessor.from_pretrained(checkpoint)
    model = ProCLIPModel.from_pretrained(checkpoint).eval()
    batch = processor(text=TEXTS, images=Image.open(images["at_size"]))
    # the prompt template, instruction, EOS and left padding come out of transformers.js's tokenizer as they do here
    assert got["input_ids"] == batch["input_ids"].tolist() and got["attention_mask"] == batch["attention_mask"].tolist()
    assert got["padding_side"] == "left"
    pixels = torch.tensor(got["pixel_values"]["data"]).reshape(got["pixel_values"]["dims"])
    assert (pixels - batch["pixel_values"]).abs().max() <= 1e-6
    text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    assert (torch.tensor(got["text_embeds"]) - text).abs().max() <= 1e-4
    assert (torch.tensor(got["image_embeds"]) - image).abs().max() <= 1e-4


def test_node_default_dtype_and_resized_keep_the_ranking(exported, checkpoint, images, node_modules, tmp_path):
    out = exported[0]
    # the dtype the export makes the default (q8 where int8 kept cosine INT8_WARN_COSINE on this CPU, else fp32)
    default = json.loads((out / "config.json").read_text())["transformers.js_config"]["dtype"]
    quantized = run_node(node_modules, tmp_path / default, node_request(out, images["at_size"], default))
    assert_same_scores(quantized["scores"], pytorch_scores(checkpoint, images["at_size"]), atol=0.02)
    # sharp's bicubic is not PIL's: the pixels of a resized image differ a little, the ranking does not
    resized = run_node(node_modules, tmp_path / "resized", node_request(out, images["to_resize"], "fp32"))
    assert_same_scores(resized["scores"], pytorch_scores(checkpoint, images["to_resize"]), atol=0.02)


# -- Chromium --------------------------------------------------------------------------------------------------------


class StaticFiles(SimpleHTTPRequestHandler):
    """Files under the server's folder (symbolic links followed), quietly."""

    def log_message(self, *args):
        pass


@pytest.fixture
def site(tmp_path, exported, images, node_modules):
    """The page, the export under /models/, node_modules and the image served from 127.0.0.1 on an ephemeral port;
    yields the base URL."""
    out = exported[0]
    root = tmp_path / "site"
    (root / "models").mkdir(parents=True)
    shutil.copy(HERE / "index.html", root / "index.html")
    shutil.copy(images["at_size"], root / "image.png")
    (root / "models" / out.name).symlink_to(out, target_is_directory=True)
    (root / "node_modules").symlink_to(node_modules, target_is_directory=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(StaticFiles, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", out.name
    finally:
        server.shutdown()
        server.server_close()


def classify_in_page(page, url: str, screenshot: Path) -> dict:
    """Open `url` (index.html) and wait for its answer, `window.proclipResult`; screenshot the page to `screenshot`."""
    page.set_viewport_size({"width": 760, "height": 300})
    page.goto(url)
    page.wait_for_function("window.proclipResult || window.proclipError", timeout=240_000)
    error = page.evaluate("window.proclipError")
    assert error is None, error
    page.screenshot(path=str(screenshot))
    return page.evaluate("window.proclipResult")


def page_url(base: str, model: str, dtype: str) -> str:
    query = {"model": model, "image": "/image.png", "labels": json.dumps(LABELS), "template": TEMPLATE, "dtype": dtype}
    return f"{base}index.html?{urlencode(query)}"


@pytest.mark.parametrize("dtype", ["fp32", "q8"])
def test_browser_page_classifies_as_pytorch(site, browser_page, checkpoint, images, tmp_path, dtype):
    base, model = site
    page, blocked = browser_page
    screenshot = screenshot_dir(tmp_path) / f"transformers-js-{dtype}.png"
    got = classify_in_page(page, page_url(base, model, dtype), screenshot)
    assert blocked == [] and got["version"] == TRANSFORMERS_JS_VERSION
    expected = pytorch_scores(checkpoint, images["at_size"])
    assert_same_scores(got["scores"], expected, atol=1e-4 if dtype == "fp32" else 0.02)
    assert screenshot.stat().st_size > 0
