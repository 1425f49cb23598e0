"""Expert residency policies, shared by the trace simulator and the runtime engine.

A policy decides which experts sit in fast memory. It sees verification windows (one decode step,
or K drafted tokens + 1 verified in one batch), exactly as the engine does:

    policy.reset(n_layer, n_expert, Capacity(total, per_layer))
    for each window:
        want = policy.before_window(draft_ids)   # bool [L, E]: make exactly these resident now
        ... verify the window ...
        hits = policy.access(token_ids, experts)  # experts int [L, T, k], -1 = none

A prompt's prefill is one more window, with `access(..., prefill=True)`: it produces no token, but
its routing says what the generation will use.

`before_window` may prefetch (want \\ resident) and evict (resident \\ want). `access` reports which of
the window's experts were served from fast memory, then lets the policy keep any expert it just used
(a miss was read once anyway, so keeping it moves no extra bytes); `resident` is always a subset of
`want | used` and within the capacity. A window uses each (layer, expert) once, however many of its
tokens route there. Every policy respects `per_layer` except the two that are global by design:
`lru-global` and `static-layers`.

The baselines the simulator compares against live in baselines.py; `MoeSpacPolicy`, here, is the
one the runtime runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..core.errors import MoespacError
from ..core.routing import used_experts
from .costs import DeviceCosts
from .keep import KeepPlan, keep_at_use, keep_plan, layer_shares
from .plan import FLASH, RESIDENT, PlanProblem, greedy
from .utility import ReusePredictor, UtilityEstimator

FREE_KEEP_ALPHA, PINNED_ALPHA = 0.3, 0.02  # the utility's memory per regime (MoeSpacPolicy)
AHEAD_SCORE = 1e12  # above any utility (tokens per window): a predicted expert outranks the rest
POLICIES = ("ondemand", "lru", "lru-global", "static", "static-layers", "spac", "moespac", "belady")


@dataclass(frozen=True)
class Capacity:
    """Experts fast memory holds: `total` in all, at most `per_layer` in any layer (None: only the
    total binds, as under one byte budget shared by all layers)."""

    total: int
    per_layer: int | None = None

    def __post_init__(self):
        if self.total < 0 or (self.per_layer is not None and self.per_layer < 0):
            raise MoespacError(f"capacity must be non-negative, got {self.total} total, {self.per_layer} per layer")


def select(score: np.ndarray, eligible: np.ndarray, capacity: Capacity) -> np.ndarray:
    """The highest-scoring eligible experts that fit `capacity` (ties to the lower layer, then expert)."""
    flat = np.flatnonzero(eligible)
    order = flat[np.argsort(-np.asarray(score, dtype=np.float64).ravel()[flat], kind="stable")]
    if capacity.per_layer is not None:
        layer = order // eligible.shape[1]
        by_layer = np.argsort(layer, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[by_layer] = np.arange(len(order)) - np.searchsorted(layer[by_layer], layer[by_layer])
        order = order[rank < capacity.per_layer]
    chosen = np.zeros(eligible.shape, dtype=bool)
    chosen.flat[order[: capacity.total]] = True
    return chosen


def first_uses(experts) -> Iterator[tuple[int, int]]:
    """(layer, expert) of a window's accesses, layer by layer, each expert once in first-use order
    (token order, then rank order): the order a pass touches them."""
    for layer, row in enumerate(np.asarray(experts).tolist()):
        for e in dict.fromkeys(e for ids in row for e in ids if e >= 0):
            yield layer, e


def lookahead_score(utility: np.ndarray, ahead: np.ndarray) -> np.ndarray:
    """`utility` (float [L, E]) with every expert a row of `ahead` (int [L, rows, k], the draft's
    routing of the next rows) routes to placed above all others, the sooner its first row the higher."""
    first = np.full(utility.shape, np.inf)
    for j in range(ahead.shape[1] - 1, -1, -1):  # the earliest row written last
        for ids in np.moveaxis(ahead[:, j, :], 1, 0):  # [L] per rank
            layers = np.flatnonzero(ids >= 0)
            first[layers, ids[layers]] = j
    return np.where(np.isfinite(first), AHEAD_SCORE - first, utility)


class Policy:
    """Holds the resident set; subclasses decide what to fetch (`_want`) and what to keep (`_keep`)."""

    name = ""

    def reset(self, n_layer: int, n_expert: int, capacity: Capacity) -> None:
        """Start empty (subclasses may preload: the model-load time, outside the decode loop)."""
        self.n_layer, self.n_expert, self.capacity = n_layer, n_expert, capacity
        self.resident = np.zeros((n_layer, n_expert), dtype=bool)

    def before_window(self, draft_tokens=None, ahead: np.ndarray | None = None) -> np.ndarray:
        """The experts to hold during the next window (a copy); `draft_tokens`: its drafted ids, if
        known; `ahead`: a draft's routing of the next rows (int [L, rows, k], SpeculativeDecoder)."""
        self.resident = self._want(draft_tokens) if ahead is None else self._want_ahead(draft_tokens, ahead)
        return self.resident.copy()

    def access(self, tokens, experts, prefill: bool = False) -> np.ndarray:
        """The window ran: return its experts that were resident (hits) and update the state."""
        used = used_experts(experts, self.n_expert)
        hits = used & self.resident
        self.resident = self._keep(tokens, np.asarray(experts), used, prefill)
        return hits

    def _want(self, draft_tokens) -> np.ndarray:
        return self.resident

    def _want_ahead(self, draft_tokens, ahead: np.ndarray) -> np.ndarray:
        return self._want(draft_tokens)

    def _keep(self, tokens, experts: np.ndarray, used: np.ndarray, prefill: bool) -> np.ndarray:
        return self.resident


