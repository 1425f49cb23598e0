"""The trace simulator: windows, replay, the device model, profiles and the CLI."""

import dataclasses
import json
import re

import numpy as np
import pytest

from moespac_gguf import MoespacError, cli
from moespac_gguf.core.paths import SHARED_DIR
from moespac_gguf.residency.baselines import Lru, OnDemand
from moespac_gguf.residency.policy import POLICIES, Capacity
from moespac_gguf.sim.profiles import DATA_DIR, Device, load_device, load_model, names
from moespac_gguf.sim.simulate import Replay, draft_decodes, make_windows, replay, simulate, timing
from moespac_gguf.sim.sweep import synthetic_routing
from moespac_gguf.sim.trace import RoutingTrace, import_mixtral_jsonl
from moespac_gguf.sim.trace_stats import lru_hit_rate

GSM8K = SHARED_DIR / "data" / "traces" / "mixtral8x7b_gsm8k_routing.jsonl"
MIXTRAL = load_model("mixtral-8x7b")
M2 = load_device("m2-macbook")


def make_trace(experts, sequence=None, n_expert=8) -> RoutingTrace:
    experts = np.asarray(experts, dtype=np.int16)
    n = experts.shape[1]
    sequence = np.zeros(n, dtype=np.int32) if sequence is None else np.asarray(sequence)
    positions = np.concatenate([np.arange(c) for c in np.bincount(sequence)])
    return RoutingTrace(
        experts, np.zeros(experts.shape), np.full(n, -1), positions, sequence, np.ones(n), n_expert, {"arch": "mixtral"}
    )


