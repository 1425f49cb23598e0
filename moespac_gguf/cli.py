"""`moespac` entry point: a thin dispatcher to one module per job (mlx-lm style).

Each job module exposes `main(argv) -> int` with its own argparse parser; this
file only maps a command name to it and turns MoespacError into one line.
"""
from __future__ import annotations

import importlib
import sys

from .errors import MoespacError

# command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("moespac_gguf.generate", "main_run", "generate text (speculative with -md DRAFT)"),
    "chat": ("moespac_gguf.generate", "main_chat", "chat with the model's template (stdin line by line)"),
    "bench": ("moespac_gguf.benchmark", "main", "tokens/s and bytes read under a memory cap, vs llama.cpp"),
    "calibrate": ("moespac_gguf.calibrate", "main", "measure disk, memory and expert costs of this machine"),
    "inspect": ("moespac_gguf.layout", "main", "show the expert layout of a GGUF MoE model"),
    "synth": ("moespac_gguf.synthetic", "main", "write a tiny random-weight MoE GGUF (tests)"),
    "trace-import": ("moespac_gguf.trace", "main_import", "convert Mixtral routing JSONL into a trace"),
    "trace-stats": ("moespac_gguf.trace_stats", "main", "routing statistics and heatmap of a trace"),
    "trace": ("moespac_gguf.record", "main", "record the routing of greedy generations into a trace"),
    "models": ("moespac_gguf.models", "main", "list known models, print a demo model's path, build demo models"),
    "perplexity": ("moespac_gguf.perplexity", "main", "perplexity of a model on a text (llama.cpp logits)"),
    "sim": ("moespac_gguf.sim", "main", "simulate expert residency policies on device profiles (trace-driven)"),
    "train-gate": ("moespac_gguf.gate", "main_train", "fit the lookahead gate (experts of layers l+1..l+D) to a model"),
    "eval-gate": ("moespac_gguf.gate", "main_eval", "recall/precision of the lookahead gate on held-out prompts"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: moespac <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
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
    module, func, _ = COMMANDS[name]
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except MoespacError as e:
        print(f"moespac {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `moespac ... | head`: the reader left; say nothing more
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
