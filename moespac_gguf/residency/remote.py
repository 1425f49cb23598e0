"""The RPC tier's decisions: the share of an RPC server's slots the balancer fills, whether the
tier's placement pays at all, and whether a server with room for the whole model should hold
every layer (`all_remote`).

residency.plan charges slots on an RPC server's device the link's round trips and bandwidth,
so a slower link must plan fewer remote experts. `remote_slot_share` asks the balancer for one
standard step, so a test over a real link (netem) or a benchmark can compare the plans that two
calibrations of the same server (`moespac calibrate --rpc`) lead to:

    share = remote_slot_share(load_costs(rpc="10.0.0.2:50052", path=calibration), read_layout(model))
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..core.layout import MoeLayout
from .costs import DeviceCosts
from .ilp import RUNTIME_GAP, solve
from .plan import RESIDENT, SLOT, PlanProblem, greedy

# ggml-rpc sends a decoded token's whole graph to the server (RPC_CMD_GRAPH_COMPUTE), every tensor
# of it described in an rpc_tensor of 304 bytes; SmolMoE's graph sends 161 KiB over its 30 layers
# (bench/results/rpc_link_sweep_tap_off.md): 18 tensors a layer
RPC_TENSOR_BYTES = 304
GRAPH_TENSORS_PER_LAYER = 18
# the inputs and the graph go without waiting for an answer; reading the logits back waits
ALL_REMOTE_ROUND_TRIPS = 1


def zipf_utility(layout: MoeLayout, tokens: float) -> np.ndarray:
    """float [MoE layers, n_expert]: expected uses of each expert in a step of `tokens` tokens
    routed with Zipf(1) popularity (expert i of every layer taken with weight 1/(i+1), each
    token using n_expert_used of them, an expert at most once a token)."""
    weight = 1.0 / np.arange(1, layout.n_expert + 1)
    uses = np.minimum(tokens * layout.n_expert_used * weight / weight.sum(), tokens)
    return np.tile(uses, (len(layout.layers), 1))


def _standard_step(
    costs: DeviceCosts,
    layout: MoeLayout,
    slots_per_layer: int,
    tokens: float,
    horizon_steps: float,
    expert_budget_bytes: float | None = None,
) -> PlanProblem:
    """One standard balancing question: steps of `tokens` tokens routed as zipf_utility, every
    expert in RAM and no slot filled yet, `slots_per_layer` slots in every MoE layer; the plan may
    keep `expert_budget_bytes` of experts in memory (None: all of them)."""
    sizes = np.array([l.bytes_per_expert for l in layout.layers], dtype=np.float64)
    utility = zipf_utility(layout, tokens)
    every = float(sizes.sum() * layout.n_expert)
    return PlanProblem(
        utility=utility,
        expert_bytes=sizes,
        current=np.full(utility.shape, RESIDENT),
        slot_capacity=np.full(len(layout.layers), min(slots_per_layer, layout.n_expert)),
        resident_budget_bytes=every if expert_budget_bytes is None else min(float(expert_budget_bytes), every),
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


@dataclass(frozen=True)
class AllRemote:
    """A decoded token's predicted seconds with every layer on an RPC server and on this machine
    alone (all_remote), and the verdict."""

    remote_s: float
    local_s: float

    @property
    def pays(self) -> bool:
        return self.remote_s < self.local_s


def token_expert_equivalents(layout: MoeLayout) -> float:
    """A decoded token's compute counted in expert matmuls: its routed experts (n_expert_used in
    every MoE layer) and the rest of the weights it reads (attention, shared experts, the output
    layer: the non-expert bytes) at an expert's bytes each. Decoding one token reads every weight
    it uses once, so its time follows those bytes; the token embedding counted among them (a row
    read) makes it an upper bound, on both sides of all_remote alike."""
    return len(layout.layers) * layout.n_expert_used + layout.other_bytes / layout.mean_bytes_per_expert


def token_link_bytes(layout: MoeLayout, n_vocab: int) -> float:
    """Bytes a decoded token moves over the link with every layer on the server: the graph
    ggml-rpc sends each time (GRAPH_TENSORS_PER_LAYER descriptions a layer), the token's input
    embedding (n_embd F32) and its logits back (n_vocab F32). SmolMoE measured 161 KiB out and
    193 KiB back (bench/results/rpc_link_sweep_tap_off.md); this says 163 and 192."""
    graph = layout.n_layer * GRAPH_TENSORS_PER_LAYER * RPC_TENSOR_BYTES
    return graph + 4.0 * layout.n_embd + 4.0 * n_vocab


def all_remote(
    local: DeviceCosts, remote: DeviceCosts, layout: MoeLayout, n_vocab: int, expert_budget_bytes: float | None
) -> AllRemote:
    """Predicted seconds of a decoded token (a) with every layer and its experts on the RPC server
    whose compute and link `remote` holds (load_costs(rpc=endpoint)): token_expert_equivalents at
    its per-token expert cost, ALL_REMOTE_ROUND_TRIPS of its round trip, token_link_bytes at its
    bandwidth; (b) on this machine alone (`local`, load_costs()): the same compute at the CPU's
    cost, plus the page-ins the page tier's plan predicts for one token routed as zipf_utility
    when only `expert_budget_bytes` of experts stay in memory (None: the model fits, none).
    Prompts are left out: a prefill crosses the link once, each decoded token crosses it again.
    Both compute figures are calibrate's marginal costs, low for a single token on both sides:
    the verdict rests on what differs, the link against the page-ins."""
    work = token_expert_equivalents(layout)
    remote_s = (
        work * remote.gpu_s_per_token_expert
        + ALL_REMOTE_ROUND_TRIPS * remote.round_trip_s
        + token_link_bytes(layout, n_vocab) / remote.memcpy_bps
    )
    pages = greedy(_standard_step(local, layout, 0, 1.0, 16.0, expert_budget_bytes))
    dense = (work - len(layout.layers) * layout.n_expert_used) * local.cpu_s_per_token_expert
    return AllRemote(remote_s=remote_s, local_s=pages.predicted_step_s + dense)
