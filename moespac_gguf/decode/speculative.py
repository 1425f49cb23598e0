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

Invariant: from the first verification on, the target's KV holds every committed
token but the last one, which opens the next verification batch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np

from ..core.errors import MoespacError
from ..core.events import Observer, VerificationEvent
from ..llama.capture import RouterCapture
from ..llama.session import Session
from .adaptive import DraftLength
from .sampling import Sampler
from .stats import DecodeStats

CATCH_UP_WINDOW = 48  # tokens of context a separate draft re-reads to be measured or probed (_catch_up)


def check_prompt(prompt: list[int], n_ctx: int) -> None:
    """A MoespacError unless `prompt` is a prompt the context can hold with room to generate."""
    if not prompt:
        raise MoespacError("empty prompt")
    if len(prompt) >= n_ctx:
        raise MoespacError(
            f"prompt of {len(prompt)} tokens does not fit the context of {n_ctx} tokens (raise -c/--ctx-size)"
        )


class SpeculativeDecoder:
    """Greedy or sampled generation from `target`, drafted by `draft` if given."""

    def __init__(
        self,
        target: Session,
        draft: Session | None = None,
        draft_max: int = 8,
        adaptive: bool = True,
        draft_ahead: int = 0,
        draft_router: RouterCapture | None = None,
    ):
        """`draft_ahead`: tokens the draft runs ahead each step, for the routing `draft_router`
        (the capture the draft Session was opened with) reads; 0 without one."""
        if draft is not None and draft.vocab_fingerprint() != target.vocab_fingerprint():
            raise MoespacError(
                f"draft {draft.path.name} has a different vocabulary from target "
                f"{target.path.name} ({draft.n_vocab} vs {target.n_vocab} tokens or different "
                "token texts): speculative decoding needs the same tokenizer"
            )
        self.target, self.draft = target, draft
        self.draft_max = draft_max if draft is not None else 0
        self.adaptive = adaptive
        self.router = draft_router if draft is not None else None
        self.draft_ahead = draft_ahead if self.router is not None else 0
        self.observers: list[Observer] = []
        self.stats = DecodeStats()
        self.draft_length = DraftLength(k_max=self.draft_max)  # costs measured once, for every request
        self._skipped = 0  # committed tokens before the draft's context (a windowed catch-up, _catch_up)
        self._catch_up_s = 0.0

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

        With a draft the prompt's last token is not prefilled: it opens the first
        verification batch, so even the first generated token goes through the
        acceptance rule. Without one the whole prompt is one batch, as in llama.cpp, and its
        last row is the first step's verification. Sets stats.finish_reason to "stop" (end-of-generation
        token), "length" or "context". The caller may stop early (stop
        strings) by closing the generator.
        """
        target, draft = self.target, self.draft
        check_prompt(prompt, target.n_ctx)
        st = self.stats = DecodeStats(n_prompt=len(prompt))
        ctl = self.draft_length
        self._ran = ([], [])  # the draft's continuation of `committed` and its rows (_propose)
        self._skipped = 0
        t0 = time.perf_counter()
        for s in (target, draft):
            if s is not None:
                s.reset()
        first = None  # without a draft: the first step's logits and routing, from the prefill
        if len(prompt) > 1:
            # without a draft the whole prompt goes in one batch, as llama.cpp runs it: with a
            # batch-dependent kernel (flash attention) the first token then is llama.cpp's
            whole = draft is None
            logits = target.decode(prompt if whole else prompt[:-1], routing=bool(self.observers))
            routing = target.last_routing
            if whole:
                last_row = slice(len(prompt) - 1, len(prompt))
                first = (logits, routing.take(last_row) if routing is not None else None)
                routing = routing.take(slice(0, len(prompt) - 1)) if routing is not None else None
            # observers plan residency from the prompt's routing before the draft's own prefill,
            # which may route to what they hold (a draft restricted to held experts)
            self._publish(VerificationEvent("prefill", prompt[:-1], [], 0, [], routing))
        # the draft reads the prompt when it first drafts (_propose): a draft that does not pay
        # never reads it
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
                if first is not None:  # the prompt's last row, decoded with the prompt
                    (p_logits, step_routing), first = first, None
                else:
                    # used before the target's next decode: llama.cpp's buffer, not a copy
                    p_logits = target.decode(batch, all_logits=True, routing=bool(self.observers), copy=False)
                    step_routing = target.last_routing
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
                t_drafts = (t2 - t1 - self._catch_up_s) * len(drafts) / max(1, n_decoded)
                if draft is not None:
                    ctl.observe(len(drafts), accepted, t_drafts, t3 - t2, self._catch_up_s)
                new = drafts[:accepted] + [bonus]
                if self.observers:
                    self._publish(VerificationEvent("verify", batch, drafts, accepted, new, step_routing))
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

    def _propose(
        self, committed: list[int], k: int, sampler: Sampler, room: int
    ) -> tuple[list[int], list[np.ndarray], np.ndarray | None, int]:
        """Draft k tokens after `committed` (and greedily on to the lookahead, within `room`),
        starting from what the draft ran ahead last step if the target committed it (_carry_over).
        Return the k drafts, their draft distributions (sampling), the draft's routing of the rows
        from `committed[-1]` on (None without a router) and the number of draft decodes run."""
        n = max(k, min(self.draft_ahead, room))
        d = self.draft
        self._catch_up_s = 0.0
        if n == 0 or d is None:
            self._ran = ([], [])
            return [], [], None, 0
        # a carried run is what the draft ran past k accepted drafts and the bonus token: fewer
        # than draft_ahead - k tokens, all inside the room the last step had for them
        drafts, rows, q = list(self._ran[0]), list(self._ran[1]), []
        pending = drafts[-1:] or self._catch_up(committed)
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

    def _catch_up(self, committed: list[int]) -> list[int]:
        """Bring the draft's KV up to `committed[:-1]` and return what it must decode next (the
        last committed token, after which it drafts); the time it took goes to `_catch_up_s`.
        A self-draft copies the target's KV (the same file and layout: megabytes copied instead
        of tokens decoded). A separate draft decodes what it missed, all of it when drafting
        pays; when it is only measured or probed (K = 0 otherwise), at most the last
        CATCH_UP_WINDOW tokens, so that a probe costs the same however long the text it skips:
        its drafts then see less context, which lowers the acceptance it measures (SmolLM2
        drafting SmolMoE on 6 Spec-Bench prompts: 0.54 with 48 tokens, 0.38 with 16, 0.75 with
        all; where drafting pays clearly, as with a GPU's nearly flat verification cost, K > 0
        anyway and the full context returns with the next prompt)."""
        d, t0 = self.draft, time.perf_counter()
        missed = committed[self._skipped + d.n_past : -1]
        if missed and d.path == self.target.path:
            d.copy_kv_from(self.target)  # the target's KV holds committed[:-1]
            self._skipped = 0
        elif len(missed) > CATCH_UP_WINDOW and self.adaptive and not self.draft_length.paying:
            d.reset()
            self._skipped = len(committed) - 1 - CATCH_UP_WINDOW
            missed = committed[self._skipped : -1]
        if missed and d.path != self.target.path:
            d.decode(missed)
            if self.router is not None:
                self.router.clear()
        self._catch_up_s = time.perf_counter() - t0
        return committed[-1:]

    def _carry_over(self, keep: int, accepted: int, bonus: int, sampler: Sampler) -> None:
        """After a verification: if the target's token after the accepted drafts is the one the
        draft ran on with (greedy), the rest of its run continues the new committed text, KV and
        rows included, and next step drafts only past it; otherwise roll the draft back to `keep`."""
        drafts, rows = self._ran
        if sampler.greedy and accepted < len(drafts) and drafts[accepted] == bonus:
            self._ran = (drafts[accepted + 1 :], rows[accepted + 1 :])
            return
        self._ran = ([], [])
        self.draft.rollback(min(self.draft.n_past, keep - self._skipped))

    @staticmethod
    def _accept(drafts: list[int], q: list[np.ndarray], p_logits: np.ndarray, sampler: Sampler) -> tuple[int, int]:
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
