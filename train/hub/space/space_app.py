"""A Gradio Space for a ProCLIP checkpoint: zero-shot image classification, image -> text ranking, and text -> image
search over a gallery when the Space has one.

Written by `proclip space` as `app.py`, next to `space_config.json`, `gallery/` and `examples/`, which it reads.
The model loads the Hub way, `AutoModel` / `AutoProcessor` with `trust_remote_code=True`, from the repo named in
space_config.json or from `$PROCLIP_MODEL` (a Hub id or a local folder):

    pip install -r requirements.txt
    PROCLIP_MODEL=path/to/checkpoint python app.py      # gradio reads GRADIO_SERVER_PORT / GRADIO_SERVER_NAME

The zero-shot tab runs transformers' zero-shot-image-classification pipeline on the loaded model, so its scores are
the pipeline's. The gallery is embedded once at start-up and kept in `cache/` (`$PROCLIP_SPACE_CACHE`), reused
while the same images and the same model give the same embedding of the first image.

API endpoints (gradio_client): `/classify(image, labels, template="This is a photo of {}.")`, `/rank(image, captions)`,
and `/search(query, k)` with a gallery.
"""

import hashlib
import json
import logging
import os
from pathlib import Path

import gradio as gr
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    pipeline,
)
from transformers.dynamic_module_utils import get_class_from_dynamic_module

HERE = Path(__file__).resolve().parent
DEFAULT_TEMPLATE = "This is a photo of {}."  # the zero-shot pipeline's
LABEL_SEPARATORS = (",", "，", "、")  # the ASCII comma, and the comma of Chinese / Japanese text
MAX_LABELS = 100
MAX_TEXT_CHARS = 2000  # a query, a label or a caption; longer text is truncated to the model's token limit anyway
MAX_CAPTIONS = 50
MAX_IMAGE_PIXELS = 40_000_000
# Both sides and the aspect ratio too, as the Endpoints handler bounds them: CLIP's processor scales the shorter side to
# 224 pixels, so a 1 x 300000 PNG of a kilobyte took the Space to 4.1 GB.
MAX_IMAGE_SIDE = 10_000
MAX_ASPECT_RATIO = 20.0
EMBED_BATCH = 32
# Small images (the demo's are 32 px) fill the image boxes instead of sitting in a corner of them.
CSS = "#classify-image img, #rank-image img { width: 100%; height: 100%; object-fit: contain; }"
# Local fonts only: the page must not depend on a font service.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])

logger = logging.getLogger("proclip-space")


# -- reading what visitors type ---------------------------------------------------------------------------------------


def split_labels(text: str | None) -> list[str]:
    """Comma-separated labels, stripped, blanks and repeats dropped (a label chart shows each label once)."""
    text = text or ""
    for separator in LABEL_SEPARATORS[1:]:
        text = text.replace(separator, LABEL_SEPARATORS[0])
    return distinct_entries(text.split(LABEL_SEPARATORS[0]), "label", MAX_LABELS,
                            "Type at least one candidate label, e.g. “cat, dog, Katze”.")


def split_captions(text: str | None) -> list[str]:
    """One caption per line, stripped, blanks and repeats dropped."""
    return distinct_entries((text or "").splitlines(), "caption", MAX_CAPTIONS,
                            "Type at least one caption, one per line.")


def distinct_entries(pieces: list[str], what: str, limit: int, when_empty: str) -> list[str]:
    """`pieces` stripped, blanks and repeats dropped, in order; at least one, at most `limit`, none too long."""
    entries = list(dict.fromkeys(piece.strip() for piece in pieces if piece.strip()))
    if not entries:
        raise gr.Error(when_empty)
    if len(entries) > limit:
        raise gr.Error(f"{len(entries)} {what}s is too many: at most {limit}.")
    check_lengths(entries, what)
    return entries


def check_lengths(texts: list[str], what: str) -> None:
    longest = max(len(text) for text in texts)
    if longest > MAX_TEXT_CHARS:
        raise gr.Error(f"A {what} of {longest} characters is too long: at most {MAX_TEXT_CHARS}.")


def check_template(template: str | None) -> str:
    """The prompt template, or the pipeline's default when blank; it must hold `{}` exactly once."""
    template = (template or "").strip() or DEFAULT_TEMPLATE
    if template.count("{}") != 1:
        raise gr.Error(f"The template must contain {{}} exactly once, where the label goes; “{template[:80]}” "
                       "does not.")
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError) as error:
        raise gr.Error(f"The template “{template[:80]}” has stray braces: write them as {{{{ and }}}}.") from error
    return template


def unreadable(name: str) -> gr.Error:
    return gr.Error(f"{name} is not an image this app can read (PNG, JPEG, WebP, GIF, …).")


