"""The residency controller: routing -> utility -> plan -> the engine, once per decode step.

A speculative-loop observer (core.events.Observer) that owns the engine and the policy the
simulator replays, and the arithmetic of the memory budget they share.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import MoespacError
from ..core.events import VerificationEvent
from ..core.layout import MoeLayout
from ..core.mapping import Mapping
from ..core.units import format_size
from . import pages, platform
from .costs import DeviceCosts, load_costs
from .engine import ExpertMap, ResidencyEngine
from .policy import Capacity, MoeSpacPolicy, lookahead_score


def expert_budget(mem_budget: int, layout: MoeLayout, draft_bytes: int, mapped: list[Mapping] = ()) -> int:
    """Bytes left for expert weights once everything else that must stay in memory is counted
    (`mapped`: the models' mappings, which pages.anon_rss needs where there is no /proc)."""
    runtime = pages.anon_rss(mapped)
    margin = (16 << 20) + mem_budget // 50  # allocator slack
    left = mem_budget - layout.other_bytes - draft_bytes - runtime - margin
    # experts are paged in layer by layer: the floor is one layer's top-k experts
    one_layer = layout.n_expert_used * max(l.bytes_per_expert for l in layout.layers)
    if left < one_layer:
        raise MoespacError(
            f"memory budget {format_size(mem_budget)} is too small: non-expert weights "
            f"{format_size(layout.other_bytes)}, draft {format_size(draft_bytes)}, runtime {format_size(runtime)} "
            f"and margin {format_size(margin)} leave {format_size(max(left, 0))} for experts, less than the "
            f"{format_size(one_layer)} one layer's top-{layout.n_expert_used} experts need"
        )
    return left


def stream_window(layout: MoeLayout, draft_max: int = 8) -> int:
    """Unlocked room a pinned budget leaves for one layer's non-pinned experts of a verification
    batch (up to (draft_max + 1) x top-k of them, at most all) to be read, used and dropped, plus
    64 MiB for the runtime's own growth (compute buffers and KV pages are touched as decoding goes:
    with everything else locked, a fault that finds no room is the OOM killer's)."""
    n = min(layout.n_expert, (draft_max + 1) * layout.n_expert_used)
    return n * max(l.bytes_per_expert for l in layout.layers) + (64 << 20)


def _lock_all(ranges: list[tuple[int, int]]) -> bool:
    """mlock every (address, length), or none of them (False: RLIMIT_MEMLOCK or the cap refused)."""
    need = sum(n for _, n in ranges)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < need:
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
        except (ValueError, OSError):
            return False
    return pages.mlock_ranges(ranges)


@dataclass
class ResidencyController:
    """Speculative-loop observer: routing -> utility -> plan -> engine.

    The decisions are the simulator's `MoeSpacPolicy` (policy.py), the same
    object `moespac sim --policy moespac` replays: before verification
    (on_draft) the token-conditioned prior turns the drafted tokens into a
    utility and the balancer's plan into the set to hold, which the engine
    starts prefetching while the target runs; after it (on_verify) the
    verification's routing updates the estimator. When a self-draft runs ahead
    (--draft-ahead), its routing of the next rows decides on_draft instead
    (MoeSpacPolicy._want_ahead: keep, among what is held or was just used, what
    those rows route to), and on_verify only learns. For the page tier alone the
    balancer's ILP is a knapsack that its greedy plan solves exactly with
    equal-size experts (tests/test_plan.py), so no solver runs here; the GPU
    tier's slots (residency.slots) ask the ILP, on its own thread.
    """

    layout: MoeLayout
    budget_bytes: int
    costs: DeviceCosts = field(default_factory=load_costs)
    refresh_every: int = 16
    pin: bool = True  # mlock held experts + fixed weights (falls back when refused or impossible)
    mappings: list[Mapping] = field(default_factory=list)  # the target's (Session.mappings)
    draft_mappings: list[Mapping] = field(default_factory=list)  # the draft's: its own file, or the target's again
    draft_path: str | None = None  # a separate draft's file, pinned whole with the fixed weights
    draft_max: int = 8
    # the target's routing tap (llama.tap.RoutingTap, demand page-in on): pinned, it keeps at use
    # (residency.keep); without it a kept miss is a fetch, as the pinned policy before it planned
    keep_tap: object | None = None

    def __post_init__(self):
        platform.say_degraded_once()
        # a self-draft maps the target's file again: its share of a page must go before eviction
        self.map = ExpertMap(self.layout, self.mappings, [] if self.draft_path else self.draft_mappings)
        budget = self.budget_bytes
        self.pin = self.pin and platform.PLATFORM.can("lock") and platform.PLATFORM.can("unlock")
        if self.pin:
            fixed = [(self.map.mapping.address(off), n) for off, n in self.map.other_ranges()]
            if self.draft_path:
                fixed += [(m.start, m.end - m.start) for m in self.draft_mappings]
            window = min(stream_window(self.layout, self.draft_max), budget // 2)
            self.pin = _lock_all(fixed)
            if self.pin:
                budget -= window
        self.engine = ResidencyEngine(self.map, budget, pin=self.pin)
        expert_bytes = self.layout.mean_bytes_per_expert
        # pinned, a streamed expert is dropped with the window after its layer: keeping it is free
        # only while it is read, which the routing tap does (keep at use); otherwise a re-read
        self.keep_at_use = self.pin and self.keep_tap is not None
        self.policy = MoeSpacPolicy(self.costs, expert_bytes, keep_used=not self.pin, keep_at_use=self.keep_at_use)
        self.policy.reset(
            self.layout.n_layer, self.layout.n_expert, Capacity(total=max(1, int(budget // expert_bytes)))
        )
        self.steps = 0
        self.lookahead = False  # set once a draft's lookahead routing is heard
        if self.keep_at_use:
            self._ranges = self.engine.address_ranges()
            self.policy.before_window(None)
            self._push_plan()

    def _push_plan(self) -> None:
        """Hand the policy's plan for the next window to the routing tap (keep at use)."""
        plan = self.policy.plan
        self.keep_tap.set_keep(plan.admit, plan.victims, plan.victim_score, plan.free, self._ranges)

    def _plan(self, want: np.ndarray, priority: Callable[[], np.ndarray]) -> None:
        """Start the engine towards `want`, most `priority()` first, or, keeping at use, give the
        tap its plan (nothing to fetch: the policy wants what it holds; no priority computed)."""
        if self.keep_at_use:
            self._push_plan()
        else:
            self.engine.apply(want, priority())

    @property
    def holds_every_expert(self) -> bool:
        """The budget has room for every expert: no residency choice is left to make."""
        return self.policy.capacity.total >= len(self.layout.layers) * self.layout.n_expert

    def on_draft(self, draft: list[int], ahead: np.ndarray | None = None) -> None:
        if ahead is not None:  # the draft ran ahead: its routing decides (MoeSpacPolicy._want_ahead)
            self.lookahead = True
            want = self.policy.before_window(draft, ahead)
            self._plan(want, lambda: lookahead_score(self.policy.estimator.predict(draft), ahead))
        elif draft:
            want = self.policy.before_window(draft)
            self._plan(want, lambda: self.policy.estimator.predict(draft))

    def on_verify(self, event: VerificationEvent) -> None:
        if event.routing is None:
            return
        experts = event.routing.experts
        prefill = event.phase == "prefill"
        if self.keep_at_use:
            moves = self.keep_tap.kept()
            if self.keep_tap.lock_failures:
                raise MoespacError(
                    "the kernel refused to lock experts the routing tap keeps (RLIMIT_MEMLOCK or the "
                    "memory cap): give a smaller --mem-budget"
                )
            self.policy.access(np.asarray(event.batch), experts, prefill=prefill, moves=moves)
            self.engine.adopt(*moves)
        else:
            self.policy.access(np.asarray(event.batch), experts, prefill=prefill)
        self.engine.note_used(event.routing.counts(self.layout.n_expert) > 0)
        self.steps += 1
        if self.steps % self.refresh_every == 0:
            self.engine.refresh()
        if self.lookahead and event.phase != "prefill":
            return  # the draft's lookahead, heard next, decides; a plan now would only churn
        # what to hold while the draft proposes the next tokens (no drafted ids yet)
        want = self.policy.before_window(None)
        self._plan(want, self.policy.estimator.predict)

    def close(self) -> None:
        self.engine.close()
