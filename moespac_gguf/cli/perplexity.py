"""`moespac perplexity`: perplexity of a GGUF model on a text file or the held-out corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.errors import MoespacError
from ..demo.catalog import resolve_model
from ..demo.corpus import heldout_text
from ..demo.perplexity import perplexity


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac perplexity", description="Perplexity of a GGUF model on a text file or the held-out corpus."
    )
    p.add_argument("-m", "--model", required=True, help="GGUF file, or a name from `moespac models`")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--file", help="UTF-8 text file")
    src.add_argument(
        "--heldout",
        action="store_true",
        help="the held-out corpus text (The Tempest + Gospel of John), never used for fitting",
    )
    p.add_argument("--ctx", type=int, default=512, help="window size in tokens (default 512)")
    p.add_argument("--max-chunks", type=int, default=None, help="score at most this many windows, spread evenly")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    model = resolve_model(a.model)
    if a.heldout:
        text = heldout_text()
    else:
        path = Path(a.file)
        if not path.is_file():
            raise MoespacError(f"text file not found: {path}")
        text = path.read_text(encoding="utf-8", errors="replace")
    r = perplexity(model, text, n_ctx=a.ctx, max_chunks=a.max_chunks, n_threads=a.threads)
    if a.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"{r['model']}: perplexity {r['perplexity']:.3f} (mean NLL {r['mean_nll']:.4f} ± {r['stderr_nll']:.4f}) "
            f"over {r['n_scored']} tokens in {r['n_chunks']} windows of {r['n_ctx']}, {r['seconds']} s"
        )
    return 0
