"""The balancer's integer program (plan.py's docstring states it): `solve` answers from the
Lagrangian bound when it proves a plan within the gap and runs HiGHS (in process, highspy) or CBC
(a subprocess, through PuLP) from the best plan known otherwise; a background thread keeps the
decode loop from ever waiting for it.

The only module that imports pulp and highspy: the decode path plans with `plan.greedy`, which
is exact on CPU-only machines with equal expert sizes, and importing the solvers costs start-up
time and memory that path does not need.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import highspy
import numpy as np
import pulp

from ..core.errors import MoespacError
from .lagrangian import lagrangian
from .plan import (
    FLASH,
    RESIDENT,
    SLOT,
    Plan,
    PlanProblem,
    feasible,
    greedy,
    make_plan,
    step_time,
    tier_costs,
)

SOLVERS = ("highs", "cbc")
DEFAULT_SOLVER = "highs"  # faster than CBC on every benchmark shape but one tie: bench/results/balancer.json
# The GPU tier's re-plans at run time: the Lagrangian bound proves 1-token-a-step re-plans within 1%
# in 5-13 ms at 48x128, where 0.5% runs HiGHS for 0.3-0.5 s (bench/results/balancer_gpu.md).
RUNTIME_GAP = 0.01
_MS = 1e3  # the ILP counts milliseconds so solver tolerances stay far below real costs


def _quiet_banner() -> None:
    """HiGHS prints a banner to stdout (the C library's, not Python's) when a process makes its
    first Highs object, whatever its options say; `moespac run` writes the model's text there, and
    the balancer's first plan comes mid-answer. The first one is made here, at import, on the
    importing thread, with file descriptor 1 pointed at /dev/null for that moment."""
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


_quiet_banner()


def solve(
    problem: PlanProblem,
    solver: str = DEFAULT_SOLVER,
    time_limit: float = 2.0,
    gap: float = 0.005,
    warm_start: Plan | None = None,
) -> Plan:
    """A plan within `gap` of the optimum (status "optimal") or, once `time_limit` seconds are
    spent, the best one found, never worse than greedy's or `warm_start`'s (if still feasible).
    The Lagrangian bound (lagrangian.lagrangian) proves 48x128 re-plans of 5 tokens a step within 0.5% in
    10-30 ms, where HiGHS takes 0.3-0.7 s (bench/results/balancer_gpu.md); only where it cannot
    does the solver run, from the best plan (1-token steps need 0.3-0.5 s at 0.5%, 10 ms at 1%)."""
    _check_solver(solver)
    t0 = time.perf_counter()
    relaxed, bound = lagrangian(problem)
    start, start_s = _best_start(problem, warm_start, relaxed)
    if start_s - bound <= gap * start_s:
        return make_plan(problem, start, "lagrangian", time.perf_counter() - t0, "optimal")
    time_left = max(0.0, time_limit - (time.perf_counter() - t0))
    return _branch_and_bound(problem, solver, start, start_s, time_left, gap, t0)


def solve_mip(
    problem: PlanProblem,
    solver: str = DEFAULT_SOLVER,
    time_limit: float = 2.0,
    gap: float = 0.005,
    warm_start: Plan | None = None,
) -> Plan:
    """`solve` without the Lagrangian: the solver alone, started from greedy or `warm_start`."""
    _check_solver(solver)
    t0 = time.perf_counter()
    return _branch_and_bound(problem, solver, *_best_start(problem, warm_start), time_limit, gap, t0)


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


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise MoespacError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")


def _best_start(problem: PlanProblem, warm_start: Plan | None, *plans: Plan) -> tuple[np.ndarray, float]:
    """The tier of the fastest of greedy's plan, `plans` (made for `problem`) and `warm_start` (if
    still feasible; re-timed, as its own predicted_step_s was for the problem it solved), and its
    step time on `problem`."""
    starts = [(plan.tier, plan.predicted_step_s) for plan in (greedy(problem), *plans)]
    if warm_start is not None and feasible(problem, warm_start.tier):
        starts.append((warm_start.tier, step_time(problem, warm_start.tier)))
    return min(starts, key=lambda start: start[1])


def _branch_and_bound(
    problem: PlanProblem, solver: str, start: np.ndarray, start_s: float, time_limit: float, gap: float, t0: float
) -> Plan:
    """The solver's plan, or the tier `start` (step time `start_s`) where the solver found none
    faster; status "optimal" when the solver proved its plan within `gap` (so is `start` then, if
    faster), else "time_limit"."""
    costs = tier_costs(problem)
    model = _build_model(problem, costs)
    if solver == "highs":
        values, optimal = _run_highs(model, time_limit, gap)
    else:
        values, optimal = _run_cbc(model, model.values(costs, start), time_limit, gap)
    tier = start
    if values is not None:
        found = model.tiers(values, problem.utility.shape)
        if feasible(problem, found) and step_time(problem, found) <= start_s:
            tier = found
    return make_plan(problem, tier, solver, time.perf_counter() - t0, "optimal" if optimal else "time_limit")


@dataclass
class _Model:
    """The ILP as arrays, for either solver: binary columns r (one per flat index in `resident`), then
    s (`slot`), then one continuous z per layer with a GPU; CSR rows, each one-sided or an equality."""

    resident: np.ndarray
    slot: np.ndarray
    n_layer: int  # z columns: n_layer with a GPU, else 0
    cost: np.ndarray
    offset: float
    lower: np.ndarray
    upper: np.ndarray
    start: np.ndarray
    index: np.ndarray
    value: np.ndarray
    row_lower: np.ndarray
    row_upper: np.ndarray

    @property
    def n_binary(self) -> int:
        return len(self.resident) + len(self.slot)

    def values(self, costs: np.ndarray, tier: np.ndarray) -> np.ndarray:
        """`tier` as column values (CBC's first incumbent). A choice the model has no column for is
        dominated: a SLOT reads as RESIDENT, a RESIDENT as FLASH, each costing no more."""
        flat = tier.ravel()
        held = flat[self.resident]
        resident = (held == RESIDENT) | ((held == SLOT) & ~np.isin(self.resident, self.slot))
        values = np.concatenate([resident, flat[self.slot] == SLOT]).astype(np.float64)
        if not self.n_layer:
            return values
        chosen = np.take_along_axis(costs, np.asarray(tier, dtype=np.intp)[None], 0)[0] * _MS
        on_slot = tier == SLOT
        slower = np.maximum(np.where(on_slot, chosen, 0).sum(1), np.where(on_slot, 0, chosen).sum(1))
        return np.concatenate([values, slower])

    def tiers(self, values: np.ndarray, shape: tuple) -> np.ndarray:
        on = values[: self.n_binary] > 0.5
        tier = np.full(shape, FLASH, dtype=np.int8)
        tier.flat[self.resident[on[: len(self.resident)]]] = RESIDENT
        tier.flat[self.slot[on[len(self.resident) :]]] = SLOT
        return tier


def _build_model(problem: PlanProblem, costs: np.ndarray) -> _Model:
    """The ILP of plan.py's docstring without dominated variables, built from arrays (no per-term
    Python objects: 3-20 ms at 48x128 where PuLP took 0.3 s)."""
    ms = costs * _MS
    n_layer, n_expert = problem.utility.shape
    may_reside, may_slot = _free_choices(problem, costs)
    resident, slot = np.flatnonzero(may_reside), np.flatnonzero(may_slot)
    r_col, s_col = np.arange(len(resident)), len(resident) + np.arange(len(slot))
    r_layer, s_layer = resident // n_expert, slot // n_expert
    n_binary = len(resident) + len(slot)
    flash = ms[FLASH].ravel()
    held = ms[RESIDENT].ravel()[resident] - flash[resident]  # what r adds to its CPU branch
    rows = _Rows()
    if problem.costs.has_gpu:
        z_col = n_binary + np.arange(n_layer)
        cost, offset = np.concatenate([np.zeros(n_binary), np.ones(n_layer)]), 0.0
        ones, zeros = np.ones(n_layer), np.zeros(n_layer)
        # z_l >= GPU branch; z_l >= CPU branch = (all on flash) + sum r*held - sum s*flash
        rows.add(np.r_[np.arange(n_layer), s_layer], np.r_[z_col, s_col], np.r_[ones, -ms[SLOT].ravel()[slot]], zeros)
        rows.add(
            np.r_[np.arange(n_layer), r_layer, s_layer],
            np.r_[z_col, r_col, s_col],
            np.r_[ones, -held, flash[slot]],
            ms[FLASH].sum(1),
        )
    else:
        cost = np.concatenate([held, ms[SLOT].ravel()[slot] - flash[slot]])
        offset = float(flash.sum())
    full = np.flatnonzero(np.bincount(s_layer, minlength=n_layer) > problem.slot_capacity)
    in_full = np.isin(s_layer, full)
    row_of = np.searchsorted(full, s_layer[in_full])
    rows.add(row_of, s_col[in_full], np.ones(in_full.sum()), np.full(len(full), -np.inf), problem.slot_capacity[full])
    must = problem.must_have.ravel()
    both = np.intersect1d(resident, slot)  # r + s <= 1, = 1 if must_have
    rows.add(
        np.r_[np.arange(len(both)), np.arange(len(both))],
        np.r_[np.searchsorted(resident, both), len(resident) + np.searchsorted(slot, both)],
        np.ones(2 * len(both)),
        np.where(must[both], 1.0, -np.inf),
        np.ones(len(both)),
    )
    units, capacity = _budget_units(problem)
    units = units.ravel()
    rows.add(
        np.zeros(n_binary, dtype=np.intp),
        np.arange(n_binary),
        np.r_[units[resident], units[slot]],
        [-np.inf],
        [capacity],
    )
    lower = np.zeros(n_binary + (n_layer if problem.costs.has_gpu else 0))
    lower[r_col[must[resident] & ~np.isin(resident, both)]] = 1.0  # must_have with one way to stay
    upper = np.r_[np.ones(n_binary), np.full(len(lower) - n_binary, np.inf)]
    return _Model(resident, slot, len(lower) - n_binary, cost, offset, lower, upper, *rows.csr(), *rows.bounds())


class _Rows:
    """Sparse rows gathered block by block: (row, column, value) entries and each row's bounds."""

    def __init__(self):
        self.row, self.column, self.value, self.lower, self.upper = [], [], [], [], []
        self.count = 0

    def add(self, row, column, value, lower, upper=None) -> None:
        """One row per entry of `lower` (`upper` default +inf); `row` numbers them from 0 in this block."""
        lower = np.asarray(lower, dtype=np.float64)
        self.row.append(self.count + np.asarray(row, dtype=np.intp))
        self.column.append(np.asarray(column, dtype=np.intp))
        self.value.append(np.asarray(value, dtype=np.float64))
        self.lower.append(lower)
        self.upper.append(np.full(len(lower), np.inf) if upper is None else np.asarray(upper, dtype=np.float64))
        self.count += len(lower)

    def csr(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        row = np.concatenate(self.row)
        order = np.argsort(row, kind="stable")
        start = np.concatenate([[0], np.cumsum(np.bincount(row, minlength=self.count))])
        return (
            start.astype(np.int32),
            np.concatenate(self.column)[order].astype(np.int32),
            np.concatenate(self.value)[order],
        )

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.lower), np.concatenate(self.upper)


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


