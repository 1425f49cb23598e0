"""The speculative decoding loop: a draft (a small dense model, or the target routing fewer
experts) proposes, the MoE target verifies.

Each step the draft proposes K tokens, the target decodes [last, d1..dK] in ONE
batch with logits at every position, and the standard rule accepts a prefix:
greedy keeps the drafts that equal the target's argmax; sampling uses the
speculative-sampling rejection rule (Leviathan et al. 2023), so the output
follows the target's distribution exactly. Rejected KV entries are rolled back.

The loop is also the runtime's sensor: observers hear the drafted tokens before
verification and the verification's routing after it. With `draft_ahead` a
self-draft drafts further than it proposes, and its own routing of those rows
(RouterCapture) tells observers which experts the next steps will need. With no
draft (or K = 0 and no draft_ahead) the same path is plain decoding, which is the
llama.cpp baseline.

Invariant: the target's KV holds every committed token but the last one,
which opens the next verification batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np

from .capture import RouterCapture
from .errors import MoespacError
from .routing import Routing
from .session import Session


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


@dataclass
class VerificationEvent:
    """One verification step, as published to observers.

    `batch` are the tokens the target decoded ([last committed, drafts...]);
    routing rows align with it. For the prompt, phase is "prefill" and batch is
    the prompt.
    """
    phase: str                 # "prefill" | "verify"
    batch: list[int]
    draft: list[int]
    accepted: int              # drafts accepted (0 for prefill)
    committed: list[int]       # tokens this step added to the output
    routing: Routing | None


class Observer(Protocol):
    def on_draft(self, draft: list[int], ahead: np.ndarray | None = None) -> None:
        """Drafted tokens, before the target verifies them (prefetch can start here). `ahead`
        (with a lookahead): int [n_layer, rows, k], the draft's routing of the rows from the
        verification's first on, through the tokens it drafted beyond `draft`."""

    def on_verify(self, event: VerificationEvent) -> None:
        """The verification's outcome and routing."""


@dataclass
class DecodeStats:
    n_prompt: int = 0
    n_generated: int = 0
    n_steps: int = 0
    n_drafted: int = 0
    n_accepted: int = 0
    t_prompt: float = 0.0
    t_draft: float = 0.0
    t_verify: float = 0.0
    t_total: float = 0.0
    finish_reason: str = ""

    @property
    def tokens_per_s(self) -> float:
        t = self.t_total - self.t_prompt
        return self.n_generated / t if t > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.n_accepted / self.n_drafted if self.n_drafted else None

    @property
    def mean_accepted_len(self) -> float:
        """Tokens committed per verification step (accepted drafts + the target's own)."""
        return self.n_generated / self.n_steps if self.n_steps else 0.0

    @classmethod
    def pooled(cls, parts: list["DecodeStats"]) -> "DecodeStats":
        """Several calls as one (counts and times summed: rates weighted by tokens, not averaged)."""
        return cls(**{f: sum(getattr(p, f) for p in parts) for f in
                      ("n_prompt", "n_generated", "n_steps", "n_drafted", "n_accepted",
                       "t_prompt", "t_draft", "t_verify", "t_total")})

    def as_dict(self) -> dict:
        return {"n_prompt": self.n_prompt, "n_tokens": self.n_generated, "n_steps": self.n_steps,
                "n_drafted": self.n_drafted, "n_accepted": self.n_accepted,
                "tokens_per_s": self.tokens_per_s, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_len": self.mean_accepted_len, "t_prompt_s": self.t_prompt,
                "t_draft_s": self.t_draft, "t_verify_s": self.t_verify, "t_total_s": self.t_total,
                "finish_reason": self.finish_reason}


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
    alpha: float = 0.5           # prior acceptance
    ewma: float = 0.2
    probe_every: int = 16
    t_draft: float | None = None                       # seconds per draft token
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


