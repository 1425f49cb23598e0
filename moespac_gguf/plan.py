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
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable

import highspy
import numpy as np
import pulp

from .errors import MoespacError

SLOT, RESIDENT, FLASH = 0, 1, 2
CPU, GPU = 0, 1
SOLVERS = ("highs", "cbc")
DEFAULT_SOLVER = "highs"  # faster than CBC on every benchmark shape but one tie: bench/results/balancer.json
_MS = 1e3  # the ILP counts milliseconds so solver tolerances stay far below real costs


@dataclass
class DeviceCosts:
    """Measured speeds of one machine; gpu_s_per_token_expert is None on CPU-only machines."""
    flash_read_bps: float
    memcpy_bps: float
    cpu_s_per_token_expert: float
    gpu_s_per_token_expert: float | None = None

    def __post_init__(self):
        if min(self.flash_read_bps, self.memcpy_bps) <= 0:
            raise MoespacError("flash and memcpy bandwidths must be positive")
        if self.cpu_s_per_token_expert < 0 or (self.gpu_s_per_token_expert or 0.0) < 0:
            raise MoespacError("per-token expert costs must be non-negative")

    @property
    def has_gpu(self) -> bool:
        return self.gpu_s_per_token_expert is not None


@dataclass
class PlanProblem:
    """One balancing question; arrays are validated and normalised on construction."""
    utility: np.ndarray               # float [n_layer, n_expert]: expected tokens next step
    expert_bytes: np.ndarray          # [n_layer] or [n_layer, n_expert]
    current: np.ndarray               # int [n_layer, n_expert]: tier now
    slot_capacity: np.ndarray         # int [n_layer]: T0 slots per layer, 0 if none
    resident_budget_bytes: float      # T0 + T1 expert bytes allowed
    costs: DeviceCosts
    must_have: np.ndarray | None = None  # bool [n_layer, n_expert]: must end in T0/T1
    horizon_steps: float = 8.0        # steps until the next plan: one-off moves are amortized over it

    def __post_init__(self):
        self.utility = np.asarray(self.utility, dtype=np.float64)
        if self.utility.ndim != 2 or not np.all(np.isfinite(self.utility)) or self.utility.min(initial=0) < 0:
            raise MoespacError(f"utility must be a finite non-negative [n_layer, n_expert] array, "
                               f"got shape {self.utility.shape}")
        shape = self.utility.shape
        self.expert_bytes = _expert_bytes(self.expert_bytes, shape)
        self.current = _as_shape(self.current, shape, "current tier", np.int8)
        if not np.isin(self.current, (SLOT, RESIDENT, FLASH)).all():
            raise MoespacError("current tier values must be SLOT=0, RESIDENT=1 or FLASH=2")
        self.slot_capacity = _as_shape(self.slot_capacity, shape[:1], "slot_capacity", np.int64)
        if self.slot_capacity.min(initial=0) < 0:
            raise MoespacError("slot_capacity must be non-negative")
        self.must_have = (np.zeros(shape, dtype=bool) if self.must_have is None
                          else _as_shape(self.must_have, shape, "must_have", bool))
        if self.horizon_steps <= 0:
            raise MoespacError(f"horizon_steps must be positive, got {self.horizon_steps}")
        must_bytes = float(self.expert_bytes[self.must_have].sum())
        if must_bytes > self.resident_budget_bytes:
            raise MoespacError(f"resident budget {self.resident_budget_bytes / 2**20:.1f} MiB is smaller than "
                               f"the {must_bytes / 2**20:.1f} MiB of experts this step must have")


@dataclass
class Plan:
    """Where each expert lives and who computes it, with the step time the cost model predicts."""
    tier: np.ndarray          # int8 [n_layer, n_expert]: SLOT, RESIDENT or FLASH
    processor: np.ndarray     # int8 [n_layer, n_expert]: CPU or GPU
    predicted_step_s: float
    solver: str               # "highs", "cbc" or "greedy"
    solve_s: float            # model build + solve (+ greedy start) wall time
    status: str               # "optimal" (within gap), "time_limit" or "greedy"


