"""The slot tier: what each MoE layer's expert slots hold, decided from the speculative utility.

The slots themselves are llama.SlotCache (memory llama.cpp allocates: the GPU's when there is
one, which makes them the GPU tier, else host RAM); this module only decides what they hold, so
it talks to them through the small `SlotStore` interface and never imports the llama layer.
"""

from __future__ import annotations

from typing import Protocol, TypedDict

import numpy as np

from ..core.events import VerificationEvent
from ..core.layout import MoeLayout
from .costs import DeviceCosts
from .plan import FLASH, RESIDENT, SLOT, Plan, PlanProblem
from .utility import UtilityEstimator


class SlotStore(Protocol):
    """What the filler needs of a slot cache (llama.slots.SlotCache provides it)."""

    n_layer: int
    n_expert: int
    n_slots: np.ndarray  # int [n_layer]
    moe_layers: list[int]
    buffer_bytes: int
    copied_bytes: int

    def copy_async(self, layer: int, expert: int, slot: int) -> None: ...
    def assign(self, layer: int, expert: int, slot: int) -> None: ...
    def evict(self, layer: int, expert: int) -> None: ...
    def expert_in(self, layer: int, slot: int) -> int | None: ...
    def assignment(self) -> np.ndarray: ...
    def close(self) -> None: ...


class Planner(Protocol):
    """The balancer behind the decode loop (ilp.BackgroundBalancer): never blocks it."""

    def submit(self, problem: PlanProblem) -> None: ...
    def latest(self) -> Plan | None: ...
    def close(self) -> None: ...


class SlotStats(TypedDict):
    """SlotFiller.stats: a completion's `moespac["slots"]`."""

    on_gpu: bool
    device: str | None  # the slots' device (a GPU, an RPC server's), None in host RAM
    slots: int  # over all layers
    buffer_bytes: int
    copies: int
    copied_bytes: int  # host -> device bytes with GPU slots
    hit_rate: float | None  # share of routed (row, expert) uses served from a slot
    planned_steps: int  # steps whose target was the balancer's plan (0: utility ranking only)