class SpeculativeDecoder:
    """Greedy or sampled generation from `target`, drafted by `draft` if given."""

    def __init__(self, target: Session, draft: Session | None = None, draft_max: int = 8,
                 adaptive: bool = True, draft_ahead: int = 0, draft_router: RouterCapture | None = None):
        """`draft_ahead`: tokens the draft runs ahead each step, for the routing `draft_router`
        (the capture the draft Session was opened with) reads; 0 without one."""
        if draft is not None and draft.vocab_fingerprint() != target.vocab_fingerprint():
            raise MoespacError(f"draft {draft.path.name} has a different vocabulary from target "
                               f"{target.path.name} ({draft.n_vocab} vs {target.n_vocab} tokens or different "
                               "token texts): speculative decoding needs the same tokenizer")
        self.target, self.draft = target, draft
        self.draft_max = draft_max if draft is not None else 0
        self.adaptive = adaptive
        self.router = draft_router if draft is not None else None
        self.draft_ahead = draft_ahead if self.router is not None else 0
        self.observers: list[Observer] = []
        self.stats = DecodeStats()

    def stop_running_ahead(self) -> None:
        """From now on the draft proposes only, and no draft routing reaches observers (the
        caller detaches the router from the draft's graph: unread, it would only pile up)."""
        self.draft_ahead, self.router = 0, None

    def subscribe(self, observer: Observer) -> None:
        self.observers.append(observer)

    def _publish(self, event: VerificationEvent) -> None:
        for o in self.observers:
            o.on_verify(event)

    def generate(self, prompt: list[int], max_tokens: int, sampler: Sampler) -> Iterator[int]:
        """Yield generated tokens until EOS, max_tokens or a full context.

        The prompt's last token is not prefilled: it opens the first
        verification batch, so even the first generated token goes through the
        acceptance rule. Sets stats.finish_reason to "stop" (end-of-generation
        token), "length" or "context". The caller may stop early (stop
        strings) by closing the generator.
        """
        target, draft = self.target, self.draft
        if not prompt:
            raise MoespacError("empty prompt")
        if len(prompt) >= target.n_ctx:
            raise MoespacError(f"prompt of {len(prompt)} tokens does not fit the context of {target.n_ctx} "
                               "tokens (raise -c/--ctx-size)")
        st = self.stats = DecodeStats(n_prompt=len(prompt))
        ctl = DraftLength(k_max=self.draft_max)
        self._ran = ([], [])  # the draft's continuation of `committed` and its rows (_propose)
        t0 = time.perf_counter()
        for s in (target, draft):
            if s is not None:
                s.reset()
        if len(prompt) > 1:
            target.decode(prompt[:-1])
            # observers plan residency from the prompt's routing before the draft's own prefill,
            # which may route to what they hold (a draft restricted to held experts)
            self._publish(VerificationEvent("prefill", prompt[:-1], [], 0, [], target.last_routing))
            if draft is not None and draft.path == target.path:
                draft.copy_kv_from(target)  # a self-draft: the same file, the same KV layout
            elif draft is not None:
                draft.decode(prompt[:-1])
                if self.router is not None:
                    self.router.clear()
        st.t_prompt = time.perf_counter() - t0
        committed, last = list(prompt), prompt[-1]
        try:
            while True:
                room = target.n_ctx - target.n_past - 1
                if room < 0:
                    st.finish_reason = "context"
                    return
                k = ctl.next_k() if self.adaptive else self.draft_max
                k = max(0, min(k, room, max_tokens - st.n_generated - 1))
                t1 = time.perf_counter()
                drafts, q, ahead, n_decoded = self._propose(committed, k, sampler, room)
                t2 = time.perf_counter()
                for o in self.observers:
                    o.on_draft(drafts, ahead)
                batch = [last] + drafts
                p_logits = target.decode(batch, all_logits=True)
                t3 = time.perf_counter()
                accepted, bonus = self._accept(drafts, q, p_logits, sampler)
                keep = len(committed) + accepted  # KV entries still valid: committed + accepted drafts
                target.rollback(keep)
                if draft is not None:
                    self._carry_over(keep, accepted, bonus, sampler)
                st.n_steps += 1
                st.n_drafted += len(drafts)
                st.n_accepted += accepted
                st.t_draft += t2 - t1
                st.t_verify += t3 - t2
                ctl.observe(len(drafts), accepted, (t2 - t1) * len(drafts) / max(1, n_decoded), t3 - t2)
                new = drafts[:accepted] + [bonus]
                self._publish(VerificationEvent("verify", batch, drafts, accepted, new, target.last_routing))
                for tok in new:
                    committed.append(tok)
                    st.n_generated += 1
                    yield tok
                    if target.is_eog(tok):
                        st.finish_reason = "stop"
                        return
                    if st.n_generated >= max_tokens:
                        st.finish_reason = "length"
                        return
                last = bonus
        finally:
            st.t_total = time.perf_counter() - t0

    def _propose(self, committed: list[int], k: int, sampler: Sampler,
                 room: int) -> tuple[list[int], list[np.ndarray], np.ndarray | None, int]:
        """Draft k tokens after `committed` (and greedily on to the lookahead, within `room`),
        starting from what the draft ran ahead last step if the target committed it (_carry_over).
        Return the k drafts, their draft distributions (sampling), the draft's routing of the rows
        from `committed[-1]` on (None without a router) and the number of draft decodes run."""
        n = max(k, min(self.draft_ahead, room))
        d = self.draft
        if n == 0 or d is None:
            self._ran = ([], [])
            return [], [], None, 0
        # a carried run is what the draft ran past k accepted drafts and the bonus token: fewer
        # than draft_ahead - k tokens, all inside the room the last step had for them
        drafts, rows, q = list(self._ran[0]), list(self._ran[1]), []
        pending = drafts[-1:] or committed[d.n_past:]
        decoded = 0
        while len(drafts) < n:
            logits = d.decode(pending)[-1]
            decoded += 1
            if self.router is not None:
                rows.append(self.router.last_row_ranking(self.target.n_layer, self.target.n_expert_used))
            if sampler.greedy or len(drafts) >= k:
                tok = int(np.argmax(logits))
            else:
                q.append(sampler.probs(logits))
                tok = sampler.draw(q[-1])
            drafts.append(tok)
            pending = [tok]
        self._ran = (drafts, rows)
        return drafts[:k], q, np.stack(rows, axis=1) if rows else None, decoded

    def _carry_over(self, keep: int, accepted: int, bonus: int, sampler: Sampler) -> None:
        """After a verification: if the target's token after the accepted drafts is the one the
        draft ran on with (greedy), the rest of its run continues the new committed text, KV and
        rows included, and next step drafts only past it; otherwise roll the draft back to `keep`."""
        drafts, rows = self._ran
        if sampler.greedy and accepted < len(drafts) and drafts[accepted] == bonus:
            self._ran = (drafts[accepted + 1:], rows[accepted + 1:])
            return
        self._ran = ([], [])
        self.draft.rollback(min(self.draft.n_past, keep))

    @staticmethod
    def _accept(drafts: list[int], q: list[np.ndarray], p_logits: np.ndarray,
                sampler: Sampler) -> tuple[int, int]:
        """(number of drafts accepted, the token the target adds after them)."""
        if sampler.greedy:
            target_choice = np.argmax(p_logits, axis=1)
            n = 0
            while n < len(drafts) and drafts[n] == target_choice[n]:
                n += 1
            return n, int(target_choice[n])
        for i, tok in enumerate(drafts):
            p = sampler.probs(p_logits[i])
            if sampler.rng.random() * q[i][tok] <= p[tok]:  # accept with prob min(1, p/q)
                continue
            residual = np.maximum(p - q[i], 0.0)
            total = residual.sum()
            return i, sampler.draw(residual / total) if total > 0 else sampler.draw(p)
        return len(drafts), sampler.draw(sampler.probs(p_logits[len(drafts)]))
