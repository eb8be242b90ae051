"""`proclip push`: upload a saved ProCLIP folder and its model card to the Hugging Face Hub.

Nothing is uploaded (and `--dry-run` fails) unless the folder passes four checks, in this order:
  1. files: config, weights, the remote-code files, processor and tokenizer files, README.md;
  2. card: README.md has a metadata block and is not the Trainer's auto-generated card;
  3. code: every `.py` file that would be uploaded is byte for byte the installed package's own copy, and every code
     reference in the folder's JSON files (`auto_map` in config.json, processor_config.json, tokenizer_config.json
     ..., `custom_pipelines`, sentence-transformers' modules.json) points at those files; otherwise the push is
     refused, naming the file, unless `--allow-modified-code` is given (the differences are then listed). Nothing
     of the folder runs before this check;
  4. remote code: in a fresh Python where this project cannot be imported, `AutoModel` and `AutoProcessor` load
     the folder with `trust_remote_code=True` and run one forward pass on a dummy image and caption
     (`check_remote_code_loads`, which can also run the zero-shot-image-classification pipeline on an image). That
     Python gets no credentials: variables named like secrets (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, ..._SECRET...) are
     removed and the token file locations (HF_TOKEN_PATH, HF_STORED_TOKENS_PATH, HF_HOME, HOME) point at an empty
     folder. This hides the token from code that looks for it where huggingface_hub does; it is not a sandbox (code
     that knows a token file's absolute path can read it), which is why modified code is refused by default.
The upload is `HfApi.create_repo` + `HfApi.upload_folder` of the folder as it is: README.md goes up unchanged
(`Trainer.push_to_hub` would write its own card over it).
"""

import difflib
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HFValidationError,
    filter_repo_objects,
    validate_repo_id,
)

from modeling_proclip.saving_proclip import (
    ENDPOINT_HANDLER_FILE,
    REMOTE_CODE_FILES,
    copy_remote_code,
)

from ...training.finite import require_finite_folder

REQUIRED_FILES = (
    "config.json", *REMOTE_CODE_FILES, ENDPOINT_HANDLER_FILE, "processor_config.json", "tokenizer_config.json",
    "README.md",
)
# A tokenizer needs its vocabulary in one of these forms besides tokenizer_config.json.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
# Training leftovers that do not belong in a model repo: Trainer checkpoints (with optimizer states), TensorBoard
# logs, pickled training arguments (the recipe is in the card and its JSON files), caches and hidden files.
IGNORE_PATTERNS = (
    "checkpoint-*", "runs/*", "*__pycache__*", "*.pyc", ".*", "*/.*", "training_args.bin",
    "optimizer.pt", "scheduler.pt", "rng_state*.pth",
)
PROJECT_MODULES = ("modeling_proclip", "configuration_proclip", "proclip_train")
# The modules a folder's code references may name: the remote-code files (handler.py is run by Inference Endpoints
# by its file name, never through a reference). sentence-transformers' modules.json may also name its own classes.
KNOWN_CODE_MODULES = tuple(name.removesuffix(".py") for name in REMOTE_CODE_FILES)
LIBRARY_MODULE_PREFIXES = ("sentence_transformers.",)
# Environment variables whose names say they hold a secret (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, GITHUB_TOKEN,
# AWS_SECRET_ACCESS_KEY, HF_OIDC_RESOURCE, ...): the isolated Python never sees them.
SECRET_VARIABLE = re.compile(
    r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_?KEY|ACCESS_?KEY|CREDENTIALS?|AUTH|OIDC)(_|$)", re.IGNORECASE
)
MAX_DIFF_LINES = 40

# Prepended to code that must run as a Hub user would: with this project not importable, whatever is installed.
BLOCK_PROJECT = textwrap.dedent(
    f"""
    import importlib.abc
    import sys

    class _BlockProject(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {PROJECT_MODULES!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: a Python without ProCLIP)", name=name)
            return None

    sys.meta_path.insert(0, _BlockProject())
    """
)

# argv: the folder, then a JSON request: {} for the load + forward check, or {"image", "labels", "template"} to run
# the zero-shot-image-classification pipeline on that image too. The last line printed is the outcome, as JSON.
REMOTE_CODE_CHECK = textwrap.dedent(
    """
    import json
    import sys

    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline

    folder, request = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype="auto").eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for name, loaded in (("model", model), ("processor", processor)):
        if not type(loaded).__module__.startswith("transformers_modules."):
            where = f"{type(loaded).__module__}.{type(loaded).__name__}"
            raise SystemExit(f"the {name} loaded as {where}, not from the folder's code")
    batch = processor(images=Image.new("RGB", (64, 48), (120, 60, 200)), text=["a photo of a dog"], return_tensors="pt")
    with torch.inference_mode():
        logits = model(**batch).logits_per_image
    if tuple(logits.shape) != (1, 1) or not torch.isfinite(logits).all():
        raise SystemExit(f"one image and one caption gave logits_per_image {logits}")
    outcome = {"model": type(model).__name__, "model_module": type(model).__module__,
               "processor": type(processor).__name__}
    if request.get("image"):
        classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
        outcome["pipeline"] = classifier(Image.open(request["image"]), candidate_labels=request["labels"],
                                         hypothesis_template=request["template"])
    print(json.dumps(outcome))
    """
)