def random_mixtral_trace(seed: int, n_tokens: int = 120) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    experts = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(n_tokens)]) for _ in range(32)])
    return make_trace(experts, np.repeat([0, 1], [n_tokens // 3, n_tokens - n_tokens // 3]))


@pytest.mark.parametrize("size", [1, 3, 4, 6])
def test_lru_equals_trace_stats_replay(size):
    trace = random_mixtral_trace(size)
    result = simulate(trace, "t", "lru", M2, MIXTRAL, cache_per_layer=size)
    assert result.hit_rate == lru_hit_rate(trace, size)


@pytest.mark.skipif(not GSM8K.is_file(), reason=f"real Mixtral GSM8K trace not found at {GSM8K}")
def test_lru_on_the_real_mixtral_gsm8k_trace():
    trace = import_mixtral_jsonl(GSM8K)
    assert 0.54 <= simulate(trace, "gsm8k", "lru", M2, MIXTRAL, cache_per_layer=4).hit_rate <= 0.62


def test_windows_cover_each_sequence_in_order_and_respect_k():
    trace = random_mixtral_trace(0, 200)
    for k, a in ((0, 0.7), (4, 0.7), (3, 1.0), (5, 0.0)):
        windows = make_windows(trace, k, a, seed=1)
        assert [s for s, _, _ in windows[1:]] == [e for _, e, _ in windows[:-1]] and windows[-1][1] == 200
        sizes = np.array([e - s for s, e, _ in windows])
        assert sizes.min() >= 1 and sizes.max() <= k + 1
        assert all(trace.sequence[s] == trace.sequence[f - 1] for s, _, f in windows)
        # the target computes K + 1 rows whatever it accepts, up to the end of the sequence
        ends = {66, 200}
        assert all(f == min(s + k + 1, min(x for x in ends if x > s)) for s, _, f in windows)
        if a in (0.0, 1.0):  # deterministic sizes, cut only at the sequence boundary (token 66)
            assert set(sizes[:-1].tolist()) - {66 % (k + 1), 134 % (k + 1)} <= {1 if a == 0 else k + 1}
    assert make_windows(trace, 4, 0.7, seed=3) == make_windows(trace, 4, 0.7, seed=3)


def test_a_fractional_k_mixes_floor_and_ceil_windows():
    trace = make_trace(np.zeros((1, 20000, 2)), n_expert=8)
    fed = np.array([f - s for s, _, f in make_windows(trace, 1.25, 0.0, seed=0)])[:-1]  # last: cut short
    assert set(fed.tolist()) == {1 + 1, 1 + 2} and abs((fed - 1).mean() - 1.25) < 0.02


def test_window_sizes_follow_the_truncated_geometric():
    trace = make_trace(np.zeros((1, 20000, 2)), n_expert=8)
    sizes = np.diff([s for s, _, _ in make_windows(trace, 4, 0.7, seed=0)])
    expected = (1 - 0.7**5) / (1 - 0.7)  # E[min(accepted, K) + 1]
    assert abs(sizes.mean() - expected) < 0.05


def test_a_window_counts_each_expert_once():
    # one layer, a window of 3 tokens that all route to experts 0 and 1 (then 2): 2 misses, not 6
    trace = make_trace([[[0, 1], [1, 0], [0, 1], [2, 0]]])
    windows = [(0, 3, 3), (3, 4, 4)]
    rep = replay(trace, windows, OnDemand(), Capacity(2, 2))
    assert rep.needed.tolist() == [2, 2] and rep.hits.tolist() == [0, 0] and rep.tokens.tolist() == [3, 1]


def test_a_window_needs_the_experts_of_rows_it_rejects():
    # K = 2, nothing accepted: the window produces token 0 but computes rows 0..2, so experts 1 and 2
    # (of the rows standing in for the rejected drafts) are needed too
    trace = make_trace([[[0], [1], [2], [0]]], n_expert=3)
    windows = make_windows(trace, 2, 0.0)
    assert windows == [(0, 1, 3), (1, 2, 4), (2, 3, 4), (3, 4, 4)]
    rep = replay(trace, windows, OnDemand(), Capacity(0))
    assert rep.tokens.tolist() == [1, 1, 1, 1] and rep.needed.tolist() == [3, 3, 2, 1]


def test_a_prompt_is_one_uncounted_prefill_window_that_warms_the_cache():
    # sequence 0: prompt rows 0-2 (experts 0, 1, 2), decode rows 3-4 (experts 2, 0); one layer, LRU of 2
    trace = make_trace([[[0], [1], [2], [2], [0]]], n_expert=3)
    trace = dataclasses.replace(trace, phase=np.array([0, 0, 0, 1, 1]))
    windows = make_windows(trace, 0, 0.7)
    assert windows == [(0, 0, 3), (3, 4, 4), (4, 5, 5)]  # the prefill produces no token
    rep = replay(trace, windows, Lru(), Capacity(2, 2))
    # the prefill left experts 1 and 2 cached: row 3 (expert 2) hits, row 4 (expert 0) misses
    assert rep.tokens.tolist() == [1, 1] and rep.needed.tolist() == [1, 1] and rep.hits.tolist() == [1, 0]
    decode_only = trace.select(trace.phase == 1)
    assert replay(decode_only, make_windows(decode_only, 0, 0.7), Lru(), Capacity(2, 2)).hits.tolist() == [0, 0]


def test_timing_known_answer():
    device = Device(
        "d",
        mem_bytes=1e9,
        mem_bps=100.0,
        flash_read_bps=10.0,
        page_in_latency_s=0.5,
        memcpy_bps=1.0,
        step_overhead_s=1.0,
    )
    rep = Replay(
        tokens=np.array([2, 1]),
        needed=np.array([3, 1]),
        hits=np.array([1, 1]),
        prefetched=np.array([0, 4]),
        preloaded=2,
    )
    r = timing(rep, device, expert_bytes=10.0, other_bytes=70.0, draft_decodes=1)
    # window 0: compute (70 + 30)/100 + 1 = 2, draft 1, 2 misses x (1 + 0.5) = 3  -> 6 s
    # window 1: compute (70 + 10)/100 + 1 = 1.8, draft 1, prefetch 4 x 1.5 = 6 > 2.8 -> stall 3.2 -> 6 s
    assert r["tokens_per_s"] == pytest.approx(3 / 12)
    assert r["hit_rate"] == pytest.approx(2 / 4)
    assert r["bytes_per_token"] == pytest.approx((2 + 4) * 10 / 3)
    assert r["prefetch_bytes_per_token"] == pytest.approx(40 / 3)
    assert r["stall_s_per_token"] == pytest.approx((3 + 3.2) / 3)
    assert r["preload_bytes"] == 20
    # no spare core (io_overlap 0): window 1's prefetch stalls whole, 6 s instead of 3.2
    busy = dataclasses.replace(device, io_overlap=0.0)
    assert timing(rep, busy, 10.0, 70.0, draft_decodes=1)["stall_s_per_token"] == pytest.approx((3 + 6) / 3)


def test_the_stream_window_serves_the_latest_misses_free():
    # no cache at all, a window of one expert: a need streamed in the previous window hits
    trace = make_trace([[[0], [0], [1], [0], [0]]], n_expert=2)
    windows = [(i, i + 1, i + 1) for i in range(5)]
    rep = replay(trace, windows, OnDemand(), Capacity(0), stream_window=1)
    assert rep.hits.tolist() == [0, 1, 0, 0, 1] and rep.needed.tolist() == [1] * 5
    assert replay(trace, windows, OnDemand(), Capacity(0)).hits.tolist() == [0] * 5


def test_fault_paging_costs_a_fault_per_page():
    device = Device(
        "d",
        mem_bytes=1e9,
        mem_bps=100.0,
        flash_read_bps=4096.0,
        page_in_latency_s=0.5,
        memcpy_bps=1.0,
        step_overhead_s=0.0,
        fault_s_per_page=0.25,
    )
    assert device.load_s(3 * 4096) == pytest.approx(3 + 0.5)  # one read: bandwidth + latency
    assert device.load_s(3 * 4096 + 1, "fault") == pytest.approx(4 * 0.25)  # a fault per page touched
    rep = Replay(tokens=np.array([1]), needed=np.array([2]), hits=np.array([0]), prefetched=np.array([0]), preloaded=0)
    r = timing(rep, device, expert_bytes=8192.0, other_bytes=0.0, draft_decodes=0, paging="fault")
    assert r["stall_s_per_token"] == pytest.approx(2 * 2 * 0.25)
    with pytest.raises(MoespacError, match="unknown paging"):
        device.load_s(1.0, "mmap")


def test_belady_is_the_best_hit_rate_of_the_demand_policies_on_a_random_trace():
    trace, profile = random_mixtral_trace(7), random_mixtral_trace(8)
    rates = {p: simulate(trace, "t", p, M2, MIXTRAL, cache_per_layer=3, draft_k=3, profile=profile) for p in POLICIES}
    for p in ("ondemand", "lru", "lru-global", "static", "static-layers"):
        assert rates["belady"].hit_rate >= rates[p].hit_rate, p
    for p in POLICIES:
        assert rates["belady"].bytes_per_token <= rates[p].bytes_per_token, p


def test_mem_budget_sets_the_capacity_after_the_other_weights():
    trace = random_mixtral_trace(0)
    _, expert_b, other_b = MIXTRAL.sizes("Q4_K_M")
    r = simulate(trace, "t", "lru", M2, MIXTRAL, mem_budget=other_b + 10.5 * expert_b)
    assert r.capacity_experts == 10 and r.cache_per_layer is None
    with pytest.raises(MoespacError, match="smaller than"):
        simulate(trace, "t", "lru", M2, MIXTRAL, mem_budget=other_b / 2)


def test_model_specs_match_public_file_sizes_and_every_number_has_a_source():
    _, expert_b, other_b = MIXTRAL.sizes("Q4_K_M")
    assert 256 * expert_b + other_b == pytest.approx(26.44e9, rel=0.02)  # TheBloke's Q4_K_M file: 26.44 GB
    for kind in ("devices", "models"):
        for name in names(kind):
            lines = (DATA_DIR / kind / f"{name}.toml").read_text().splitlines()
            for i, line in enumerate(lines):
                if re.match(r"^\w+\s*=\s*[-\d.]", line):
                    assert "#" in line or lines[i - 1].startswith("#"), f"{kind}/{name}.toml:{i + 1} has no source"
            (load_device if kind == "devices" else load_model)(name)


def test_local_device_reads_the_calibration(tmp_path):
    path = tmp_path / "calibration.json"
    with pytest.raises(MoespacError, match="moespac calibrate"):
        load_device("local", path)
    keys = {
        "flash_read_bps": 2e9,
        "memcpy_bps": 8e9,
        "mem_bps": 2e10,
        "cpu_s_per_token_expert": 1e-4,
        "page_in_latency_s": 2e-4,
    }
    path.write_text(json.dumps(keys))
    device = load_device("local", path)
    assert (device.mem_bps, device.flash_read_bps, device.step_overhead_s) == (2e10, 2e9, 0.0)
    assert device.costs(1e6).cpu_s_per_token_expert == 1e-4
    assert device.pass_s(64, 1e8, 1e9) == pytest.approx(64 * 1e-4)  # measured, not bandwidth-derived
    assert device.draft_s == 0.0
    path.write_text(json.dumps({**keys, "step_overhead_s": 1e-3, "draft_s_per_token": 5e-3}))
    assert (load_device("local", path).step_overhead_s, load_device("local", path).draft_s) == (1e-3, 5e-3)
    path.write_text(json.dumps({**keys, "model": "/models/demo.gguf"}))
    with pytest.raises(MoespacError, match="calibrated on /models/demo.gguf"):
        simulate(random_mixtral_trace(0, 20), "t", "lru", load_device("local", path), MIXTRAL)
    path.write_text(json.dumps({k: v for k, v in keys.items() if k != "mem_bps"}))
    with pytest.raises(MoespacError, match="mem_bps"):
        load_device("local", path)


def test_synthetic_routing_has_the_model_shape_and_is_seeded():
    olmoe = load_model("olmoe-1b-7b")
    a, b = synthetic_routing(olmoe, 0), synthetic_routing(olmoe, 1)
    assert a.experts.shape == (16, 256, 8) and a.n_expert == 64
    assert all(len(set(row)) == 8 for row in a.experts.reshape(-1, 8).tolist())
    assert np.array_equal(a.experts, synthetic_routing(olmoe, 0).experts) and not np.array_equal(a.experts, b.experts)


def test_cli_json_has_the_promised_keys(tmp_path, capsys):
    path = tmp_path / "t.npz"
    random_mixtral_trace(0).save(path)
    assert cli.main(["sim", "--trace", str(path), "--policy", "lru", "--cache-per-layer", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"hit_rate", "bytes_per_token", "tokens_per_s", "pinned", "stream_window"} <= set(result)
    assert result["pinned"] is False and result["stream_window"] == 0
    assert result["hit_rate"] == lru_hit_rate(random_mixtral_trace(0), 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--policy", "nope"], "unknown policy"),
        (["--device", "nope"], "unknown device"),
        (["--model", "nope"], "unknown model"),
        (["--model", "qwen3-30b-a3b"], "routes 32 layers"),
        (["--policy", "static"], "needs --profile"),
        (["--quant", "Q2_K"], "no quant"),
        (["--cache-per-layer", "9"], "0..8"),
    ],
)
def test_cli_bad_inputs_are_one_line_errors(tmp_path, capsys, args, message):
    path = tmp_path / "t.npz"
    random_mixtral_trace(0, 20).save(path)
    assert cli.main(["sim", "--trace", str(path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_cli_missing_trace_is_a_one_line_error(capsys):
    assert cli.main(["sim", "--trace", "/nonexistent/trace.npz"]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and err.count("\n") == 1


def test_a_gguf_file_is_a_model_spec_with_its_exact_sizes(tiny_moe, tmp_path):
    from moespac_gguf.core.layout import read_layout

    path = tiny_moe()
    layout = read_layout(path)
    model = load_model(str(path))
    assert (model.n_layer, model.n_expert, model.top_k) == (2, 8, 2)
    assert model.sizes(None) == ("file", layout.mean_bytes_per_expert, float(layout.other_bytes))
    rng = np.random.default_rng(0)
    trace = make_trace(np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(30)]) for _ in range(2)]))
    r = simulate(trace, "t", "moespac", M2, model, mem_budget=layout.other_bytes + 8 * layout.mean_bytes_per_expert)
    assert r.capacity_experts == 8 and 0 < r.hit_rate < 1


def test_draft_decodes_without_and_with_a_lookahead():
    windows = [
        (0, 0, 4),  # a prompt
        (4, 6, 7),  # 2 drafted, 1 accepted: the run is thrown away
        (6, 9, 9),  # 2 drafted, both accepted
        (9, 10, 10),  # none drafted; after a window that accepted all, its run may carry over
        (10, 10, 14),  # the next prompt: the draft starts over
        (14, 15, 15),
    ]
    assert draft_decodes(windows, 1.5, 0.5) == 1.5  # no lookahead: K per window
    # running 4 ahead: max(k, 4) rows fresh; carried over (chance A = 0.5) only the 3 rows window 2 used
    np.testing.assert_allclose(draft_decodes(windows, 1.5, 0.5, draft_ahead=4), [4, 4, 0.5 * 3 + 0.5 * 4, 4])


def test_draft_ahead_needs_the_models_gguf_file():
    trace = random_mixtral_trace(0, 20)
    with pytest.raises(MoespacError, match="--draft-ahead"):
        simulate(trace, "t", "moespac", M2, MIXTRAL, cache_per_layer=2, draft_ahead=2)
    with pytest.raises(MoespacError, match="0 or more"):
        simulate(trace, "t", "moespac", M2, MIXTRAL, cache_per_layer=2, draft_ahead=-3, self_draft="m.gguf")


def test_a_toml_file_is_a_model_spec(tmp_path, capsys):
    spec = tmp_path / "my-mixtral.toml"
    spec.write_text((DATA_DIR / "models" / "mixtral-8x7b.toml").read_text().replace('"Mixtral-8x7B"', '"My-Mixtral"'))
    trace = tmp_path / "t.npz"
    random_mixtral_trace(0, 20).save(trace)
    args = ["sim", "--trace", str(trace), "--policy", "lru", "--cache-per-layer", "4", "--json"]
    assert cli.main([*args, "--model", str(spec)]) == 0
    mine = json.loads(capsys.readouterr().out)
    assert cli.main([*args, "--model", "mixtral-8x7b"]) == 0
    shipped = json.loads(capsys.readouterr().out)
    assert mine["model"] == "My-Mixtral" and mine["bytes_per_token"] == shipped["bytes_per_token"]
    spec.write_text("name = 'broken'\n")
    assert cli.main([*args, "--model", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "lacks n_layer" in err and err.count("\n") == 1


@pytest.mark.parametrize("escape", ["ABS", "../models/mixtral-8x7b", "models/../models/mixtral-8x7b"])
def test_a_model_name_cannot_reach_a_file_outside_the_data_dir(tmp_path, capsys, escape):
    # an absolute "name" used to work by accident: DATA_DIR / "models" / "/abs/x.toml" is /abs/x.toml
    name = str(DATA_DIR / "models" / "mixtral-8x7b") if escape == "ABS" else escape
    with pytest.raises(MoespacError, match="unknown model"):
        load_model(name)
    with pytest.raises(MoespacError, match="unknown device"):
        load_device(str(DATA_DIR / "devices" / "m2-macbook"))
    trace = tmp_path / "t.npz"
    random_mixtral_trace(0, 20).save(trace)
    assert cli.main(["sim", "--trace", str(trace), "--model", name]) == 2
    err = capsys.readouterr().err
    assert "unknown model" in err and err.count("\n") == 1
