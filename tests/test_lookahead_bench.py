"""bench/lookahead.py: the target's own routing as a perfect draft's lookahead, and the recall of a
draft's rows counted against it."""

import importlib.util

import numpy as np

from moespac_gguf.core.paths import REPO_ROOT
from moespac_gguf.sim.simulate import make_windows
from moespac_gguf.sim.trace import DECODE, PROMPT, RoutingTrace

spec = importlib.util.spec_from_file_location("lookahead", REPO_ROOT / "bench" / "lookahead.py")
lookahead = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lookahead)


def two_prompt_trace(seed: int = 0) -> RoutingTrace:
    """Two sequences of 4 prompt rows then 9 decoded rows, 3 layers, top-2 of 6."""
    rng = np.random.default_rng(seed)
    phase = np.tile(np.r_[[PROMPT] * 4, [DECODE] * 9], 2)
    n = len(phase)
    experts = np.stack([np.stack([rng.choice(6, 2, replace=False) for _ in range(n)]) for _ in range(3)])
    sequence = np.repeat([0, 1], n // 2)
    positions = np.tile(np.arange(n // 2), 2)
    return RoutingTrace(
        experts.astype(np.int16),
        np.zeros(experts.shape),
        np.zeros(n, dtype=np.int64),
        positions,
        sequence,
        phase,
        6,
        {"arch": "llama"},
    )


def test_oracle_rows_are_the_next_tokens_routing_within_the_sequence():
    trace = two_prompt_trace()
    windows = make_windows(trace, 1.5, 0.6)
    rows = lookahead.oracle_rows(trace, windows, 5)
    assert len(rows) == len(windows)
    for (a, b, _), r in zip(windows, rows):
        if a == b:
            assert r is None
            continue
        for j in range(5):
            t = a + j
            inside = t < trace.n_tokens and trace.sequence[t] == trace.sequence[a]
            expected = trace.experts[:, t] if inside else np.full((3, 2), -1)
            np.testing.assert_array_equal(r[:, j], expected)


def test_recall_counts_the_picks_a_draft_names():
    trace = two_prompt_trace(1)
    windows = make_windows(trace, 1.0, 0.5)
    perfect = lookahead.oracle_rows(trace, windows, 4)
    assert lookahead.recall_by_row(trace, windows, perfect) == [1.0] * 4
    # naming only each row's first pick finds half the picks, wherever the rows are the target's
    half = [None if r is None else np.where(np.arange(2) == 0, r, -1) for r in perfect]
    assert lookahead.recall_by_row(trace, windows, half) == [0.5] * 4
