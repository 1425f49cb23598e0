"""The RPC tier (issue 25): an RPC server's device as the slot device, when there is no local GPU.

`moespac rpc-server` runs here on 127.0.0.1 (conftest). llama.cpp puts the layers on its device
with their expert tensors in host memory (--cpu-moe), and the hot experts get slots in the
server's memory, computed there. The slots must not change the logits (the server computes
on the same CPU kernels: the rows are in fact bit-identical, checked within test_slots' TOL),
and they must really be the server's: its process grows by the slot buffer when the experts are
copied in (slots created in host RAM by mistake leave it unchanged).
"""

from __future__ import annotations

import json

import numpy as np
import psutil
import pytest
from test_slots import STEPS, TOL, max_diff, random_remap, reference

from moespac_gguf import MoeSpac, MoespacError, cli
from moespac_gguf.core.layout import read_layout
from moespac_gguf.demo.synthetic import SyntheticSpec
from moespac_gguf.llama.session import Session
from moespac_gguf.llama.slots import SlotCache
from moespac_gguf.residency import costs as costs_mod

# 768 KiB experts: 24 of them make the server's growth unmistakable
SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=256, n_ff_exp=256, n_expert=8, seed=11)
PROMPT = "hot experts computed on another machine"


FAST = dict(remote_s_per_token_expert=2e-5, link_bps=1e10, round_trip_s=1e-6)  # every remote expert pays
SLOW = dict(remote_s_per_token_expert=2e-5, link_bps=1.25e6, round_trip_s=2e-2)  # 10 Mbit/s, 20 ms: none does


@pytest.fixture
def link_profile(tmp_path, monkeypatch):
    """set(endpoint, link): the calibration the runtime reads then holds `link` (RPC_KEYS but the
    device) as that server's profile; the server itself is on 127.0.0.1 whatever it says."""
    calibration = tmp_path / "calibration.json"
    monkeypatch.setattr(costs_mod, "CALIBRATION_PATH", calibration)
    base = dict(flash_read_bps=1e9, memcpy_bps=5e9, mem_bps=9e9, cpu_s_per_token_expert=2e-4, page_in_latency_s=1e-4)

    def set_link(endpoint: str, link: dict) -> None:
        calibration.write_text(json.dumps({**base, "rpc": {endpoint: {"device": "RPC0", **link}}}))

    return set_link


def test_remote_slots_leave_the_logits_unchanged(tiny_moe, rpc_server):
    endpoint, proc, _ = rpc_server
    path = tiny_moe(SPEC)
    toks, ref = reference(path)
    server = psutil.Process(proc.pid)
    rng = np.random.default_rng(3)
    with Session(path, n_ctx=256, n_gpu_layers=-1, op_offload=False, rpc_servers=[endpoint]) as s:
        assert s.gpu is None and s.slot_device.description == endpoint
        before = server.memory_info().rss
        with SlotCache(s, [SPEC.n_expert] * s.n_layer) as cache:
            for layer in cache.moe_layers:  # every slot filled once: the server holds them all
                for e in range(cache.n_expert):
                    cache.copy_async(layer, e, e)
            cache.wait()
            grown = server.memory_info().rss - before
            assert grown >= 0.9 * cache.copied_bytes > 0, f"the server grew by {grown} bytes only"
            random_remap(cache, rng)
            got = [s.decode(toks, all_logits=True)]
            assert cache.graph_layers == len(cache.moe_layers) == SPEC.n_layer
            for t in STEPS:
                random_remap(cache, rng)
                got.append(s.decode([t]))
            assert (cache.assignment() >= 0).any()
    assert max_diff(ref, got) <= TOL
    assert proc.poll() is None


