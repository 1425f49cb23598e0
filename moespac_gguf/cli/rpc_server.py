"""`moespac rpc-server`: llama.cpp's RPC server, serving this machine's CPU to `--rpc` clients."""

from __future__ import annotations

import argparse
import os
import sys

from ..llama.rpc import serve
from .serve import listen

WARNING = (
    "the RPC protocol has no authentication and no encryption: anyone who can reach the port can use this "
    "machine's memory and compute. Expose it only on a trusted network."
)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac rpc-server",
        description="Serve this machine's CPU (memory and compute) to `moespac run/chat/serve --rpc HOST:PORT` "
        f"on another machine, with llama.cpp's RPC backend. Warning: {WARNING}",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    p.add_argument("-p", "--port", type=int, default=50052, help="port (default %(default)s, as llama.cpp's)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads (default: all)")
    p.add_argument("-c", "--cache", metavar="DIR", help="a local cache of tensors the clients send (optional)")
    args = p.parse_args(argv)
    listen(args.host, args.port).close()  # a taken port or a bad address: one line here, not ggml's message
    print(
        f"moespac rpc-server: {args.host}:{args.port}, {args.threads} threads; {WARNING}", file=sys.stderr, flush=True
    )
    serve(args.host, args.port, args.threads, args.cache)
    return 1  # serve() returns only when llama.cpp could not start the server (it said why)
