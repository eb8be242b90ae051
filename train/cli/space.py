"""`proclip space`: write a Gradio Space for a saved ProCLIP folder (see `proclip_train.hub.space.space`)."""

import argparse
from pathlib import Path

from ..hub.space import space as hub_space
from ..hub.space.space import GALLERY_DIR, SpaceOptions, run_instructions, write_space
from .errors import UsageError
from .flags import add_caption_column_argument


def run_space(args: argparse.Namespace) -> dict:
    options = SpaceOptions(repo_id=args.repo_id, results=args.results, gallery_size=args.gallery_size,
                           caption_columns=args.caption_column, title=args.title, images=args.images)
    try:
        config = write_space(args.model, args.out, options)
    except (ValueError, FileNotFoundError) as error:  # SpaceError, and the data loader's refusals
        raise UsageError(str(error)) from error
    gallery = (f"{len(config['search_examples'])} search examples, a gallery read from {args.out}/{GALLERY_DIR}"
               if config["gallery"] else "no search tab (no retrieval results with their data here, no --images)")
    print(f"wrote the Space for {args.model} to {args.out}: {len(config['classify_examples'])} zero-shot examples, "
          f"{gallery}")
    print(run_instructions(args.model, args.out))
    if args.repo_id:
        print(f"Publish it: `proclip push --model {args.model} --repo-id {args.repo_id}`, then upload {args.out} to a "
              f"Gradio Space repo (e.g. `hf upload ORG/SPACE {args.out} --repo-type space`).")
    return config


def add_space_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip space`."""
    parser = subparsers.add_parser(
        "space", help="write a Gradio Space (app, gallery, examples, card) for a saved ProCLIP folder",
        description=hub_space.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="the saved ProCLIP folder (its `proclip eval` results, if any, "
                        "give the Space its examples and search gallery)")
    parser.add_argument("--out", required=True, help="the Space folder to write")
    parser.add_argument("--repo-id", metavar="ORG/NAME",
                        help="the model's Hub repo, which the Space loads (without it, set PROCLIP_MODEL to run it)")
    parser.add_argument("--results", action="append", type=Path, metavar="JSON",
                        help="a `proclip eval --out` file naming the data of the gallery and examples; repeat "
                        "(default: every results file in --model)")
    parser.add_argument("--images", type=Path, metavar="DATA",
                        help="images for the search tab instead of the evaluated retrieval data: a folder of images "
                        "(captions from its metadata.jsonl, if any) or any data `proclip eval --data` reads")
    parser.add_argument("--gallery-size", type=int, default=SpaceOptions.gallery_size,
                        help="the most gallery images (default: %(default)s)")
    add_caption_column_argument(parser, "A caption column of the retrieval data for the search examples.",
                                "the columns the results scored")
    parser.add_argument("--title", help="the Space's title (default: ProCLIP <repo or folder name>)")
    parser.set_defaults(func=run_space)
    return parser
