"""`moespac inspect`: where every expert of a GGUF MoE model lives, and how many fit in memory."""

from __future__ import annotations

import argparse
import json

from ..core.layout import format_layout, read_layout
from ..core.units import parse_size


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac inspect", description="Show the expert layout of a GGUF MoE model.")
    p.add_argument("model", help="GGUF file")
    p.add_argument("--mem", metavar="SIZE", help="memory for weights, e.g. 8G: how many experts fit")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    layout = read_layout(args.model)
    mem = parse_size(args.mem) if args.mem else None
    if args.json:
        d = layout.to_json()
        if mem is not None:
            d["experts_fitting"] = layout.experts_fitting(mem)
        print(json.dumps(d))
    else:
        print(format_layout(layout, mem))
    return 0
