"""`proclip serve`: a checkpoint's `handler.py` served as Inference Endpoints serve it (see
`proclip_train.hub.serving.serve`)."""

import argparse

from ..hub.serving import serve as hub_serve
from ..hub.serving.endpoint_worker import HandlerLoadError
from ..hub.serving.serve import ServerConfig, serve_folder
from .errors import UsageError


def run_serve(args: argparse.Namespace) -> None:
    """Serve `--model` (`checks.check_serve` made sure it holds the handler)."""
    config = ServerConfig(args.host, args.port, int(args.max_body_mb * 2**20), args.max_pending, args.timeout)
    try:
        serve_folder(args.model, config)
    except HandlerLoadError as error:
        raise UsageError(str(error), "Fix the folder (or the PROCLIP_* variable named) and serve it again.") from None


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register `proclip serve`."""
    parser = subparsers.add_parser(
        "serve", help="serve a checkpoint's Inference Endpoints handler on this machine (POST /, GET /health)",
        description=hub_serve.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="a checkpoint folder with handler.py")
    parser.add_argument("--host", default=ServerConfig.host, help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=ServerConfig.port)
    parser.add_argument("--max-body-mb", type=float, default=ServerConfig.max_body_bytes / 2**20)
    parser.add_argument("--max-pending", type=int, default=ServerConfig.max_pending)
    parser.add_argument("--timeout", type=float, default=ServerConfig.timeout,
                        help="seconds the handler may spend on one request; then it is answered 504 and restarted")
    parser.set_defaults(func=run_serve)
    return parser
