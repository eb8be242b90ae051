"""`proclip export --format onnx`: the ONNX files against PyTorch on tiny towers, the int8 variants, the README's
onnxruntime-only recipe in a Python without torch or transformers, push and card, and the command's user errors."""

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import require_module
from PIL import Image

require_module("onnxruntime")
require_module("onnxscript")

from isolation import run_without_project  # noqa: E402
from proclip_train.cli import main  # noqa: E402
from proclip_train.hub.export.onnx import (  # noqa: E402
    TEXT_OUTPUTS,
    OnnxExportOptions,
    OnnxProCLIP,
    export_onnx,
    onnx_paths,
    onnx_session,
)
from proclip_train.hub.publish.card import build_model_card  # noqa: E402
from proclip_train.hub.publish.push import files_to_upload  # noqa: E402
from venvs import OPTIMUM_REQUIREMENTS, venv_python_or_skip  # noqa: E402

from modeling_proclip import ProCLIPModel, ProCLIPProcessor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# Text settings that exercise the checkpoint's own pooling: a decoder run bidirectionally, mean pooling with the
# instruction's tokens left out, a chat template around the caption, left padding; and last-token pooling.
TEXT_SETTINGS = {
    "bidirectional_mean_instruction": dict(
        bidirectional=True, pooling="mean", instruction="Represent this caption: ",
        prompt_template="<|im_start|>user\n{text}<|im_end|>", padding_side="left",
    ),
    "causal_last_token": dict(bidirectional=False, pooling="last_token", padding_side="right"),
}
CAPTIONS = ["a cat", "two small blue squares beside a large green triangle, seen from above on a grey ground", "dog"]


@pytest.fixture(scope="module", params=list(TEXT_SETTINGS))
def exported(request, tmp_path_factory, tiny_clip_dir, tiny_llm_dir):
    """(folder, export report) of a tiny ProCLIP folder exported with --quantize int8."""
    folder = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    model = ProCLIPModel.from_towers(vision=tiny_clip_dir, text=tiny_llm_dir, adapter_expansion=2,
                                     **TEXT_SETTINGS[request.param])
    model.save_pretrained(folder)
    ProCLIPProcessor.from_towers(tiny_clip_dir, tiny_llm_dir, model.config).save_pretrained(folder)
    return folder, export_onnx(folder, OnnxExportOptions(quantize="int8"))


def pytorch_and_onnx(folder: Path, quantize=None):
    torch.set_num_threads(1)
    return ProCLIPModel.from_pretrained(folder).eval(), ProCLIPProcessor.from_pretrained(folder), OnnxProCLIP(folder, quantize, threads=1)


def test_graphs_take_the_processor_keys_with_dynamic_batch_and_sequence(exported):
    folder, report = exported
    vision, text = (onnx_session(path) for path in onnx_paths(folder).values())
    assert [i.name for i in vision.get_inputs()] == ["pixel_values"]
    assert [i.name for i in text.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in vision.get_outputs()] == ["image_embeds"]
    assert [o.name for o in text.get_outputs()] == list(TEXT_OUTPUTS)
    assert isinstance(vision.get_inputs()[0].shape[0], str) and vision.get_inputs()[0].shape[1:] == [3, 32, 32]
    assert all(isinstance(dim, str) for i in text.get_inputs() for dim in i.shape)
    assert sorted(path.name for path in report.files) == sorted(
        ["vision_model.onnx", "text_model.onnx", "vision_model_int8.onnx", "text_model_int8.onnx"]
    )
    assert max(report.max_abs_diff.values()) <= 1e-4


