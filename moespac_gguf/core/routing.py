"""Routing: which experts each token used, and the few ways the package counts it.

Everywhere in the package a routing is an integer array `experts` [n_layer, n_tokens, k] of
expert ids, -1 where a layer did not route a row (dense layers; the last layer skips rows that
produce no output). These helpers are the one place that turns it into counts and masks, so the
estimator, the policies, the simulator and the gate cannot disagree on what "used" means.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import MoespacError


def check_experts(experts, n_expert: int, n_layer: int | None = None) -> np.ndarray:
    """`experts` as an array, or MoespacError if it is not int [n_layer, n_tokens, k] of ids in -1..n_expert-1."""
    ids = np.asarray(experts)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise MoespacError(f"experts must be an integer array [n_layer, n_tokens, k], got {ids.dtype} {ids.shape}")
    if n_layer is not None and ids.shape[0] != n_layer:
        raise MoespacError(f"experts has {ids.shape[0]} layers, expected {n_layer}")
    if ids.size and (ids.min() < -1 or ids.max() >= n_expert):
        raise MoespacError(f"expert ids must be in -1..{n_expert - 1}, got {ids.min()}..{ids.max()}")
    return ids


def routing_counts(experts, n_expert: int) -> np.ndarray:
    """Tokens routed to each (layer, expert): int [n_layer, n_expert]."""
    ids = check_experts(experts, n_expert)
    n_layer = ids.shape[0]
    flat = ids.reshape(n_layer, -1).astype(np.int64)
    keys = (flat + np.arange(n_layer)[:, None] * n_expert)[flat >= 0]
    return np.bincount(keys, minlength=n_layer * n_expert).reshape(n_layer, n_expert)


def routed_rows(experts) -> np.ndarray:
    """Rows each layer routed (rows with at least one expert): int [n_layer]."""
    return (np.asarray(experts) >= 0).any(axis=2).sum(axis=1)


def used_experts(experts, n_expert: int) -> np.ndarray:
    """bool [n_layer, n_expert]: the experts a window routed to at least once."""
    return routing_counts(experts, n_expert) > 0


def routing_mask(experts: np.ndarray, n_expert: int) -> np.ndarray:
    """One layer's routing, int [N, k] (-1 = none) -> bool [N, n_expert]: the experts of each row."""
    mask = np.zeros((experts.shape[0], n_expert + 1), bool)
    np.put_along_axis(mask, np.where(experts < 0, n_expert, experts), True, axis=1)
    return mask[:, :n_expert]


@dataclass
class Routing:
    """Experts used by each token of one decode call, per layer (ids as in the module docstring),
    with the router weights of those experts."""

    experts: np.ndarray  # int32 [n_layer, n_tokens, k]
    weights: np.ndarray  # float32 [n_layer, n_tokens, k]

    @property
    def n_tokens(self) -> int:
        return self.experts.shape[1]

    def counts(self, n_expert: int) -> np.ndarray:
        """Tokens routed to each expert: int [n_layer, n_expert]."""
        return routing_counts(self.experts, n_expert)

    def take(self, rows: slice | np.ndarray) -> Routing:
        return Routing(self.experts[:, rows], self.weights[:, rows])

    @staticmethod
    def concat(parts: list[Routing]) -> Routing:
        return Routing(
            np.concatenate([p.experts for p in parts], axis=1), np.concatenate([p.weights for p in parts], axis=1)
        )
