"""bench/sim_agreement.py: each benchmark contender replayed by the policy that models it, at the
capacity the run left it, against the measured decode speed."""

import importlib.util
import json

import numpy as np
import pytest

from moespac_gguf.core.layout import read_layout
from moespac_gguf.core.paths import REPO_ROOT
from moespac_gguf.sim.profiles import load_device, load_model
from moespac_gguf.sim.record import record
from moespac_gguf.sim.simulate import load_trace, simulate

spec = importlib.util.spec_from_file_location("sim_agreement", REPO_ROOT / "bench" / "sim_agreement.py")
sim_agreement = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sim_agreement)


def fake_run(model, layout, speeds: dict) -> dict:
    """A `moespac bench --json` run of `model` whose contenders measured `speeds` (decode tok/s), under a
    cap that leaves 7 experts after 1 MiB of anonymous memory and the non-expert weights."""
    b = layout.mean_bytes_per_expert
    cap = int(layout.other_bytes + 7 * b + (1 << 20))
    results = []
    for name, tps in speeds.items():
        r = {
            "name": name,
            "n_tokens": 20,
            "acceptance_rate": 0.5 if name != "llama.cpp+random" else None,
            "rss_anon_bytes": 1 << 20,
            "decode": {
                "tokens_per_s": tps,
                "bytes_read": 20 * 3 * b,
                "n_steps": 10,
                "n_drafted": 0 if name == "llama.cpp+random" else 20,
            },
        }
        if name == "moespac":
            r["engine"] = {"engine_budget_bytes": 3 * b, "budget_bytes": 4 * b, "pinned": True}
        results.append(r)
    return {
        "model": str(model),
        "draft": "draft.gguf",
        "mem_cap": cap,
        "prompts": "p.jsonl",
        "limit": 2,
        "n_predict": 12,
        "date": "today",
        "results": results,
    }


def test_rows_model_each_contender_at_its_capacity(tiny_moe, tmp_path):
    model = tiny_moe()
    layout = read_layout(model)
    trace_path = tmp_path / "t.npz"
    record(
        model,
        [
            {"text": "hello there", "category": "", "question_id": 0},
            {"text": "the quick brown fox", "category": "", "question_id": 1},
        ],
        12,
        progress=False,
    ).save(trace_path)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(
        json.dumps(
            {
                "flash_read_bps": 1e8,
                "memcpy_bps": 1e9,
                "mem_bps": 1e10,
                "cpu_s_per_token_expert": 1e-4,
                "page_in_latency_s": 1e-4,
                "fault_s_per_page": 5e-5,
                "step_overhead_s": 1e-3,
                "draft_s_per_token": 1e-3,
                "model": str(model),
            }
        )
    )
    device = load_device("local", calibration)
    run = fake_run(model, layout, {"llama.cpp+random": 2.0, "llama.cpp+sd": 3.0, "moespac": 4.0})
    # a second run of the same setup, twice as fast, drafting 1.5 tokens per step on average
    run2 = {
        **run,
        "date": "later",
        "results": [
            {
                **r,
                "decode": {
                    **r["decode"],
                    "tokens_per_s": 2 * r["decode"]["tokens_per_s"],
                    "n_drafted": 15 if r["decode"]["n_drafted"] else 0,
                },
            }
            for r in run["results"]
        ],
    }
    rows = sim_agreement.agreement([run, run2], trace_path, device)
    assert [(r["contender"], r["run"]) for r in rows] == [
        ("llama.cpp+random", "today"),
        ("moespac", "today"),
        ("(offline optimum)", "today"),
        ("llama.cpp+random", "later"),
        ("moespac", "later"),
        ("(offline optimum)", "later"),
        ("llama.cpp+sd", "today"),
        ("llama.cpp+sd", "later"),
    ]
    first = {r["contender"]: r for r in rows[:3]}
    # capacities: cap - anon - non-expert weights for llama.cpp+random; moespac its pinned budget
    assert first["llama.cpp+random"]["capacity_experts"] == 7
    assert first["moespac"]["capacity_experts"] == 3 == first["(offline optimum)"]["capacity_experts"]
    # each run replayed with its own mean K (adaptive drafting)
    assert [r["draft_k"] for r in rows[:6]] == [0, 2.0, 2.0, 0, 1.5, 1.5]
    assert all(r["modeled_tokens_per_s"] is None for r in rows[6:])  # read-ahead: listed, not modelled
    # a row's modeled speed is the simulator's own, against that run's measurement
    m = load_model(str(model))
    expected = simulate(
        load_trace(trace_path),
        "t",
        "lru-global",
        device,
        m,
        mem_budget=layout.other_bytes + 7 * layout.mean_bytes_per_expert,
        paging="fault",
    )
    r = first["llama.cpp+random"]
    assert r["modeled_tokens_per_s"] == pytest.approx(expected.tokens_per_s)
    assert r["ratio"] == pytest.approx(expected.tokens_per_s / 2.0)
    assert r["agrees"] == (abs(r["ratio"] - 1) <= 0.25)
    # nothing reads fewer bytes than the offline optimum at the same capacity, K and acceptance
    assert first["(offline optimum)"]["modeled_bytes_per_token"] <= first["moespac"]["modeled_bytes_per_token"]
    assert np.isclose(first["moespac"]["measured_bytes_per_token"], 3 * layout.mean_bytes_per_expert)
    # the verdict is on the means over the runs: measured 2 and 4 for llama.cpp+random
    means = {x["contender"]: x for x in sim_agreement.summary(rows)}
    assert means["llama.cpp+random"]["measured_mean"] == 3.0 and means["llama.cpp+random"]["runs"] == 2
    assert means["llama.cpp+random"]["ratio"] == pytest.approx(expected.tokens_per_s / 3.0)
    md = sim_agreement.markdown(rows, [run, run2], device)
    assert md.count("\n| ") == 8 + 1 + 2 + 1 and "2 run(s)" in md


def test_run_ahead_is_the_recorded_lookahead_else_the_runtimes_default():
    from moespac_gguf.api.options import DRAFT_AHEAD

    assert sim_agreement.run_ahead({"draft_ahead": 10}, {"draft": "self"}) == 10
    assert sim_agreement.run_ahead({"draft_ahead": 0}, {"draft": "self"}) == 0  # it held every expert
    assert sim_agreement.run_ahead({}, {"draft": "self"}) == DRAFT_AHEAD  # a run from before it was recorded
    assert sim_agreement.run_ahead({}, {"draft": "draft.gguf"}) == 0
