"""`proclip export --format onnx`: a saved ProCLIP folder's two towers as ONNX files, for ONNX Runtime.

    <folder>/onnx/vision_model.onnx   pixel_values (batch, 3, S, S)             -> image_embeds (batch, D)
    <folder>/onnx/text_model.onnx     input_ids, attention_mask (batch, sequence) -> text_embeds (batch, D),
                                      last_hidden_state (batch, 1, D) (the same, for optimum)
    <folder>/onnx/*_int8.onnx         the same with int8 weights (`--quantize int8`, ONNX Runtime dynamic quantization)

Input names are the processor's keys; the first output is the unnormalised embedding, exactly
`get_image_features(...).pooler_output` / `get_text_features(...).pooler_output`: the text graph holds the LLM, the
checkpoint's own pooling (bidirectional mask, instruction tokens left out of the mean, padding-side independent
positions) and the adapter. Batch and sequence are dynamic axes; the sequence may not exceed `max_text_length`
(truncate with the tokenizer, which keeps the template's end). The files sit inside the folder, so `proclip push`
uploads them with it.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export, then onnxscript's translation and optimiser), not
optimum-onnx: optimum-onnx 0.1 requires transformers < 4.58 while this project needs transformers >= 5, and a custom
`OnnxConfig` for the remote-code model would only wrap the same `torch.onnx.export` call. The TorchScript exporter
(`dynamo=False`) is deprecated and fails on this graph (ONNX has no CumSum of booleans, which the attention-mask
arithmetic traces to).

After writing, the export is checked: ONNX Runtime and PyTorch embed a fresh batch (another batch size and caption
length than the export's example), fp32 must agree within `atol`; the int8 files report their cosine to PyTorch.
"""

import contextlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from configuration_proclip import ProCLIPConfig
from modeling_proclip import ProCLIPModel, ProCLIPProcessor

from ...training.finite import require_finite_embeddings, require_finite_folder
from ...training.saved_weights import require_weights_fit_config
from ...training.staged_folder import staged_folder

ONNX_FOLDER = "onnx"
VISION_FILE = "vision_model.onnx"
TEXT_FILE = "text_model.onnx"
QUANTIZATIONS = {"int8": "_int8"}  # --quantize value -> file name suffix (transformers.js names int8 files so)
DEFAULT_OPSET = 20
# Above this many bytes of weights a tower's initialisers go to `<file>.data` (protobuf files stop at 2 GiB).
EXTERNAL_DATA_BYTES = 1_800_000_000
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# Below this cosine to PyTorch on the check batch, `proclip export` warns about an int8 file. Dynamic int8 (one
# activation scale per tensor) suits CLIP towers and encoders; decoder LLMs' outlier activations can cost points.
INT8_WARN_COSINE = 0.99


class ExportError(ValueError):
    """The folder or the options cannot be exported: a user error, reported in one line."""


class ParityError(RuntimeError):
    """The written fp32 files do not reproduce PyTorch's embeddings within the tolerance."""


@dataclass
class OnnxExportOptions:
    """How `export_onnx` writes and checks the files.

    Args:
        opset: ONNX opset of the graphs.
        quantize: also write int8 variants (`"int8"`), or None.
        atol: largest absolute difference allowed between ONNX Runtime's fp32 embeddings and PyTorch's.
    """

    opset: int = DEFAULT_OPSET
    quantize: str | None = None
    atol: float = 1e-4


@dataclass
class OnnxExportReport:
    """What `export_onnx` wrote and measured.

    Args:
        files: the ONNX files written (with external data files, if any).
        max_abs_diff: fp32 file name -> largest |ONNX Runtime - PyTorch| over the check batch.
        min_cosine: int8 file name -> smallest cosine between its embeddings and PyTorch's.
    """

    files: list[Path] = field(default_factory=list)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    min_cosine: dict[str, float] = field(default_factory=dict)


# -- the two graphs ----------------------------------------------------------------------------------------------