def test_moespac_with_remote_slots_gives_the_local_greedy_output(tiny_moe, rpc_server, capfd, link_profile):
    endpoint, proc, _ = rpc_server
    path = tiny_moe(SPEC)
    link_profile(endpoint, FAST)
    with MoeSpac(path, n_ctx=256, mem_budget="off") as local:
        local.create_completion(PROMPT, max_tokens=32)
        expected = local.completion_tokens
    capfd.readouterr()
    expert = read_layout(path).mean_bytes_per_expert
    # 9 slots and each layer's zero slot: the balancer chooses which experts are remote
    with MoeSpac(
        path,
        n_ctx=256,
        mem_budget="off",
        rpc_servers=[endpoint],
        n_cpu_moe=SPEC.n_layer,  # the tier's placement without the engine: every layer's experts here
        gpu_budget=int(12 * expert),
        verbose=True,
    ) as m:
        out = m.create_completion(PROMPT, max_tokens=32)
        assert m.completion_tokens == expected
        slots = out["moespac"]["slots"]
        assert slots["device"] == f"RPC0 ({endpoint})" and slots["slots"] == 9
        assert slots["copies"] > 0 and slots["copied_bytes"] > 0 and slots["hit_rate"] > 0
        assert m.slots.in_slot.any()
        # planned with the endpoint's measured link, activations of n_embd F32 charged to it
        costs = m.slots.costs
        assert (costs.gpu_s_per_token_expert, costs.memcpy_bps, costs.round_trip_s) == (2e-5, 1e10, 1e-6)
        assert m.slots.token_bytes == 4 * SPEC.n_embd
    llama_log = capfd.readouterr().err
    # the layers on the server's device, their expert tensors in host memory (--cpu-moe)
    assert f"RPC0[{endpoint}] model buffer size" in llama_log
    assert "ffn_up_exps.weight" in llama_log and "buffer type overridden to CPU" in llama_log
    assert proc.poll() is None


def test_the_residency_engine_runs_with_remote_slots(tiny_moe, rpc_server, link_profile):
    endpoint = rpc_server[0]
    path = tiny_moe(SPEC)
    link_profile(endpoint, FAST)
    layout = read_layout(path)
    with MoeSpac(path, n_ctx=256, mem_budget="off") as local:
        local.create_completion(PROMPT, max_tokens=24)
        expected = local.completion_tokens
    budget = layout.other_bytes + (600 << 20)
    with MoeSpac(
        path, n_ctx=256, mem_budget=budget, rpc_servers=[endpoint], gpu_budget=int(12 * layout.mean_bytes_per_expert)
    ) as m:
        assert m.residency is not None and m.slots is not None
        out = m.create_completion(PROMPT, max_tokens=24)
        assert m.completion_tokens == expected
        assert out["moespac"]["slots"]["copied_bytes"] > 0
    with pytest.raises(MoespacError, match="--rpc with the residency engine .* drop --n-cpu-moe"):
        MoeSpac(path, mem_budget=budget, rpc_servers=[endpoint], n_cpu_moe=1)


def test_the_engine_leaves_out_a_server_whose_link_cannot_pay(tiny_moe, rpc_server, link_profile, capfd):
    """With the engine, a link over which the balancer would put no expert in the server's slots
    (10 Mbit/s, 20 ms) is not used at all, said on one line: layers there with their experts here
    would cross it twice in every layer for nothing (MoeSpac._rpc_placement)."""
    endpoint = rpc_server[0]
    path = tiny_moe(SPEC)
    layout = read_layout(path)
    with MoeSpac(path, n_ctx=256, mem_budget="off") as local:
        local.create_completion(PROMPT, max_tokens=24)
        expected = local.completion_tokens
    link_profile(endpoint, SLOW)
    capfd.readouterr()
    with MoeSpac(path, n_ctx=256, mem_budget=layout.other_bytes + (600 << 20), rpc_servers=[endpoint]) as m:
        assert m.residency is not None and m.slots is None and m.target.link.endpoints == []
        m.create_completion(PROMPT, max_tokens=24)
        assert m.completion_tokens == expected
    err = capfd.readouterr().err
    assert f"the link to the RPC server at {endpoint} (20 ms a round trip, 10 Mbit/s) is too slow" in err


def test_an_automatic_budget_sends_every_layer_to_a_server_over_a_link_that_pays(tiny_moe, rpc_server, link_profile):
    """--mem-budget auto (the default) with a server that has room for the whole model and a link
    over which it decodes faster (a server 10x faster per expert, FAST): no residency engine here,
    every layer there with its experts, as llama.cpp's --rpc."""
    endpoint = rpc_server[0]
    path = tiny_moe(SPEC)
    link_profile(endpoint, FAST)
    with MoeSpac(path) as local:
        assert local.memory_plan.mode == "auto" and local.all_remote is None
    with MoeSpac(path, rpc_servers=[endpoint]) as remote:
        assert remote.memory_plan.mode == "off" and remote.residency is None
        assert remote.n_cpu_moe == 0 and remote.slots is None and remote.target.link.endpoints == [endpoint]
        assert remote.all_remote.pays


