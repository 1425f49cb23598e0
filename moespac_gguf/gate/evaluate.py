"""How well the gate predicts: top-k recall and precision per lookahead distance, per token and
per verification batch, against speculative gating, the previous token and a frequency prior."""

from __future__ import annotations

import numpy as np

from ..core.routing import routing_mask
from .capture import Capture, capture, prompt_sequences
from .model import LookaheadGate, _aug, _router_matrix, topk_rows

BATCH_ROWS = 4  # rows of a verification batch for the batch-level metric (K = 3 + 1)
METHODS = ("aligned", "unaligned", "prev_token", "frequency")


def evaluate(gate: LookaheadGate, cap: Capture, rows: np.ndarray | None = None, batch: int = BATCH_ROWS) -> dict:
    """Per distance d: top-k recall and precision of every method on the captured rows.

    token level: each row's predicted top-k (k = experts per token) vs its true top-k at layer
    l+d, summed over all (l, l+d) MoE pairs (recall = precision: both sets have k experts);
    batch level: a verification batch of `batch` consecutive rows, the union of the per-row
    predictions vs the union of the true experts (previous token: the experts of the token just
    before the batch, known when the batch starts). Rows: all (default) or a bool mask.
    """
    k, e = gate.n_expert_used, gate.n_expert
    n_rows = cap.n_rows
    sel = np.ones(n_rows, bool) if rows is None else np.asarray(rows, bool)
    seq_id = np.cumsum(cap.seq_start) - 1
    # batches: `batch` consecutive selected rows of one sequence
    idx = np.flatnonzero(sel)
    groups = []
    i = 0
    while i + batch <= len(idx):
        g = idx[i : i + batch]
        if seq_id[g[0]] == seq_id[g[-1]] and g[-1] - g[0] == batch - 1:
            groups.append(g)
            i += batch
        else:
            i += 1
    groups = np.array(groups, dtype=np.int64).reshape(-1, batch)
    out = {}
    for d in range(1, gate.distance + 1):
        acc = {m: np.zeros(2) for m in METHODS}  # token: hits, used (= predicted)
        bacc = {m: np.zeros(3) for m in METHODS}  # batch: hits, used, predicted
        for l in gate.moe_layers:
            t = l + d
            if not gate._valid[l][d - 1]:
                continue
            h = cap.hidden[l].astype(np.float32)
            true = routing_mask(cap.experts[t], e)
            freq_mask = topk_rows(np.broadcast_to(gate.frequency[t], (n_rows, e)), k)
            prev = np.zeros_like(true)
            prev[1:] = true[:-1]
            prev[cap.seq_start] = freq_mask[cap.seq_start]
            preds = {
                "aligned": topk_rows(gate.predict(l, h)[:, d - 1], k),
                "unaligned": topk_rows(_aug(h) @ _router_matrix(gate.routers[t]).T, k),
                "prev_token": prev,
                "frequency": freq_mask,
            }
            for m, p in preds.items():
                acc[m] += [(p & true)[sel].sum(), true[sel].sum()]
                if len(groups):
                    used = true[groups].any(axis=1)
                    pb = prev[groups[:, 0]] if m == "prev_token" else p[groups].any(axis=1)
                    bacc[m] += [(pb & used).sum(), used.sum(), pb.sum()]
        row = {}
        for m in METHODS:
            r = acc[m][0] / max(1, acc[m][1])
            row[f"{m}_recall"] = round(float(r), 4)
            row[f"{m}_precision"] = round(float(r), 4)
        for m in METHODS:
            row[f"batch{batch}_{m}_recall"] = round(float(bacc[m][0] / max(1, bacc[m][1])), 4)
            row[f"batch{batch}_{m}_precision"] = round(float(bacc[m][0] / max(1, bacc[m][2])), 4)
        row["pairs"] = sum(1 for l in gate.moe_layers if gate._valid[l][d - 1])
        row["rows"] = int(sel.sum())
        out[str(d)] = row
    return out


def format_table(result: dict, batch: int = BATCH_ROWS) -> str:
    """Markdown table: one row per distance, recall (= precision at token level) per method."""
    lines = [
        "| d | aligned gate | speculative gating (unaligned) | previous token | frequency prior |",
        "|---|---|---|---|---|",
    ]
    for d, r in result.items():
        lines.append(f"| {d} | " + " | ".join(f"{r[f'{m}_recall']:.3f}" for m in METHODS) + " |")
    lines += [
        "",
        f"Verification batch of {batch} rows (union of the rows' experts), recall / precision:",
        "",
        "| d | aligned gate | speculative gating (unaligned) | previous token | frequency prior |",
        "|---|---|---|---|---|",
    ]
    for d, r in result.items():
        cells = [f"{r[f'batch{batch}_{m}_recall']:.3f} / {r[f'batch{batch}_{m}_precision']:.3f}" for m in METHODS]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_on_prompts(
    model, gate: LookaheadGate, prompts, n_prompts: int, max_new: int, threads=None, progress: bool = True
) -> tuple[dict, Capture]:
    seqs = prompt_sequences(model, prompts, n_prompts)
    cap = capture(model, seqs, max_new=max_new, n_ctx=2048, n_threads=threads, desc="eval", progress=progress)
    return evaluate(gate, cap), cap
