"""How often a draft's tokens are accepted by a target: measured by running the speculative loop,
or replayed exactly (greedy) on the target's recorded generations. Used to choose the drafts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...decode.sampling import Sampler
from ...decode.speculative import SpeculativeDecoder
from ...llama.chat import format_prompt
from ...llama.session import Session


def draft_acceptance(
    target: Path,
    draft: Path,
    prompts: list[str],
    n_tokens: int = 64,
    draft_max: int = 4,
    n_ctx: int = 1024,
    progress: bool = True,
) -> dict:
    """Greedy speculative decoding of `prompts` (chat-formatted): acceptance of `draft` against `target`."""
    drafted = accepted = generated = steps = 0
    with Session(target, n_ctx=n_ctx, tap=False) as t, Session(draft, n_ctx=n_ctx, tap=False) as d:
        dec = SpeculativeDecoder(t, d, draft_max=draft_max, adaptive=False)
        for p in tqdm(prompts, desc=f"acceptance of {Path(draft).name}", disable=not progress):
            toks = format_prompt(t, p)
            for _ in dec.generate(toks, n_tokens, Sampler(temperature=0)):
                pass
            st = dec.stats
            drafted, accepted = drafted + st.n_drafted, accepted + st.n_accepted
            generated, steps = generated + st.n_generated, steps + st.n_steps
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "tokens_per_step": generated / steps if steps else None,
        "draft_max": draft_max,
        "n_prompts": len(prompts),
        "n_tokens": n_tokens,
    }


def greedy_acceptance_from_trace(
    draft: Path, trace, draft_max: int = 4, n_ctx: int = 2048, progress: bool = True
) -> dict:
    """Greedy speculative acceptance of `draft`, replayed on a target's recorded greedy generations.

    Exact for greedy decoding and far cheaper than running the loop: the
    target's output is fixed (the trace's phase-1 tokens), and a drafted token
    is accepted iff the draft's argmax after the committed prefix equals the
    target's next token. One teacher-forced pass of the draft over each
    sequence gives those agreements; the loop (draft up to K, accept the
    agreeing prefix, the target adds one token) is then replayed on them.
    """
    drafted = accepted = steps = generated = 0
    agree_all = []
    with Session(draft, n_ctx=n_ctx, tap=False) as d:
        seqs = np.unique(trace.sequence)
        for seq in tqdm(seqs, desc=f"replaying {Path(draft).name}", unit="seq", disable=not progress):
            rows = np.flatnonzero(trace.sequence == seq)
            toks = trace.tokens[rows].tolist()
            n_prompt = int((trace.phase[rows] == 0).sum())
            if len(toks) - n_prompt < 2:
                continue
            d.reset()
            pred = np.argmax(d.decode(toks[:-1], all_logits=True), axis=1)
            # agree[i]: the draft predicts generated token i+1 from the prefix ending at generated token i
            gen = np.arange(n_prompt, len(toks) - 1)
            agree = pred[gen] == np.asarray(toks)[gen + 1]
            agree_all.append(agree)
            t, n = 0, len(agree)  # the target's first generated token comes from the prefill
            generated += 1
            while t < n:
                k = min(draft_max, n - t)
                a = 0
                while a < k and agree[t + a]:
                    a += 1
                drafted, accepted, steps = drafted + k, accepted + a, steps + 1
                step = min(a + 1, n - t)  # accepted drafts + the target's own token
                generated += step
                t += step
    agree = np.concatenate(agree_all) if agree_all else np.zeros(0, bool)
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "tokens_per_step": generated / steps if steps else None,
        "draft_max": draft_max,
        "token_agreement": float(agree.mean()) if agree.size else None,
        "n_sequences": len(agree_all),
        "method": "greedy replay on the target's recorded generations",
    }