class MoeSpacPolicy(Policy):
    """Ours. What it decides depends on what a decision costs.

    **Free keeps** (`keep_used`, a page cache; the simulator's default): a window's misses are read
    anyway, so after each window the choice is which of the held and just-used experts stay, and a
    fetch ahead of use never reads fewer bytes than the miss it replaces. It fetches nothing and keeps
    the experts most likely to be used by the next window: utility.ReusePredictor, online from the
    windows' routing (recency and frequency through one learned table, what followed past rows that
    routed alike, an online-calibrated blend of the two). Under a global budget (`per_layer` None)
    the probabilities compare across layers, so each layer's share follows how predictable its reuse
    is. On the real Mixtral traces this moved 0.59-0.85x LRU's bytes (bench/results/policy_table.md;
    the policy before it, `reuse=False`, 0.66-0.96x).

    **Keep at use** (`keep_at_use`, the pinned engine with the routing tap's free keeps, residency.
    keep): the same prediction, applied while a window's experts are read instead of after it. Before
    each window `plan` scores a routed expert by its chance of use by the next window if this one
    uses it (ReusePredictor.predict_if_used) and the held ones by their chance (`keep_score`); at
    each layer the tap (the simulator: keep.keep_at_use) keeps a routed expert in a free place of
    its layer's share (keep.layer_shares) or in place of the layer's weakest held one it
    outscores. Nothing is fetched ahead of use.

    **Pinned** (the engine under a cap: misses stream through and are dropped), every admission is a
    paid fetch, worth it only for an expert used often over the steps it is held: the runtime's
    UtilityEstimator predicts each expert's tokens per window over the next `horizon_steps` windows
    (the next one from the drafted ids when known, the rest at the long-run rate), and the balancer's
    greedy plan (plan.greedy: saving per byte under the byte budget, with the move cost amortized
    over `horizon_steps`) picks what is resident. Without a GPU tier and with equal expert sizes the
    balancer's ILP is a knapsack that greedy solves exactly, so the simulator needs no solver.
    `expert_bytes` is the size of one expert; the byte budget is `capacity.total` experts.

    The estimator is kept in both modes (the controller orders the engine's moves by it). How long it
    remembers (the EWMA's per-token `alpha`): 0.3 (~3 tokens) with free keeps, 0.02 (~50 tokens)
    pinned, with a fetch amortized over 8 windows (docs/design.md, "The utility estimator and how
    long it remembers").
    """

    name = "moespac"

    def __init__(
        self,
        costs: DeviceCosts,
        expert_bytes: float,
        method: str = "prior",
        horizon_steps: float = 8.0,
        keep_used: bool = True,
        alpha: float | None = None,
        reuse: bool = True,
        keep_at_use: bool = False,
    ):
        """`reuse` False: with free keeps too, the utility and the balancer's plan decide, as
        before issue 24 (`moespac sim --policy moespac-old`, the tables' reference).
        `keep_at_use` (with `keep_used` False): pinned, with the tap's free keeps."""
        self.costs, self.expert_bytes = costs, float(expert_bytes)
        self.method, self.horizon_steps = method, horizon_steps
        # False where the window's misses stream through and are dropped (the pinned engine): keeping
        # one is then a fetch the next plan must pay for, not free as from a page cache
        self.keep_used = keep_used
        self.keep_at_use = keep_at_use and not keep_used and reuse
        self.use_reuse = (keep_used or self.keep_at_use) and reuse
        self.alpha = alpha if alpha is not None else (FREE_KEEP_ALPHA if keep_used else PINNED_ALPHA)

    def reset(self, n_layer, n_expert, capacity):
        super().reset(n_layer, n_expert, capacity)
        self.estimator = UtilityEstimator(n_layer, n_expert, self.method, alpha=self.alpha)
        self.reuse = ReusePredictor(n_layer, n_expert) if self.use_reuse else None
        self.last_used = np.zeros((n_layer, n_expert), dtype=bool)  # the last decode window's experts
        self.after_prefill = False
        self.plan: KeepPlan | None = None  # keep at use: the next window's (before_window)

    def before_window(self, draft_tokens=None, ahead: np.ndarray | None = None) -> np.ndarray:
        if not self.keep_at_use:
            return super().before_window(draft_tokens, ahead)
        # the tap decides at use: the held set stays until the window's moves are heard
        admit, held = self.reuse.predict_if_used(), self.keep_score()
        if ahead is not None:
            admit, held = lookahead_score(admit, ahead), lookahead_score(held, ahead)
        shares = layer_shares(self.capacity.total, self.n_layer, self.capacity.per_layer)
        self.plan = keep_plan(self.resident, admit, held, shares)
        return self.resident.copy()

    def access(self, tokens, experts, prefill: bool = False, moves: tuple[np.ndarray, np.ndarray] | None = None):
        """As Policy.access; with keep at use, the window's admissions and evictions are `moves`
        (admitted, evicted: flat ids, what the tap did) or, without them, keep.keep_at_use's (the
        simulator), and the hits exclude a held expert evicted before its layer ran."""
        if not self.keep_at_use:
            return super().access(tokens, experts, prefill)
        used = used_experts(experts, self.n_expert)
        if moves is None:
            hits, admitted, evicted = keep_at_use(self.plan, self.resident, experts)
        else:
            admitted, evicted = moves
            hits = used & self.resident
            hits.flat[evicted] = False
        self.resident.flat[evicted] = False
        self.resident.flat[admitted] = True
        self._keep(tokens, np.asarray(experts), used, prefill)
        return hits

    def keep_score(self) -> np.ndarray:
        """What ranks the experts to keep, float [L, E]: with free keeps, the chance the next window
        uses each (recency breaks ties); pinned, the utility."""
        if self.reuse is None:
            return self.estimator.predict()
        return self.reuse.predict() + 1e-9 * self.reuse.last_row / (self.reuse.rows + 1.0)

    def _want(self, draft_tokens):
        if self.reuse is not None:  # a fetch never reads less than the miss it would replace
            return self.resident
        utility = self.estimator.predict_over(self.horizon_steps, draft_tokens)
        problem = PlanProblem(
            utility,
            np.full(self.n_layer, self.expert_bytes),
            current=np.where(self.resident, RESIDENT, FLASH),
            slot_capacity=np.zeros(self.n_layer, dtype=np.int64),
            resident_budget_bytes=self.capacity.total * self.expert_bytes,
            costs=self.costs,
            horizon_steps=self.horizon_steps,
        )
        return select(utility, greedy(problem).tier != FLASH, self.capacity)

    def _want_ahead(self, draft_tokens, ahead):
        """Belady's rule with the draft's lookahead for the future: of the experts held (pinned: or
        used by the last window, still in the stream window, so keeping one reads nothing), hold
        those the draft's rows route to, soonest first, then the highest keep score. No fetch for a
        prediction: a wrong one would be bytes read for nothing, a right one is read on use anyway
        (docs/design.md, "Self-draft lookahead"). With free keeps the last window's experts were
        already kept or let go by `_keep`: taking one back is a fetch (on SmolMoE Spec-Bench, C 2,
        K 4, 6 ahead: 111 MiB/token with them, 88 without)."""
        if self.after_prefill and self.reuse is None:  # the plan starts from a prompt's routing at once
            self.resident = self._want(draft_tokens)
        base = (
            self.keep_score()
            if self.reuse is not None
            else self.estimator.predict_over(self.horizon_steps, draft_tokens)
        )
        eligible = self.resident if self.reuse is not None else self.resident | self.last_used
        return select(lookahead_score(base, ahead), eligible, self.capacity)

    def _keep(self, tokens, experts, used, prefill):
        self.estimator.observe_verification(tokens, experts, prefill)
        if self.reuse is not None:
            self.reuse.observe(experts)
        # a prefill's experts are long gone from the stream window: not free to keep
        self.last_used = np.zeros_like(used) if prefill else used
        self.after_prefill = prefill
        if self.keep_at_use:
            return self.resident  # the tap kept what it kept
        return select(self.keep_score(), self.resident | used if self.keep_used else self.resident, self.capacity)
