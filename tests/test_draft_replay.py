"""draft_replay: the self-draft's rows ahead of each window, aligned with the recorded trace, and
`moespac sim --draft-ahead` replaying them (real llama.cpp on a tiny synthetic MoE)."""

import json

import pytest

from moespac_gguf import cli
from moespac_gguf.core.layout import read_layout
from moespac_gguf.sim.draft_replay import self_draft_rows
from moespac_gguf.sim.record import record
from moespac_gguf.sim.simulate import make_windows

PROMPTS = [
    {"text": "hello there", "category": "", "question_id": 0},
    {"text": "the quick brown fox", "category": "", "question_id": 1},
]


@pytest.fixture(scope="module")
def traced(tiny_moe, tmp_path_factory):
    model = tiny_moe()
    path = tmp_path_factory.mktemp("draft_replay") / "t.npz"
    record(model, PROMPTS, 12, progress=False).save(path)
    return model, path


def test_row_zero_of_layer_zero_is_the_targets_own_routing(traced):
    """Up to the first MoE layer the self-draft computes what the target does: its ranking of the
    committed token (row 0) in layer 0 must name the trace's picks for that token, window by window.
    A row taken one token early or late would not."""
    from moespac_gguf.sim.simulate import load_trace

    model, path = traced
    trace = load_trace(path)
    windows = make_windows(trace, 1.0, 0.7)
    rows = self_draft_rows(trace, windows, str(model), 3)
    assert len(rows) == len(windows)
    decoded = 0
    for (a, b, _), r in zip(windows, rows):
        if a == b:
            assert r is None
            continue
        assert r.shape == (trace.n_layer, 3, trace.k)
        assert set(r[0, 0].tolist()) == set(trace.experts[0, a].tolist()), f"window at token {a}"
        decoded += 1
    assert decoded >= 2 * 6  # both prompts' windows were checked


def test_sim_draft_ahead_runs_the_self_draft(traced, capsys):
    model, path = traced
    layout = read_layout(model)
    budget = str(int(layout.other_bytes + 6 * layout.mean_bytes_per_expert))
    args = [
        "sim",
        "--trace",
        str(path),
        "--model",
        str(model),
        "--mem-budget",
        budget,
        "--pinned",
        "--draft-k",
        "1",
        "--acceptance",
        "0.7",
        "--json",
    ]
    assert cli.main(args) == 0
    without = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "--draft-ahead", "3"]) == 0
    captured = capsys.readouterr()
    ahead = json.loads(captured.out)
    assert "drafting ahead" in captured.err  # llama.cpp ran the self-draft over the windows
    assert ahead["n_windows"] == without["n_windows"] and ahead["capacity_experts"] == 6
    # three draft decodes per window at most instead of K = 1: the modeled time grows by the difference
    assert ahead["tokens_per_s"] != without["tokens_per_s"]
