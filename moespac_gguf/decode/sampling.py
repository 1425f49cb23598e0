"""Token choice from logits: greedy, or temperature / top-k / top-p sampling with its own RNG.

The speculative loop needs the distribution itself (`probs`), not only a sampled token: the
rejection rule compares the target's and the draft's probabilities of each drafted token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sampler:
    """Token choice from logits: greedy when temperature <= 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def probs(self, logits: np.ndarray) -> np.ndarray:
        """The distribution tokens are drawn from (temperature, top-k, top-p applied)."""
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.size:
            kth = np.partition(z, -self.top_k)[-self.top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            keep = np.cumsum(p[order]) - p[order] < self.top_p
            mask = np.zeros_like(p, dtype=bool)
            mask[order[keep]] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        return p

    def draw(self, p: np.ndarray) -> int:
        return int(self.rng.choice(p.size, p=p))

    def sample(self, logits: np.ndarray) -> int:
        return int(np.argmax(logits)) if self.greedy else self.draw(self.probs(logits))
