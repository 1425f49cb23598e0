"""`moespac trace-stats`: skew, next-token reuse, LRU hit rates and an activation heatmap of a trace."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..core.errors import MoespacError
from ..sim.trace import RoutingTrace, open_trace
from ..sim.trace_stats import activation_heatmap, layer_skew, lru_curve, next_token_reuse


def _report(trace: RoutingTrace, path: str, png: str) -> dict:
    return {
        "file": path,
        "meta": trace.meta,
        "n_layer": trace.n_layer,
        "n_tokens": trace.n_tokens,
        "n_sequences": int(np.unique(trace.sequence).size),
        "k": trace.k,
        "n_expert": trace.n_expert,
        "skew_top_frac": 0.1,
        "skew": layer_skew(trace).tolist(),
        "reuse": next_token_reuse(trace).tolist(),
        "lru": lru_curve(trace, range(1, trace.n_expert + 1)),
        "png": png,
    }


def _print_report(r: dict) -> None:
    m = r["meta"]
    print(
        f"{r['file']}: {m.get('model', '?')} {m.get('dataset', '')}, {r['n_tokens']} tokens in "
        f"{r['n_sequences']} sequences, {r['n_layer']} layers, top-{r['k']} of {r['n_expert']} experts"
    )
    print(
        f"{'layer':>5}  {'skew':>6}  {'reuse':>6}   skew: routing share of the top 10% experts; "
        f"reuse: share of token t's experts used by t-1"
    )
    for layer, (skew, reuse) in enumerate(zip(r["skew"], r["reuse"])):
        print(f"{layer:>5}  {skew:6.3f}  {reuse:6.3f}")
    print(f"{'mean':>5}  {np.nanmean(r['skew']):6.3f}  {np.nanmean(r['reuse']):6.3f}")
    print("per-layer LRU hit rate (routings replayed in order, no reset between sequences):")
    for size, rate in r["lru"].items():
        print(f"  {size:>4} experts cached  {rate:.3f}")
    print(f"heatmap: {r['png']}")


def main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="moespac trace-stats", description="Skew, next-token reuse and LRU hit rates of a routing trace."
    )
    parser.add_argument(
        "trace", help="trace .npz from `moespac trace-import` (or a Mixtral .jsonl, imported on the fly)"
    )
    parser.add_argument("--png", help="activation heatmap path (default: <name>.heatmap.png in the current directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    trace = open_trace(args.trace)
    png = args.png or Path(args.trace).with_suffix(".heatmap.png").name
    try:
        activation_heatmap(trace, png)
    except OSError as e:
        raise MoespacError(f"cannot write heatmap {png}: {e.strerror or e}; choose another path with --png") from None
    report = _report(trace, args.trace, png)
    if args.json:
        nan_free = {key: [None if np.isnan(x) else x for x in report[key]] for key in ("skew", "reuse")}
        print(json.dumps({**report, **nan_free}))
    else:
        _print_report(report)
    return 0
