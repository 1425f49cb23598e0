"""Fitting the gate: ridge regression of layer l+d's router logits on layer l's router input,
shrunk toward speculative gating, the shrinkage chosen by validation (model.py's docstring)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import MoespacError
from ..core.gguf import model_fingerprint
from ..core.layout import MoeLayout, read_layout
from ..core.routing import routed_rows, routing_counts, routing_mask
from .capture import Capture
from .model import LookaheadGate, _aug, _router_matrix, load_routers, topk_rows

ALPHAS = (1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, np.inf)  # ridge strength / mean diag(H^T H); inf = unaligned


def true_logits(cap: Capture, routers, layer: int, rows=slice(None)) -> np.ndarray:
    """Router logits of `layer` recomputed from its captured router input: float64 [N, E]."""
    return _aug(cap.hidden[layer][rows]).astype(np.float64) @ _router_matrix(routers[layer]).T


def _reduce_rank(delta: np.ndarray, evals, evecs, rank: int):
    """Best rank-r Delta [E, n+1] in the data metric (reduced-rank regression): factors (P, Q)."""
    root = np.sqrt(np.maximum(evals, 0) + 1e-12 * evals.max())
    u, s, vt = np.linalg.svd(delta @ evecs * root, full_matrices=False)
    p = u[:, :rank] * s[:rank]
    q = (vt[:rank] / root) @ evecs.T
    return p, q


def validation_folds(cap: Capture, val_frac: float = 0.2) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, validation rows) bool masks: leave one source group out when the capture has
    several (validating across sources, like the shift from training text to real prompts), else
    the last `val_frac` of the rows, cut at a sequence start when possible."""
    n_rows = cap.n_rows
    groups = np.unique(cap.group) if cap.group is not None else np.zeros(1)
    if len(groups) >= 2:
        return [(cap.group != g, cap.group == g) for g in groups]
    cut = int(n_rows * (1 - val_frac))
    starts = np.flatnonzero(cap.seq_start)
    starts = starts[starts > 0]
    if len(starts):  # the sequence start nearest the cut: no sequence on both sides
        cut = int(starts[np.argmin(np.abs(starts - cut))])
    va = np.arange(n_rows) >= cut
    return [(~va, va)]