def test_an_automatic_budget_keeps_the_model_here_over_a_link_that_cannot_pay(
    tiny_moe, rpc_server, link_profile, capfd
):
    """The same server over a link calibrated at 10 Mbit/s and 20 ms round trips (SLOW): a token
    would cost the link more than the server saves, so the model runs here, said on one line with
    the link's figures, with the local greedy output; --mem-budget off still sends it there."""
    endpoint = rpc_server[0]
    path = tiny_moe(SPEC)
    with MoeSpac(path, n_ctx=256) as local:
        local.create_completion(PROMPT, max_tokens=16)
        expected = local.completion_tokens
    link_profile(endpoint, SLOW)
    capfd.readouterr()
    with MoeSpac(path, n_ctx=256, rpc_servers=[endpoint]) as m:
        assert m.memory_plan.mode == "auto" and m.target.link.endpoints == [] and m.n_cpu_moe is None
        assert m.all_remote.remote_s > 0.02 > m.all_remote.local_s
        m.create_completion(PROMPT, max_tokens=16)
        assert m.completion_tokens == expected
    err = capfd.readouterr().err
    line = f"over the link to the RPC server at {endpoint} (20 ms a round trip, 10 Mbit/s) a token would take"
    assert line in err and "running on this machine (--mem-budget off sends every layer there" in err
    with MoeSpac(path, n_ctx=256, mem_budget="off", rpc_servers=[endpoint]) as forced:
        assert forced.target.link.endpoints == [endpoint] and forced.n_cpu_moe == 0


def test_calibrate_measures_an_rpc_server_and_keeps_its_profile(tiny_moe, rpc_server, tmp_path, capsys):
    """`moespac calibrate --rpc`: the server's expert compute, the link's bandwidth and round trip,
    under "rpc" by endpoint; a later calibration without --rpc keeps them."""
    endpoint = rpc_server[0]
    path, out = str(tiny_moe(SPEC)), tmp_path / "calibration.json"
    assert cli.main(["calibrate", "-m", path, "--rpc", endpoint, "--out", str(out)]) == 0
    assert "round trip" in capsys.readouterr().out
    profile = json.loads(out.read_text())["rpc"][endpoint]
    assert profile["device"] == f"RPC0 ({endpoint})"
    assert 0 < profile["remote_s_per_token_expert"] < 0.01 and 0 < profile["round_trip_s"] < 0.05
    assert profile["link_bps"] > 1e7  # 127.0.0.1
    assert cli.main(["calibrate", "-m", path, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rpc"] == {endpoint: profile}


def remote_run(path, endpoint) -> dict:
    """The slot stats of a self-drafted greedy run with slots on the server, and its tokens."""
    budget = int(12 * read_layout(path).mean_bytes_per_expert)
    with MoeSpac(
        path, "self", n_ctx=256, mem_budget="off", rpc_servers=[endpoint], n_cpu_moe=SPEC.n_layer, gpu_budget=budget
    ) as m:
        m.slots.plan_every = 2  # plans early in a short run
        out = m.create_completion(PROMPT, max_tokens=32)
        return {**out["moespac"]["slots"], "held": int(m.slots.in_slot.sum()), "tokens": m.completion_tokens}


def test_the_runtime_keeps_experts_local_over_a_link_that_cannot_pay(tiny_moe, rpc_server, link_profile):
    """The same run planned for a fast link fills remote slots; planned for 10 Mbit/s and 20 ms
    round trips it copies nothing to the server and holds nothing there (no copies before the
    first plan either), with the same greedy output."""
    endpoint = rpc_server[0]
    path = tiny_moe(SPEC)
    link_profile(endpoint, FAST)
    fast = remote_run(path, endpoint)
    link_profile(endpoint, SLOW)
    slow = remote_run(path, endpoint)
    assert fast["planned_steps"] > 0 and fast["copies"] > 0 and fast["held"] > 0 and fast["hit_rate"] > 0
    assert slow["planned_steps"] > 0 and slow["copies"] == slow["copied_bytes"] == slow["held"] == 0
    assert slow["tokens"] == fast["tokens"]