class ImageInput(gr.Image):
    """`gr.Image` that answers an upload it cannot open (a text file named .png) with a message in the page, where
    `gr.Image` shows a bare "Error"."""

    def get_block_name(self) -> str:
        return "image"  # the same widget in the browser

    def preprocess(self, payload):
        try:
            return super().preprocess(payload)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
            raise unreadable(getattr(payload, "orig_name", None) or "The file") from error


# -- the model -------------------------------------------------------------------------------------------------------


def model_id(config: dict) -> str:
    name = os.environ.get("PROCLIP_MODEL") or config.get("model")
    if not name:
        raise SystemExit("No model to load: set PROCLIP_MODEL to a ProCLIP folder or Hub id (this Space was written "
                         "without --repo-id).")
    return name


def gallery_key(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


class ProCLIPSpace:
    """The model, its zero-shot pipeline and the embedded gallery; the methods are the page's and API's functions."""

    def __init__(self, config: dict, cache_dir: Path):
        name = model_id(config)
        self.model = AutoModel.from_pretrained(name, trust_remote_code=True).eval()
        self.processor = AutoProcessor.from_pretrained(name, trust_remote_code=True)
        # The checkpoint's own image opener (`images_proclip.py`), as its model code is loaded.
        self.image_policy = get_class_from_dynamic_module("images_proclip.ImagePolicy", name)(
            max_pixels=MAX_IMAGE_PIXELS, max_side=MAX_IMAGE_SIDE, max_aspect_ratio=MAX_ASPECT_RATIO)
        self.read_image = get_class_from_dynamic_module("images_proclip.open_image", name)
        # As loading through AutoModelForZeroShotImageClassification would: the pipeline then knows the class.
        AutoModelForZeroShotImageClassification.register(type(self.model.config), type(self.model), exist_ok=True)
        self.classifier = pipeline("zero-shot-image-classification", model=self.model,
                                   tokenizer=self.processor.tokenizer, image_processor=self.processor.image_processor)
        self.gallery, self.gallery_paths, self.gallery_embeds = [], [], None
        if config.get("gallery"):
            gallery_dir = HERE / config["gallery"]
            with open(gallery_dir / "metadata.jsonl", encoding="utf-8") as f:
                self.gallery = [json.loads(line) for line in f if line.strip()]
            self.gallery_paths = [gallery_dir / row["file_name"] for row in self.gallery]
            self.gallery_embeds = self.gallery_embeddings(cache_dir)

    def image_embeddings(self, paths: list[Path]) -> torch.Tensor:
        """(N, D) L2-normalised image embeddings: the model's `encode_image` (the embedding service)."""
        return self.model.encode_image([str(path) for path in paths], batch_size=EMBED_BATCH, processor=self.processor)

    def gallery_embeddings(self, cache_dir: Path) -> torch.Tensor:
        """The gallery's embeddings: from `cache_dir` when the file of these images holds them for this model (its
        first embedding equals the first image's embedding computed now), else computed and saved there."""
        cache = cache_dir / f"gallery-{gallery_key(self.gallery_paths)}.safetensors"
        probe = self.image_embeddings(self.gallery_paths[:1])
        if cache.is_file():
            cached = load_file(str(cache))["embeds"]
            if len(cached) == len(self.gallery_paths) and torch.allclose(cached[:1], probe, atol=1e-5):
                logger.warning("gallery: %d embeddings read from %s", len(cached), cache)
                return cached
        embeds = self.image_embeddings(self.gallery_paths)
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({"embeds": embeds.contiguous()}, str(cache))
        logger.warning("gallery: %d images embedded, saved to %s", len(embeds), cache)
        return embeds

    def open_image(self, path: str | None) -> Image.Image:
        """The uploaded file as a loaded RGB PIL image, or a message saying why not."""
        if not path:
            raise gr.Error("Upload an image first.")
        try:
            return self.read_image(path, self.image_policy)
        except OSError as error:  # `UnreadableImage`: a refusal by the policy, or PIL's failure (its cause)
            if error.__cause__ is None:
                raise gr.Error(f"{str(error)[0].upper()}{str(error)[1:]}.") from error
            raise unreadable(Path(path).name) from error

    def classify(self, image: str | None, labels: str, template: str) -> dict[str, float]:
        """Zero-shot scores of comma-separated `labels` for the image file `image`: the pipeline's answer."""
        picture, names, template = self.open_image(image), split_labels(labels), check_template(template)
        results = self.classifier(picture, candidate_labels=names, hypothesis_template=template)
        return {result["label"]: result["score"] for result in results}

    @torch.inference_mode()
    def search(self, query: str, k: float) -> list[tuple[str, str]]:
        """The `k` gallery images closest to `query` (cosine), as (path, "rank. file · score")."""
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a query, e.g. a caption of one of the gallery's images.")
        check_lengths([query], "query")
        scores = self.model.encode_text(query, processor=self.processor) @ self.gallery_embeds.T
        top = scores.topk(max(1, min(int(k), len(scores))))
        return [(str(self.gallery_paths[i]), f"{rank}. {self.gallery[i]['file_name']} · {score:.3f}")
                for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1)]

    def rank(self, image: str | None, captions: str) -> dict[str, float]:
        """The captions (one per line) scored against the image: the pipeline with the template "{}"."""
        picture, lines = self.open_image(image), split_captions(captions)
        results = self.classifier(picture, candidate_labels=lines, hypothesis_template="{}")
        return {result["label"]: result["score"] for result in results}


