"""What the decode loop tells the rest of the runtime: one event per verification, and the
observer interface that hears it.

The speculative loop is the runtime's sensor. Observers (the residency controller, the slot
filler, the benchmark's prefill meter) hear the drafted tokens before the target verifies them
and the verification's routing after it; this module is the contract between them, so that the
residency layer never needs to import the decode loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .routing import Routing


@dataclass
class VerificationEvent:
    """One verification step, as published to observers.

    `batch` are the tokens the target decoded ([last committed, drafts...]);
    routing rows align with it. For the prompt, phase is "prefill" and batch is
    the prompt.
    """

    phase: str  # "prefill" | "verify"
    batch: list[int]
    draft: list[int]
    accepted: int  # drafts accepted (0 for prefill)
    committed: list[int]  # tokens this step added to the output
    routing: Routing | None


class Observer(Protocol):
    def on_draft(self, draft: list[int], ahead: np.ndarray | None = None) -> None:
        """Drafted tokens, before the target verifies them (prefetch can start here). `ahead`
        (with a lookahead): int [n_layer, rows, k], the draft's routing of the rows from the
        verification's first on, through the tokens it drafted beyond `draft`."""

    def on_verify(self, event: VerificationEvent) -> None:
        """The verification's outcome and routing."""
