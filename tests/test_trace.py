"""Routing-trace format, Mixtral import and trace statistics (LRU checked against a brute-force replay)."""

import json
from collections import OrderedDict

import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.cli.trace_import import main as main_import
from moespac_gguf.cli.trace_stats import main
from moespac_gguf.core.paths import SHARED_DIR
from moespac_gguf.sim.trace import RoutingTrace, import_mixtral_jsonl
from moespac_gguf.sim.trace_stats import layer_skew, lru_curve, lru_hit_rate, next_token_reuse

GSM8K = SHARED_DIR / "data" / "traces" / "mixtral8x7b_gsm8k_routing.jsonl"


def make_trace(experts, n_expert=8, sequence=None, positions=None):
    """A trace from an int array-like [n_layer, n_tokens, k]; one sequence unless told."""
    experts = np.asarray(experts, dtype=np.int16)
    n = experts.shape[1]
    sequence = np.zeros(n) if sequence is None else np.asarray(sequence)
    if positions is None:
        positions = np.concatenate([np.arange(c) for c in np.unique(sequence, return_counts=True)[1]])
    weights = np.where(experts >= 0, 1.0 / experts.shape[2], 0.0)
    return RoutingTrace(experts, weights, np.arange(n), positions, sequence, np.ones(n), n_expert, {"model": "toy"})


def brute_force_lru(trace, size):
    """The definition, spelled out: one OrderedDict per layer, routings in token then rank order."""
    hits = total = 0
    for layer in trace.experts:
        cache = OrderedDict()
        for token in layer:
            for e in token[token >= 0]:
                total += 1
                hits += e in cache
                cache[e] = None
                cache.move_to_end(e)
                if len(cache) > size:
                    cache.popitem(last=False)
    return hits / total


def random_trace(rng, n_layer=3, n_tokens=200, k=2, n_expert=8):
    experts = np.argsort(rng.random((n_layer, n_tokens, n_expert)), axis=-1)[..., :k]
    experts[rng.random(experts.shape) < 0.05] = -1  # some routings missing, as in padded traces
    sequence = np.sort(rng.integers(0, 4, n_tokens))
    return make_trace(experts, n_expert, sequence)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mixtral_rows(problem_id, layer, n_tokens):
    return [
        {
            "dataset": "toy",
            "problem_id": problem_id,
            "layer": layer,
            "token_idx": t,
            "experts": [(t + layer) % 8, (t + layer + 1) % 8],
            "gating_probs": [0.75, 0.25],
        }
        for t in range(n_tokens)
    ]


