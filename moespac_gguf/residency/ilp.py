"""The balancer's integer program (plan.py's docstring states it), solved by HiGHS or CBC through
PuLP, and a background thread that keeps the decode loop from ever waiting for it.

The only module that imports pulp and highspy: the decode path plans with `plan.greedy`, which
is exact on CPU-only machines with equal expert sizes, and importing the solvers costs start-up
time and memory that path does not need.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import highspy
import numpy as np
import pulp

from ..core.errors import MoespacError
from .plan import FLASH, RESIDENT, SLOT, Plan, PlanProblem, feasible, greedy, make_plan, step_time, tier_costs

SOLVERS = ("highs", "cbc")
DEFAULT_SOLVER = "highs"  # faster than CBC on every benchmark shape but one tie: bench/results/balancer.json
_MS = 1e3  # the ILP counts milliseconds so solver tolerances stay far below real costs


def solve(
    problem: PlanProblem,
    solver: str = DEFAULT_SOLVER,
    time_limit: float = 2.0,
    gap: float = 0.005,
    warm_start: Plan | None = None,
) -> Plan:
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
    return make_plan(problem, tier, solver, time.perf_counter() - t0, status)


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
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, threads=1, warmStart=True, timeMode="elapsed")