@torch.inference_mode()
def test_fp32_embeddings_equal_pytorch_for_any_batch_length_and_padding_side(exported):
    folder, _ = exported
    model, processor, runtime = pytorch_and_onnx(folder)
    for batch in (1, 5):
        pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        expected = model.get_image_features(pixel_values=pixels).pooler_output
        assert (runtime.get_image_features(pixels).pooler_output - expected).abs().max() <= 1e-4
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        for captions in (CAPTIONS, CAPTIONS[:1]):
            batch = processor(text=captions, return_tensors="pt")
            expected = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            got = runtime.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
            assert got.shape == expected.pooler_output.shape
            assert (got - expected.pooler_output).abs().max() <= 1e-4, (side, captions)


@torch.inference_mode()
def test_int8_variants_are_smaller_and_close_to_pytorch(exported):
    folder, report = exported
    model, processor, runtime = pytorch_and_onnx(folder, quantize="int8")
    for tower, path in onnx_paths(folder, "int8").items():
        assert path.stat().st_size < onnx_paths(folder)[tower].stat().st_size
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = processor(text=CAPTIONS, return_tensors="pt")
    pairs = [
        (runtime.get_image_features(pixels).pooler_output, model.get_image_features(pixel_values=pixels).pooler_output),
        (runtime.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output,
         model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output),
    ]
    for got, expected in pairs:
        assert not torch.equal(got, expected)  # really quantized
        assert torch.nn.functional.cosine_similarity(got, expected, dim=-1).min() > 0.99
    assert min(report.min_cosine.values()) > 0.99


def test_int8_weights_use_seven_bits_so_avx2_cannot_saturate(exported):
    """The check above passes on a VNNI CPU with full-range weights too; what makes the file safe on AVX2-only CPUs
    (int16 sums of two uint8 x int8 products: 2 x 255 x 64 = 32640 fits, 2 x 255 x 127 does not) is weights within
    +-64, the largest near that bound."""
    import onnx
    from onnx import numpy_helper

    folder, _ = exported
    for path in onnx_paths(folder, "int8").values():
        weights = [numpy_helper.to_array(init) for init in onnx.load(str(path)).graph.initializer
                   if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 2]  # not the zero points
        assert weights, path.name
        for weight in weights:
            assert 60 <= abs(weight.astype(int)).max() <= 64


