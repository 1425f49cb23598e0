"""Heterogeneous Workload Balancer: the tier of every expert for the next steps, as an integer program.

Tiers: SLOT (T0 slot cache), RESIDENT (T1 page cache), FLASH (T2, paged in on demand). A slot
expert is computed by the GPU when there is one, every other expert by the CPU. Per expert:
u = expected tokens next step, p = 1 - exp(-u) the chance it is used, b its bytes, F/M the flash
and memcpy bandwidths, H the steps a plan stays in force (one-off moves are amortized over it).
Binaries s (slot) and r (resident) per expert; flash = 1 - s - r.

    min  sum_l z_l                              a layer waits for its slower branch
    GPU  z_l >= sum_e s * (u*c_gpu + ([cur!=SLOT]*b/M + [cur=FLASH]*b/F) / H)
    CPU  z_l >= sum_e r * (u*c_cpu + [cur=FLASH]*b/F / H) + (1-s-r) * (u*c_cpu + p*b/F)
    s.t. s + r <= 1 (= 1 if must_have),  sum_e s <= slots_l,  sum b*(s + r) <= budget
Without a GPU both branches run on the CPU: z_l is their sum, slot experts computed at c_cpu.

Slots on an RPC server's device (costs.round_trip_s = R, the link's latency; M its bandwidth,
c_gpu the server's compute): moving an expert in costs b/M as above, and a layer that computes
on the server pays a round trip, R + 2*n*a/M for n tokens of a bytes of activations (a =
`token_bytes`, n_embd F32) out and back. The program stays linear by charging it per slot expert:
    s * (u*(c_gpu + 2a/M) + R + moves)
an upper bound of the slot branch: exact for a layer with one remote expert, k experts pay k
latencies and a token's several remote experts each their activations, where they share one
trip. The bound is deliberate: a charge of R/k for k remote experts (the latency shared by the
slots) undercharges every layer the plan leaves with fewer, and one expert, charged R/slots_l,
could then cost its layer the whole R (a 50 ms link, 8 slots: 6 ms planned, 50 ms paid); R is
the only linear charge that never does. So the plan puts an expert on the server only where it
pays even then, and a slower link (larger R, smaller M) never buys more remote slots. Where the
layers' other weights are on the server too (llama.session's placement without a local GPU),
the trips are the CPU experts' (the split graph runs its CPU side in every layer) and paid
whatever the plan: there the charge overstates a remote expert's cost, an upper bound still.

`greedy` answers in milliseconds and is exact on CPU-only machines with equal expert sizes. With a
GPU it is not: 1-2.5% slower than the best plan on 48x128 re-plans of 5 tokens a step, 35-50% with
1 token a step or a 1-step horizon (bench/results/balancer_gpu.md).
`lagrangian.lagrangian` bounds the optimum from below and gives a plan in milliseconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..core.errors import MoespacError
from .costs import DeviceCosts

SLOT, RESIDENT, FLASH = 0, 1, 2
CPU, GPU = 0, 1


@dataclass
class PlanProblem:
    """One balancing question; arrays are validated and normalised on construction."""

    utility: np.ndarray  # float [n_layer, n_expert]: expected tokens next step
    expert_bytes: np.ndarray  # [n_layer] or [n_layer, n_expert]
    current: np.ndarray  # int [n_layer, n_expert]: tier now
    slot_capacity: np.ndarray  # int [n_layer]: T0 slots per layer, 0 if none
    resident_budget_bytes: float  # T0 + T1 expert bytes allowed
    costs: DeviceCosts
    must_have: np.ndarray | None = None  # bool [n_layer, n_expert]: must end in T0/T1
    horizon_steps: float = 8.0  # steps until the next plan: one-off moves are amortized over it
    token_bytes: float = 0.0  # a token's activations (n_embd F32): what a remote layer ships each way

    def __post_init__(self):
        self.utility = np.asarray(self.utility, dtype=np.float64)
        if self.utility.ndim != 2 or not np.all(np.isfinite(self.utility)) or self.utility.min(initial=0) < 0:
            raise MoespacError(
                f"utility must be a finite non-negative [n_layer, n_expert] array, got shape {self.utility.shape}"
            )
        shape = self.utility.shape
        self.expert_bytes = _expert_bytes(self.expert_bytes, shape)
        self.current = _as_shape(self.current, shape, "current tier", np.int8)
        if not np.isin(self.current, (SLOT, RESIDENT, FLASH)).all():
            raise MoespacError("current tier values must be SLOT=0, RESIDENT=1 or FLASH=2")
        self.slot_capacity = _as_shape(self.slot_capacity, shape[:1], "slot_capacity", np.int64)
        if self.slot_capacity.min(initial=0) < 0:
            raise MoespacError("slot_capacity must be non-negative")
        self.must_have = (
            np.zeros(shape, dtype=bool)
            if self.must_have is None
            else _as_shape(self.must_have, shape, "must_have", bool)
        )
        if self.horizon_steps <= 0:
            raise MoespacError(f"horizon_steps must be positive, got {self.horizon_steps}")
        if self.token_bytes < 0:
            raise MoespacError(f"token_bytes must be non-negative, got {self.token_bytes}")
        must_bytes = float(self.expert_bytes[self.must_have].sum())
        if must_bytes > self.resident_budget_bytes:
            raise MoespacError(
                f"resident budget {self.resident_budget_bytes / 2**20:.1f} MiB is smaller than "
                f"the {must_bytes / 2**20:.1f} MiB of experts this step must have"
            )


@dataclass
class Plan:
    """Where each expert lives and who computes it, with the step time the cost model predicts."""

    tier: np.ndarray  # int8 [n_layer, n_expert]: SLOT, RESIDENT or FLASH
    processor: np.ndarray  # int8 [n_layer, n_expert]: CPU or GPU
    predicted_step_s: float
    solver: str  # "highs", "cbc", "lagrangian" (its bound proved the plan within the gap) or "greedy"
    solve_s: float  # model build + solve (+ greedy start) wall time
    status: str  # "optimal" (within gap), "time_limit", "greedy" or "relaxed" (lagrangian's, unproved)


def tier_costs(problem: PlanProblem) -> np.ndarray:
    """Seconds each expert adds to its branch in each tier: float [3, n_layer, n_expert]."""
    c, u, b = problem.costs, problem.utility, problem.expert_bytes
    from_flash = problem.current == FLASH
    fetch = b / c.flash_read_bps
    cpu = u * c.cpu_s_per_token_expert
    slot_compute = u * (c.gpu_s_per_token_expert if c.has_gpu else c.cpu_s_per_token_expert)
    if c.round_trip_s is not None:  # the slots are across a link (module docstring)
        slot_compute = slot_compute + c.round_trip_s + u * 2 * problem.token_bytes / c.memcpy_bps
    moves = 1.0 / problem.horizon_steps
    costs = np.empty((3,) + u.shape)
    costs[SLOT] = slot_compute + moves * ((problem.current != SLOT) * b / c.memcpy_bps + from_flash * fetch)
    costs[RESIDENT] = cpu + moves * from_flash * fetch
    costs[FLASH] = cpu - np.expm1(-u) * fetch
    return costs


def step_time(problem: PlanProblem, tier: np.ndarray) -> float:
    """The objective: predicted seconds of one step if the experts sit in `tier`."""
    chosen = np.take_along_axis(tier_costs(problem), np.asarray(tier, dtype=np.intp)[None], axis=0)[0]
    if not problem.costs.has_gpu:
        return float(chosen.sum())
    on_gpu = tier == SLOT
    return float(np.maximum(np.where(on_gpu, chosen, 0).sum(1), np.where(on_gpu, 0, chosen).sum(1)).sum())


def feasible(problem: PlanProblem, tier: np.ndarray) -> bool:
    """True if `tier` respects the slots, the byte budget and must_have of `problem`."""
    tier = np.asarray(tier)
    in_memory = tier != FLASH
    return (
        tier.shape == problem.utility.shape
        and bool(((tier == SLOT).sum(1) <= problem.slot_capacity).all())
        and float(problem.expert_bytes[in_memory].sum()) <= problem.resident_budget_bytes
        and bool(in_memory[problem.must_have].all())
    )


def greedy(problem: PlanProblem) -> Plan:
    """Fallback in milliseconds: fill the budget by saving per byte, then fill slots where they help."""
    start = time.perf_counter()
    costs = tier_costs(problem)
    tier = np.where(_pick_in_memory(problem, costs), RESIDENT, FLASH).astype(np.int8)
    _fill_slots(problem, costs, tier)
    return make_plan(problem, tier, "greedy", time.perf_counter() - start, "greedy")


def make_plan(problem: PlanProblem, tier: np.ndarray, solver: str, solve_s: float, status: str) -> Plan:
    on_gpu = (tier == SLOT) & problem.costs.has_gpu
    return Plan(
        tier=tier.astype(np.int8),
        processor=np.where(on_gpu, GPU, CPU).astype(np.int8),
        predicted_step_s=step_time(problem, tier),
        solver=solver,
        solve_s=solve_s,
        status=status,
    )


def _pick_in_memory(problem: PlanProblem, costs: np.ndarray) -> np.ndarray:
    """must_have first, then every expert whose residency saves time, by saving per byte, while bytes fit."""
    can_slot = (problem.slot_capacity > 0)[:, None]
    saving = costs[FLASH] - np.minimum(costs[RESIDENT], np.where(can_slot, costs[SLOT], np.inf))
    wanted = problem.must_have | (saving > 0)
    order = np.lexsort(((-saving / problem.expert_bytes).ravel(), (~problem.must_have).ravel()))
    order = order[wanted.ravel()[order]]
    sizes = problem.expert_bytes.ravel()[order]
    chosen = np.zeros(saving.size, dtype=bool)
    left, start = problem.resident_budget_bytes, 0
    while start < len(order):  # a run of experts that fit in turn, then on from the next that fits
        after = np.subtract.accumulate(np.r_[left, sizes[start:]])  # the bytes left, subtracted in turn
        fits = sizes[start:] <= after[:-1]
        stop = len(fits) if fits.all() else int(np.argmin(fits))
        chosen[order[start : start + stop]] = True
        left = after[stop]
        rest = np.flatnonzero(sizes[start + stop :] <= left)
        if rest.size == 0:
            break
        start += stop + int(rest[0])
    return chosen.reshape(saving.shape)


def _fill_slots(problem: PlanProblem, costs: np.ndarray, tier: np.ndarray) -> None:
    """Per layer, promote the in-memory expert that leaves the layer fastest, while it gets no slower
    (every layer takes its next step at once)."""
    slot, resident = costs[SLOT], costs[RESIDENT]
    open_ = tier == RESIDENT
    layers = np.arange(tier.shape[0])
    gpu, cpu = np.zeros(tier.shape[0]), np.where(open_, resident, costs[FLASH]).sum(1)
    steps = np.minimum(problem.slot_capacity, open_.sum(1))
    while (steps > 0).any():
        after = np.where(open_, layer_time(problem, gpu[:, None] + slot, cpu[:, None] - resident), np.inf)
        e = np.argmin(after, axis=1)
        go = (steps > 0) & (after[layers, e] <= layer_time(problem, gpu, cpu))
        rows, e = layers[go], e[go]
        tier[rows, e], open_[rows, e] = SLOT, False
        gpu[rows] += slot[rows, e]
        cpu[rows] -= resident[rows, e]
        steps = np.where(go, steps - 1, 0)


def layer_time(problem: PlanProblem, slot_branch, other_branch):
    """A layer waits for its slower branch; without a GPU both branches are the CPU's."""
    if problem.costs.has_gpu:
        return np.maximum(slot_branch, other_branch)
    return slot_branch + other_branch


def _expert_bytes(values, shape: tuple) -> np.ndarray:
    b = np.asarray(values, dtype=np.float64)
    if b.shape == shape[:1]:
        b = np.repeat(b[:, None], shape[1], axis=1)
    if b.shape != shape or b.min(initial=1) <= 0:
        raise MoespacError(f"expert_bytes must be positive with shape {shape[:1]} or {shape}, got {b.shape}")
    return b


def _as_shape(values, shape: tuple, what: str, dtype) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != tuple(shape):
        raise MoespacError(f"{what} must have shape {tuple(shape)}, got {arr.shape}")
    return arr.astype(dtype)
