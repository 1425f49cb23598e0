"""How far below the page cache a residency policy can read, on recorded routing.

For each trace and share of the experts held, the decode bytes per token of
  llama.cpp+random  the kernel's page cache: lru-global, misses paged in by 4 KiB faults, no draft;
  moespac           the runtime's policy, pinned as the engine runs it (misses stream through a window
                    of one layer's experts), with the self-draft's lookahead where the trace's model is a
                    local .gguf (--draft-ahead) and without it otherwise;
  belady            the offline optimum: no policy at that capacity, K and acceptance reads less;
and their ratios to llama.cpp+random. The benchmark's byte target (<= 0.5x llama.cpp+random) is a ratio
of this kind. The shared Mixtral-8x7B traces carry the routing of real trained routers; a SmolMoE trace
(moespac trace) the demo model's. Writes bench/results/byte_bound.{json,md}.

  .venv/bin/python bench/byte_bound.py [TRACE ...] [--shares 0.375,0.5,0.625] [--draft-ahead 6]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from moespac_gguf import MoespacError
from moespac_gguf.core.paths import REPO_ROOT, SHARED_DIR
from moespac_gguf.sim.profiles import load_device, load_model
from moespac_gguf.sim.simulate import default_model, load_trace, simulate

RESULTS = REPO_ROOT / "bench" / "results"
SHARED_TRACES = [
    SHARED_DIR / "data" / "traces" / f"mixtral8x7b_{name}_routing.jsonl" for name in ("gsm8k", "humaneval")
]
MIB = 1 << 20


def model_of(trace, path: Path) -> str:
    """The trace's own .gguf when it is still there (a moespac trace), else the spec of its architecture."""
    local = trace.meta.get("model_path")
    return local if local and Path(local).is_file() else default_model(trace, str(path))


def bound_rows(
    path: Path, shares: list[float], device, draft_k: float, acceptance: float, draft_ahead: int
) -> list[dict]:
    trace = load_trace(path)
    model_name = model_of(trace, path)
    model = load_model(model_name)
    ahead = draft_ahead if model_name.endswith(".gguf") else 0  # a self-draft needs the model's weights
    rows = []
    for share in shares:
        per_layer = max(1, min(trace.n_expert - 1, round(share * trace.n_expert)))
        page_cache = simulate(
            trace, str(path), "lru-global", device, model, paging="fault", draft_k=0, cache_per_layer=per_layer
        )
        ours = simulate(
            trace,
            str(path),
            "moespac",
            device,
            model,
            draft_k=draft_k,
            acceptance=acceptance,
            pinned=True,
            stream_window=trace.n_expert,
            draft_ahead=ahead,
            self_draft=model_name,
            cache_per_layer=per_layer,
        )
        optimum = simulate(
            trace, str(path), "belady", device, model, draft_k=draft_k, acceptance=acceptance, cache_per_layer=per_layer
        )
        base = page_cache.bytes_per_token
        rows.append(
            {
                "trace": path.name,
                "model": Path(model_name).name,
                "tokens": page_cache.n_tokens,
                "per_layer": per_layer,
                "share": per_layer / trace.n_expert,
                "capacity_experts": page_cache.capacity_experts,
                "draft_ahead": ahead,
                "random_mib_per_token": base / MIB,
                "moespac_mib_per_token": ours.bytes_per_token / MIB,
                "belady_mib_per_token": optimum.bytes_per_token / MIB,
                "moespac_vs_random": ours.bytes_per_token / base,
                "belady_vs_random": optimum.bytes_per_token / base,
            }
        )
    return rows


def markdown(rows: list[dict], draft_k: float, acceptance: float, device: str) -> str:
    lines = [
        f"Decode bytes per token at a share of the experts held (`bench/byte_bound.py`, device {device}: "
        f"only moespac's plan reads its costs). llama.cpp+random: lru-global, 4 KiB faults, no draft; "
        f"moespac (pinned, one layer's stream window) and belady: K {draft_k:g}, acceptance {acceptance:g}.",
        "",
        "| trace | model | tokens | held per layer | share | llama.cpp+random MiB/token | moespac MiB/token "
        "(lookahead rows) | belady MiB/token | moespac vs +random | belady vs +random |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trace']} | {r['model']} | {r['tokens']} | {r['per_layer']} | {r['share']:.0%} | "
            f"{r['random_mib_per_token']:.1f} | {r['moespac_mib_per_token']:.1f} ({r['draft_ahead']}) | "
            f"{r['belady_mib_per_token']:.1f} | {r['moespac_vs_random']:.2f}x | "
            f"{r['belady_vs_random']:.2f}x |"
        )
    return "\n".join(lines)


def parse_shares(text: str) -> list[float]:
    try:
        shares = [float(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"fractions like 0.375,0.5, got {text!r}") from None
    if not shares or not all(0 < s < 1 for s in shares):
        raise argparse.ArgumentTypeError(f"shares lie strictly between 0 and 1, got {text!r}")
    return shares


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "traces",
        nargs="*",
        type=Path,
        default=SHARED_TRACES,
        help="routing traces (default: the shared Mixtral-8x7B GSM8K and HumanEval traces)",
    )
    p.add_argument(
        "--shares",
        type=parse_shares,
        default=[0.375, 0.5, 0.625],
        help="shares of each layer's experts held (default 0.375,0.5,0.625)",
    )
    p.add_argument(
        "--draft-k",
        type=float,
        default=0.26,
        help="mean drafted tokens per window (default 0.26, "
        "the adaptive K of the smolmoe-32x benchmark's moespac run 1)",
    )
    p.add_argument("--acceptance", type=float, default=0.6, help="draft acceptance (default 0.6, the same run's)")
    p.add_argument(
        "--draft-ahead",
        type=int,
        default=6,
        help="self-draft lookahead rows for traces of a local .gguf (default 6, the runtime's)",
    )
    p.add_argument("--device", default="m2-macbook")
    p.add_argument("--out", type=Path, default=RESULTS / "byte_bound.json")
    args = p.parse_args(argv)
    try:
        device = load_device(args.device)
        rows = [
            r
            for path in args.traces
            for r in bound_rows(path, args.shares, device, args.draft_k, args.acceptance, args.draft_ahead)
        ]
    except MoespacError as e:
        sys.exit(f"error: {e}")
    md = markdown(rows, args.draft_k, args.acceptance, args.device)
    args.out.write_text(
        json.dumps(
            {
                "date": str(datetime.date.today()),
                "draft_k": args.draft_k,
                "acceptance": args.acceptance,
                "device": args.device,
                "rows": rows,
            },
            indent=1,
        )
    )
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
