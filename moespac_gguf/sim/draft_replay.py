"""A self-draft running ahead, replayed over a recorded trace: the rows `--draft-ahead N` gives the
residency policy, for the simulator (`moespac sim --draft-ahead`) and bench/lookahead.py.

Before each decode window the target routing one expert per token (`-md self`) is fed the committed
tokens and drafts greedily on, its RouterCapture ranking every row it decodes, as the runtime's
SpeculativeDecoder._propose does: rows [last committed, d1 .. d(N-1)]. Under a budget the runtime
restricts the draft's routing to the experts the engine holds (patch 0009); a replay has no engine,
so `restrict` stands in for it with the M most used experts of the trace.
"""

from __future__ import annotations

import sys

import numpy as np

from ..core.layout import read_layout
from ..core.routing import routing_counts
from ..decode.draft import SelfDraft
from ..llama.capture import RouterCapture
from ..llama.session import Session
from ..residency.policy import Capacity, select
from .trace import RoutingTrace


def self_draft_rows(
    trace: RoutingTrace, windows, model: str, n_rows: int, restrict: int | None = None
) -> list[np.ndarray | None]:
    """Per window (simulate.make_windows): int [L, n_rows, k], the self-draft's top-k ranking of the rows
    it decodes from the window's first (committed) token on; None for a prefill window."""
    layout = read_layout(model)
    router = RouterCapture()
    draft = SelfDraft().open(layout, n_ctx=int(trace.positions.max()) + n_rows + 8, tap=True, capture=router)
    try:
        if restrict:
            counts = routing_counts(trace.experts, trace.n_expert)
            allowed = select(counts, np.ones(counts.shape, dtype=bool), Capacity(restrict))
            draft.tap.restrict_to(np.ascontiguousarray(allowed))
        return _run_ahead(trace, windows, draft, router, n_rows)
    finally:
        draft.close()


def _run_ahead(trace: RoutingTrace, windows, draft: Session, router: RouterCapture, n_rows: int):
    rows: list[np.ndarray | None] = []
    start = 0
    for a, b, fed in windows:
        if a == b:  # a prompt: the draft prefills it
            draft.reset()
            draft.decode(trace.tokens[a:fed].tolist())
            router.clear()
            start = a
            rows.append(None)
            continue
        draft.rollback(a - start)  # the committed tokens before this window's first
        if draft.n_past < a - start:  # the ones the last window committed
            draft.decode(trace.tokens[start + draft.n_past : a].tolist())
            router.clear()
        pending, out = [int(trace.tokens[a])], []
        for _ in range(n_rows):
            logits = draft.decode(pending)
            out.append(router.last_row_ranking(trace.n_layer, trace.experts.shape[2]))
            pending = [int(np.argmax(logits[-1]))]
        rows.append(np.stack(out, axis=1))
        draft.rollback(a - start + 1)  # keep the committed token, forget the drafted ones
        print(f"\rdrafting ahead: window {len(rows)}/{len(windows)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows
