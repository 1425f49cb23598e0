"""How long should the residency utility remember, and over how many steps should a fetch pay off?

Replays recorded SmolMoE routing traces (prompts included: each prompt is one uncounted prefill
window, as the runtime sees it) through `MoeSpacPolicy` as the pinned engine runs it (misses stream
through an unlocked window of `--window` x the experts, which keeps the latest ones), over a grid
of the EWMA's per-token forgetting `alpha` and the plan's `horizon_steps`, at several capacities,
with speculative windows of mean K. Counts bytes read per decoded token; bytes do not depend on the
device (with one CPU tier the plan compares a fetch with the same fetch), so none is modelled.
For reference: lru-global (the page cache) and the offline optimum (belady) at the same capacity,
neither with a window. Writes bench/results/utility_memory.{json,md}.

    .venv/bin/python bench/utility_memory.py TRACE.npz... [--draft-k 0.57 1.5] [--max-sequences 20]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from moespac_gguf.residency.baselines import Belady, Lru
from moespac_gguf.residency.costs import DeviceCosts
from moespac_gguf.residency.policy import Capacity, MoeSpacPolicy
from moespac_gguf.sim.profiles import load_model
from moespac_gguf.sim.simulate import load_trace, make_windows, replay, window_needs
from moespac_gguf.sim.trace import PROMPT

RESULTS = Path(__file__).resolve().parent / "results"
ALPHAS = (0.3, 0.1, 0.05, 0.02, 0.01)
HORIZONS = (2, 8, 32)
SHARES = (0.25, 0.34, 0.42, 0.52)  # capacity, share of all experts (the 16x bench: moespac 34%, +random 52%)
COSTS = DeviceCosts(flash_read_bps=1e9, memcpy_bps=1e10, cpu_s_per_token_expert=1e-4)


def mib_per_token(rep, expert_bytes: float) -> float:
    return rep.bytes_per_token(expert_bytes) / 2**20


def rows_for(path: Path, draft_k: float, acceptance: float, window_share: float, max_sequences: int | None):
    trace = load_trace(path)
    if max_sequences is not None:
        trace = trace.select(trace.sequence < max_sequences)
    model = load_model(trace.meta["model_path"])
    _, expert_b, _ = model.sizes(None)
    windows = make_windows(trace, draft_k, acceptance)
    n_all = trace.n_layer * trace.n_expert
    window = max(1, round(window_share * n_all))
    base = {
        "trace": path.name,
        "prompts": int((trace.phase == PROMPT).sum()),
        "decoded": int((trace.phase != PROMPT).sum()),
        "draft_k": draft_k,
        "window": window,
    }
    for share in SHARES:
        cap = Capacity(int(share * n_all))
        row = dict(base, capacity=cap.total, share=share)
        row["lru-global"] = mib_per_token(replay(trace, windows, Lru(per_layer=False), cap), expert_b)
        row["belady"] = mib_per_token(replay(trace, windows, Belady(window_needs(trace, windows)), cap), expert_b)
        for alpha in ALPHAS:
            for horizon in HORIZONS:
                policy = MoeSpacPolicy(COSTS, expert_b, horizon_steps=horizon, keep_used=False, alpha=alpha)
                rep = replay(trace, windows, policy, cap, stream_window=window)
                row[f"a{alpha:g}/h{horizon}"] = mib_per_token(rep, expert_b)
        yield row


def markdown(rows: list[dict], acceptance: float, command: str) -> str:
    grid = [f"a{a:g}/h{h}" for a in ALPHAS for h in HORIZONS]
    out = [
        f"{datetime.date.today()}: MiB read per decoded token, moespac pinned (+ stream window) over the "
        f"EWMA's alpha (a) and the plan's horizon (h); acceptance {acceptance}; the pinned default is "
        f"a0.02/h8. Best moespac cell per row in bold. `{command}`",
        "",
        "| trace | K | capacity | window | lru-global | belady | " + " | ".join(grid) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(grid),
    ]
    for r in rows:
        best = min(r[g] for g in grid)
        cells = [f"**{r[g]:.1f}**" if r[g] == best else f"{r[g]:.1f}" for g in grid]
        out.append(
            f"| {r['trace']} | {r['draft_k']:g} | {r['capacity']} ({r['share']:.0%}) | {r['window']} | "
            f"{r['lru-global']:.1f} | {r['belady']:.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(out)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("traces", nargs="+", type=Path, help="moespac trace .npz files (with their prompts)")
    p.add_argument("--draft-k", type=float, nargs="+", default=[0.57, 1.5], help="mean drafted tokens per window")
    p.add_argument("--acceptance", type=float, default=0.75)
    p.add_argument("--window", type=float, default=0.08, help="stream window, share of all experts (16x bench: 39/480)")
    p.add_argument("--max-sequences", type=int, help="replay only the first N sequences of each trace")
    p.add_argument("--out", type=Path, default=RESULTS / "utility_memory.json")
    args = p.parse_args(argv)
    rows = [
        r
        for path in args.traces
        for k in args.draft_k
        for r in rows_for(path, k, args.acceptance, args.window, args.max_sequences)
    ]
    md = markdown(rows, args.acceptance, " ".join(["bench/utility_memory.py"] + argv))
    args.out.write_text(json.dumps({"date": str(datetime.date.today()), "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