def tier_costs(problem: PlanProblem) -> np.ndarray:
    """Seconds each expert adds to its branch in each tier: float [3, n_layer, n_expert]."""
    c, u, b = problem.costs, problem.utility, problem.expert_bytes
    from_flash = problem.current == FLASH
    fetch = b / c.flash_read_bps
    cpu = u * c.cpu_s_per_token_expert
    slot_compute = u * (c.gpu_s_per_token_expert if c.has_gpu else c.cpu_s_per_token_expert)
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
    return (tier.shape == problem.utility.shape
            and bool(((tier == SLOT).sum(1) <= problem.slot_capacity).all())
            and float(problem.expert_bytes[in_memory].sum()) <= problem.resident_budget_bytes
            and bool(in_memory[problem.must_have].all()))


def greedy(problem: PlanProblem) -> Plan:
    """Fallback in milliseconds: fill the budget by saving per byte, then fill slots where they help."""
    start = time.perf_counter()
    costs = tier_costs(problem)
    tier = np.where(_pick_in_memory(problem, costs), RESIDENT, FLASH).astype(np.int8)
    _fill_slots(problem, costs, tier)
    return _make_plan(problem, tier, "greedy", time.perf_counter() - start, "greedy")


def solve(problem: PlanProblem, solver: str = DEFAULT_SOLVER, time_limit: float = 2.0, gap: float = 0.005,
          warm_start: Plan | None = None) -> Plan:
    """The ILP's plan, started from the better of greedy and `warm_start` (if still feasible), so a
    time-limited answer is never worse than either."""
    if solver not in SOLVERS:
        raise MoespacError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    t0 = time.perf_counter()
    starts = [greedy(problem)] + ([warm_start] if warm_start is not None and feasible(problem, warm_start.tier) else [])
    start = min(starts, key=lambda plan: step_time(problem, plan.tier))
    costs = tier_costs(problem)
    lp, slot, resident, branch = _build_model(problem, costs)
    _set_start(problem, costs, start.tier, slot, resident, branch)
    lp.solve(_solver(solver, time_limit, gap))
    tier, status = start.tier, "time_limit"
    if lp.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        found = _read_tiers(problem, slot, resident)
        status = "optimal" if lp.sol_status == pulp.LpSolutionOptimal else "time_limit"
        if step_time(problem, found) <= step_time(problem, start.tier):
            tier = found
    return _make_plan(problem, tier, solver, time.perf_counter() - t0, status)