class ImageEmbeddings(nn.Module):
    """pixel_values (batch, 3, S, S) -> (batch, D) unnormalised image embeddings, as `get_image_features`."""

    def __init__(self, model: ProCLIPModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output


# The text graph's outputs: the embedding, and the same as a one-token sequence under the name optimum reads.
TEXT_OUTPUTS = ("text_embeds", "last_hidden_state")


class TextEmbeddings(nn.Module):
    """input_ids, attention_mask (batch, sequence) -> (batch, D) unnormalised text embeddings, as `get_text_features`."""

    def __init__(self, model: ProCLIPModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(text_embeds (batch, D), last_hidden_state (batch, 1, D))`: the second output is the same embedding as a
        one-token sequence, under the name optimum's `ORTModelForFeatureExtraction` reads (its only output)."""
        embeds = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return embeds, embeds[:, None, :]


def onnx_paths(model_dir: str | Path, quantize: str | None = None) -> dict[str, Path]:
    """`{"vision": ..., "text": ...}`: where a folder's ONNX files are (the int8 ones with `quantize="int8"`)."""
    return tower_files(Path(model_dir) / ONNX_FOLDER, quantize)


def tower_files(folder: Path, quantize: str | None = None) -> dict[str, Path]:
    """`{"vision": ..., "text": ...}`: the ONNX files of the two towers in `folder` (`onnx/`, or where it is staged)."""
    suffix = QUANTIZATIONS[quantize] if quantize else ""
    return {
        "vision": folder / VISION_FILE.replace(".onnx", f"{suffix}.onnx"),
        "text": folder / TEXT_FILE.replace(".onnx", f"{suffix}.onnx"),
    }


# The export traces one batch and checks another: other batch size, other caption lengths, padding in both.
EXAMPLE_CAPTIONS = ("a photo of a cat", "a red circle on a grey ground")
CHECK_CAPTIONS = ("a red circle", "two small blue squares beside a large green triangle on a grey ground", "a dog")


def tower_inputs(processor: ProCLIPProcessor, config: ProCLIPConfig, captions, seed: int = 0) -> dict[str, torch.Tensor]:
    """`pixel_values` of as many random images as `captions`, and the captions' `input_ids` / `attention_mask`."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    encoding = processor.tokenizer(list(captions), padding=True, return_tensors="pt")
    return {
        "pixel_values": torch.randn(len(captions), 3, size, size, generator=generator),
        "input_ids": encoding["input_ids"],
        "attention_mask": encoding["attention_mask"],
    }


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only errors from `logger_name` while the block runs."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_graph(module: nn.Module, inputs: dict[str, torch.Tensor], dynamic_axes: dict[str, dict[int, object]],
                 output_names: list[str], path: Path, opset: int) -> list[Path]:
    """Export `module(**inputs)` to `path`, its outputs named `output_names`; returns the files written (`path`, and
    `path.data` for large weights)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    with _quiet("torch.onnx._internal.exporter._registration"), warnings.catch_warnings():
        # The exporter's own notes: deprecations inside torch, and that equal axes share one name.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
        program = torch.onnx.export(
            module.eval(), (), kwargs=inputs, input_names=list(inputs), output_names=output_names,
            opset_version=opset, dynamic_shapes=dynamic_axes, dynamo=True, external_data=external, verbose=False,
        )
    program.save(str(path), external_data=external)
    data = path.with_name(path.name + ".data")
    return [path, data] if external and data.exists() else [path]


def export_towers(model: ProCLIPModel, example: dict[str, torch.Tensor], paths: dict[str, Path],
                  opset: int) -> list[Path]:
    """The two tower graphs ([module docstring]) traced on `example` (`tower_inputs`), written to `paths["vision"]` and
    `paths["text"]`; returns the files written."""
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=model.config.max_text_length)
    vision = {"pixel_values": example["pixel_values"]}
    files = export_graph(ImageEmbeddings(model), vision, {"pixel_values": {0: batch}}, ["image_embeds"],
                         paths["vision"], opset)
    text_axes = {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}}
    text = {name: example[name] for name in ("input_ids", "attention_mask")}
    return files + export_graph(TextEmbeddings(model), text, text_axes, list(TEXT_OUTPUTS), paths["text"], opset)


def quantize_int8(source: Path, target: Path) -> list[Path]:
    """ONNX Runtime's dynamic quantization of `source`: per-channel int8 weights for every MatMul with a constant
    weight, activations quantized per batch at run time.

    Per-channel scales: per-tensor ones gave MiniLM's text embeddings a worst cosine of 0.953 to fp32, per-channel
    0.992, at the same speed (Intel, VNNI). Weights use 7 of their 8 bits (`reduce_range`), so that the file gives the
    same embeddings on every x86 CPU: without VNNI (AVX2 only: AMD Zen 3, Intel before Cascade Lake) ONNX Runtime sums
    uint8 x int8 products pairwise in int16, and full-range weights saturate those sums. On an AVX2-only AMD EPYC,
    full-range weights gave a tiny text tower a worst cosine of 0.957 to PyTorch, 7-bit ones 0.9997; MiniLM 0.977
    and 0.988 (uint8 weights, which do not saturate either: 0.991, but 1.2x slower: 397 vs 326 ms for 64 captions). Convolutions (the patch embedding) stay fp32: quantizing them too made ViT-B/32 slower
    (144 vs 104 ms for 8 images, one thread). The quantizer's advice (on the root logger) to pre-process first is
    silenced: its symbolic shape inference fails on these graphs, and the rest of it changed neither speed nor
    accuracy here.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = source.with_name(source.name + ".data").exists()
    with _quiet(""):
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True,
            reduce_range=True, use_external_data_format=external, extra_options={"MatMulConstBOnly": True},
        )
    data = target.with_name(target.name + ".data")
    return [target, data] if external and data.exists() else [target]


def onnx_session(path: str | Path, threads: int | None = None):
    """An ONNX Runtime CPU session of `path`, all graph optimisations on, `threads` intra-op threads (None: all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxProCLIP:
    """A folder's ONNX files run by ONNX Runtime, with `ProCLIPModel`'s two embedding methods: a stand-in for the
    PyTorch model wherever only those are called (`proclip_train.evaluation`'s `embed_image_rows` / `embed_joint_texts`,
    the benchmarks).

    Args:
        model_dir: a ProCLIP folder after `proclip export --format onnx`.
        quantize: run the int8 files (`"int8"`) instead of the fp32 ones.
        threads: ONNX Runtime intra-op threads (None: ONNX Runtime's default, one per core).
        onnx_dir: where the files are (default: `model_dir/onnx`; the export checks them where it stages them).
    """

    def __init__(self, model_dir: str | Path, quantize: str | None = None, threads: int | None = None,
                 onnx_dir: str | Path | None = None):
        self.config = ProCLIPConfig.from_pretrained(model_dir)
        self.device = torch.device("cpu")
        paths = tower_files(Path(onnx_dir) if onnx_dir else Path(model_dir) / ONNX_FOLDER, quantize)
        self.vision = onnx_session(paths["vision"], threads)
        self.text = onnx_session(paths["text"], threads)

    def get_image_features(self, pixel_values: torch.Tensor, **_) -> BaseModelOutputWithPooling:
        """pixel_values (batch, 3, S, S) -> `pooler_output` (batch, D), unnormalised."""
        (embeds,) = self.vision.run(None, {"pixel_values": pixel_values.float().cpu().numpy()})
        return BaseModelOutputWithPooling(pooler_output=torch.from_numpy(embeds))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> BaseModelOutputWithPooling:
        """input_ids, attention_mask (batch, sequence) -> `pooler_output` (batch, D), unnormalised."""
        feeds = {"input_ids": input_ids.cpu().long().numpy(), "attention_mask": attention_mask.cpu().long().numpy()}
        (embeds,) = self.text.run(["text_embeds"], feeds)
        return BaseModelOutputWithPooling(pooler_output=torch.from_numpy(embeds))


# -- export ------------------------------------------------------------------------------------------------------


def check_proclip_folder(model_dir: str | Path) -> Path:
    """The folder as a `Path` if it holds a ProCLIP model and its processor; else `ExportError` saying what is missing."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; give a saved ProCLIP folder with --model")
    config_file = folder / "config.json"
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type") if config_file.is_file() else None
    if model_type != ProCLIPConfig.model_type:
        found = f"its config.json has model_type {model_type!r}" if config_file.is_file() else "it has no config.json"
        raise ExportError(f"{folder} is not a ProCLIP folder ({found}); give a folder written by proclip init/train/convert")
    missing = [name for name in ("processor_config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} has no {' or '.join(missing)}; save the processor next to the model")
    return folder


def require_onnx_packages() -> None:
    """`ExportError` naming the install command if onnx, onnxscript or onnxruntime is missing."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(missing)}: pip install 'proclip[onnx]'")


def export_onnx(model_dir: str | Path, options: OnnxExportOptions | None = None) -> OnnxExportReport:
    """Write `<model_dir>/onnx/` ([module docstring]) and check it against PyTorch. The files are written and checked
    in a hidden folder beside `onnx/`, which replaces it only when every check passed (`staged_folder`): a failed
    export leaves the folder as it was.

    Raises:
        ExportError: not a ProCLIP folder, an unknown quantization, missing ONNX packages, or a folder that cannot be
            written.
        NonFiniteError: the weights, or PyTorch's embeddings of the check batch, hold NaN or infinite values.
        WeightsConfigMismatch: the weights do not have the shapes config.json gives.
        ParityError: ONNX Runtime's fp32 embeddings differ from PyTorch's by more than `options.atol`.
    """
    options = options or OnnxExportOptions()
    folder = check_proclip_folder(model_dir)
    if options.quantize not in (None, *QUANTIZATIONS):
        raise ExportError(f"--quantize {options.quantize!r} is not one of {sorted(QUANTIZATIONS)}")
    require_onnx_packages()
    require_finite_folder(folder)
    require_weights_fit_config(folder)

    model = ProCLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
    processor = ProCLIPProcessor.from_pretrained(folder)
    example = tower_inputs(processor, model.config, EXAMPLE_CAPTIONS)
    inputs = tower_inputs(processor, model.config, CHECK_CAPTIONS, seed=1)
    with torch.no_grad():
        reference = {
            "vision": model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output,
            "text": model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output,
        }
    for tower, embeds in reference.items():
        require_finite_embeddings(embeds, f"{folder}: PyTorch's {tower} embeddings of the export's check batch")
    report = OnnxExportReport()
    staging = contextlib.ExitStack()
    try:
        onnx_dir = staging.enter_context(staged_folder(folder / ONNX_FOLDER))
    except OSError as error:
        raise ExportError(f"cannot write into {folder}: {error.strerror or error}; make it writable, or copy the "
                          "folder somewhere writable and export there") from error
    with staging, torch.no_grad():
        paths = tower_files(onnx_dir)
        report.files += export_towers(model, example, paths, options.opset)
        if options.quantize:
            for tower, target in tower_files(onnx_dir, options.quantize).items():
                report.files += quantize_int8(paths[tower], target)
        _check_against_pytorch(folder, onnx_dir, inputs, reference, options, report)
    report.files = [folder / ONNX_FOLDER / path.name for path in report.files]
    return report


def _check_against_pytorch(folder: Path, onnx_dir: Path, inputs: dict, reference: dict, options: OnnxExportOptions,
                           report: OnnxExportReport) -> None:
    for quantize in (None, options.quantize) if options.quantize else (None,):
        runtime = OnnxProCLIP(folder, quantize, onnx_dir=onnx_dir)
        embeds = {
            "vision": runtime.get_image_features(inputs["pixel_values"]).pooler_output,
            "text": runtime.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output,
        }
        for tower, path in tower_files(onnx_dir, quantize).items():
            if quantize:
                cosine = torch.nn.functional.cosine_similarity(embeds[tower], reference[tower], dim=-1)
                report.min_cosine[path.name] = cosine.min().item()
            else:
                report.max_abs_diff[path.name] = (embeds[tower] - reference[tower]).abs().max().item()
    worst = {name: diff for name, diff in report.max_abs_diff.items() if not diff <= options.atol}
    if worst:
        raise ParityError(
            f"ONNX Runtime and PyTorch embeddings differ by more than atol={options.atol}: "
            + ", ".join(f"{name} {diff:.2e}" for name, diff in worst.items())
        )
