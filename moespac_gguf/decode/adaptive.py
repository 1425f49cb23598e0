"""Adaptive draft length: how many tokens to draft next step, from measured costs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DraftLength:
    """Chooses K each step to maximise expected tokens per second.

    With acceptance rate a, a step of K drafts commits (1 - a^(K+1)) / (1 - a)
    tokens on average and costs K draft decodes plus one verification of K+1
    tokens; both costs are measured as the run goes (EWMA), and one DraftLength
    serves every request of a decoder, so they are measured once. The first step
    is plain decoding (K = 0), which measures a one-token verification for free;
    the second drafts `first_k`, which measures the draft and a batch.

    When no K would pay even if every draft were accepted (a draft no faster per
    token than a one-token verification, or verification batches that cost more than
    the tokens they could commit, as an MoE's on a CPU, where each token of a batch
    reads other experts), K stays 0 and nothing is probed. Otherwise, when drafting does not pay at the
    measured acceptance, K falls to 0 and the loop is plain decoding, with a probe
    at K = 1 now and then to notice a change of regime. A probe costs the draft's
    catch-up on the text it has not read (`t_catch_up`, measured), one draft
    token and a verification one token longer; probes are spent from a credit
    that grows by `probe_share` of each plain step's time, so probing costs at
    most that share of a run. A probe whose draft is accepted is followed by
    another at once.
    """

    k_max: int = 8
    alpha: float = 0.5  # prior acceptance
    alpha_ewma: float = 0.05  # per draft: about the last 20 drafts' outcomes
    ewma: float = 0.2  # per step, for the costs
    first_k: int = 4
    probe_share: float = 0.015
    t_draft: float | None = None  # seconds per draft token
    t_catch_up: float = 0.0  # seconds the last probe's draft spent reading the text it had missed
    t_verify: dict[int, float] = field(default_factory=dict)  # batch size -> seconds
    paying: bool = False  # the last K came from the rate (not a measurement or a probe) and was > 0
    _n_obs: int = 0
    _credit: float = 0.0

    def observe(self, k: int, accepted: int, t_draft: float, t_verify: float, t_catch_up: float = 0.0) -> None:
        """A step's outcome: `t_draft` for its k drafts, `t_catch_up` for the draft's reading of
        committed text before them."""
        w = self.ewma
        if k:
            # each draft up to the first rejection is one observation of the acceptance rate; the
            # first ones average with the prior (weight 1/n) until alpha_ewma's weight takes over
            for hit in [1.0] * accepted + ([0.0] if accepted < k else []):
                self._n_obs += 1
                self.alpha += max(self.alpha_ewma, 1 / (self._n_obs + 1)) * (hit - self.alpha)
            per = t_draft / k
            self.t_draft = per if self.t_draft is None else (1 - w) * self.t_draft + w * per
            if not self.paying:  # a measurement or a probe
                self.t_catch_up = t_catch_up
                if accepted:
                    self._credit = self.probe_cost()  # look again at once
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

    def probe_cost(self) -> float:
        """Seconds a probe adds to a plain step: the draft's catch-up, one draft token, one more
        verified token."""
        extra = max(0.0, self._verify_cost(2) - self._verify_cost(1))
        return self.t_catch_up + (self.t_draft or 0.0) + extra

    def next_k(self) -> int:
        self.paying = False
        if self.k_max <= 0:
            return 0
        if not self.t_verify:
            return 0  # a plain step measures one-token verification
        if self.t_draft is None:
            return min(self.first_k, self.k_max)  # then the draft and a batch
        one = self._verify_cost(1)

        def rate(k: int, a: float) -> float:
            cost = k * self.t_draft + self._verify_cost(k + 1)
            return ((1 - a ** (k + 1)) / (1 - a)) / cost if cost > 0 else 0.0

        if all(rate(k, 0.999) <= 1 / one for k in range(1, self.k_max + 1)):
            return 0  # not even a draft accepted every time would pay: no probing
        a = min(self.alpha, 0.999)
        best = max(range(self.k_max + 1), key=lambda k: rate(k, a))
        if best:
            self.paying = True
            return best
        self._credit += self.probe_share * one
        if self._credit < self.probe_cost():
            return 0
        self._credit = 0.0
        return 1
