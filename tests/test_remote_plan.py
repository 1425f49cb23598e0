"""The balancer over a link (issue 25): slots on an RPC server's device are charged the link's
round trips and bandwidth (residency.plan), so a slower link plans fewer remote experts, and none
where the remote device can never pay. Pure logic: the real link (netem) is another test's."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.core.layout import MoeLayer, MoeLayout, TensorSpan
from moespac_gguf.residency.costs import DeviceCosts
from moespac_gguf.residency.plan import RESIDENT, SLOT, PlanProblem, tier_costs
from moespac_gguf.residency.remote import (
    all_remote,
    remote_slot_share,
    remote_tier_pays,
    token_expert_equivalents,
    token_link_bytes,
    zipf_utility,
)

MB = 1 << 20


def layout(n_layer: int = 8, n_expert: int = 32, n_used: int = 4, n_embd: int = 2048, expert: int = 2 * MB):
    """A Qwen3-MoE-like layout (2 MiB experts, 2048-wide activations) without a file."""
    layers = [
        MoeLayer(i, {f"blk.{i}.ffn_up_exps.weight": TensorSpan("up", "Q4_K", 0, expert * n_expert, expert)}, None)
        for i in range(n_layer)
    ]
    total = expert * n_expert * n_layer
    return MoeLayout("m.gguf", "qwen3moe", n_layer, n_expert, n_used, 0, 0, n_embd, 768, total, total, 0, layers)


def remote(link_bps: float, round_trip_s: float) -> DeviceCosts:
    """This machine's CPU, and a server computing an expert 4x faster across the link."""
    return DeviceCosts(1e9, link_bps, 2e-4, 5e-5, round_trip_s=round_trip_s)


FAST = remote(1.25e10, 1e-5)  # 100 Gbit/s, 10 us
GIGABIT = remote(1.25e8, 1e-3)  # 1 Gbit/s, 1 ms
SLOW = remote(1.25e6, 2e-2)  # 10 Mbit/s, 20 ms


def test_a_slower_link_plans_fewer_remote_experts_and_none_where_they_never_pay():
    m = layout()
    shares = [remote_slot_share(c, m, slots_per_layer=8) for c in (FAST, GIGABIT, SLOW)]
    assert shares[0] > shares[1] > shares[2] == 0.0, shares
    local = DeviceCosts(1e9, 1.25e10, 2e-4, 5e-5)  # the same device without a link: a local GPU
    assert remote_slot_share(local, m, slots_per_layer=8) >= shares[0]


@pytest.mark.parametrize(
    "costs,n_embd,horizon",
    [
        (remote(1.25e10, 1e-2), 2048, 16.0),  # the latency alone: 10 ms round trips on 100 Gbit/s
        (remote(1.25e5, 0.0), 2048, 1e9),  # the activations alone: 1 Mbit/s, moves amortized to nothing
        (remote(1.25e6, 0.0), 1, 16.0),  # the moves alone: 10 Mbit/s, 2 MiB experts, 4-byte activations
    ],
    ids=["latency", "activations", "moves"],
)
def test_each_cost_of_the_link_alone_keeps_every_expert_local(costs, n_embd, horizon):
    """Each term alone outweighs a layer's CPU work (8 tokens x 4 experts x 0.2 ms = 6.4 ms,
    which remote slots run beside): no expert is worth sending."""
    m = layout(n_embd=n_embd)
    assert remote_slot_share(FAST, m, slots_per_layer=8, horizon_steps=horizon) > 0
    assert remote_slot_share(costs, m, slots_per_layer=8, horizon_steps=horizon) == 0.0


def test_a_slot_over_a_link_costs_compute_activations_a_round_trip_and_its_move():
    u = np.array([[3.0, 0.5, 0.0]])
    problem = PlanProblem(
        utility=u,
        expert_bytes=np.array([2 * MB]),
        current=np.array([[RESIDENT, SLOT, RESIDENT]]),
        slot_capacity=np.array([4]),
        resident_budget_bytes=6 * MB,
        costs=GIGABIT,
        horizon_steps=8.0,
        token_bytes=4 * 2048,
    )
    c = GIGABIT
    move = np.array([[1.0, 0.0, 1.0]]) * 2 * MB / c.memcpy_bps / 8
    expected = u * (c.gpu_s_per_token_expert + 2 * 4 * 2048 / c.memcpy_bps) + c.round_trip_s + move
    assert tier_costs(problem)[SLOT] == pytest.approx(expected, rel=1e-12)
    local = PlanProblem(**{**problem.__dict__, "costs": DeviceCosts(1e9, 1.25e8, 2e-4, 5e-5)})
    assert tier_costs(local)[SLOT] == pytest.approx(u * c.gpu_s_per_token_expert + move, rel=1e-12)


