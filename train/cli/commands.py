"""The whole `proclip` parser: every command's flags and implementation (importing this loads torch and transformers;
`cli/__init__.py` does it only once the fast checks have passed). Each command is registered by an
`add_<name>_parser(subparsers)` function that lives next to its implementation; this file only wires them."""

from .card import add_card_parser
from .convert import add_convert_parser
from .demo import add_demo_parser
from .embed import add_embed_parser
from .eval import add_eval_parser
from .export import add_export_parser
from .flags import FlagParser
from .init import add_init_parser
from .push import add_push_parser
from .serve import add_serve_parser
from .space import add_space_parser
from .train import add_train_parser


def build_parser() -> FlagParser:
    parser = FlagParser(prog="proclip", description="Train, evaluate and publish ProCLIP models. Flags take dashes or "
                        "underscores alike (--max-steps = --max_steps).")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its explanation (anywhere on the line)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_init_parser(subparsers)
    add_eval_parser(subparsers)
    add_card_parser(subparsers)
    add_push_parser(subparsers)
    add_convert_parser(subparsers)
    add_export_parser(subparsers)
    add_embed_parser(subparsers)
    add_train_parser(subparsers)
    add_space_parser(subparsers)
    add_serve_parser(subparsers)
    add_demo_parser(subparsers)
    return parser