def _run_highs(model: _Model, time_limit: float, gap: float) -> tuple[np.ndarray | None, bool]:
    """HiGHS in process on one thread (the planner shares the cores with llama.cpp's decode): the
    best columns found (None if none) and whether they are proved within `gap`. Presolve is off: at
    48x128 it took 0.2-0.4 s of 0.5 s and the solve without it was never slower (0.25 s). No start:
    HiGHS 1.16 with presolve returned a start's own values with the objective of a better solution
    (2 of 240 small models), and `_branch_and_bound` keeps the start when HiGHS finds nothing faster."""
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = len(model.cost), len(model.row_lower)
    lp.col_cost_, lp.col_lower_, lp.col_upper_, lp.offset_ = model.cost, model.lower, model.upper, model.offset
    lp.row_lower_, lp.row_upper_ = model.row_lower, model.row_upper
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = model.start, model.index, model.value
    integer, continuous = highspy.HighsVarType.kInteger, highspy.HighsVarType.kContinuous
    lp.integrality_ = [integer] * model.n_binary + [continuous] * model.n_layer
    highs = highspy.Highs()
    options = dict(output_flag=False, threads=1, presolve="off", time_limit=float(time_limit), mip_rel_gap=gap)
    for option, value in options.items():
        highs.setOptionValue(option, value)
    highs.passModel(lp)
    highs.run()
    if highs.getInfo().primal_solution_status != highspy.SolutionStatus.kSolutionStatusFeasible:
        return None, False
    return np.asarray(highs.getSolution().col_value), highs.getModelStatus() == highspy.HighsModelStatus.kOptimal