def slot_counts(layout: MoeLayout, budget_bytes: int, fraction: float, n_layer: int, spare: int = 0) -> list[int]:
    """Slots per layer (all `n_layer` layers of the model) for `fraction` of a byte budget, spread
    evenly over the MoE layers that get any; when there are fewer slots than layers the last
    layers get them (their routing is the least balanced, so one slot catches the most). `spare`:
    slots a layer with slots allocates beyond its count (GPU slots keep one all-zero slot per
    layer), paid from the same budget: a small budget gives one slot each to fewer layers
    rather than spares to all. At most every expert of a layer; all 0 when not even one fits."""
    layers = [l.index for l in layout.layers]
    room = int(fraction * budget_bytes // layout.mean_bytes_per_expert)
    n_with = min(len(layers), room // (1 + spare))
    total = min(room - spare * n_with, n_with * layout.n_expert)
    counts = [0] * n_layer
    for i in range(total):
        counts[layers[len(layers) - 1 - i % n_with]] += 1
    return counts


class SlotFiller:
    """Speculative-loop observer: each layer's slots hold the experts the balancer puts there.

    After each verification the utility estimate (the residency controller's, which the page
    engine also follows, or the filler's own when there is no memory budget) ranks experts;
    every `plan_every` steps the balancer (a `Planner`, off the decode thread) is asked where
    each expert should live given the costs, and its SLOT set becomes the target, occupants it
    leaves out evicted; until a plan arrives, each layer's top-S experts by utility are (none
    for slots across a link). Experts missing from a slot are copied, on the native worker
    while the draft runs, into free slots or slots whose occupants dropped out (without a plan
    an occupant is replaced only by an expert with (1 + margin)x its utility: copies cost bytes,
    churn buys nothing), at most `max_copies` per step, and assigned at the next draft/verify
    boundary: never into a slot the running graph reads (SlotCache refuses that).

    Experts in slots never touch their file pages, so the page engine (if any) leaves them out;
    host-RAM slots (no GPU, or unified memory) also shrink its byte budget by the slot buffer.
    """

    def __init__(
        self,
        cache: SlotStore,
        layout: MoeLayout,
        costs: DeviceCosts,
        *,
        on_gpu: bool,
        device: str | None = None,
        estimator: UtilityEstimator | None = None,
        engine=None,
        planner: Planner | None = None,
        plan_every: int = 16,
        margin: float = 1.0,
        max_copies: int = 4,
    ):
        """`estimator`: a utility estimator someone else updates (the residency controller's);
        None: the filler keeps its own from the verifications it hears. `engine`: the page tier's
        ResidencyEngine, or None when every expert stays in RAM. `device`: the slots' device as
        stats name it (a GPU, an RPC server's device), None for host RAM."""
        self.cache, self.costs, self.on_gpu, self.device = cache, costs, on_gpu, device
        self.own_estimator = estimator is None
        self.estimator = estimator or UtilityEstimator(cache.n_layer, cache.n_expert)
        self.engine, self.planner, self.plan_every = engine, planner, plan_every
        self.margin, self.max_copies = margin, max_copies
        self.in_slot = np.zeros((cache.n_layer, cache.n_expert), dtype=bool)
        self.pending: list[tuple[int, int, int]] = []
        self.copies = self.steps = self.planned_steps = 0
        self.hits = self.uses = 0
        self.bytes = np.array([[l.bytes_per_expert] for l in layout.layers], dtype=np.float64)
        self.layers = np.array([l.index for l in layout.layers])
        self.token_bytes = 4.0 * layout.n_embd  # a token's activations, F32: what a remote layer ships
        if engine is not None:
            engine.elsewhere = self.in_slot  # the engine reads the live mask
            if not on_gpu or costs.unified_memory:
                engine.budget = max(0, engine.budget - cache.buffer_bytes)

    def _commit(self) -> None:
        for layer, e, slot in self.pending:
            self.cache.assign(layer, e, slot)  # waits for its copy
            self.in_slot[layer, e] = True
            if self.engine is not None:  # the copy read the file pages; the slot holds it now
                self.engine.release((layer, e))
        self.pending = []

    def on_draft(self, draft: list[int], ahead=None) -> None:
        self._commit()

    def on_verify(self, event: VerificationEvent) -> None:
        if event.routing is not None:
            counts = event.routing.counts(self.cache.n_expert)
            self.hits += int(counts[self.in_slot].sum())
            self.uses += int(counts[self.layers].sum())
            if self.own_estimator:
                self.estimator.observe_verification(
                    np.asarray(event.batch), event.routing.experts, prefill=event.phase == "prefill"
                )
        self._commit()
        utility = self.estimator.predict()
        if self.planner is not None:
            if self.steps % self.plan_every == 0:
                self.planner.submit(self._problem(utility))
            self.steps += 1
        self._move(utility, *self._target(utility))

    def _problem(self, utility: np.ndarray) -> PlanProblem:
        """Where should each expert live for the next `plan_every` steps (layers with experts)."""
        rows = self.layers
        current = np.where(self.in_slot[rows], SLOT, RESIDENT)
        budget = float((self.bytes * self.cache.n_expert).sum())  # no page budget: all in RAM
        if self.engine is not None:
            current = np.where(self.in_slot[rows] | self.engine.resident[rows], current, FLASH)
            budget = float(self.engine.budget)
        slot_bytes = float((self.cache.n_slots[rows] * self.bytes[:, 0]).sum())
        return PlanProblem(
            utility=utility[rows],
            expert_bytes=self.bytes[:, 0],
            current=current,
            slot_capacity=self.cache.n_slots[rows],
            resident_budget_bytes=budget + slot_bytes,  # slots have their own memory
            costs=self.costs,
            horizon_steps=float(self.plan_every),
            token_bytes=self.token_bytes,
        )

    def _target(self, utility: np.ndarray) -> tuple[np.ndarray, bool]:
        """(bool [n_layer, n_expert], planned): the balancer's SLOT set (planned), else each
        layer's top-S by utility; none for slots across a link (costs.round_trip_s) until the
        balancer has weighed it: over a slow one every copy and every remote expert costs more
        than it saves, and the ranking knows nothing of that."""
        plan = self.planner.latest() if self.planner is not None else None
        want = np.zeros_like(self.in_slot)
        if plan is not None:
            self.planned_steps += 1
            want[self.layers] = plan.tier == SLOT
            return want, True
        if self.costs.round_trip_s is not None:
            return want, False
        for layer in self.cache.moe_layers:
            u = utility[layer]
            top = np.argsort(-u, kind="stable")[: int(self.cache.n_slots[layer])]
            want[layer, top[u[top] > 0]] = True
        return want, False

    def _move(self, utility: np.ndarray, want: np.ndarray, planned: bool) -> None:
        """Copy and assign the experts of `want` missing from the slots. `planned`: the balancer's
        plan, which weighed every move, decides alone: an occupant it leaves out is evicted now
        (free: the slot keeps its bytes) and computed on the CPU again; an expert over a link
        pays a round trip whether it helps or not. Else the utility ranking: an occupant gives
        way only to a missing expert of (1 + margin)x its utility."""
        cache = self.cache
        assignment = cache.assignment()
        moves = []  # the most useful candidates first, across layers, under a per-step copy budget
        for layer in cache.moe_layers:
            u = utility[layer]
            held = {int(e): int(s) for e, s in enumerate(assignment[layer]) if s >= 0}
            free = [s for s in range(int(cache.n_slots[layer])) if s not in held.values()]
            victims = sorted((e for e in held if not want[layer, e]), key=lambda e: u[e])  # weakest first
            if planned:
                for e in victims:
                    cache.evict(layer, e)
                    self.in_slot[layer, e] = False
                free += [held[e] for e in victims]
                victims = []
            missing = np.flatnonzero(want[layer] & ~self.in_slot[layer])
            for e in missing[np.argsort(-u[missing], kind="stable")].tolist():
                if free:
                    moves.append((u[e], layer, e, None, free.pop(0)))
                elif victims and u[e] > (1 + self.margin) * u[victims[0]]:
                    v = victims.pop(0)
                    moves.append((u[e], layer, e, v, held[v]))
        copies = 0
        for _, layer, e, victim, s in sorted(moves, key=lambda m: -m[0]):
            needs_copy = cache.expert_in(layer, s) != e
            if needs_copy and copies >= self.max_copies:
                continue
            if victim is not None:
                cache.evict(layer, victim)
                self.in_slot[layer, victim] = False
            if needs_copy:
                cache.copy_async(layer, e, s)
                copies += 1
                self.copies += 1
            self.pending.append((layer, e, s))

    def follow(
        self, estimator, *, margin: float, planner: Planner | None = None, max_copies: int | None = None
    ) -> None:
        """From now on fill the slots from `estimator` (anything with UtilityEstimator's
        observe_verification and predict, e.g. utility.RecencyEstimator: an LRU cache), which the
        filler updates from the verifications it hears, with this `margin`, `planner` (None: each
        layer's top-S, no balancer) and `max_copies` (None: unchanged); the old planner is closed."""
        if self.planner is not None and self.planner is not planner:
            self.planner.close()
        self.estimator, self.own_estimator = estimator, True
        self.planner, self.margin = planner, margin
        if max_copies is not None:
            self.max_copies = max_copies

    def stats(self) -> SlotStats:
        return {
            "on_gpu": self.on_gpu,
            "device": self.device,
            "slots": int(self.cache.n_slots.sum()),
            "buffer_bytes": self.cache.buffer_bytes,
            "copies": self.copies,
            "copied_bytes": self.cache.copied_bytes,
            "hit_rate": self.hits / self.uses if self.uses else None,
            "planned_steps": self.planned_steps,
        }

    def close(self) -> None:
        if self.planner is not None:
            self.planner.close()
        self.cache.close()
