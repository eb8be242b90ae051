"""`proclip export --format transformers.js`: a folder that transformers.js (the `@huggingface/transformers` npm
package, in Node or in a browser) loads as a CLIP model, so that its own `pipeline("zero-shot-image-classification")`,
`AutoProcessor`, `AutoTokenizer` and `CLIPModel` / `CLIPTextModelWithProjection` / `CLIPVisionModelWithProjection`
run a ProCLIP checkpoint with no code of ours:

    <out>/config.json                 model_type "clip" (transformers.js picks its model class by it), the vision
                                      config, under "proclip" what it was exported from, and the dtype loaded when
                                      the caller names none (`default_dtype`: q8 only where it stays close)
    <out>/preprocessor_config.json    the checkpoint's CLIP image processor (`AutoProcessor`)
    <out>/tokenizer.json, tokenizer_config.json   the LLM's tokenizer, its post-processor holding the prompt
                                      template, instruction and EOS, as the checkpoint saved it
    <out>/onnx/model.onnx             input_ids, attention_mask (texts, sequence), pixel_values (images, 3, S, S) ->
                                      logits_per_image (images, texts), logits_per_text (texts, images), text_embeds
                                      (texts, D), image_embeds (images, D): `ProCLIPModel.forward`, L2-normalised
                                      embeddings, the trained logit scale
    <out>/onnx/text_model.onnx, vision_model.onnx   the towers alone (unnormalised embeddings), as
                                      `proclip export --format onnx` writes them
    <out>/onnx/*_quantized.onnx ...   every file again for each other `--dtype`, under the suffix transformers.js's
                                      `dtype` option reads: q8 `_quantized` (its default on wasm, i.e. in browsers),
                                      int8 `_int8`, fp16 `_fp16`, q4 `_q4`

The checkpoint folder is only read: it keeps loading with `trust_remote_code=True` as before. After writing, ONNX
Runtime runs model.onnx on a check batch: fp32 must reproduce PyTorch's outputs within `atol`; the other dtypes report
their embeddings' cosine to PyTorch.

What transformers.js does differently from the Python processor, and so from PyTorch: it truncates captions longer
than `max_text_length` after the template's end is added (the Python tokenizer keeps the end), and it resizes images
with sharp (Node) or a canvas (browsers) instead of PIL: images already at the model's size skip resizing and give
PyTorch's pixels exactly.
"""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ...training.finite import require_finite_folder
from ...training.saved_weights import require_weights_fit_config
from .onnx import (
    CHECK_CAPTIONS,
    EXAMPLE_CAPTIONS,
    ONNX_FOLDER,
    TEXT_FILE,
    VISION_FILE,
    INT8_WARN_COSINE,
    ExportError,
    ParityError,
    check_proclip_folder,
    export_graph,
    export_towers,
    onnx_session,
    quantize_int8,
    require_onnx_packages,
    tower_inputs,
)

MODEL_FILE = "model.onnx"
# transformers.js's `dtype` option -> the file-name suffix it reads (its `DEFAULT_DTYPE_SUFFIX_MAPPING`).
DTYPE_SUFFIXES = {"fp32": "", "q8": "_quantized", "int8": "_int8", "fp16": "_fp16", "q4": "_q4"}
DEFAULT_DTYPES = ("fp32", "q8")  # transformers.js's own defaults: fp32 in Node, q8 in browsers (wasm)
# The version of @huggingface/transformers this export is tested with (tests/ install it from npm).
TRANSFORMERS_JS_VERSION = "4.3.2"
# q4: ONNX Runtime's MatMulNBits, 4-bit symmetric weights in blocks of this many along the input dimension.
Q4_BLOCK_SIZE = 32
# config.json's key saying the folder is ProCLIP's export (an --out holding it may be overwritten).
SOURCE_KEY = "proclip"


@dataclass
class TransformersJsOptions:
    """How `export_transformers_js` writes and checks the folder.

    Args:
        dtypes: transformers.js dtypes to write (keys of `DTYPE_SUFFIXES`); fp32 is always written.
        opset: ONNX opset of the graphs.
        atol: largest |ONNX Runtime - PyTorch| allowed on model.onnx's outputs (fp32).
    """

    dtypes: tuple[str, ...] = DEFAULT_DTYPES
    opset: int = 20
    atol: float = 1e-4


