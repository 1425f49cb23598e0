"""What the model's experts are doing, for people: a decode observer that keeps a decayed count
of the experts each verification routed to, and how many of those uses found the expert held in
fast memory."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from ..core.events import VerificationEvent


class ExpertActivity:
    """core.events.Observer. `held()` says which experts are in fast memory now (bool [n_layer,
    n_expert]), or None when everything is (no residency engine): then there is no hit rate.
    Each verification multiplies the counts by `decay` before adding its own, so the map shows
    about the last 1 / (1 - decay) steps."""

    def __init__(self, n_layer: int, n_expert: int, held: Callable[[], np.ndarray | None], decay: float = 0.9):
        self.counts = np.zeros((n_layer, n_expert))
        self.held, self.decay = held, decay
        self.uses = self.hits = 0
        self._lock = threading.Lock()

    def on_draft(self, draft: list[int], ahead: np.ndarray | None = None) -> None:
        pass

    def on_verify(self, event: VerificationEvent) -> None:
        if event.routing is None:
            return
        counts = event.routing.counts(self.counts.shape[1])
        held = self.held()
        with self._lock:
            self.counts *= self.decay
            self.counts += counts
            if held is not None and event.phase != "prefill":
                self.uses += int(counts.sum())
                self.hits += int(counts[held].sum())

    def hit_rate(self) -> float | None:
        """Share of the generated tokens' routed (token, expert) uses whose expert was held when
        the routing was heard (prompts are left out: a prefill routes to nearly every expert)."""
        return self.hits / self.uses if self.uses else None

    def scaled(self, rows: list[int]) -> np.ndarray:
        """The counts of `rows`, each row scaled to its own maximum (0..1)."""
        with self._lock:
            c = self.counts[rows].copy()
        top = c.max(axis=1, keepdims=True)
        return np.divide(c, top, out=np.zeros_like(c), where=top > 0)
