"""The slot tier's filler: each MoE layer's highest-utility experts live in its expert slots.

The slots themselves are llama.SlotCache (memory llama.cpp allocates: host RAM on a CPU build,
VRAM/Metal on a GPU one); this module only decides what they hold, so it talks to them through
the small `SlotStore` interface and never imports the llama layer.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ..core.layout import MoeLayout


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


def slot_counts(layout: MoeLayout, budget_bytes: int, fraction: float, n_layer: int) -> list[int]:
    """Slots per layer (all `n_layer` layers of the model) for `fraction` of an expert budget,
    spread evenly over the MoE layers; when there are fewer slots than layers the last layers get
    them (their routing is the least balanced, so one slot catches the most)."""
    layers = [l.index for l in layout.layers]
    total = int(fraction * budget_bytes // layout.mean_bytes_per_expert)
    total = max(1, min(total, len(layers) * layout.n_expert))
    counts = [0] * n_layer
    for i in range(total):
        counts[layers[len(layers) - 1 - i % len(layers)]] += 1
    return counts


class SlotFiller:
    """Speculative-loop observer: each layer's highest-utility experts live in its slots.

    After each verification the residency controller's utility estimate (the one
    ranking the page-cache engine also follows) picks the top-S_l experts of every
    MoE layer; those not in a slot yet are copied into slots whose experts dropped
    out, on the native worker while the draft model runs, and assigned at the next
    draft/verify boundary. Experts in slots never touch their file pages, so the
    page-cache engine is told to leave them out (the pages a copy read are paged
    out again), and its byte budget shrinks by the slot buffer: the total stays
    under the same memory budget.
    """

    def __init__(self, cache: SlotStore, residency, margin: float = 1.0, max_copies: int = 4):
        """`margin`: a slot's expert is replaced only by one with (1 + margin)x its utility
        (each copy reads the expert from the file: churn costs I/O); `max_copies` per step."""
        self.cache, self.residency = cache, residency
        self.margin, self.max_copies = margin, max_copies
        self.in_slot = np.zeros((cache.n_layer, cache.n_expert), dtype=bool)
        self.pending: list[tuple[int, int, int]] = []
        self.copies = 0
        engine = residency.engine
        engine.budget = max(0, engine.budget - cache.buffer_bytes)
        apply, note_used = engine.apply, engine.note_used
        engine.apply = lambda want, priority: apply(want & ~self.in_slot, priority)
        engine.note_used = lambda used: note_used(used & ~self.in_slot)

    def _commit(self) -> None:
        for layer, e, slot in self.pending:
            self.cache.assign(layer, e, slot)  # waits for its copy
            self.in_slot[layer, e] = True
            # the copy read the expert's file pages; the slot holds it now: give them back
            self.residency.engine.release((layer, e))
        self.pending = []

    def on_draft(self, draft: list[int], ahead=None) -> None:
        self._commit()

    def on_verify(self, event) -> None:
        self._commit()
        utility = self.residency.policy.estimator.predict()
        cache = self.cache
        assignment = cache.assignment()
        # the most useful candidates first, across layers, under a per-step copy budget
        moves = []
        for layer in cache.moe_layers:
            u = utility[layer]
            n = int(cache.n_slots[layer])
            held = {int(e): int(s) for e, s in enumerate(assignment[layer]) if s >= 0}
            free = [s for s in range(n) if s not in held.values()]
            victims = sorted(held, key=lambda e: u[e])  # weakest occupant first
            for e in np.argsort(-u, kind="stable")[:n].tolist():
                if e in held or u[e] <= 0:
                    continue
                if free:
                    moves.append((u[e], layer, e, None, free.pop(0)))
                elif victims and u[e] > (1 + self.margin) * u[victims[0]]:
                    v = victims.pop(0)
                    moves.append((u[e], layer, e, v, held[v]))
        copies = 0
        for _, layer, e, victim, s in sorted(moves, key=lambda m: -m[0]):
            if cache.expert_in(layer, s) != e:
                if copies >= self.max_copies:
                    continue
                copies += 1
            if victim is not None:
                cache.evict(layer, victim)
                self.in_slot[layer, victim] = False
            if cache.expert_in(layer, s) != e:
                cache.copy_async(layer, e, s)
                self.copies += 1
            self.pending.append((layer, e, s))

    def stats(self) -> dict:
        return {
            "slots_per_layer": int(self.cache.n_slots.max()),
            "buffer_bytes": self.cache.buffer_bytes,
            "copied_bytes": self.cache.copied_bytes,
            "copies": self.copies,
            "engine_budget_bytes": self.residency.engine.budget,
        }

    def close(self) -> None:
        self.cache.close()
