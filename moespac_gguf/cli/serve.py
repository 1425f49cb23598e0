"""`moespac serve`: an OpenAI-compatible server for one model (moespac_gguf.server), with a chat
page showing its experts. Binds 127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from ..core.errors import MoespacError
from .options import DRAFT_HELP, MODEL_HELP, ModelOptions, add_options, open_model


def listen(host: str, port: int) -> socket.socket:
    """A bound socket for uvicorn, made before the model loads, so a taken port fails in a second."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        raise MoespacError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    return sock


def loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac serve",
        description="Serve a model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions, "
        "/v1/models), /metrics, /v1/moespac/stats and a chat page at /. Requests are served one at a time, in "
        "arrival order.",
    )
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument("-md", "--model-draft", help=DRAFT_HELP)
    add_options(p, ModelOptions)
    p.add_argument(
        "-a", "--alias", help="the model id clients use (default: a demo model's name, else the file's stem)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MOESPAC_API_KEY"),
        help="require Authorization: Bearer KEY on every route but / and /health (default: $MOESPAC_API_KEY, "
        "else none)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="requests that may wait for the model; more get 503 (default %(default)s)",
    )
    args = p.parse_args(argv)
    try:
        import uvicorn  # lazy: the server's libraries are an optional extra (as llama-cpp-python's [server])

        from ..server.app import create_app  # lazy: imports FastAPI (the extra)
        from ..server.worker import ModelWorker, model_id  # lazy: imports FastAPI (the extra)
    except ImportError as e:
        raise MoespacError(f"moespac serve needs {e.name}: pip install 'moespac-gguf[server]'") from None
    if args.max_queue < 1:
        raise MoespacError(f"--max-queue must be 1 or more, got {args.max_queue}")
    if not loopback(args.host) and not args.api_key:
        print(
            f"moespac serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
            file=sys.stderr,
        )
    sock = listen(args.host, args.port)
    with open_model(args) as m:
        worker = ModelWorker(
            m, args.alias or model_id(args.model), args.model_draft and model_id(args.model_draft), args.max_queue
        )
        app = create_app(worker, args.api_key)
        shown = f"[{args.host}]" if ":" in args.host else args.host
        print(
            f"moespac serve: {worker.model_id} on http://{shown}:{args.port}/ (chat page; OpenAI base URL "
            f"http://{shown}:{args.port}/v1, model {worker.model_id!r})",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(
            app,
            log_level="info" if args.verbose else "warning",
            access_log=args.verbose,
            timeout_graceful_shutdown=5,  # SIGTERM: a running answer gets 5 s, then it is cancelled
        )
        # uvicorn shuts down gracefully on SIGTERM, then raises it again for the handler it found: this
        # one lets the model close and the process exit 0 (SIGINT's is Python's: exit 130, as `run`)
        signal.signal(signal.SIGTERM, lambda *_: None)
        uvicorn.Server(config).run(sockets=[sock])
    return 0