# A Python that can import neither torch nor transformers (nor this project): only onnxruntime, numpy, tokenizers, PIL.
BLOCK_TORCH = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {"torch", "transformers", "modeling_proclip", "configuration_proclip", "proclip_train", "optimum"}

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
            return None

    sys.meta_path.insert(0, _Block())
    """
)
DUMP = textwrap.dedent(
    """
    print(json.dumps({"image": image_embeds.tolist(), "text": text_embeds.tolist(),
                      "ids": [e.ids for e in encodings], "mask": [e.attention_mask for e in encodings],
                      "modules": sorted({name.partition(".")[0] for name in sys.modules})}))
    """
)


def readme_onnx_recipe() -> str:
    section = README.read_text(encoding="utf-8").split("## ONNX Runtime", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_recipe_runs_with_onnxruntime_alone_and_reproduces_pytorch(exported, tmp_path):
    folder, _ = exported
    photo = tmp_path / "photo.jpg"
    Image.radial_gradient("L").convert("RGB").resize((53, 41)).save(photo)  # not square, not the model's size
    recipe = readme_onnx_recipe()
    assert 'Path("proclip-checkpoint")' in recipe and '"photo.jpg"' in recipe
    recipe = recipe.replace('Path("proclip-checkpoint")', f"Path({str(folder)!r})").replace('"photo.jpg"', repr(str(photo)))
    result = subprocess.run([sys.executable, "-c", BLOCK_TORCH + recipe + "import sys\n" + DUMP],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert not {"torch", "transformers"} & set(out["modules"])

    model, processor, _ = pytorch_and_onnx(folder)
    captions = re.search(r"captions = (\[.*?\])\n", recipe).group(1)
    captions = json.loads(captions)
    for ids, mask, caption in zip(out["ids"], out["mask"], captions):  # the tokenizers post-processor = the processor
        assert [i for i, m in zip(ids, mask) if m] == processor.tokenizer(caption)["input_ids"]
    batch = processor(images=Image.open(photo), text=captions, return_tensors="pt")
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).pooler_output
    assert (torch.tensor(out["image"]) - image).abs().max() <= 1e-4
    assert (torch.tensor(out["text"]) - text).abs().max() <= 1e-4


def test_push_uploads_and_card_lists_the_onnx_files(exported):
    folder, _ = exported
    uploaded = [path for path, _ in files_to_upload(folder)]
    assert {"onnx/vision_model.onnx", "onnx/text_model.onnx", "onnx/text_model_int8.onnx"} <= set(uploaded)
    card, _ = build_model_card(folder, plot=False, template=REPO / "model_cards" / "proclip.md")
    assert "onnx/vision_model_int8.onnx" in card.content and "onnxruntime" in card.content


def test_cli_exports_a_folder(tmp_path, tiny_proclip_dir, capsys):
    folder = tmp_path / "model"
    shutil.copytree(tiny_proclip_dir, folder)
    (folder / "onnx").mkdir()
    (folder / "onnx" / "text_model_int8.onnx").write_bytes(b"from an older export")
    main(["export", "--format", "onnx", "--model", str(folder)])
    out = capsys.readouterr().out
    assert "vision_model.onnx: max |ONNX Runtime - PyTorch|" in out
    # the int8 file of an earlier export would not match the new weights: gone
    assert sorted(p.name for p in (folder / "onnx").iterdir()) == ["text_model.onnx", "vision_model.onnx"]


@pytest.mark.parametrize("problem", ["missing", "not_proclip", "no_processor", "bad_quantize"])
def test_cli_user_errors_exit_2_with_one_line(problem, tmp_path, tiny_llm_dir, tiny_proclip_dir):
    model = {"missing": tmp_path / "nowhere", "not_proclip": tiny_llm_dir}.get(problem, tmp_path / "model")
    if problem in ("no_processor", "bad_quantize"):
        shutil.copytree(tiny_proclip_dir, model)
    if problem == "no_processor":
        (model / "processor_config.json").unlink()
    extra = ["--quantize", "int4"] if problem == "bad_quantize" else []
    result = subprocess.run(
        [sys.executable, "-m", "proclip_train.cli", "export", "--format", "onnx", "--model", str(model), *extra],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    if problem != "bad_quantize":  # argparse's own message (usage + one line) for a bad choice
        lines = [line for line in result.stderr.splitlines() if line.startswith("proclip export:")]
        assert len(lines) == 1 and str(model) in lines[0]
    assert not (model / "onnx").exists()


OPTIMUM_FEATURE_EXTRACTION = """
    import json, sys
    import transformers
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer

    folder, captions = sys.argv[1], json.loads(sys.argv[2])
    model = ORTModelForFeatureExtraction.from_pretrained(
        folder, subfolder="onnx", file_name="text_model.onnx", trust_remote_code=True
    )
    batch = AutoTokenizer.from_pretrained(folder)(captions, padding=True, return_tensors="pt")
    embeds = model(**batch).last_hidden_state[:, 0]
    print(json.dumps({"transformers": transformers.__version__, "embeds": embeds.tolist()}))
"""


@torch.inference_mode()
def test_optimum_feature_extraction_gives_the_text_embeddings(exported):
    folder, _ = exported
    python = venv_python_or_skip(OPTIMUM_REQUIREMENTS)
    answer = run_without_project(OPTIMUM_FEATURE_EXTRACTION, timeout=600, args=[folder, json.dumps(CAPTIONS)],
                                 python=python)
    model, processor, _ = pytorch_and_onnx(folder)
    expected = model.get_text_features(**processor(text=CAPTIONS)).pooler_output
    assert answer["transformers"].startswith("4.")  # optimum's own transformers, not this Python's 5.x
    assert (torch.tensor(answer["embeds"]) - expected).abs().max().item() <= 1e-4
