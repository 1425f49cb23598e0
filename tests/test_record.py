"""`moespac trace` records greedy generations with the routing tap; `moespac perplexity` scores text."""

import json
import math

import numpy as np
import pytest

from moespac_gguf.cli import main as moespac
from moespac_gguf.core.prompts import load_prompts
from moespac_gguf.demo.perplexity import perplexity, windows
from moespac_gguf.sim.trace import RoutingTrace


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"question_id": i, "category": c, "turns": [t, "second turn"]}
        for i, (c, t) in enumerate(
            [
                ("writing", "hello world, write a poem"),
                ("qa", "the answer is"),
                ("math", "one plus one is"),
                ("coding", "def hello(): return"),
            ]
        )
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _trace(model, prompts, out, limit=3, n=6):
    assert (
        moespac(
            [
                "trace",
                "-m",
                str(model),
                "--prompts",
                str(prompts),
                "--limit",
                str(limit),
                "-n",
                str(n),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return RoutingTrace.load(out)


def test_trace_records_prompt_and_decode_tokens(tiny_moe, prompts, tmp_path, capsys):
    model = tiny_moe(n_layer=3)
    t = _trace(model, prompts, tmp_path / "a.npz")
    assert t.n_layer == 3 and t.k == 2 and t.n_expert == 8
    assert set(np.unique(t.sequence)) == {0, 1, 2}
    assert (t.experts >= 0).all(), "every recorded token is routed in every layer"
    for seq in range(3):
        rows = t.sequence == seq
        ph = t.phase[rows]
        assert ph[0] == 0 and ph[-1] == 1 and (np.diff(ph) >= 0).all()  # prompt, then decode
        assert (t.positions[rows] == np.arange(rows.sum())).all()
        assert 1 <= (ph == 1).sum() <= 6
    assert t.meta["prompt_file"].endswith("prompts.jsonl") and t.meta["model"] == model.name
    assert t.meta["question_ids"] == [0, 1, 2]
    assert (t.weights > 0).all() and (t.weights <= 1).all()
    # a second run routes identically (greedy, deterministic)
    again = _trace(model, prompts, tmp_path / "b.npz")
    assert np.array_equal(again.experts, t.experts) and np.array_equal(again.tokens, t.tokens)
    assert "wrote" in capsys.readouterr().out


def test_trace_errors_are_one_line(tiny_moe, prompts, tmp_path, capsys):
    assert (
        moespac(
            ["trace", "-m", str(tmp_path / "missing.gguf"), "--prompts", str(prompts), "--out", str(tmp_path / "x.npz")]
        )
        == 2
    )
    assert (
        moespac(
            [
                "trace",
                "-m",
                str(tiny_moe()),
                "--prompts",
                str(tmp_path / "nope.jsonl"),
                "--out",
                str(tmp_path / "x.npz"),
            ]
        )
        == 2
    )
    dense = tiny_moe(arch="llama", n_expert=0)
    assert moespac(["trace", "-m", str(dense), "--prompts", str(prompts), "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert "not an MoE" in err and "Traceback" not in err


def test_prompt_selection(prompts):
    assert [r["question_id"] for r in load_prompts(prompts, 2)] == [0, 1]
    assert [r["question_id"] for r in load_prompts(prompts, 2, "spread")] == [0, 3]
    assert len(load_prompts(prompts)) == 4


def test_perplexity_on_a_tiny_model(tiny_moe, tmp_path):
    model = tiny_moe()
    text = "hello world, the model reads this text and predicts the next byte of it. " * 40
    r = perplexity(model, text, n_ctx=64, max_chunks=4, progress=False)
    assert r["n_chunks"] == 4 and r["n_scored"] == 4 * 31
    assert math.isfinite(r["perplexity"]) and 1 < r["perplexity"] < 1e4
    f = tmp_path / "t.txt"
    f.write_text(text)
    assert moespac(["perplexity", "-m", str(model), "-f", str(f), "--ctx", "64", "--max-chunks", "2"]) == 0
    assert windows(1000, 100, 3) == [0, 400, 900]
