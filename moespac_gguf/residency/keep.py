"""Keep at use: free keeps for the pinned engine, decided while a window's experts are being read.

A page cache keeps what it just read for nothing, so its best policy (MoeSpacPolicy with free
keeps) chooses after each window which of the held and just-used experts stay. The pinned engine
under a memory cap cannot: an expert read for a layer sits in the small unlocked stream window
and is reclaimed a few layers later, so keeping it after the window is a second read. The
routing tap (patches/0017, 0019) moves the decision to the moment of use: at each layer's expert
matmul, with the layer's routing known and its bytes being read, it locks the routed experts
worth holding, each in place of a held one of the same layer it unlocks first, so the locked
bytes never grow and every layer keeps its share.

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
    each layer's weakest first, with `victim_score` float [V]; `free` int [L], the places a layer's
    routed experts take with no victim. An admission replaces an expert of its own layer: every
    layer keeps its share (`layer_shares`)."""

    admit: np.ndarray
    victims: np.ndarray
    victim_score: np.ndarray
    free: np.ndarray


def layer_shares(total: int, n_layer: int, per_layer: int | None = None) -> np.ndarray:
    """int [n_layer]: how many experts each layer may hold, `total` in all (at most `per_layer`
    each): equal shares, the remainder spread over the layers evenly. Keeping at use with one
    share for all layers filled it in layer order and kept it there (patches/0019)."""
    n = total if per_layer is None else min(total, per_layer * n_layer)
    base, extra = divmod(n, n_layer)
    shares = np.full(n_layer, base, dtype=np.int64)
    shares[(np.arange(extra) * n_layer) // max(extra, 1)] += 1
    return shares


def keep_plan(resident: np.ndarray, admit_score: np.ndarray, held_score: np.ndarray, shares: np.ndarray) -> KeepPlan:
    """The plan for a window: `resident` bool [L, E] held now; `admit_score` / `held_score` float
    [L, E], an expert's score if the window uses it / as it is; `shares` int [L], what each layer
    may hold. Victims are all held experts, weakest first (ties: the lower flat id), so an
    admission always finds its layer's cheapest expert to give up."""
    admit = np.where(resident, -np.inf, admit_score).astype(np.float32)
    flat = np.flatnonzero(resident)
    victims = flat[np.argsort(held_score.ravel()[flat], kind="stable")].astype(np.int32)
    free = np.maximum(0, np.asarray(shares) - resident.sum(axis=1)).astype(np.int32)
    room = max(0, int(np.sum(shares)) - len(flat))  # a layer above its share leaves less room
    free[np.cumsum(free) > room] = 0
    return KeepPlan(admit, victims, held_score.ravel()[victims].astype(np.float32), free)


def keep_at_use(plan: KeepPlan, resident: np.ndarray, experts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hits bool [L, E], admitted, evicted: int flat ids in decision order) of one window whose
    routing is `experts` int [L, T, k], starting from `resident` bool [L, E] (not modified).

    Layer by layer: the layer's routed experts that are held are hits; the others, best `admit`
    first (ties: the lower id), take one of the layer's free places, else replace its weakest
    victim not routed in the window so far whose score is lower, else are read and dropped.
    patches/0017 and 0019's tap_keep_decide is this rule in C."""
    n_layer, n_expert = resident.shape
    ids = check_experts(experts, n_expert, n_layer)
    held = resident.copy()
    hits = np.zeros_like(resident)
    free = plan.free.astype(np.int64).copy()
    victim_layer = plan.victims // n_expert
    admitted, evicted = [], []
    for layer in range(n_layer):
        used = routing_mask(ids[layer], n_expert).any(axis=0)
        if not used.any():
            continue
        hits[layer] = used & held[layer]
        todo = np.flatnonzero(used & ~held[layer])
        admit = plan.admit[layer]
        queue = plan.victims[victim_layer == layer]
        score = plan.victim_score[victim_layer == layer]
        nxt = 0
        for e in todo[np.argsort(-admit[todo], kind="stable")]:
            if not admit[e] > -np.inf:
                continue
            if free[layer] > 0:
                free[layer] -= 1
            else:
                while nxt < len(queue) and used[queue[nxt] - layer * n_expert]:
                    nxt += 1
                if nxt >= len(queue) or not admit[e] > score[nxt]:
                    continue
                victim = int(queue[nxt])
                nxt += 1
                held.flat[victim] = False
                evicted.append(victim)
            held[layer, e] = True
            admitted.append(layer * n_expert + int(e))
    return hits, np.array(admitted, dtype=np.int64), np.array(evicted, dtype=np.int64)
