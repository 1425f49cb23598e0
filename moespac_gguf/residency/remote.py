"""The RPC tier's decision in one number: the share of an RPC server's slots the balancer fills.

residency.plan charges slots on an RPC server's device the link's round trips and bandwidth,
so a slower link must plan fewer remote experts. `remote_slot_share` asks the balancer for one
standard step, so a test over a real link (netem) or a benchmark can compare the plans that two
calibrations of the same server (`moespac calibrate --rpc`) lead to:

    share = remote_slot_share(load_costs(rpc="10.0.0.2:50052", path=calibration), read_layout(model))
"""

from __future__ import annotations

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
    sizes = np.array([l.bytes_per_expert for l in layout.layers], dtype=np.float64)
    utility = zipf_utility(layout, tokens)
    capacity = np.full(len(layout.layers), min(slots_per_layer, layout.n_expert))
    problem = PlanProblem(
        utility=utility,
        expert_bytes=sizes,
        current=np.full(utility.shape, RESIDENT),
        slot_capacity=capacity,
        resident_budget_bytes=float(sizes.sum() * layout.n_expert),  # every expert in RAM
        costs=costs,
        horizon_steps=horizon_steps,
        token_bytes=4.0 * layout.n_embd,
    )
    return float((solve(problem, gap=RUNTIME_GAP).tier == SLOT).sum() / capacity.sum())