# -- the page ----------------------------------------------------------------------------------------------------------


def build_demo(space: ProCLIPSpace, config: dict) -> gr.Blocks:
    """The page: zero-shot classification, text -> image search (only with a gallery), image -> text ranking."""
    name = model_id(config)
    notes = "\n".join(f"- {note}" for note in config.get("scores", []))
    languages = config.get("text_languages") or "the languages named in the text tower's own model card"
    with gr.Blocks(title=config["title"]) as demo:
        gr.Markdown(f"# {config['title']}\nModel: `{name}`, a ProCLIP model (an LLM text tower aligned to CLIP's "
                    f"image tower). Its text tower reads {languages}; captions may be far longer than CLIP's."
                    + (f"\n\n**Its evaluation:**\n{notes}" if notes else ""))
        with gr.Tab("Zero-shot classification", id="classify"):
            with gr.Row():
                with gr.Column():
                    image = ImageInput(type="filepath", label="Image", elem_id="classify-image", height=280)
                    labels = gr.Textbox(label="Candidate labels (comma-separated)",
                                        placeholder="cat, dog", elem_id="classify-labels")
                    # A value, not only a placeholder: the API then marks the template optional, with this default.
                    template = gr.Textbox(DEFAULT_TEMPLATE, label="Prompt template ({} is where the label goes)",
                                          placeholder=DEFAULT_TEMPLATE, elem_id="classify-template")
                    button = gr.Button("Classify", variant="primary", elem_id="classify-button")
                result = gr.Label(label="Scores", num_top_classes=10, elem_id="classify-result")
            examples = config.get("classify_examples", [])
            if examples:
                gr.Examples([[str(HERE / e["image"]), e["labels"]] for e in examples], [image, labels],
                            label="Examples from the model's zero-shot evaluation data")
            button.click(space.classify, [image, labels, template], result, api_name="classify")
        if space.gallery:  # images to search: the evaluated retrieval data or `proclip space --images`
            with gr.Tab("Text → image search", id="search"):
                with gr.Row():
                    query = gr.Textbox(label="Query (any length)", lines=3, elem_id="search-query", scale=4)
                    with gr.Column(scale=1):
                        k = gr.Slider(1, min(24, len(space.gallery)), value=min(8, len(space.gallery)), step=1,
                                      label="Images to show", elem_id="search-k")
                        button = gr.Button("Search", variant="primary", elem_id="search-button")
                hits = gr.Gallery(label=f"Closest of the {len(space.gallery)} gallery images", columns=4,
                                  elem_id="search-results", object_fit="contain", height="auto")
                examples = config.get("search_examples", [])
                if examples:
                    gr.Examples([[e["query"]] for e in examples], [query],
                                example_labels=[e["label"] for e in examples],
                                label="Captions of gallery images (column → the image it describes, and the model's "
                                "text → image R@1 on that column)")
                button.click(space.search, [query, k], hits, api_name="search")
        with gr.Tab("Image → text ranking", id="rank"):
            with gr.Row():
                with gr.Column():
                    rank_image = ImageInput(type="filepath", label="Image", elem_id="rank-image", height=280)
                    captions = gr.Textbox(label="Captions (one per line)", lines=5, elem_id="rank-captions")
                    button = gr.Button("Rank", variant="primary", elem_id="rank-button")
                ranked = gr.Label(label="Captions by score", num_top_classes=10, elem_id="rank-result")
            examples = config.get("rank_examples", [])
            if examples:
                gr.Examples([[str(HERE / e["image"]), e["captions"]] for e in examples], [rank_image, captions],
                            label="Gallery images with their captions and another image's")
            button.click(space.rank, [rank_image, captions], ranked, api_name="rank")
    return demo


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s")
    config = json.loads((HERE / "space_config.json").read_text(encoding="utf-8"))
    space = ProCLIPSpace(config, Path(os.environ.get("PROCLIP_SPACE_CACHE") or HERE / "cache"))
    demo = build_demo(space, config)
    demo.queue(default_concurrency_limit=1)  # one model call at a time: a fast tokenizer is not thread-safe
    folders = [folder for folder in (config.get("gallery"), "examples") if folder]
    demo.launch(theme=THEME, css=CSS, allowed_paths=[str(HERE / folder) for folder in folders], max_file_size="20mb",
                footer_links=["api"])


if __name__ == "__main__":
    main()
