"""Adaptive draft length: how many tokens to draft next step, from measured costs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftLength:
    """Chooses K each step to maximise expected tokens per second.

    With acceptance rate a, a step of K drafts commits (1 - a^(K+1)) / (1 - a)
    tokens on average and costs K draft decodes plus one verification of K+1
    tokens; both costs are measured as the run goes (EWMA). When drafting does
    not pay, K falls to 0 and the loop is plain decoding; every `probe_every`
    steps at K = 0 it tries K = 1 again so a change in the regime is noticed.
    """

    k_max: int = 8
    alpha: float = 0.5  # prior acceptance
    ewma: float = 0.2
    probe_every: int = 16
    t_draft: float | None = None  # seconds per draft token
    t_verify: dict[int, float] = field(default_factory=dict)  # batch size -> seconds
    _zero_steps: int = 0

    def observe(self, k: int, accepted: int, t_draft: float, t_verify: float) -> None:
        w = self.ewma
        if k:
            self.alpha = (1 - w) * self.alpha + w * (accepted / k)
            per = t_draft / k
            self.t_draft = per if self.t_draft is None else (1 - w) * self.t_draft + w * per
        old = self.t_verify.get(k + 1)
        self.t_verify[k + 1] = t_verify if old is None else (1 - w) * old + w * t_verify

    def _verify_cost(self, n: int) -> float:
        if n in self.t_verify:
            return self.t_verify[n]
        sizes = sorted(self.t_verify)
        if len(sizes) >= 2:  # linear in batch size through the measured extremes
            a, b = sizes[0], sizes[-1]
            slope = (self.t_verify[b] - self.t_verify[a]) / (b - a)
            return self.t_verify[a] + slope * (n - a)
        return self.t_verify.get(sizes[0], 0.0) if sizes else 0.0

    def next_k(self) -> int:
        if self.k_max <= 0:
            return 0
        if self.t_draft is None or not self.t_verify:
            return self.k_max  # measure the speculative regime first
        a = min(self.alpha, 0.999)

        def rate(k: int) -> float:
            cost = k * self.t_draft + self._verify_cost(k + 1)
            return ((1 - a ** (k + 1)) / (1 - a)) / cost if cost > 0 else 0.0

        best = max(range(self.k_max + 1), key=rate)
        if best == 0:
            self._zero_steps += 1
            if self._zero_steps % self.probe_every == 0:
                return 1
        return best