def test_zipf_utility_routes_n_used_experts_a_token():
    u = zipf_utility(layout(n_expert=32, n_used=4), tokens=8.0)
    assert u.shape == (8, 32) and u.sum(1) == pytest.approx(32.0) and (np.diff(u, axis=1) <= 0).all()


def test_link_costs_are_validated():
    with pytest.raises(MoespacError, match="round trip must be non-negative"):
        remote(1e9, -1.0)
    with pytest.raises(MoespacError, match="needs the remote device's per-token expert cost"):
        DeviceCosts(1e9, 1e9, 2e-4, round_trip_s=1e-3)
    with pytest.raises(MoespacError, match="token_bytes must be non-negative"):
        PlanProblem(np.ones((1, 2)), [MB], np.ones((1, 2)), [1], 2 * MB, FAST, token_bytes=-1)


def test_the_tier_pays_only_where_its_slots_also_cover_every_layer_crossing():
    """remote_tier_pays: on a fast link yes, on a slow one no; never where the plan fills no remote
    slot; and on some link the plan fills slots whose saving does not cover the crossings the
    placement adds to every layer (the experts computed here), which it must then refuse."""
    m = layout()
    assert remote_tier_pays(FAST, m, tokens=8) and not remote_tier_pays(SLOW, m, tokens=8)
    round_trips = np.geomspace(1e-6, 1e-1, 26)
    shares = [remote_slot_share(remote(1.25e10, r), m, tokens=8) for r in round_trips]
    pays = [remote_tier_pays(remote(1.25e10, r), m, tokens=8) for r in round_trips]
    assert all(share > 0 for share, p in zip(shares, pays) if p)
    assert pays == sorted(pays, reverse=True)  # a slower link never makes it pay
    assert any(share > 0 and not p for share, p in zip(shares, pays))


CPU = DeviceCosts(1e9, 5e9, 2e-4)  # this machine alone: the CPU of remote()'s costs
N_VOCAB = 32000
HALF = 8 * 16 * 2 * MB  # half of layout()'s experts stay in memory here


@pytest.mark.parametrize(
    "link,pays",
    [
        (FAST, True),
        (GIGABIT, True),
        (SLOW, False),
        (remote(1.25e10, 5e-2), False),  # the latency alone: 50 ms round trips on 100 Gbit/s
        (remote(1.25e6, 0.0), False),  # the bandwidth alone: 10 Mbit/s, no delay
    ],
    ids=["fast", "gigabit", "slow", "latency", "bandwidth"],
)
def test_every_layer_goes_to_the_server_only_over_a_link_that_pays(link, pays):
    """A server 4x faster per expert, this machine paging half the experts in: a token there costs
    its compute, a round trip and its bytes at the link's rate, here its compute and its page-ins;
    a fast link pays, and each of a slow link's costs alone keeps the model here."""
    m = layout()
    verdict = all_remote(CPU, link, m, N_VOCAB, HALF)
    work = token_expert_equivalents(m)
    assert verdict.remote_s == pytest.approx(
        work * link.gpu_s_per_token_expert + link.round_trip_s + token_link_bytes(m, N_VOCAB) / link.memcpy_bps
    )
    assert verdict.pays == pays, verdict


def test_this_machines_token_pays_the_page_ins_its_budget_leaves():
    """Here: the token's compute at the CPU's cost, more page-ins the less memory; with the model in
    memory the compute alone, which a server no faster than this machine never beats."""
    m = layout()
    compute = token_expert_equivalents(m) * CPU.cpu_s_per_token_expert
    times = [all_remote(CPU, FAST, m, N_VOCAB, budget).local_s for budget in (None, 2 * HALF, HALF, HALF / 4)]
    assert times[0] == pytest.approx(compute) and times[1] == pytest.approx(compute)
    assert times[1] < times[2] < times[3]
    as_fast = replace(remote(1.25e10, 1e-5), gpu_s_per_token_expert=CPU.cpu_s_per_token_expert)
    assert not all_remote(CPU, as_fast, m, N_VOCAB, None).pays
    assert all_remote(CPU, as_fast, m, N_VOCAB, HALF / 4).pays


def test_a_token_over_the_link_moves_what_smolmoe_measured():
    """SmolMoE (30 layers, n_embd 576, 49152 tokens) sent 161 KiB and received 193 KiB a decoded
    token with every layer on the server (bench/results/rpc_link_sweep_tap_off.md)."""
    m = layout(n_layer=30, n_embd=576)
    assert token_link_bytes(m, 49152) == pytest.approx((161 + 193) * 1024, rel=0.02)
    dense = replace(m, other_bytes=10 * MB)  # 5 experts' bytes of other weights
    assert token_expert_equivalents(dense) == token_expert_equivalents(m) + 5 == 30 * 4 + 5
