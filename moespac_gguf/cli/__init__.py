"""`moespac`: a thin dispatcher to one module per command (mlx-lm style).

Each command module here exposes `main(argv) -> int` with its own argparse parser; this file
maps a command name to it (imported only when that command runs) and turns MoespacError into
one line on stderr and exit code 2. Nothing in the library imports this package.
"""

from __future__ import annotations

import importlib
import sys

from ..core.errors import MoespacError

# command -> (module, function, one-line help)
COMMANDS: dict[str, str] = {
    "run": "generate text (speculative with -md DRAFT)",
    "chat": "chat with the model's template (stdin line by line)",
    "serve": "an OpenAI-compatible HTTP server with a chat page showing the experts",
    "rpc-server": "serve this machine's CPU to --rpc clients (llama.cpp's RPC backend)",
    "bench": "tokens/s and bytes read under a memory cap (or with a GPU budget, or --no-cap), vs llama.cpp",
    "calibrate": "measure disk, memory and expert costs of this machine",
    "inspect": "show the expert layout of a GGUF MoE model",
    "synth": "write a tiny random-weight MoE GGUF (tests)",
    "trace-import": "convert Mixtral routing JSONL into a trace",
    "trace-stats": "routing statistics and heatmap of a trace",
    "trace": "record the routing of greedy generations into a trace",
    "models": "list known models, print a demo model's path, build demo models",
    "perplexity": "perplexity of a model on a text (llama.cpp logits)",
    "sim": "simulate expert residency policies on device profiles (trace-driven)",
    "train-gate": "fit the lookahead gate (experts of layers l+1..l+D) to a model",
    "eval-gate": "recall/precision of the lookahead gate on held-out prompts",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: moespac <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in COMMANDS.items()]
    lines += ["", "Run `moespac <command> -h` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"moespac: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:  # the command's module, moespac_gguf.cli.<name with _ for ->
        return int(importlib.import_module(f"{__name__}.{name.replace('-', '_')}").main(rest) or 0)
    except MoespacError as e:
        print(f"moespac {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a command's own handler (cli.interrupt) is in place
        print(f"moespac {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `moespac ... | head`: the reader left; say nothing more
        sys.stderr.close()
        return 0
