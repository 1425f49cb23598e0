"""`moespac eval-gate`: how well the lookahead gate predicts on held-out prompts."""

from __future__ import annotations

import argparse
import json

from ..core.prompts import SPEC_BENCH
from ..gate.evaluate import eval_on_prompts, format_table
from ..gate.model import LookaheadGate


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac eval-gate",
        description="Top-k recall/precision of the lookahead gate on held-out prompts, "
        "against unaligned speculative gating, the previous token's experts "
        "and a frequency prior.",
    )
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--gate", required=True, help="gate file from train-gate")
    p.add_argument("--prompts", default=str(SPEC_BENCH), help='JSONL with "turns" (default: Spec-Bench)')
    p.add_argument("--n-prompts", type=int, default=26, help="prompts, round-robin over categories (default 26)")
    p.add_argument("--max-new", type=int, default=24, help="greedy tokens generated per prompt (default 24)")
    p.add_argument("--json", action="store_true", help="print one JSON object: per distance, the metrics")
    p.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args(argv)
    gate = LookaheadGate.load(a.gate, a.model)
    result, cap = eval_on_prompts(a.model, gate, a.prompts, a.n_prompts, a.max_new, a.threads)
    if a.json:
        print(json.dumps(result))
    else:
        print(
            f"{cap.n_rows} held-out tokens ({int(cap.generated.sum())} generated), top-{gate.n_expert_used} "
            f"of {gate.n_expert} experts; recall = precision per token"
        )
        print(format_table(result))
    return 0
