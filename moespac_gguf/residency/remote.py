"""The RPC tier's decisions: the share of an RPC server's slots the balancer fills, and whether
the tier's placement pays at all.

residency.plan charges slots on an RPC server's device the link's round trips and bandwidth,
so a slower link must plan fewer remote experts. `remote_slot_share` asks the balancer for one
standard step, so a test over a real link (netem) or a benchmark can compare the plans that two
calibrations of the same server (`moespac calibrate --rpc`) lead to:

    share = remote_slot_share(load_costs(rpc="10.0.0.2:50052", path=calibration), read_layout(model))
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..core.layout import MoeLayout
from .costs import DeviceCosts
from .ilp import RUNTIME_GAP, solve
from .plan import RESIDENT, SLOT, PlanProblem


def zipf_utility(layout: MoeLayout, tokens: float) -> np.ndarray:
    """float [MoE layers, n_expert]: expected uses of each expert in a step of `tokens` tokens
    routed with Zipf(1) popularity (expert i of every layer taken with weight 1/(i+1), each
    token using n_expert_used of them, an expert at most once a token)."""
    weight = 1.0 / np.arange(1, layout.n_expert + 1)
    uses = np.minimum(tokens * layout.n_expert_used * weight / weight.sum(), tokens)
    return np.tile(uses, (len(layout.layers), 1))


def _standard_step(
    costs: DeviceCosts, layout: MoeLayout, slots_per_layer: int, tokens: float, horizon_steps: float
) -> PlanProblem:
    """One standard balancing question: steps of `tokens` tokens routed as zipf_utility, every
    expert in RAM and no slot filled yet, `slots_per_layer` slots in every MoE layer."""
    sizes = np.array([l.bytes_per_expert for l in layout.layers], dtype=np.float64)
    utility = zipf_utility(layout, tokens)
    return PlanProblem(
        utility=utility,
        expert_bytes=sizes,
        current=np.full(utility.shape, RESIDENT),
        slot_capacity=np.full(len(layout.layers), min(slots_per_layer, layout.n_expert)),
        resident_budget_bytes=float(sizes.sum() * layout.n_expert),  # every expert in RAM
        costs=costs,
        horizon_steps=horizon_steps,
        token_bytes=4.0 * layout.n_embd,
    )


def remote_slot_share(
    costs: DeviceCosts,
    layout: MoeLayout,
    slots_per_layer: int = 4,
    tokens: float = 8.0,
    horizon_steps: float = 16.0,
) -> float:
    """The share (0 to 1) of `slots_per_layer` slots in every MoE layer of `layout` that the
    balancer fills (ilp.solve at the runtime's gap, as SlotFiller asks it), for steps of `tokens`
    tokens (a verification batch) routed as zipf_utility, every expert in RAM and no slot filled
    yet, a plan in force for `horizon_steps` steps (SlotFiller's plan_every). `costs`: the slot
    device's, e.g. load_costs(rpc=endpoint) for an RPC server."""
    problem = _standard_step(costs, layout, slots_per_layer, tokens, horizon_steps)
    return float((solve(problem, gap=RUNTIME_GAP).tier == SLOT).sum() / problem.slot_capacity.sum())


def remote_tier_pays(costs: DeviceCosts, layout: MoeLayout, tokens: float, slots_per_layer: int = 4) -> bool:
    """Whether the RPC tier's placement (layers on the server, their experts here, hot experts in
    the server's slots) should beat this machine alone for steps of `tokens` tokens: the plan's
    predicted step with the slots, plus what that placement costs whatever the plan (the experts
    computed here: every MoE layer's activations cross the link there and back, a round trip and
    2 * tokens * n_embd * 4 bytes), below the predicted step without slots. The server's share of
    the other weights' compute is not counted: an answer against the server, never for it."""
    with_slots = _standard_step(costs, layout, slots_per_layer, tokens, 16.0)
    plan = solve(with_slots, gap=RUNTIME_GAP)
    if not (plan.tier == SLOT).any():
        return False
    alone = solve(replace(with_slots, slot_capacity=np.zeros_like(with_slots.slot_capacity)), gap=RUNTIME_GAP)
    crossings = len(layout.layers) * (costs.round_trip_s + 2 * tokens * with_slots.token_bytes / costs.memcpy_bps)
    return plan.predicted_step_s + crossings < alone.predicted_step_s
