"""The balancer's Lagrangian relaxation: a plan and a lower bound on the optimum in milliseconds.

`lagrangian` prices the budget at lam per byte and replaces each layer's max by
theta_l*GPU + (1-theta_l)*CPU (the sum without a GPU): then every expert picks its cheapest tier on
its own but for the slot count. Every (lam, theta) bounds the optimum from below and the best bound
is the LP relaxation's. The picks at the best prices, recombined per layer under the budget, are a
plan in a few ms, within 0.001% of the best found on every 26x64-94x128 benchmark re-plan but
those with half a layer or more in slots (0.4%). The bound is within 0.5% of it at 5 tokens a step and within 1%
at 1 token a step (the LP's integrality gap), so `ilp.solve` runs a solver only where it falls short.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np

from .plan import FLASH, RESIDENT, SLOT, Plan, PlanProblem, layer_time, make_plan, tier_costs


def lagrangian(problem: PlanProblem) -> tuple[Plan, float]:
    """A plan, and a lower bound on the step time of every plan (so of the optimum's), in 2-25 ms at
    48x128 (the module docstring says how). The plan is feasible but carries no proof: its status is
    "relaxed"."""
    start = time.perf_counter()
    costs = tier_costs(problem)
    dual = _Dual(problem, costs)
    bound, picks = dual.maximize()
    tier = dual.recombine(picks)
    if problem.costs.has_gpu:
        _balance(problem, costs, tier)
    return make_plan(problem, tier, "lagrangian", time.perf_counter() - start, "relaxed"), bound


_SEARCH_STEPS = 50  # per tangent search; 48x128 instances need under 20
_TOLERANCE = 1e-6  # the byte price search stops when its bound is this close (relative) to the LP's


@dataclass
class _Picks:
    """Each expert's cheapest tier at some prices, per layer: the tiers and their layer totals."""

    tier: np.ndarray  # int8 [layers, n_expert]
    value: np.ndarray  # the priced objective: theta*gpu + (1-theta)*cpu + lam*bytes (sum without a GPU)
    gpu: np.ndarray
    cpu: np.ndarray
    bytes: np.ndarray

    def replace_rows(self, rows: np.ndarray, other: _Picks, take) -> None:
        for name in ("tier", "value", "gpu", "cpu", "bytes"):
            getattr(self, name)[rows] = getattr(other, name)[take]


class _Dual:
    """The Lagrangian dual of the module docstring. Both searches maximize a concave piecewise-linear
    function by intersecting the tangents at the two ends of a bracket: each step either meets the
    function (the maximum) or moves an end to a new linear piece, so they stop after a few pieces."""

    def __init__(self, problem: PlanProblem, costs: np.ndarray):
        self.problem = problem
        self.slot, self.resident, self.flash = costs
        self.bytes = problem.expert_bytes
        self.n_layer = problem.utility.shape[0]

    def pick(self, lam: float, theta: np.ndarray | None, rows=slice(None)) -> _Picks:
        """Every expert's cheapest tier in `rows` at byte price `lam` and GPU weight `theta` (one per
        row; None without a GPU): resident or flash alone, then the best slot savings up to the
        slot count."""
        p = self.problem
        slot, resident, flash, size = self.slot[rows], self.resident[rows], self.flash[rows], self.bytes[rows]
        w_gpu, w_cpu = (1.0, 1.0) if theta is None else (theta[:, None], 1.0 - theta[:, None])
        price = lam * size
        keep, drop = w_cpu * resident + price, np.where(p.must_have[rows], np.inf, w_cpu * flash)
        held = keep < drop
        value = np.minimum(keep, drop)
        saving = value - (w_gpu * slot + price)
        on_slot = _best(saving, p.slot_capacity[rows])
        held &= ~on_slot
        return _Picks(
            tier=np.where(on_slot, SLOT, np.where(held, RESIDENT, FLASH)).astype(np.int8),
            value=(value - saving * on_slot).sum(1),
            gpu=(slot * on_slot).sum(1),
            cpu=np.where(on_slot, 0.0, np.where(held, resident, flash)).sum(1),
            bytes=(size * (on_slot | held)).sum(1),
        )

    def layers(self, lam: float) -> tuple[np.ndarray, np.ndarray, list[_Picks]]:
        """Per layer at byte price `lam`: the best bound over theta, the bytes of the LP optimum there
        (the slope of the bound in lam) and the picks either side of it. theta = 1 leaves the GPU
        empty, so a layer whose GPU is not the slower branch at theta = 0 is done at 0."""
        if not self.problem.costs.has_gpu:
            picks = self.pick(lam, None)
            return picks.value, picks.bytes, [picks]
        lo = self.pick(lam, np.zeros(self.n_layer))
        rows = np.flatnonzero(lo.gpu > lo.cpu)
        hi = copy.deepcopy(lo)
        hi.replace_rows(rows, self.pick(lam, np.ones(rows.size), rows), slice(None))
        theta_lo, theta_hi = np.zeros(self.n_layer), np.ones(self.n_layer)
        bound, lp_bytes = lo.value.copy(), lo.bytes.copy()
        for _ in range(_SEARCH_STEPS):
            if rows.size == 0:
                break
            slope_lo, slope_hi = lo.gpu[rows] - lo.cpu[rows], hi.gpu[rows] - hi.cpu[rows]
            at_lo = lo.value[rows] - theta_lo[rows] * slope_lo  # the tangents' values at theta = 0
            theta = np.clip((hi.value[rows] - theta_hi[rows] * slope_hi - at_lo) / (slope_lo - slope_hi), 0.0, 1.0)
            tangent = at_lo + theta * slope_lo
            new = self.pick(lam, theta, rows)
            bound[rows] = np.maximum(bound[rows], new.value)
            met = new.value >= tangent - 1e-12 * np.abs(tangent)
            share = slope_hi / (slope_hi - slope_lo)  # of lo in the balanced (gpu = cpu) LP optimum
            lp_bytes[rows[met]] = (share * lo.bytes[rows] + (1 - share) * hi.bytes[rows])[met]
            up = ~met & (new.gpu > new.cpu)
            for end, end_theta, take in ((lo, theta_lo, up), (hi, theta_hi, ~met & ~up)):
                end.replace_rows(rows[take], new, take)
                end_theta[rows[take]] = theta[take]
            rows = rows[~met]
        return bound, lp_bytes, [lo, hi]

    def maximize(self) -> tuple[float, list[_Picks]]:
        """The best lower bound on the step time found, and the picks at the byte prices bracketing
        the best price (over the budget at one end, under it at the other)."""
        budget = self.problem.resident_budget_bytes
        bound, lp_bytes, picks = self.layers(0.0)
        lo = (0.0, float(bound.sum()), float(lp_bytes.sum()) - budget, picks)
        if lo[2] <= 0:  # the budget does not bind
            return lo[1], picks
        lam = 2.0 * float((self.flash / self.bytes).max())  # dearer than any expert saves: must_have only
        bound, lp_bytes, picks = self.layers(lam)
        hi = (lam, float(bound.sum()) - lam * budget, float(lp_bytes.sum()) - budget, picks)
        best = max(lo[1], hi[1])
        for _ in range(_SEARCH_STEPS):
            lam = lo[0] + (hi[1] - lo[1] - hi[2] * (hi[0] - lo[0])) / (lo[2] - hi[2])
            tangent = lo[1] + lo[2] * (lam - lo[0])
            bound, lp_bytes, picks = self.layers(lam)
            value, slope = float(bound.sum()) - lam * budget, float(lp_bytes.sum()) - budget
            best = max(best, value)
            if tangent - best <= _TOLERANCE * abs(tangent):
                return best, lo[3] + hi[3] + picks
            if slope > 0:
                lo = (lam, value, slope, picks)
            else:
                hi = (lam, value, slope, picks)
        return best, lo[3] + hi[3]

    def recombine(self, picks: list[_Picks]) -> np.ndarray:
        """One of the candidate picks per layer, chosen under the budget: the fastest per layer if
        they fit, else start from the fewest bytes per layer (the must_have experts alone are a
        candidate, so this fits) and take the switch that saves the most time per byte added, while
        one saves time and fits."""
        p = self.problem
        must_only = np.where(p.must_have, RESIDENT, FLASH).astype(np.int8)
        tiers = np.stack([c.tier for c in picks] + [must_only])
        gpu = np.stack([c.gpu for c in picks] + [np.zeros(self.n_layer)])
        cpu = np.stack([c.cpu for c in picks] + [np.where(p.must_have, self.resident, self.flash).sum(1)])
        size = np.stack([c.bytes for c in picks] + [(self.bytes * p.must_have).sum(1)])
        seconds = layer_time(p, gpu, cpu)
        layers = np.arange(self.n_layer)
        chosen = np.lexsort((size, seconds), axis=0)[0]
        if size[chosen, layers].sum() <= p.resident_budget_bytes:
            return tiers[chosen, layers]
        chosen = np.lexsort((seconds, size), axis=0)[0]
        left = p.resident_budget_bytes - size[chosen, layers].sum()
        while True:
            faster = seconds - seconds[chosen, layers]
            more = size - size[chosen, layers]
            fits = (faster < 0) & (more <= left)
            per_byte = np.where(more > 0, faster / np.where(more > 0, more, 1.0), -np.inf)
            k, layer = np.unravel_index(np.argmin(np.where(fits, per_byte, np.inf)), fits.shape)
            if not fits[k, layer]:
                return tiers[chosen, layers]
            left -= more[k, layer]
            chosen[layer] = k


def _balance(problem: PlanProblem, costs: np.ndarray, tier: np.ndarray) -> None:
    """Per layer, move the one expert between slot and resident (same bytes) that leaves the layer
    fastest, while that is faster: the dual's picks sit either side of a layer's balance point and
    the best plan is often between them (at 48x128 with 60-100 slots a layer: 1% -> 0.4% off)."""
    slot, resident = costs[SLOT], costs[RESIDENT]
    on_slot = tier == SLOT
    gpu, cpu = np.where(on_slot, slot, 0).sum(1), np.where(on_slot, 0, np.choose(tier, costs)).sum(1)
    layers = np.arange(tier.shape[0])
    for _ in range(tier.shape[1]):
        room = (on_slot.sum(1) < problem.slot_capacity)[:, None] & (tier == RESIDENT)
        out = np.maximum(gpu[:, None] - slot, cpu[:, None] + resident)
        back = np.maximum(gpu[:, None] + slot, cpu[:, None] - resident)
        after = np.where(on_slot, out, np.where(room, back, np.inf))
        e = np.argmin(after, axis=1)
        go = after[layers, e] < np.maximum(gpu, cpu) * (1 - 1e-12)
        if not go.any():
            return
        rows, e = layers[go], e[go]
        sign = np.where(on_slot[rows, e], -1.0, 1.0)
        gpu[rows] += sign * slot[rows, e]
        cpu[rows] -= sign * resident[rows, e]
        tier[rows, e] = np.where(on_slot[rows, e], RESIDENT, SLOT)
        on_slot[rows, e] = ~on_slot[rows, e]


def _best(saving: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Mask of each row's `count` largest positive savings (equal ones by position)."""
    n = saving.shape[1]
    nth = np.sort(saving, axis=1)[np.arange(len(count)), np.clip(n - count, 0, n - 1)]
    best = (saving > 0) & (saving >= np.where(count > 0, nth, np.inf)[:, None])
    ties = np.flatnonzero(best.sum(1) > count)
    if ties.size:
        rank = np.argsort(np.argsort(-saving[ties], axis=1, kind="stable"), axis=1)
        best[ties] &= rank < count[ties, None]
    return best
