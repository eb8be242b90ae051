"""`proclip card`: write a saved ProCLIP folder's README.md, a Hub model card with its results (the command
line of `hub/publish/card.py`, whose docstring is the `--help` description).
"""

import argparse
from pathlib import Path

from ..hub.publish import card as hub_card
from ..hub.publish.card import (
    DEFAULT_LICENSE,
    DEFAULT_TAGS,
    DEFAULT_TEMPLATE,
    EXAMPLE_IMAGE_FILE,
    PLOT_FILE,
    TRAINING_FILES,
    write_model_card,
)
from .errors import UsageError


def run_card(args: argparse.Namespace) -> Path:
    try:
        readme, plot_path = write_model_card(
            args.model,
            out=args.out,
            results=args.results or [],
            repo_id=args.repo_id,
            model_name=args.model_name,
            license=args.license,
            datasets=args.dataset or [],
            languages=args.language or [],
            tags=args.tag or [],
            runs=args.run,
            template=args.template,
            example_image=args.example_image,
            example_labels=[label.strip() for label in (args.example_labels or "").split(",") if label.strip()] or None,
            plot=not args.no_plot,
        )
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from error
    print(f"model card written to {readme}" + (f" (with {plot_path.name})" if plot_path else ""))
    return readme


def add_card_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip card` on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "card",
        help="write a saved ProCLIP folder's README.md: a Hub model card with its evaluation results",
        description=hub_card.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="the saved ProCLIP folder")
    parser.add_argument("--results", action="append", metavar="JSON",
                        help="a `proclip eval --out` file; repeat for several (they fill model-index and the plot)")
    parser.add_argument("--repo-id", help="the Hub repo the card is for; the usage snippets load it "
                        "(default: your-org/<folder name>)")
    parser.add_argument("--model-name", help="the model's name in model-index (default: the repo name)")
    parser.add_argument("--license", default=DEFAULT_LICENSE,
                        help="the weights' license; they derive from both towers, so use the stricter of their "
                        f"licenses (default: {DEFAULT_LICENSE}, the code's)")
    parser.add_argument("--dataset", action="append", help="a training dataset (Hub id, or a local name that is only "
                        "mentioned in the text); repeat for several")
    parser.add_argument("--language", action="append", help="an ISO 639 code of the text the model was trained on")
    parser.add_argument("--tag", action="append", help=f"an extra Hub tag (always: {', '.join(DEFAULT_TAGS)})")
    parser.add_argument("--run", action="append", metavar="DIR",
                        help=f"a training output folder to read the recipe from ({', '.join(TRAINING_FILES)}, "
                        "whichever exist); repeat for stage 1 and stage 2 (default: --model)")
    parser.add_argument("--template", type=Path, help=f"a Jinja model-card template (default: {DEFAULT_TEMPLATE.name})")
    parser.add_argument("--example-image", help="image URL of the widget and usage snippets (default: an image of the "
                        f"model's own zero-shot data, saved as {EXAMPLE_IMAGE_FILE} and shown from --repo-id)")
    parser.add_argument("--example-labels", help="comma-separated candidate labels (default: class names of the model's "
                        "own zero-shot data)")
    parser.add_argument("--no-plot", action="store_true", help=f"do not draw {PLOT_FILE}")
    parser.add_argument("--out", type=Path, help="where to write the card (default: <model>/README.md)")
    parser.set_defaults(func=run_card)
    return parser
