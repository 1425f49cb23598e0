"""`moespac bench --gpu-budget`: the GPU mode (tools.bench_gpu).

The CPU suite checks the pure parts: llama.cpp's --n-cpu-moe N for a budget, the LRU policy
(utility.RecencyEstimator through SlotFiller.follow), the table and the CLI's refusals. The
test marked gpu runs every contender end to end on a GPU device (Vulkan on lavapipe in CI) with
F32 synthetic models, where every placement must give the same greedy output.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from test_slot_filler import FakeSlots, FixedPlanner, event

from moespac_gguf import cli
from moespac_gguf.core.layout import MoeLayer, MoeLayout, TensorSpan, read_layout
from moespac_gguf.residency.costs import DEFAULT_COSTS
from moespac_gguf.residency.slots import SlotFiller
from moespac_gguf.residency.utility import RecencyEstimator
from moespac_gguf.tools.bench import BenchConfig
from moespac_gguf.tools.bench_gpu import GPU_CONTENDERS, LRU_INSERTS_PER_LAYER, markdown, ncmoe_layers


def fake_layout(bytes_per_expert: dict[int, int], n_layer: int, n_expert: int = 4) -> MoeLayout:
    """A layout whose MoE layer i has experts of bytes_per_expert[i] bytes (the others are dense)."""
    layers = [
        MoeLayer(
            i,
            {f"blk.{i}.ffn_up_exps.weight": TensorSpan(f"blk.{i}.ffn_up_exps.weight", "F32", 0, b * n_expert, b)},
            None,
        )
        for i, b in sorted(bytes_per_expert.items())
    ]
    total = sum(b * n_expert for b in bytes_per_expert.values())
    return MoeLayout("fake.gguf", "qwen3moe", n_layer, n_expert, 2, 0, 0, 64, 32, total, total, 0, layers)


def test_ncmoe_is_the_fewest_leading_layers_that_leave_the_rest_within_the_budget():
    # layer 0 dense; MoE layers 1..4 hold 40, 40, 80, 120 bytes of experts
    layout = fake_layout({1: 10, 2: 10, 3: 20, 4: 30}, n_layer=5)
    # on the GPU from layer N on: N<=1: 280, N=2: 240, N=3: 200, N=4: 120, N=5: 0
    cases = {10**6: 0, 280: 0, 279: 2, 240: 2, 239: 3, 200: 3, 199: 4, 120: 4, 119: 5, 0: 5}
    assert {budget: ncmoe_layers(layout, budget) for budget in cases} == cases
    # -ngl 3 puts layers 3 and 4 on the GPU (the output layer counts as one): the others hold nothing there
    assert ncmoe_layers(layout, 200, n_gpu_layers=3) == 0
    assert ncmoe_layers(layout, 199, n_gpu_layers=3) == 4
    assert ncmoe_layers(layout, 239, n_gpu_layers=6) == ncmoe_layers(layout, 239, n_gpu_layers=-1) == 3


def test_recency_ranks_the_last_used_experts_first():
    est = RecencyEstimator(2, 8)
    ids = np.array([[[1, 2], [3, 1]], [[-1, -1], [5, 6]]])  # layer 1 routes only the second row
    est.observe_verification([10, 11], ids)
    est.observe_verification([12], np.array([[[4, 2]], [[6, 7]]]), prefill=False)
    u = est.predict()
    assert u[0, [4, 2]].tolist() == [3, 3] and u[0, [3, 1]].tolist() == [2, 2] and u[0, 0] == 0
    assert u[1, [6, 7]].tolist() == [3, 3] and u[1, 5] == 2 and u[1, :5].sum() == 0
    assert np.argsort(-u[0], kind="stable")[:4].tolist() == [2, 4, 1, 3]  # most recent first


def test_a_filler_following_recency_holds_each_layers_most_recently_used(tiny_moe):
    layout = read_layout(tiny_moe(n_layer=2))
    cache = FakeSlots(2, 8, [2, 2])
    planner = FixedPlanner(None)
    closed = []
    planner.close = lambda: closed.append(True)
    filler = SlotFiller(cache, layout, DEFAULT_COSTS, on_gpu=True, planner=planner)
    filler.follow(RecencyEstimator(2, 8), margin=0.0, planner=None, max_copies=3)
    assert closed == [True] and filler.planner is None
    filler.on_verify(event(2, [[1, 2]] * 5 + [[3, 4]], 2))  # 1 and 2 far more used, 3 and 4 last
    filler.on_draft([])
    assert len(cache.copied) == 3  # max_copies: 4 wanted, 3 copied this step
    filler.on_verify(event(2, [[5, 6]], 2))
    filler.on_draft([])
    filler.on_verify(event(2, [[5, 6]], 2))
    filler.on_draft([])
    for layer in (0, 1):
        assert sorted(np.flatnonzero(cache.map[layer] >= 0)) == [5, 6]  # LRU: the frequent 1, 2 are gone
    assert filler.stats()["planned_steps"] == 0


def report_with(device: str, same: bool) -> dict:
    row = {
        "name": "lru",
        "draft": None,
        "device": device,
        "n_cpu_moe": None,
        "gpu_expert_bytes": 1 << 20,
        "tokens_per_s": 1.5,
        "acceptance_rate": None,
        "h2d_bytes": 3 << 20,
        "hit_rate": 0.5,
        "slots": {"slots": 12, "copies": 40},
        "decode": {"tokens_per_s": 2.0},
        "same_output": same,
        "same_prompts": "1/2",
    }
    return {"results": [row], "device": device, "reference": "llama.cpp+ncmoe", "gpu_budget": 1 << 20, "n_cpu_moe": 3}


def test_the_table_says_lavapipe_speeds_mean_nothing(tiny_moe):
    cfg = BenchConfig(model=str(tiny_moe(n_layer=2)), gpu_budget=1 << 20, limit=2, n_predict=8)
    lava = markdown(report_with("llvmpipe (LLVM 15.0.7, 256 bits)", False), cfg)
    assert "mean nothing" in lava and "functional check" in lava
    assert "| lru | - | 12 slots: 1.00 MiB | 1.50 | 2.00 | 3.00 MiB | 40 | 0.50 | - | NO (1/2 prompts) |" in lava
    assert "mean nothing" not in markdown(report_with("NVIDIA H200", True), cfg)


def test_the_cli_needs_a_cap_or_a_gpu_budget_and_a_gpu_for_the_gpu_mode(tiny_moe, capsys):
    model, draft = str(tiny_moe(n_layer=2)), str(tiny_moe(n_layer=2, seed=1))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "-m", model, "-md", draft])
    assert e.value.code == 2 and "--mem-cap is required (or --gpu-budget" in capsys.readouterr().err
    # the CPU suite hides every GPU device (conftest): the GPU mode says what it needs, in one line
    assert cli.main(["bench", "-m", model, "-md", draft, "--gpu-budget", "1M"]) == 2
    assert "needs a GPU device" in capsys.readouterr().err
    assert cli.main(["bench", "-m", model, "-md", draft, "--gpu-budget", "1M", "--contenders", "llama.cpp"]) == 2
    assert "unknown GPU contender(s) llama.cpp" in capsys.readouterr().err
    assert cli.main(["bench", "-m", model, "-md", draft, "--mem-cap", "1G", "-ngl", "-1"]) == 2
    assert "-ngl is for the GPU mode" in capsys.readouterr().err


@pytest.mark.gpu
def test_gpu_bench_every_contender_end_to_end(tiny_moe, tmp_path):
    """Every GPU contender on F32 synthetic models: the fields, N, the slots' copies and hits, and
    the same greedy output everywhere."""
    model, draft = tiny_moe(n_layer=3), tiny_moe(n_layer=3, seed=1)
    layout = read_layout(model)
    per_expert = layout.layers[0].bytes_per_expert  # 24 KiB
    per_layer = layout.n_expert * per_expert
    budget = per_layer + per_expert // 3  # one layer's experts and a bit: N = 2; 5 slots + 3 zero slots
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"turns": ["hello there, said the expert"]}\n{"turns": ["the quick brown fox jumps"]}\n')
    out = tmp_path / "gpu.json"
    argv = ["-m", str(model), "-md", str(draft), "--gpu-budget", str(budget), "--prompts", str(prompts)]
    r = subprocess.run(
        [sys.executable, "-m", "moespac_gguf.cli", "bench", *argv, "--limit", "2", "-n", "24", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr
    assert "--n-cpu-moe 2 (1 of 3 MoE layers' experts on the GPU)" in r.stderr
    d = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().count("\n| ") == 1 + len(GPU_CONTENDERS)  # the header and a row each
    assert d["mode"] == "gpu" and d["n_cpu_moe"] == 2 and d["reference"] == "llama.cpp+ncmoe"
    res = {x["name"]: x for x in d["results"]}
    assert list(res) == list(GPU_CONTENDERS)
    for x in res.values():
        assert "error" not in x, x
        assert x["tokens_per_s"] > 0 and x["n_tokens"] > 0 and x["decode"]["n_steps"] > 0
        assert x["same_output"] is True and x["same_prompts"] == "2/2", x["name"]
    for name in ("llama.cpp+ncmoe", "llama.cpp+ncmoe+sd"):
        x = res[name]
        assert x["n_cpu_moe"] == 2 and x["gpu_expert_bytes"] == per_layer and x["h2d_bytes"] == 0
        # one layer of three on the GPU, the last, which routes only the prompt's last row (llama.cpp
        # computes no other row's output there)
        assert x["slots"] is None and 0 < x["hit_rate"] < 1 / 3
    for name in ("lru", "moespac"):
        x = res[name]
        slots = x["slots"]
        assert x["n_cpu_moe"] is None and slots["on_gpu"] and slots["slots"] == 5
        assert slots["copies"] > 0 and x["h2d_bytes"] == slots["copied_bytes"] > 0 and 0 < x["hit_rate"] <= 1
        assert x["gpu_expert_bytes"] == slots["buffer_bytes"] <= budget
    assert res["lru"]["draft"] is None and res["lru"]["acceptance_rate"] is None
    assert res["lru"]["slots"]["planned_steps"] == 0  # recency only, no balancer
    assert res["llama.cpp+ncmoe"]["acceptance_rate"] is None
    assert res["moespac"]["draft"] == res["llama.cpp+ncmoe+sd"]["draft"] == str(draft)
    assert res["moespac"]["acceptance_rate"] is not None
    assert d["lru_inserts_per_layer"] == LRU_INSERTS_PER_LAYER
