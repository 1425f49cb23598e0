"""Keep at use: free keeps for the pinned engine, decided while a window's experts are being read.

A page cache keeps what it just read for nothing, so its best policy (MoeSpacPolicy with free
keeps) chooses after each window which of the held and just-used experts stay. The pinned engine
under a memory cap cannot: an expert read for a layer sits in the small unlocked stream window
and is reclaimed a few layers later, so keeping it after the window is a second read. The
routing tap (patches/0017) moves the decision to the moment of use: at each layer's expert
matmul, with the layer's routing known and its bytes being read, it locks the routed experts
worth holding, each in place of a held one it unlocks first, so the locked bytes never grow.

The caller scores both sides before the window (`KeepPlan`: a routed expert's score if kept, the
held experts' scores, weakest first), the tap applies the rule, and the caller reads back what it
did. `keep_at_use` is the same rule in Python: the simulator's, and the reference the tap is
tested against. It decides layer by layer, which is the tap's order for a window that fits one
ubatch (a decode or a verification; a longer prefill is split into ubatches, each in layer order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.routing import check_experts, routing_mask


@dataclass(frozen=True)
class KeepPlan:
    """What may change during one window: `admit` float [L, E], a routed expert's score if kept
    (-inf: never; the held ones); `victims` int [V], flat ids (layer * E + expert) of held experts,
    weakest first, with `victim_score` float [V]; `free` places a routed expert takes with no
    victim. With `per_layer`, every layer has its own victims and `free` (int [L]): an admission
    replaces an expert of its own layer (Capacity.per_layer); else one list and one count (a
    single byte budget, as the runtime's)."""

    admit: np.ndarray
    victims: np.ndarray
    victim_score: np.ndarray
    free: np.ndarray
    per_layer: bool = False


def keep_plan(
    resident: np.ndarray, admit_score: np.ndarray, held_score: np.ndarray, total: int, per_layer: int | None = None
) -> KeepPlan:
    """The plan for a window: `resident` bool [L, E] held now; `admit_score` / `held_score` float
    [L, E], an expert's score if the window uses it / as it is; `total` (and `per_layer`, if it
    binds) the experts that may be held. Victims are all held experts, weakest first (ties: the
    lower flat id), so an admission always finds the cheapest expert to give up."""
    n_layer, n_expert = resident.shape
    admit = np.where(resident, -np.inf, admit_score).astype(np.float32)
    flat = np.flatnonzero(resident)
    victims = flat[np.argsort(held_score.ravel()[flat], kind="stable")].astype(np.int32)
    if per_layer is None:
        free = np.array([max(0, total - len(flat))])
    else:
        free = np.maximum(0, per_layer - resident.sum(axis=1))
        free = np.minimum(free, max(0, total - len(flat)))  # the total binds too, given to layers in order
        free[np.cumsum(free) > max(0, total - len(flat))] = 0
    return KeepPlan(admit, victims, held_score.ravel()[victims].astype(np.float32), free, per_layer is not None)


def keep_at_use(plan: KeepPlan, resident: np.ndarray, experts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hits bool [L, E], admitted, evicted: int flat ids in decision order) of one window whose
    routing is `experts` int [L, T, k], starting from `resident` bool [L, E] (not modified).

    Layer by layer: the layer's routed experts that are held are hits; the others, best `admit`
    first (ties: the lower id), take a free place, else replace the weakest victim not routed in
    the window so far whose score is lower (a victim of a later layer is a miss there), else are
    read and dropped. patches/0017's tap_keep_decide is this rule in C."""
    n_layer, n_expert = resident.shape
    ids = check_experts(experts, n_expert, n_layer)
    held = resident.copy()
    routed = np.zeros(n_layer * n_expert, dtype=bool)
    hits = np.zeros_like(resident)
    groups = n_layer if plan.per_layer else 1
    free = plan.free.astype(np.int64).copy()
    victim_layer = plan.victims // n_expert
    queues = [plan.victims if not plan.per_layer else plan.victims[victim_layer == g] for g in range(groups)]
    scores = [plan.victim_score if not plan.per_layer else plan.victim_score[victim_layer == g] for g in range(groups)]
    nxt = [0] * groups
    admitted, evicted = [], []
    for layer in range(n_layer):
        used = routing_mask(ids[layer], n_expert).any(axis=0)
        if not used.any():
            continue
        routed[layer * n_expert + np.flatnonzero(used)] = True
        hits[layer] = used & held[layer]
        todo = np.flatnonzero(used & ~held[layer])
        admit = plan.admit[layer]
        g = layer if plan.per_layer else 0
        for e in todo[np.argsort(-admit[todo], kind="stable")]:
            if not admit[e] > -np.inf:
                continue
            if free[g] > 0:
                free[g] -= 1
            else:
                queue, score = queues[g], scores[g]
                while nxt[g] < len(queue) and routed[queue[nxt[g]]]:
                    nxt[g] += 1
                if nxt[g] >= len(queue) or not admit[e] > score[nxt[g]]:
                    continue
                victim = int(queue[nxt[g]])
                nxt[g] += 1
                held.flat[victim] = False
                evicted.append(victim)
            held[layer, e] = True
            admitted.append(layer * n_expert + int(e))
    return hits, np.array(admitted, dtype=np.int64), np.array(evicted, dtype=np.int64)
