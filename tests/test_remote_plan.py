"""The balancer over a link (issue 25): slots on an RPC server's device are charged the link's
round trips and bandwidth (residency.plan), so a slower link plans fewer remote experts, and none
where the remote device can never pay. Pure logic: the real link (netem) is another test's."""

from __future__ import annotations

import numpy as np
import pytest

from moespac_gguf import MoespacError
from moespac_gguf.core.layout import MoeLayer, MoeLayout, TensorSpan
from moespac_gguf.residency.costs import DeviceCosts
from moespac_gguf.residency.plan import RESIDENT, SLOT, PlanProblem, tier_costs
from moespac_gguf.residency.remote import remote_slot_share, remote_tier_pays, zipf_utility

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