def _run_cbc(model: _Model, start: np.ndarray, time_limit: float, gap: float) -> tuple[np.ndarray | None, bool]:
    """CBC through PuLP (a subprocess), one thread, from the column values `start`: as `_run_highs`."""
    columns = [
        pulp.LpVariable(
            f"x{j}",
            lowBound=float(model.lower[j]),
            upBound=None if math.isinf(model.upper[j]) else float(model.upper[j]),
            cat=pulp.LpInteger if j < model.n_binary else pulp.LpContinuous,
        )
        for j in range(len(model.cost))
    ]
    lp = pulp.LpProblem("balancer", pulp.LpMinimize)
    lp += pulp.LpAffineExpression(
        [(columns[j], model.cost[j]) for j in np.flatnonzero(model.cost)], constant=model.offset
    )
    for i, (lower, upper) in enumerate(zip(model.row_lower, model.row_upper)):
        terms = range(model.start[i], model.start[i + 1])
        row = pulp.LpAffineExpression([(columns[model.index[k]], model.value[k]) for k in terms])
        if lower == upper:
            lp += row == upper, f"r{i}"
            continue
        if lower > -np.inf:
            lp += row >= lower, f"r{i}"
        if upper < np.inf:
            lp += row <= upper, f"r{i}u"
    for column, value in zip(columns, start):
        column.setInitialValue(float(value))
    lp.solve(
        pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap, threads=1, warmStart=True, timeMode="elapsed")
    )
    if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        return None, False
    return np.array([column.varValue or 0.0 for column in columns]), lp.sol_status == pulp.LpSolutionOptimal