class FolderNotReady(Exception):
    """The folder must not be pushed: files missing, no proper card, or its remote code does not load."""


class RemoteCodeError(FolderNotReady):
    """The folder does not load through remote code in a Python where this project is not importable."""


class ModifiedCodeError(FolderNotReady):
    """The folder's code is not the installed package's (a changed or extra file, or a reference to other code)."""


def environment_without_credentials(scratch: str | os.PathLike) -> dict[str, str]:
    """This process's environment minus every variable named like a secret (`SECRET_VARIABLE`), with the places
    huggingface_hub looks for a token file (`HF_TOKEN_PATH`, `HF_STORED_TOKENS_PATH`, `HF_HOME`, and `HOME` for
    `~/.cache/huggingface`) pointed into the empty folder `scratch/home`; the Hub cache stays where it was."""
    home = Path(scratch) / "home"
    (home / "huggingface").mkdir(parents=True, exist_ok=True)
    environment = {name: value for name, value in os.environ.items() if not SECRET_VARIABLE.search(name)}
    environment.update(
        HOME=str(home),
        HF_HOME=str(home / "huggingface"),
        HF_TOKEN_PATH=str(home / "huggingface" / "token"),
        HF_STORED_TOKENS_PATH=str(home / "huggingface" / "stored_tokens"),
        HF_HUB_CACHE=hub_constants.HF_HUB_CACHE,
    )
    return environment


def run_python_without_project(
    code: str, args: list[str] = (), timeout: float = 600, env: dict | None = None, python: str = sys.executable
) -> subprocess.CompletedProcess:
    """Run `code` in a new Python (this one's interpreter, or `python`, e.g. another environment's) where
    `modeling_proclip`, `configuration_proclip` and `proclip_train` cannot be imported: the world of a Hub user
    loading with `trust_remote_code=True`.

    Offline (`HF_HUB_OFFLINE=1`), from an empty working directory, with a fresh `HF_MODULES_CACHE`, so remote
    code is copied from the folder for this run and never picked up from an earlier one, and without credentials
    (`environment_without_credentials`).

    Returns:
        The `subprocess.CompletedProcess` (text stdout and stderr); it does not raise on a non-zero exit.
    """
    with tempfile.TemporaryDirectory(prefix="proclip-isolated-") as scratch:
        environment = {
            **environment_without_credentials(scratch),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_MODULES_CACHE": os.path.join(scratch, "modules"),
            **(env or {}),
        }
        return subprocess.run(
            [str(python), "-c", BLOCK_PROJECT + code, *map(str, args)],
            capture_output=True, text=True, timeout=timeout, env=environment, cwd=scratch,
        )


def output_tail(text: str, lines: int = 30) -> str:
    """The last `lines` non-empty lines of a process's output, progress-bar redraws (`\\r`) collapsed."""
    kept = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in kept if line.strip()][-lines:])


