"""``python -m tedm_core.serve`` (also ``tedm serve``): the TEDM worker process.

    python -m tedm_core.serve --stdio                                  # a child of the Slicer module
    python -m tedm_core.serve --listen 8765 --token-file F   # clients on this machine (127.0.0.1)
    python -m tedm_core.serve --listen 0.0.0.0:8765 --token-file F   # clients on other machines

See docs/worker_protocol.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

from .protocol import DEFAULT_MAX_MESSAGE_BYTES

TOKEN_ENVIRONMENT_VARIABLE = "TEDM_TOKEN"
DEFAULT_HOST = "127.0.0.1"  # never reachable from another machine unless the user names an address


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--stdio", action="store_true", help="serve the parent process over stdin/stdout (pipes)")
    where.add_argument(
        "--listen",
        metavar="[HOST:]PORT",
        help=f"serve the network on PORT of HOST (default {DEFAULT_HOST}: this machine only; name the address "
        "other machines reach it by to serve them; port 0 picks a free one)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the token clients must know (or set ${TOKEN_ENVIRONMENT_VARIABLE}); needed with --listen",
    )
    parser.add_argument(
        "--max-request-mb",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES >> 20,
        help="refuse requests larger than this many MiB (default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    protocol_fd = None
    if args.stdio:
        # Before the imports below (numpy, the worker): whatever they print goes to the log, never
        # into the protocol's stream.
        from .stdio import take_stdout

        protocol_fd = take_stdout()
    from .server import MIN_TOKEN_CHARACTERS, ListenError, serve_network, serve_stdio

    if args.max_request_mb <= 0:
        print(f"--max-request-mb must be positive, got {args.max_request_mb}", file=sys.stderr)
        return 2
    max_bytes = int(args.max_request_mb) << 20
    if args.stdio:
        return serve_stdio(max_bytes, protocol_fd)
    host, _, port = args.listen.rpartition(":")
    host = host or DEFAULT_HOST
    if not port.isdigit():
        print(f"--listen: expected [HOST:]PORT, got {args.listen!r}", file=sys.stderr)
        return 2
    if int(port) > 65535:
        print(f"--listen: port {port} out of range (0 to 65535; 0 picks a free one)", file=sys.stderr)
        return 2
    token = _read_token(args.token_file)
    if token is None or len(token) < MIN_TOKEN_CHARACTERS:
        print(
            f"--listen needs a token of at least {MIN_TOKEN_CHARACTERS} characters: --token-file FILE or "
            f"${TOKEN_ENVIRONMENT_VARIABLE} (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')",
            file=sys.stderr,
        )
        return 2
    try:
        return serve_network(host.strip("[]"), int(port), token, max_bytes)
    except ListenError as error:
        print(f"--listen: {error}", file=sys.stderr)
        return 2


def _read_token(path: Optional[Path]) -> Optional[str]:
    if path is None:
        return os.environ.get(TOKEN_ENVIRONMENT_VARIABLE, "").strip() or None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as error:
        print(f"{path}: cannot read the token ({error.strerror})", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tedm serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