@dataclass
class TransformersJsReport:
    """What `export_transformers_js` wrote and measured.

    Args:
        files: every file written.
        max_abs_diff: model.onnx output name -> largest |ONNX Runtime - PyTorch| on the check batch.
        min_cosine: quantized model file name -> smallest cosine of its text / image embeddings to PyTorch's.
        default_dtype: the dtype config.json makes transformers.js load when its caller names none.
    """

    files: list[Path] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    min_cosine: dict[str, float] = field(default_factory=dict)
    default_dtype: str = "fp32"


class ScoresGraph(nn.Module):
    """input_ids, attention_mask (texts, sequence), pixel_values (images, 3, S, S) -> logits_per_image (images, texts),
    logits_per_text (texts, images), text_embeds (texts, D), image_embeds (images, D): `ProCLIPModel.forward`'s
    fields, what transformers.js's `CLIPModel` returns and its zero-shot pipeline reads."""

    OUTPUTS = ("logits_per_image", "logits_per_text", "text_embeds", "image_embeds")

    def __init__(self, model: ProCLIPModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
        return out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds


def web_config(model: ProCLIPModel, source: Path) -> dict:
    """config.json of the export: a CLIP config as far as transformers.js reads one (`model_type`), the checkpoint's
    vision config and projection size, and where it came from."""
    config = model.config
    return {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "projection_dim": config.projection_dim,
        "logit_scale_init_value": model.logit_scale.item(),
        "vision_config": config.vision_config.to_diff_dict(),
        SOURCE_KEY: {
            "exported_from": str(source),
            "text_tower": config.text_name_or_path,
            "prompt_template": config.prompt_template,
            "instruction": config.instruction,
            "max_text_length": config.max_text_length,
        },
    }


def one_token_pieces(post_processor: dict | None, tokenizer) -> dict | None:
    """A tokenizers post-processor whose template pieces each hold one token, named by the token itself.

    `configure_text_tokenizer` stores the prompt template as pieces of many ids (`proclip_prefix`: `[bos, <, |, im,
    ...]`). transformers.js's TemplateProcessing ignores a piece's ids: it inserts the piece's *name* as a token and
    looks its id up in the vocabulary, so a many-id piece becomes one unknown token. Split into one piece per token,
    named by that token, the template gives the same ids in both libraries.

    Raises:
        ExportError: a template token whose vocabulary id is not the id the template holds (transformers.js would
            look up another id).
    """
    if not post_processor:
        return post_processor
    if post_processor["type"] == "Sequence":
        return {**post_processor, "processors": [one_token_pieces(p, tokenizer) for p in post_processor["processors"]]}
    if post_processor["type"] != "TemplateProcessing":
        return post_processor
    pieces, vocab = post_processor["special_tokens"], tokenizer.get_vocab()

    def expand(template: list[dict]) -> list[dict]:
        items = []
        for item in template:
            if "SpecialToken" not in item:
                items.append(item)
                continue
            piece, type_id = pieces[item["SpecialToken"]["id"]], item["SpecialToken"]["type_id"]
            items += [{"SpecialToken": {"id": token, "type_id": type_id}} for token in piece["tokens"]]
        return items

    split = {}
    for piece in pieces.values():
        for token, token_id in zip(piece["tokens"], piece["ids"]):
            if vocab.get(token) != token_id:
                raise ExportError(f"the tokenizer's template token {token!r} has id {token_id} but the vocabulary says "
                                  f"{vocab.get(token)}: transformers.js would give other ids than the checkpoint")
            split[token] = {"id": token, "ids": [token_id], "tokens": [token]}
    return {**post_processor, "single": expand(post_processor["single"]), "pair": expand(post_processor["pair"]),
            "special_tokens": split}


def write_processor_files(processor: ProCLIPProcessor, out: Path) -> list[Path]:
    """preprocessor_config.json (the CLIP image processor) and the tokenizer files, without the remote-code keys
    (`auto_map`, `processor_class`) that would send transformers.js or transformers to ProCLIP's own classes, the
    template split for transformers.js (`one_token_pieces`)."""
    processor.image_processor.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)
    tokenizer_json = out / "tokenizer.json"
    backend = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    backend["post_processor"] = one_token_pieces(backend["post_processor"], processor.tokenizer)
    tokenizer_json.write_text(json.dumps(backend, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    written = []
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        path = out / name
        settings = json.loads(path.read_text(encoding="utf-8"))
        for key in ("auto_map", "processor_class"):
            settings.pop(key, None)
        if name == "tokenizer_config.json":
            # transformers' v5 name for a tokenizers-backed tokenizer; transformers.js knows the older one (and reads
            # the padding side, pad token and `model_max_length` from here).
            settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(path)
    return written + [out / "tokenizer.json"]


def convert_fp16(source: Path, target: Path) -> list[Path]:
    """`source` with float16 weights and arithmetic, float32 inputs and outputs (ONNX Runtime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
    return [target]


def quantize_q4(source: Path, target: Path) -> list[Path]:
    """`source` with every constant-weight MatMul as ONNX Runtime's 4-bit MatMulNBits (symmetric, blocks of
    `Q4_BLOCK_SIZE`): what transformers.js's `q4` files hold."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), block_size=Q4_BLOCK_SIZE, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target))
    return [target]


DTYPE_WRITERS = {"q8": quantize_int8, "int8": quantize_int8, "fp16": convert_fp16, "q4": quantize_q4}


def variant_path(path: Path, dtype: str) -> Path:
    """`path` (an fp32 .onnx file) under `dtype`'s suffix."""
    return path.with_name(path.stem + DTYPE_SUFFIXES[dtype] + path.suffix)


def prepare_out(out: Path, model_dir: Path) -> None:
    """Refuse an --out that is the checkpoint itself or a non-empty folder other than an earlier export; empty an
    earlier export's onnx/ (files of dtypes not asked for now would be stale)."""
    if out.resolve() == model_dir.resolve():
        raise ExportError(f"--out {out} is the checkpoint folder; give a new folder for the transformers.js files")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        config = out / "config.json"
        earlier = config.is_file() and SOURCE_KEY in json.loads(config.read_text(encoding="utf-8"))
        if not earlier:
            raise ExportError(f"--out {out} is not empty and holds no earlier transformers.js export; "
                              "give a new folder")
        shutil.rmtree(out / ONNX_FOLDER, ignore_errors=True)
    (out / ONNX_FOLDER).mkdir(parents=True, exist_ok=True)


def export_transformers_js(model_dir: str | Path, out: str | Path,
                           options: TransformersJsOptions | None = None) -> TransformersJsReport:
    """Write the transformers.js folder `out` ([module docstring]) from the ProCLIP folder `model_dir` and check it.

    Raises:
        ExportError: not a ProCLIP folder, an unusable --out, an unknown dtype, or missing ONNX packages.
        NonFiniteError: the checkpoint holds NaN or infinite weights.
        WeightsConfigMismatch: the weights do not have the shapes config.json gives.
        ParityError: ONNX Runtime's fp32 outputs differ from PyTorch's by more than `options.atol`.
    """
    options = options or TransformersJsOptions()
    folder, out = check_proclip_folder(model_dir), Path(out)
    unknown = sorted(set(options.dtypes) - set(DTYPE_SUFFIXES))
    if unknown:
        raise ExportError(f"--dtype {', '.join(unknown)} is not one of {', '.join(DTYPE_SUFFIXES)}")
    require_onnx_packages()
    require_finite_folder(folder)
    require_weights_fit_config(folder)
    prepare_out(out, folder)

    model = ProCLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    processor = ProCLIPProcessor.from_pretrained(folder)
    report = TransformersJsReport(files=write_processor_files(processor, out))
    config_path = out / "config.json"
    config_path.write_text(json.dumps(web_config(model, folder), indent=2) + "\n", encoding="utf-8")
    report.files.append(config_path)

    onnx_dir = out / ONNX_FOLDER
    fp32 = {"model": onnx_dir / MODEL_FILE, "text": onnx_dir / TEXT_FILE, "vision": onnx_dir / VISION_FILE}
    example = tower_inputs(processor, model.config, EXAMPLE_CAPTIONS)
    # two captions against three images: the graph must keep the two batch sizes apart
    # (in the graph's input order: the exporter pairs inputs with their dynamic axes by position)
    scores_example = {"input_ids": example["input_ids"], "attention_mask": example["attention_mask"],
                      "pixel_values": tower_inputs(processor, model.config, CHECK_CAPTIONS)["pixel_values"]}
    with torch.no_grad():
        report.files += export_graph(ScoresGraph(model), scores_example, scores_axes(model),
                                     list(ScoresGraph.OUTPUTS), fp32["model"], options.opset)
        report.files += export_towers(model, example, fp32, options.opset)
        for dtype in dict.fromkeys(options.dtypes):
            if dtype != "fp32":
                for path in fp32.values():
                    report.files += DTYPE_WRITERS[dtype](path, variant_path(path, dtype))
    check_scores(model, processor, fp32["model"], options, report)
    report.default_dtype = default_dtype(report)
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["transformers.js_config"] = {"dtype": report.default_dtype}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return report


def default_dtype(report: "TransformersJsReport") -> str:
    """The dtype transformers.js loads when its caller names none (config.json's `transformers.js_config`): q8 where
    its embeddings keep a cosine of `INT8_WARN_COSINE` to PyTorch's (a quarter of the download), else fp32.
    Without this, browsers would load q8 whatever it loses: dynamic int8 suits CLIP towers and encoders, while a
    decoder LLM's outlier activations can cost much (the quick demo's SmolLM2 tower: cosine 0.78)."""
    q8 = report.min_cosine.get(variant_path(Path(MODEL_FILE), "q8").name)
    return "q8" if q8 is not None and q8 >= INT8_WARN_COSINE else "fp32"


def scores_axes(model: ProCLIPModel) -> dict[str, dict[int, object]]:
    """Dynamic axes of model.onnx: texts and images are batched independently; the sequence up to `max_text_length`."""
    texts, images = torch.export.Dim("texts"), torch.export.Dim("images")
    sequence = torch.export.Dim("sequence", max=model.config.max_text_length)
    return {"input_ids": {0: texts, 1: sequence}, "attention_mask": {0: texts, 1: sequence},
            "pixel_values": {0: images}}


def check_scores(model: ProCLIPModel, processor: ProCLIPProcessor, fp32: Path, options: TransformersJsOptions,
                 report: TransformersJsReport) -> None:
    """Run model.onnx and its other dtypes against PyTorch on a check batch (other sizes than the export's example)."""
    inputs = tower_inputs(processor, model.config, CHECK_CAPTIONS, seed=1)
    inputs["pixel_values"] = inputs["pixel_values"][:2]
    with torch.no_grad():
        expected = ScoresGraph(model)(**inputs)
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    for dtype in dict.fromkeys(("fp32", *options.dtypes)):
        path = variant_path(fp32, dtype)
        got = [torch.from_numpy(array) for array in onnx_session(path).run(list(ScoresGraph.OUTPUTS), feeds)]
        if dtype == "fp32":
            for name, value, reference in zip(ScoresGraph.OUTPUTS, got, expected):
                report.max_abs_diff[name] = (value - reference).abs().max().item()
        else:
            cosines = [torch.nn.functional.cosine_similarity(got[i], expected[i], dim=-1).min().item() for i in (2, 3)]
            report.min_cosine[path.name] = min(cosines)
    worst = {name: diff for name, diff in report.max_abs_diff.items() if not diff <= options.atol}
    if worst:
        raise ParityError(
            f"ONNX Runtime's {MODEL_FILE} and PyTorch differ by more than atol={options.atol}: "
            + ", ".join(f"{name} {diff:.2e}" for name, diff in worst.items())
        )