def check_remote_code_loads(
    folder: str | os.PathLike,
    timeout: float = 600,
    pipeline_image: str | os.PathLike | None = None,
    candidate_labels: Sequence[str] = (),
    hypothesis_template: str = "a photo of a {}.",
) -> dict:
    """Load `folder` with `AutoModel` / `AutoProcessor(trust_remote_code=True)` where this project cannot be
    imported, and run one forward pass on a dummy image and caption; with `pipeline_image`, also classify that image
    among `candidate_labels` with the zero-shot-image-classification pipeline, in the same process.

    Returns:
        `{"model", "model_module", "processor"}` (class names and the module the model loaded from), plus `"pipeline"`
        (the pipeline's `[{"label", "score"}, ...]`, best first) with `pipeline_image`.

    Raises:
        RemoteCodeError: with the tail of the subprocess's stderr, if anything fails or it runs past `timeout` s.
    """
    folder = Path(folder).resolve()
    request = {}
    if pipeline_image is not None:
        request = {"image": str(pipeline_image), "labels": list(candidate_labels), "template": hypothesis_template}
    what = "AutoModel/AutoProcessor with trust_remote_code=True, then one forward pass" + (
        ", then the zero-shot pipeline" if request else ""
    )
    try:
        result = run_python_without_project(REMOTE_CODE_CHECK, [folder, json.dumps(request)], timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise RemoteCodeError(f"{folder}: loading through remote code took more than {timeout:.0f} s") from error
    if result.returncode != 0:
        raise RemoteCodeError(
            f"{folder} does not load through remote code where this project is not installed ({what}):\n"
            + textwrap.indent(output_tail(result.stderr), "    ")
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def required_files(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The files a pushable folder needs, as `(present, missing)` (paths relative to the folder).

    Weights are `model.safetensors`, or `model.safetensors.index.json` and every shard it names; the tokenizer
    is `tokenizer_config.json` and a vocabulary file (`TOKENIZER_VOCAB_FILES`).
    """
    folder = Path(folder)
    names = list(REQUIRED_FILES)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        names += [index.name, *shards]
    else:
        names.append("model.safetensors")
    vocab = next((name for name in TOKENIZER_VOCAB_FILES if (folder / name).is_file()), None)
    names.append(vocab or f"a tokenizer vocabulary ({' or '.join(TOKENIZER_VOCAB_FILES)})")
    present = [name for name in names if (folder / name).is_file()]
    missing = [name for name in names if name not in present]
    if "model.safetensors" in missing and any(folder.glob("pytorch_model*.bin")):
        missing[missing.index("model.safetensors")] += " (only pickled pytorch_model*.bin found: save with safetensors)"
    return present, missing


def card_problems(folder: str | os.PathLike) -> list[str]:
    """Why README.md is not a model card that may be pushed; empty when it is."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return []  # reported as a missing required file
    try:
        card = ModelCard.load(readme)
    except Exception as error:  # any parse failure: the Hub would reject the metadata too
        return [f"README.md does not parse as a model card: {error}"]
    metadata = card.data.to_dict()
    if not metadata:
        return ["README.md has no metadata block (--- yaml ---); write the card with `proclip card`"]
    tags = metadata.get("tags") or []
    if "generated_from_trainer" in tags and "proclip" not in tags:
        return ["README.md is the Trainer's auto-generated card (it overwrites ours when the Trainer pushes or "
                "saves a card); write ours again with `proclip card`"]
    return []


@dataclass(frozen=True)
class CodeDifference:
    """How a folder's code departs from the installed package's: `file` (relative to the folder), `problem` (one
    line), and for a changed file its unified diff against the package's copy (at most `MAX_DIFF_LINES` lines)."""

    file: str
    problem: str
    diff: tuple[str, ...] = ()


def package_code_files() -> dict[str, bytes]:
    """The installed package's remote-code files as `copy_remote_code` writes them into a checkpoint folder."""
    with tempfile.TemporaryDirectory(prefix="proclip-code-") as scratch:
        copy_remote_code(scratch)
        return {path.name: path.read_bytes() for path in sorted(Path(scratch).iterdir())}


def _code_references(value, where: str = "") -> Iterator[tuple[str, str]]:
    """`(where, "module.Class")` for every code reference in a parsed JSON file: the values of any `auto_map` (strings
    or lists such as a tokenizer's `[slow, fast]`) and of `custom_pipelines.*.impl`, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "auto_map" and isinstance(item, dict):
                for auto_class, target in item.items():
                    for reference in target if isinstance(target, list) else [target]:
                        if isinstance(reference, str):
                            yield f"{where}auto_map.{auto_class}", reference
            elif key == "custom_pipelines" and isinstance(item, dict):
                for task, pipeline_spec in item.items():
                    if isinstance(pipeline_spec, dict) and isinstance(pipeline_spec.get("impl"), str):
                        yield f"{where}custom_pipelines.{task}.impl", pipeline_spec["impl"]
            else:
                yield from _code_references(item, f"{where}{key}.")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _code_references(item, f"{where}{index}.")


def _outside_reference(reference: str, library_prefixes: Sequence[str] = ()) -> bool:
    """Whether `module.Class` (or a cross-repo `repo--module.Class`) names code other than the package's files."""
    if reference.startswith(tuple(library_prefixes)):
        return False
    return "--" in reference or reference.rpartition(".")[0] not in KNOWN_CODE_MODULES


def code_differences(folder: str | os.PathLike) -> list[CodeDifference]:
    """Every way the code that would be uploaded from `folder` differs from the installed package's: `.py` files that
    are not the package's copy byte for byte, extra `.py` files, and code references in its JSON files (`auto_map`,
    `custom_pipelines`, modules.json `type`) that point outside the package's files. Empty when the code is ours."""
    folder = Path(folder)
    expected = package_code_files()
    differences = []
    uploaded = [path for path, _ in files_to_upload(folder)]
    for path in uploaded:
        if path.endswith(".py") and path not in expected:
            differences.append(CodeDifference(path, f"{path}: an extra code file (the package ships only "
                                                    f"{', '.join(expected)})"))  # fmt: skip
        elif path in expected and (folder / path).read_bytes() != expected[path]:
            ours = expected[path].decode("utf-8").splitlines()
            theirs = (folder / path).read_bytes().decode("utf-8", errors="replace").splitlines()
            diff = list(difflib.unified_diff(ours, theirs, f"package/{path}", f"folder/{path}", lineterm=""))
            added = sum(line.startswith("+") and not line.startswith("+++") for line in diff)
            removed = sum(line.startswith("-") and not line.startswith("---") for line in diff)
            differences.append(CodeDifference(
                path, f"{path}: differs from the installed package's copy (+{added} -{removed} lines)",
                tuple(diff[:MAX_DIFF_LINES]) + ((f"... {len(diff) - MAX_DIFF_LINES} more lines",)
                                                if len(diff) > MAX_DIFF_LINES else ()),
            ))  # fmt: skip
    for path in uploaded:
        if not path.endswith(".json"):
            continue
        try:
            content = json.loads((folder / path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a config transformers could read either
        references = list(_code_references(content))
        if Path(path).name == "modules.json" and isinstance(content, list):
            references += [(f"{i}.type", module["type"]) for i, module in enumerate(content)
                           if isinstance(module, dict) and isinstance(module.get("type"), str)]  # fmt: skip
        for where, reference in references:
            if _outside_reference(reference, LIBRARY_MODULE_PREFIXES if where.endswith(".type") else ()):
                differences.append(CodeDifference(
                    path, f"{path}: {where} -> {reference} points outside the package's code files "
                    f"({', '.join(f'{m}.py' for m in KNOWN_CODE_MODULES)})",
                ))  # fmt: skip
    return differences


def check_folder(folder: str | os.PathLike, timeout: float = 600, allow_modified_code: bool = False) -> list[str]:
    """All the checks `proclip push` makes; returns the required files present.

    Args:
        allow_modified_code: go on (to the isolated load) when the folder's code is not the package's.

    Raises:
        FolderNotReady: missing files or card problems, all listed (the later checks are not run then).
        NonFiniteWeightsError: the weights hold NaN or infinite values (`training.finite`).
        ModifiedCodeError: the folder's code differs from the installed package's (`code_differences`), unless
            `allow_modified_code`; nothing of the folder has run then.
        RemoteCodeError: the folder does not load through remote code.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FolderNotReady(f"{folder} is not a folder")
    present, missing = required_files(folder)
    problems = [f"missing {name}" for name in missing] + card_problems(folder)
    if "README.md" in missing:
        problems.append("write the model card first: proclip card --model DIR --results results.json")
    if problems:
        raise FolderNotReady(f"{folder} is not ready to push:\n" + "\n".join(f"  - {p}" for p in problems))
    require_finite_folder(folder)
    differences = code_differences(folder)
    if differences and not allow_modified_code:
        raise ModifiedCodeError(
            f"{folder} holds code that is not this installed ProCLIP's, so it is not run and not pushed:\n"
            + "\n".join(f"  - {d.problem}" for d in differences)
            + "\nIf the change is yours and meant to ship, pass --allow-modified-code (the differences are then "
            "listed); otherwise restore the package's files: python -c \"from modeling_proclip.saving_proclip "
            f"import copy_remote_code; copy_remote_code('{folder}')\" (and remove extra files and auto_map entries)."
        )
    check_remote_code_loads(folder, timeout=timeout)
    return present


def files_to_upload(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """`(path in repo, size in bytes)` of every file `upload_folder` sends, with the same patterns it applies."""
    folder = Path(folder).resolve()
    paths = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
    kept = filter_repo_objects(paths, ignore_patterns=[*IGNORE_PATTERNS, *DEFAULT_IGNORE_PATTERNS])
    return [(path, (folder / path).stat().st_size) for path in kept]


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
    commit_message: str = "Upload ProCLIP model",
    timeout: float = 600,
    allow_modified_code: bool = False,
):
    """Check `folder` ([`check_folder`]), then upload it to the model repo `repo_id`.

    The repo is created if needed (`private` applies only then); a `revision` branch is created from main if
    missing. With `dry_run`, nothing is contacted.

    Returns:
        `files_to_upload(folder)` with `dry_run`, else the `CommitInfo` of the upload.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"--repo-id {repo_id!r} is not a Hub repo id (ORG/NAME): {error}") from error
    check_folder(folder, timeout=timeout, allow_modified_code=allow_modified_code)
    files = files_to_upload(folder)
    if dry_run:
        return files
    api = api or HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, repo_type="model", branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(folder),
        revision=revision,
        ignore_patterns=list(IGNORE_PATTERNS),
        commit_message=commit_message,
    )


