"""`proclip push`: check a saved ProCLIP folder and upload it with its model card to the Hugging Face Hub (the
command line of `hub/publish/push.py`, whose docstring is the `--help` description).
"""

import argparse
import sys
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError

from ..hub.publish import push as hub_push
from ..hub.publish.push import (
    FolderNotReady,
    code_differences,
    human_size,
    push_folder,
    required_files,
)
from .errors import UsageError


def run_push(args: argparse.Namespace):
    folder = Path(args.model)
    differences = code_differences(folder) if args.allow_modified_code and folder.is_dir() else []
    if args.allow_modified_code:
        _print_code_differences(differences)
    try:
        result = push_folder(folder, args.repo_id, args.private, args.revision, args.dry_run, timeout=args.timeout,
                             allow_modified_code=args.allow_modified_code)  # fmt: skip
    except (FolderNotReady, ValueError) as error:
        raise UsageError(f"refused: {error}") from error
    except HfHubHTTPError as error:  # the upload itself (`checks.require_hub_login` tried the token first)
        raise UsageError(f"the Hub refused the upload: {error}") from error
    readme = (folder / "README.md").read_text(encoding="utf-8")
    if args.repo_id not in readme:
        print(f"warning: README.md never names {args.repo_id}; its usage snippets load another repo. "
              f"Rewrite it with `proclip card --repo-id {args.repo_id}`.", file=sys.stderr)
    if not args.dry_run:
        print(f"uploaded {folder} to {getattr(result, 'commit_url', args.repo_id)}")
        return result
    required = set(required_files(folder)[0])
    total = sum(size for _, size in result)
    print(f"dry run: would upload {len(result)} files ({human_size(total)}) from {folder} to {args.repo_id} "
          f"(revision {args.revision or 'main'}, {'private' if args.private else 'public'} if created)")
    for path, size in result:
        print(f"  {human_size(size):>10}  {path}{'  [required]' if path in required else ''}")
    code = "modified code (allowed, listed above)" if differences else "the package's own code"
    print(f"checks passed: required files, model card, {code}, remote-code load and forward pass without this "
          "project and without credentials")
    return result


def _print_code_differences(differences) -> None:
    print(f"--allow-modified-code: {len(differences)} difference(s) from the installed ProCLIP's code"
          + (" (they run in the isolated load and are uploaded as they are):" if differences else "."))
    for difference in differences:
        print(f"  - {difference.problem}")
        for line in difference.diff:
            print(f"      {line}")


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip push` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "push",
        help="check a saved ProCLIP folder and upload it, model card included, to the Hugging Face Hub",
        description=hub_push.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="the saved ProCLIP folder (with README.md from `proclip card`)")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the model repo to upload to")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", help="branch to upload to (created from main if missing; default: main)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run the checks and list the files and sizes; upload nothing")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed for the remote-code load check")
    parser.add_argument("--allow-modified-code", action="store_true",
                        help="push code files that differ from the installed package's (or extra ones, or auto_map "
                        "entries pointing at them); the differences are listed. Without it such a folder is refused "
                        "before any of its code runs")
    parser.set_defaults(func=run_push)
    return parser