class BackgroundBalancer:
    """Re-solves on a daemon thread so the decode loop never waits for the solver.

    `submit` replaces any problem not yet started (the latest one wins). If the solver has not
    answered `deadline_s` after a submit, `latest` serves the greedy plan of that problem until the
    solver's plan arrives (a problem queued behind a running solve gets it when the worker takes it up).
    """

    def __init__(self, solve_fn: Callable[..., Plan] = solve, deadline_s: float = 0.25):
        self._solve_fn, self._deadline_s = solve_fn, deadline_s
        self._cond = threading.Condition()
        self._pending: tuple[PlanProblem, float] | None = None
        self._fallback: tuple[Plan, float] | None = None  # greedy plan, time it may be served
        self._plan: Plan | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moespac-balancer", daemon=True)
        self._thread.start()

    def submit(self, problem: PlanProblem) -> None:
        with self._cond:
            if self._closed:
                raise MoespacError("balancer is closed")
            self._pending = (problem, time.monotonic())
            self._cond.notify()

    def latest(self) -> Plan | None:
        """The freshest plan: the solver's, or greedy once the solver is past its deadline."""
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._fallback is not None and time.monotonic() >= self._fallback[1]:
                self._plan, self._fallback = self._fallback[0], None
            return self._plan

    def close(self) -> None:
        """Stop the thread (waits for a solve in progress)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._pending is not None)
                if self._closed:
                    return
                (problem, submitted), self._pending = self._pending, None
            try:
                fallback = greedy(problem)
                with self._cond:
                    self._fallback = (fallback, submitted + self._deadline_s)
                    previous = self._plan
                plan = self._solve_fn(problem, warm_start=previous)
            except Exception as e:  # surfaced by latest(): a dead planner must not fail silently
                with self._cond:
                    self._error = e
                return
            with self._cond:
                self._plan, self._fallback = plan, None


def _make_plan(problem: PlanProblem, tier: np.ndarray, solver: str, solve_s: float, status: str) -> Plan:
    on_gpu = (tier == SLOT) & problem.costs.has_gpu
    return Plan(tier=tier.astype(np.int8), processor=np.where(on_gpu, GPU, CPU).astype(np.int8),
                predicted_step_s=step_time(problem, tier), solver=solver, solve_s=solve_s, status=status)


def _pick_in_memory(problem: PlanProblem, costs: np.ndarray) -> np.ndarray:
    """must_have first, then every expert whose residency saves time, by saving per byte, while bytes fit."""
    can_slot = (problem.slot_capacity > 0)[:, None]
    saving = costs[FLASH] - np.minimum(costs[RESIDENT], np.where(can_slot, costs[SLOT], np.inf))
    wanted = problem.must_have | (saving > 0)
    order = np.lexsort(((-saving / problem.expert_bytes).ravel(), (~problem.must_have).ravel()))
    chosen = np.zeros(saving.size, dtype=bool)
    left = problem.resident_budget_bytes
    for i, size in zip(order, problem.expert_bytes.ravel()[order]):
        if wanted.flat[i] and size <= left:
            chosen[i], left = True, left - size
    return chosen.reshape(saving.shape)


def _fill_slots(problem: PlanProblem, costs: np.ndarray, tier: np.ndarray) -> None:
    """Per layer, promote the in-memory expert that leaves the layer fastest, while it gets no slower."""
    for layer, capacity in enumerate(problem.slot_capacity):
        slot, resident = costs[SLOT, layer], costs[RESIDENT, layer]
        open_ = tier[layer] == RESIDENT
        gpu, cpu = 0.0, float(np.where(open_, resident, costs[FLASH, layer]).sum())
        for _ in range(min(int(capacity), int(open_.sum()))):
            after = np.where(open_, _layer_time(problem, gpu + slot, cpu - resident), np.inf)
            e = int(np.argmin(after))
            if after[e] > _layer_time(problem, gpu, cpu):
                break
            tier[layer, e], open_[e], gpu, cpu = SLOT, False, gpu + slot[e], cpu - resident[e]


def _layer_time(problem: PlanProblem, slot_branch, other_branch):
    """A layer waits for its slower branch; without a GPU both branches are the CPU's."""
    if problem.costs.has_gpu:
        return np.maximum(slot_branch, other_branch)
    return slot_branch + other_branch


def _build_model(problem: PlanProblem, costs: np.ndarray):
    """The ILP of the module docstring, without dominated variables; returns
    (lp, slot vars, resident vars, per-layer z vars), the first two keyed by (layer, expert)."""
    ms = costs * _MS
    has_gpu = problem.costs.has_gpu
    may_reside, may_slot = _free_choices(problem, costs)
    resident = {(l, e): pulp.LpVariable(f"r_{l}_{e}", cat=pulp.LpBinary) for l, e in zip(*np.nonzero(may_reside))}
    slot = {(l, e): pulp.LpVariable(f"s_{l}_{e}", cat=pulp.LpBinary) for l, e in zip(*np.nonzero(may_slot))}
    branch = [pulp.LpVariable(f"z_{l}", lowBound=0) for l in range(problem.utility.shape[0])] if has_gpu else []
    cpu = [pulp.LpAffineExpression(constant=float(total)) for total in ms[FLASH].sum(1)]
    gpu = [pulp.LpAffineExpression() for _ in cpu]
    for (l, e), v in resident.items():
        cpu[l].addterm(v, ms[RESIDENT, l, e] - ms[FLASH, l, e])
    for (l, e), v in slot.items():
        cpu[l].addterm(v, -ms[FLASH, l, e])
        (gpu if has_gpu else cpu)[l].addterm(v, ms[SLOT, l, e])
    lp = pulp.LpProblem("balancer", pulp.LpMinimize)
    lp += pulp.lpSum(branch) if has_gpu else pulp.lpSum(cpu)
    for l, z in enumerate(branch):
        lp += z >= gpu[l], f"gpu_{l}"
        lp += z >= cpu[l], f"cpu_{l}"
    for l, capacity in enumerate(problem.slot_capacity):
        in_layer = [slot[l, e] for e in np.flatnonzero(may_slot[l])]
        if len(in_layer) > capacity:
            lp += pulp.lpSum(in_layer) <= int(capacity), f"slots_{l}"
    for l, e in zip(*np.nonzero(may_reside | may_slot)):
        placed = pulp.lpSum(v for v in (resident.get((l, e)), slot.get((l, e))) if v is not None)
        if problem.must_have[l, e]:
            lp += placed == 1, f"one_{l}_{e}"
        elif (l, e) in resident and (l, e) in slot:
            lp += placed <= 1, f"one_{l}_{e}"
    units, capacity = _budget_units(problem)
    in_memory = [(v, units[key]) for variables in (resident, slot) for key, v in variables.items()]
    lp += pulp.LpAffineExpression(in_memory) <= capacity, "budget"
    return lp, slot, resident, branch