def fit_gate(
    model: str | Path,
    train: Capture,
    distance: int,
    *,
    rank: int = 0,
    val_frac: float = 0.2,
    alphas=ALPHAS,
    alpha_scope: str = "pair",
    progress: bool = True,
    dtype=np.float16,
) -> LookaheadGate:
    """Fit the alignment of every (l, d) on `train` (see the module docstring)."""
    if distance < 1:
        raise MoespacError(f"--distance must be >= 1, got {distance}")
    layout = read_layout(model)
    routers = load_routers(model, [l.index for l in layout.layers])
    moe = [l.index for l in layout.layers]
    n, k, e = layout.n_embd, layout.n_expert_used, layout.n_expert
    n_rows = train.n_rows
    if n_rows < 64:
        raise MoespacError(f"{n_rows} training tokens are too few to fit a gate (want >= 64)")
    folds = validation_folds(train, val_frac)
    moe_set = set(moe)
    alphas = sorted(alphas, reverse=True)  # strongest shrinkage first: argmax keeps it on ties
    n_pairs = sum(1 for l in moe for d in range(1, distance + 1) if l + d in moe_set)
    bar = tqdm(total=2 * n_pairs, desc="fit", unit="pair", disable=not progress, file=sys.stderr)
    eye = np.eye(n + 1)

    def centred_logits(t, rows=slice(None)):
        z = true_logits(train, routers, t, rows)
        return z - z.mean(axis=1, keepdims=True)

    # 1. validation top-k hits of every (l, d, lam) over the folds
    hits = np.zeros((layout.n_layer, distance, len(alphas)))
    used = np.zeros((layout.n_layer, distance))
    for l in moe:
        targets = [d for d in range(1, distance + 1) if l + d in moe_set]
        if not targets:
            continue
        h_all = _aug(train.hidden[l]).astype(np.float64)
        w0s = {d: _router_matrix(routers[l + d]) for d in targets}
        z_all = {d: centred_logits(l + d) for d in targets}
        for tr, va in folds:
            h_tr, h_va = h_all[tr], h_all[va]
            g_tr = h_tr.T @ h_tr
            c_tr = {d: h_tr.T @ z_all[d][tr] for d in targets}
            true_va = {d: routing_mask(train.experts[l + d][va], e) for d in targets}
            for d in targets:
                used[l, d - 1] += true_va[d].sum()
            for ai, a in enumerate(alphas):
                if np.isinf(a):
                    ms = w0s
                else:  # M^T = (H^T H + lam I)^-1 (H^T Z + lam W0^T), one solve for every d
                    lam = a * float(np.trace(g_tr)) / (n + 1)  # relative to the mean diag(H^T H)
                    rhs = np.concatenate([c_tr[d] + lam * w0s[d].T for d in targets], axis=1)
                    sol = np.linalg.solve(g_tr + lam * eye, rhs)
                    ms = {d: sol[:, i * e : (i + 1) * e].T for i, d in enumerate(targets)}
                for d in targets:
                    hits[l, d - 1, ai] += (topk_rows(h_va @ ms[d].T, k) & true_va[d]).sum()
        bar.update(len(targets))

    # 2. lam: per distance pooled over layers (robust), or per (l, d)
    if alpha_scope == "distance":
        pooled = hits.sum(axis=0).argmax(axis=1)  # [D]
        choice = np.broadcast_to(pooled, hits.shape[:2])
    elif alpha_scope == "pair":
        choice = hits.argmax(axis=2)
    else:
        raise MoespacError(f"alpha_scope must be 'distance' or 'pair', got {alpha_scope!r}")
    inf_i = alphas.index(np.inf) if np.inf in alphas else None

    # 3. refit every pair on all rows with its lam
    deltas, chosen, val = {}, {}, {}
    for l in moe:
        targets = [d for d in range(1, distance + 1) if l + d in moe_set]
        if not targets:
            continue
        for d in targets:
            chosen[l, d] = float(alphas[choice[l, d - 1]])
            den = max(1.0, used[l, d - 1])
            val[l, d] = (
                (hits[l, d - 1, inf_i] / den) if inf_i is not None else float("nan"),
                hits[l, d - 1, choice[l, d - 1]] / den,
            )
        finite = [d for d in targets if np.isfinite(chosen[l, d])]
        if not finite:
            bar.update(len(targets))
            continue
        h_all = _aug(train.hidden[l]).astype(np.float64)
        g_all = h_all.T @ h_all
        ev = vec = None
        if 0 < rank < min(e, n + 1):
            ev, vec = np.linalg.eigh(g_all)
        for d in targets:
            if d in finite:
                w0 = _router_matrix(routers[l + d])
                lam = chosen[l, d] * float(np.trace(g_all)) / (n + 1)
                delta = np.linalg.solve(g_all + lam * eye, h_all.T @ centred_logits(l + d) + lam * w0.T).T - w0
                if ev is not None:
                    p, q = _reduce_rank(delta, ev, vec, rank)
                    deltas[l, d] = (p.astype(dtype), q.astype(dtype))
                else:
                    deltas[l, d] = (delta.astype(dtype), None)
            bar.update(1)
    bar.close()
    freq = train_frequency(train, layout)
    by_d = {}
    for (_, d), (b, a) in val.items():
        by_d.setdefault(d, []).append((b, a))
    info = {
        "trained_rows": int(n_rows),
        "val_folds": len(folds),
        "alpha_scope": alpha_scope,
        "rank": int(rank),
        "alpha": {f"{l},{d}": (v if np.isfinite(v) else "inf") for (l, d), v in chosen.items()},
        "val_recall": {
            str(d): {"unaligned": float(np.mean([x[0] for x in v])), "aligned": float(np.mean([x[1] for x in v]))}
            for d, v in sorted(by_d.items())
        },
        "method": "ridge regression of layer l+d's router logits on layer l's router input, shrunk toward "
        "speculative gating; lam by validation top-k recall "
        + ("(leave-one-source-out)" if len(folds) > 1 else "(held-out tail)")
        + (" per distance" if alpha_scope == "distance" else " per (l, d)"),
    }
    gate = LookaheadGate(layout.n_layer, e, k, n, distance, moe, routers, deltas, freq, model_fingerprint(model), info)
    model_bytes = Path(model).stat().st_size
    gate.info["bytes"] = gate.nbytes
    gate.info["model_bytes"] = model_bytes
    return gate


def train_frequency(cap: Capture, layout: MoeLayout) -> np.ndarray:
    """Routings per token of each (layer, expert) in `cap`: the frequency prior."""
    counts = routing_counts(cap.experts, layout.n_expert).astype(np.float64)
    return counts / np.maximum(routed_rows(cap.experts), 1)[:, None]
