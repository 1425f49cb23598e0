"""Can a self-draft running ahead tell the residency engine which experts to keep?

Replays a recorded routing trace (`moespac trace`: the bench's prompts and the target's greedy
outputs) in speculative windows of mean K and acceptance A, as `moespac sim` does, with the
self-draft running ahead of each decode window as the runtime's `--draft-ahead N` does
(moespac_gguf.draft_replay; `--restrict M`: its routing restricted to the M most used experts of
the trace, as under a budget, where it may only compute with held experts). Reports

  recall  the share of the target's top-k picks of a row that the draft's top-k for it names,
          by row offset (row 0 is the committed token; later rows also depend on the drafted
          tokens being the target's);
  MiB read per decoded token by `MoeSpacPolicy` as the pinned engine runs it (misses stream
          through a window of `--window` experts) without and with the draft's rows as `ahead`
          (MoeSpacPolicy._want_ahead), with the target's own routing of the next `--oracle` N
          rows as `ahead` (a draft that predicts perfectly: what a better draft could win, and
          what a longer lookahead could), and by the offline optimum (belady), per capacity.

Bytes do not depend on the device, so none is modelled. Writes bench/results/lookahead.{json,md} (--out).

    .venv/bin/python bench/lookahead.py TRACE.npz -m MODEL.gguf [--ahead 2 4 6 8] \\
        [--oracle 6 12] [--capacity 197 236] [--window 39] [--restrict 197] [--out F.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from moespac_gguf.core.layout import read_layout
from moespac_gguf.residency.baselines import Belady
from moespac_gguf.residency.costs import DeviceCosts
from moespac_gguf.residency.policy import Capacity, MoeSpacPolicy
from moespac_gguf.sim.draft_replay import self_draft_rows
from moespac_gguf.sim.simulate import load_trace, make_windows, replay, window_needs
from moespac_gguf.sim.trace import PROMPT

RESULTS = Path(__file__).resolve().parent / "results"
COSTS = DeviceCosts(flash_read_bps=1e9, memcpy_bps=1e10, cpu_s_per_token_expert=1e-4)


def oracle_rows(trace, windows, n_rows: int) -> list[np.ndarray | None]:
    """Per window: the target's own routing of its next `n_rows` tokens (int [L, n_rows, k], -1
    past the sequence's end), as `self_draft_rows` lays out a draft's; None for a prefill window."""
    rows: list[np.ndarray | None] = []
    for a, b, _ in windows:
        if a == b:
            rows.append(None)
            continue
        out = np.full((trace.n_layer, n_rows, trace.experts.shape[2]), -1, dtype=trace.experts.dtype)
        for j in range(n_rows):
            t = a + j
            if t >= trace.n_tokens or trace.sequence[t] != trace.sequence[a] or trace.phase[t] == PROMPT:
                break
            out[:, j] = trace.experts[:, t]
        rows.append(out)
    return rows


def recall_by_row(trace, windows, rows) -> list[float]:
    """Share of the target's picks of row a+j named by the draft's top-k for it, per offset j."""
    n_rows = next(r for r in rows if r is not None).shape[1]
    hit, total = np.zeros(n_rows), np.zeros(n_rows)
    for pred, actual in zip(rows, oracle_rows(trace, windows, n_rows)):
        if pred is None:
            continue
        for j in range(n_rows):
            for layer in range(trace.n_layer):
                picks = set(actual[layer, j][actual[layer, j] >= 0].tolist())
                hit[j] += len(picks & set(pred[layer, j].tolist()))
                total[j] += len(picks)
    return (hit / np.maximum(total, 1)).tolist()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("-m", "--model", required=True, help="the trace's model (GGUF)")
    p.add_argument("--ahead", type=int, nargs="+", default=[2, 4, 6, 8], help="rows the draft decodes per window")
    p.add_argument(
        "--oracle",
        type=int,
        nargs="*",
        default=[6, 12],
        help="rows of the target's own routing given as the lookahead (a perfect draft)",
    )
    p.add_argument("--capacity", type=int, nargs="+", default=[197, 236], help="held experts")
    p.add_argument("--window", type=int, default=39, help="experts the stream window keeps")
    p.add_argument(
        "--restrict",
        type=int,
        default=197,
        help="the draft may route only to this many most used experts (0: unrestricted)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "lookahead.json", help="JSON; the table beside it as .md")
    p.add_argument("--draft-k", type=float, default=0.66)
    p.add_argument("--acceptance", type=float, default=0.82)
    args = p.parse_args(argv)

    trace = load_trace(args.trace)
    windows = make_windows(trace, args.draft_k, args.acceptance)
    rows = self_draft_rows(trace, windows, args.model, max(args.ahead), args.restrict or None)
    expert_bytes = read_layout(args.model).mean_bytes_per_expert
    n_decoded = int((trace.phase != PROMPT).sum())

    def mib(policy, capacity, window, ahead=None) -> float:
        return (
            replay(trace, windows, policy, Capacity(capacity), stream_window=window, ahead=ahead).bytes_per_token(
                expert_bytes
            )
            / 2**20
        )

    # each column's lookahead, built once for every capacity: none, the draft's first n rows, the trace's
    lookaheads = {"without": None}
    lookaheads |= {f"ahead {n}": [None if r is None else r[:, :n] for r in rows] for n in args.ahead}
    lookaheads |= {f"oracle {n}": oracle_rows(trace, windows, n) for n in args.oracle}
    table = []
    for capacity in args.capacity:
        row = {"capacity": capacity, "belady": mib(Belady(window_needs(trace, windows)), capacity, 0)}
        for name, ahead in lookaheads.items():
            row[name] = mib(MoeSpacPolicy(COSTS, expert_bytes, keep_used=False), capacity, args.window, ahead)
        table.append(row)
    recall = recall_by_row(trace, windows, rows)
    report = {
        "date": datetime.date.today().isoformat(),
        "trace": Path(args.trace).name,
        "model": Path(args.model).name,
        "decoded": n_decoded,
        "windows": len(windows),
        "draft_k": args.draft_k,
        "acceptance": args.acceptance,
        "window": args.window,
        "restrict": args.restrict,
        "recall_by_row": recall,
        "mib_per_token": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    cols = [*lookaheads, "belady"]
    lines = [
        f"{report['date']}: `{report['trace']}` ({n_decoded} decoded tokens, {len(windows)} windows, "
        f"K={args.draft_k}, A={args.acceptance}), self-draft of `{report['model']}` "
        f"{'restricted to the ' + str(args.restrict) + ' most used experts' if args.restrict else 'unrestricted'}",
        "",
        "Recall of the target's picks by the draft's ranking, by row (0: the committed token):",
        "",
        "| row | " + " | ".join(str(j) for j in range(len(recall))) + " |",
        "|---|" + "---:|" * len(recall),
        "| recall | " + " | ".join(f"{r:.2f}" for r in recall) + " |",
        "",
        f"MiB read per decoded token, MoeSpacPolicy pinned with a {args.window}-expert stream window "
        "(ahead N: the draft's N rows as its lookahead; oracle N: the target's own routing of the next "
        "N tokens instead, a perfect draft; belady: offline optimum, no window):",
        "",
        "| held experts | " + " | ".join(cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    lines += [f"| {r['capacity']} | " + " | ".join(f"{r[c]:.1f}" for c in cols) + " |" for r in table]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