def _free_choices(problem: PlanProblem, costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where residency and slots can matter: RESIDENT never beats FLASH when it costs the CPU branch
    no less and uses budget; without a GPU a SLOT never beats RESIDENT when it costs no less (same
    branch, same bytes, plus a slot). Everything else is fixed to FLASH before the solver sees it."""
    may_reside = problem.must_have | (costs[RESIDENT] < costs[FLASH])
    may_slot = (problem.slot_capacity > 0)[:, None] & np.ones_like(may_reside)
    if not problem.costs.has_gpu:
        may_slot &= costs[SLOT] < costs[RESIDENT]
    return may_reside, may_slot


def _budget_units(problem: PlanProblem) -> tuple[np.ndarray, float]:
    """Bytes in units of the smallest expert, and the budget in those units, rounded down when every
    size is a whole number of units: an integral capacity keeps the LP bound tight (NOTES: CBC ran
    for >10 min on equal sizes with a fractional capacity)."""
    unit = float(problem.expert_bytes.min())
    units = problem.expert_bytes / unit
    cap = problem.resident_budget_bytes / unit
    if np.allclose(units, np.round(units)):
        return np.round(units), float(math.floor(cap + 1e-9))
    return units, cap


def _set_start(problem: PlanProblem, costs: np.ndarray, tier: np.ndarray, slot, resident, branch) -> None:
    """Give every variable its value in `tier`: the solver's first incumbent."""
    for (l, e), v in resident.items():
        v.setInitialValue(int(tier[l, e] == RESIDENT))
    for (l, e), v in slot.items():
        v.setInitialValue(int(tier[l, e] == SLOT))
    chosen = np.take_along_axis(costs, np.asarray(tier, dtype=np.intp)[None], 0)[0] * _MS
    on_slot = tier == SLOT
    for l, z in enumerate(branch):
        z.setInitialValue(max(float(chosen[l][on_slot[l]].sum()), float(chosen[l][~on_slot[l]].sum())))


def _read_tiers(problem: PlanProblem, slot, resident) -> np.ndarray:
    tier = np.full(problem.utility.shape, FLASH, dtype=np.int8)
    for value, variables in ((RESIDENT, resident), (SLOT, slot)):
        for key, v in variables.items():
            if (v.varValue or 0.0) > 0.5:
                tier[key] = value
    return tier


class _Highs(pulp.HiGHS):
    """pulp.HiGHS with two changes: integrality is set in one call (pulp sets it column by column at
    ~60 us each: 0.6 s on a 48x128 model), and the variables' initial values become HiGHS's first
    incumbent (pulp.HiGHS ignores them)."""

    def __init__(self, **options):
        super().__init__(mip=False, **options)  # keeps pulp's per-column integrality calls off

    def buildSolverModel(self, lp):
        super().buildSolverModel(lp)
        integer = np.array([v.index for v in lp.variables() if v.cat == pulp.LpInteger], dtype=np.int32)
        kinds = np.full(len(integer), int(highspy.HighsVarType.kInteger), dtype=np.uint8)
        lp.solverModel.changeColsIntegrality(len(integer), integer, kinds)

    def callSolver(self, lp):
        variables = lp.variables()
        index = np.array([v.index for v in variables], dtype=np.int32)
        value = np.array([v.varValue or 0.0 for v in variables], dtype=np.float64)
        lp.solverModel.setSolution(len(variables), index, value)
        super().callSolver(lp)


def _solver(name: str, time_limit: float, gap: float):
    """One thread: the planner shares the cores with llama.cpp's decode."""
    if name == "highs":
        return _Highs(msg=False, timeLimit=time_limit, gapRel=gap, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, threads=1, warmStart=True,
                             timeMode="elapsed")


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