# --- format ------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    trace = random_trace(np.random.default_rng(0))
    trace.meta = {"model": "toy", "dates": ["2026-01-01"], "n": 3}
    path = tmp_path / "t.trace"  # no .npz suffix: save must write exactly this path
    trace.save(path)
    back = RoutingTrace.load(path)
    for name in ("experts", "weights", "tokens", "positions", "sequence", "phase"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
        assert getattr(back, name).dtype == getattr(trace, name).dtype
    assert (back.n_expert, back.meta, back.n_layer, back.n_tokens, back.k) == (8, trace.meta, 3, 200, 2)


@pytest.mark.parametrize("content", [None, b"not a zip at all", "npz-without-format"])
def test_load_rejects_non_traces(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content == "npz-without-format":
        np.savez(path, experts=np.zeros(3))
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(MoespacError) as info:
        RoutingTrace.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_inconsistent_shapes_are_rejected():
    with pytest.raises(MoespacError, match="positions"):
        RoutingTrace(
            np.zeros((2, 3, 2)), np.zeros((2, 3, 2)), np.zeros(3), np.zeros(4), np.zeros(3), np.zeros(3), 8, {}
        )
    with pytest.raises(MoespacError, match="expert ids"):
        make_trace([[[0, 8]]])


def test_select_concat_usage_counts():
    a = make_trace([[[0, 1], [1, 2], [2, -1]]], n_expert=4)
    b = make_trace([[[3, 0]]], n_expert=4)
    both = RoutingTrace.concat([a, b])
    np.testing.assert_array_equal(both.sequence, [0, 0, 0, 1])
    np.testing.assert_array_equal(both.usage_counts(), [[2, 2, 2, 1]])
    picked = both.select(both.positions > 0)
    np.testing.assert_array_equal(picked.experts[0], [[1, 2], [2, -1]])
    assert picked.meta == both.meta and picked.meta is not both.meta
    with pytest.raises(MoespacError):
        RoutingTrace.concat([a, make_trace([[[3, 0]]], n_expert=8)])


# --- Mixtral import ----------------------------------------------------------------------------------


def test_import_keeps_tokens_every_layer_has(tmp_path):
    # problem 7: layer 0 logged 4 tokens, layer 1 only 3 -> token 3 dropped; problem 2: 2 tokens everywhere
    rows = mixtral_rows(7, 0, 4) + mixtral_rows(7, 1, 3) + mixtral_rows(2, 0, 2) + mixtral_rows(2, 1, 2)
    trace = import_mixtral_jsonl(write_jsonl(tmp_path / "r.jsonl", rows))
    assert (trace.n_layer, trace.n_tokens, trace.k, trace.n_expert) == (2, 5, 2, 8)
    np.testing.assert_array_equal(trace.sequence, [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(trace.positions, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(trace.tokens, -1)
    np.testing.assert_array_equal(trace.phase, 1)
    np.testing.assert_array_equal(trace.experts[1, :, 0], [1, 2, 3, 1, 2])
    np.testing.assert_allclose(trace.weights[..., 0], 0.75)
    assert trace.meta["problem_ids"] == [7, 2] and trace.meta["dataset"] == "toy"
    assert (trace.meta["rows_read"], trace.meta["rows_dropped"]) == (11, 1)
    assert "every layer" in trace.meta["alignment"]


def test_import_rejects_bad_rows(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(mixtral_rows(0, 0, 1)[0]) + '\n{"layer": 1}\n')
    with pytest.raises(MoespacError, match=r"r.jsonl:2:"):
        import_mixtral_jsonl(path)
    with pytest.raises(MoespacError, match="not found"):
        import_mixtral_jsonl(tmp_path / "missing.jsonl")


def test_import_cli_writes_a_loadable_trace(tmp_path, capsys):
    src = write_jsonl(tmp_path / "r.jsonl", mixtral_rows(0, 0, 3) + mixtral_rows(0, 1, 2))
    assert main_import([str(src), "--out", str(tmp_path / "r.npz")]) == 0
    assert RoutingTrace.load(tmp_path / "r.npz").n_tokens == 2
    out = capsys.readouterr().out
    assert "every layer" in out and "1 dropped" in out


# --- statistics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,k,n_expert", [(1, 1, 4), (2, 2, 8), (3, 3, 16)])
def test_lru_matches_brute_force(seed, k, n_expert):
    trace = random_trace(np.random.default_rng(seed), k=k, n_expert=n_expert)
    sizes = [1, 2, 3, 5, n_expert, n_expert + 2]
    curve = lru_curve(trace, sizes)
    for size in sizes:
        assert curve[size] == pytest.approx(brute_force_lru(trace, size), abs=1e-12)


def test_lru_known_answers():
    one = make_trace([[[0], [1], [0], [2], [1], [0]]], n_expert=4)
    assert lru_hit_rate(one, 2) == pytest.approx(1 / 6)  # only the 2nd use of 0 hits
    assert lru_hit_rate(one, 3) == pytest.approx(3 / 6)  # every reuse hits
    # rank order inside a token counts: loading 2 evicts 0 before token 1's 0 is looked up
    two = make_trace([[[0, 1], [2, 0]]], n_expert=4)
    assert lru_hit_rate(two, 2) == 0.0
    assert lru_hit_rate(two, 3) == pytest.approx(1 / 4)
    # no reset between sequences: the second sequence starts with a warm cache
    warm = make_trace([[[0], [0]]], n_expert=4, sequence=[0, 1])
    assert lru_hit_rate(warm, 1) == 0.5


def test_layer_skew_known_answer():
    # 10 experts, top 10% = 1 expert: layer 0 gives expert 3 half of 10 routings; layer 1 is uniform-ish
    layer0 = [[3], [3], [3], [3], [3], [0], [1], [2], [4], [5]]
    layer1 = [[0], [1], [2], [3], [4], [5], [6], [7], [8], [9]]
    trace = make_trace([layer0, layer1], n_expert=10)
    np.testing.assert_allclose(layer_skew(trace), [0.5, 0.1])
    np.testing.assert_allclose(layer_skew(trace, top_frac=0.2), [0.6, 0.2])
    np.testing.assert_allclose(layer_skew(make_trace([[[0], [0], [1], [2]]], n_expert=4)), [0.5])  # at least 1


def test_next_token_reuse_known_answer():
    # sequence 0: {0,1} -> {1,2} (1/2) -> {3,4} (0); sequence 1: {3,4} must not count against {3,4}
    layer0 = [[0, 1], [1, 2], [3, 4], [3, 4]]
    # a token without routing in this layer breaks the chain on both sides
    layer1 = [[0, 1], [-1, -1], [0, 1], [0, 5]]
    trace = make_trace([layer0, layer1], sequence=[0, 0, 0, 1])
    np.testing.assert_allclose(next_token_reuse(trace), [0.25, np.nan])
    # tokens that are neighbours only after select() are not consecutive: nothing to measure
    gapped = make_trace([[[0, 1], [2, 3], [0, 1]]]).select([0, 2])
    np.testing.assert_allclose(next_token_reuse(gapped), [np.nan])


def test_stats_cli_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path / "..")  # the default heatmap goes to the current directory
    path = tmp_path / "t.npz"
    random_trace(np.random.default_rng(4)).save(path)
    assert main([str(path), "--json", "--png", str(tmp_path / "h.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert len(report["skew"]) == len(report["reuse"]) == 3
    assert report["lru"]["8"] == pytest.approx(brute_force_lru(random_trace(np.random.default_rng(4)), 8))
    assert main([str(path)]) == 0  # table mode, default heatmap in the current directory
    assert "experts cached" in capsys.readouterr().out and (tmp_path / ".." / "t.heatmap.png").exists()
    assert not (tmp_path / "t.heatmap.png").exists()  # never beside the input (shared data is read-only)


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"real Mixtral GSM8K trace not found at {GSM8K}")
def test_real_gsm8k_lru4_matches_published_range():
    trace = import_mixtral_jsonl(GSM8K)
    assert (trace.n_layer, trace.k, trace.n_expert) == (32, 2, 8)
    assert 0.54 <= lru_hit_rate(trace, 4) <= 0.62
