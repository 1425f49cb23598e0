"""`moespac chat`: chat with the model's own template, one user message per line."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import RemoteDeviceLost
from .interrupt import Interrupt, interrupted
from .options import add_model_args, add_n_predict, open_model, sampling


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac chat",
        description="Chat with the model's own template; reads one user message per line (piped stdin works too).",
    )
    add_model_args(p)
    add_n_predict(p, 256, "most tokens per reply")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--stats", action="store_true", help="print a stats line after each reply")
    args = p.parse_args(argv)
    interactive = sys.stdin.isatty()
    with Interrupt() as stop, open_model(args) as m:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        while not stop.requested:  # Ctrl-C while loading, or in a reply: the text so far, then exit 130
            try:
                with stop.raising():
                    line = input("> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                if interactive:
                    print(flush=True)  # past the "> ^C" the terminal shows
                break
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            reply = []
            request = dict(max_tokens=args.n_predict, stream=True, cancel=stop.cancelled, **sampling(args))
            try:
                for chunk in m.create_chat_completion(messages, **request):
                    delta = chunk["choices"][0]["delta"].get("content", "")
                    reply.append(delta)
                    sys.stdout.write(delta)
                    sys.stdout.flush()
            except RemoteDeviceLost as e:  # the model runs on without that server: ask again
                print(f"\nmoespac chat: {e}", file=sys.stderr, flush=True)
                messages.pop()
                continue
            print(flush=True)
            if stop.requested:
                break
            if args.stats:
                print(m.stats.summary())
            messages.append({"role": "assistant", "content": "".join(reply)})
    return interrupted("chat") if stop.requested else 0
