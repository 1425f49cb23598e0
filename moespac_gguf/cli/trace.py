"""`moespac trace`: record the routing of greedy generations into a trace (sim.record)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..core.errors import MoespacError
from ..core.prompts import load_prompts
from ..demo.catalog import resolve_model
from ..sim.record import record
from ..sim.trace import PROMPT


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac trace", description="Record the expert routing of greedy generations into a trace (.npz)."
    )
    p.add_argument("-m", "--model", required=True, help="MoE GGUF file, or a name from `moespac models`")
    p.add_argument("--prompts", required=True, help='JSONL with "turns" (Spec-Bench) or "prompt" per row')
    p.add_argument("--limit", type=int, default=None, help="number of prompts (default: all)")
    p.add_argument(
        "--select",
        choices=("first", "spread"),
        default="first",
        help="first N rows, or N rows spread evenly over the file (all categories)",
    )
    p.add_argument("-n", "--n-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("-c", "--ctx-size", type=int, default=2048)
    p.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.n_tokens < 0:
        raise MoespacError(f"-n must be >= 0, got {a.n_tokens}")
    model = resolve_model(a.model)
    prompts = load_prompts(a.prompts, a.limit, a.select)
    trace = record(
        model, prompts, a.n_tokens, n_ctx=a.ctx_size, n_threads=a.threads, prompt_file=str(Path(a.prompts).resolve())
    )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trace.save(out)
    m = trace.meta
    n_prompt = int((trace.phase == PROMPT).sum())
    print(
        f"{len(prompts)} prompts: {n_prompt} prompt + {m['n_generated']} generated tokens, {trace.n_layer} layers, "
        f"top-{trace.k} of {trace.n_expert} experts, {m['seconds']} s"
    )
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return 0
