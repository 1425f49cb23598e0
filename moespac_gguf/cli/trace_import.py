"""`moespac trace-import`: convert the Mixtral routing JSONL into a moespac trace (.npz)."""

from __future__ import annotations

import argparse
import os
import time

from ..sim.trace import ALIGNMENT, import_mixtral_jsonl


def main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="moespac trace-import", description="Convert a Mixtral routing JSONL into a moespac trace (.npz)."
    )
    parser.add_argument(
        "jsonl", help="Mixtral routing rows {dataset, problem_id, layer, token_idx, experts, gating_probs}"
    )
    parser.add_argument("--out", required=True, help="output .npz path")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    trace = import_mixtral_jsonl(args.jsonl, progress=True)
    trace.save(args.out)
    m = trace.meta
    print(
        f"{m['dataset']}: {len(m['problem_ids'])} problems, {trace.n_tokens} decode tokens, "
        f"{trace.n_layer} layers, top-{trace.k} of {trace.n_expert} experts"
    )
    print(f"alignment: {ALIGNMENT}")
    print(
        f"kept {m['rows_read'] - m['rows_dropped']} of {m['rows_read']} rows "
        f"({m['rows_dropped']} dropped, {m['problems_dropped']} problems dropped)"
    )
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB) in {time.perf_counter() - start:.1f} s")
    return 0
