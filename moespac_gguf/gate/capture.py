"""Capture for fitting and evaluating the gate: router inputs and routing of every token of some
text, decoded through llama.cpp with every row's logits (so every layer routes every row)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import MoespacError
from ..core.prompts import load_prompts
from ..llama.capture import TensorCapture
from ..llama.chat import format_prompt
from ..llama.session import Session
from .model import HIDDEN_NAMES, moe_layers


@dataclass
class Capture:
    """Router inputs and the tap's routing of every token of some sequences, in order."""

    hidden: dict[int, np.ndarray]  # MoE layer -> float16 [N, n_embd] router inputs
    experts: np.ndarray  # int32 [n_layer, N, k]: routing read by the C tap
    tokens: np.ndarray  # int32 [N]
    seq_start: np.ndarray  # bool [N]: first row of a sequence (no previous token)
    generated: np.ndarray  # bool [N]: rows produced by greedy decoding (not prompt)
    group: np.ndarray | None = None  # int [N]: source of each row (e.g. text file), for validation

    @property
    def n_rows(self) -> int:
        return len(self.tokens)

    def rows(self, sel) -> Capture:
        return Capture(
            {l: h[sel] for l, h in self.hidden.items()},
            self.experts[:, sel],
            self.tokens[sel],
            self.seq_start[sel],
            self.generated[sel],
            None if self.group is None else self.group[sel],
        )


def capture(
    model: str | Path,
    sequences: list[list[int]],
    *,
    max_new: int = 0,
    n_ctx: int = 1024,
    n_threads: int | None = None,
    desc: str = "capture",
    progress: bool = True,
    groups: list[int] | None = None,
) -> Capture:
    """Decode each token sequence from an empty context (every row's logits, so every layer routes
    every row), then `max_new` greedy tokens one at a time; collect router inputs and routing.
    `groups`: a source label per sequence (kept per row for grouped validation)."""
    moe = moe_layers(model)
    cap = TensorCapture(*HIDDEN_NAMES)
    hidden = {l: [] for l in moe}
    experts, tokens, starts, gen, grp = [], [], [], [], []
    total = sum(len(s) + max_new for s in sequences)
    with (
        Session(model, n_ctx=n_ctx, n_threads=n_threads, capture=cap) as s,
        tqdm(total=total, desc=desc, unit="tok", disable=not progress, file=sys.stderr) as bar,
    ):
        if s.tap is None:
            raise MoespacError(f"{model}: no routing tap (not an MoE model?)")
        for i_seq, seq in enumerate(sequences):
            seq = list(seq)[: n_ctx - max_new]
            if not seq:
                continue
            s.reset()
            cap.clear()
            logits = s.decode(seq, all_logits=True)
            routes = [s.last_routing.experts]
            rows = list(seq)
            bar.update(len(seq))
            for _ in range(max_new):
                tok = int(np.argmax(logits[-1]))
                if s.is_eog(tok):
                    break
                logits = s.decode([tok])
                routes.append(s.last_routing.experts)
                rows.append(tok)
                bar.update(1)
            n = len(rows)
            for l in moe:
                names = [f"ffn_norm-{l}", f"attn_post_norm-{l}"]
                name = next((x for x in names if x in cap.captured), None)
                if name is None:
                    raise MoespacError(f"{model}: the router input of layer {l} was not captured")
                h = cap.take(name)
                if h.shape[0] != n:
                    raise MoespacError(f"capture of {name}: {h.shape[0]} rows for {n} tokens")
                hidden[l].append(h.astype(np.float16))
            experts.append(np.concatenate(routes, axis=1))
            tokens.append(np.asarray(rows, np.int32))
            st = np.zeros(n, bool)
            st[0] = True
            starts.append(st)
            g = np.zeros(n, bool)
            g[len(seq) :] = True
            gen.append(g)
            grp.append(np.full(n, 0 if groups is None else groups[i_seq], np.int32))
    if not tokens:
        raise MoespacError("capture: no tokens to decode")
    return Capture(
        {l: np.concatenate(v) for l, v in hidden.items()},
        np.concatenate(experts, axis=1),
        np.concatenate(tokens),
        np.concatenate(starts),
        np.concatenate(gen),
        np.concatenate(grp),
    )


def text_windows(
    model: str | Path, files: list[str | Path], max_tokens: int, window: int = 256
) -> tuple[list[list[int]], list[int]]:
    """About `max_tokens` tokens of the files as `window`-token sequences, spread evenly over the
    files and over each file (deterministic); and the index of each sequence's file."""
    texts = []
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise MoespacError(f"no such text file: {p}")
        t = p.read_text(encoding="utf-8", errors="replace")
        if t.strip():
            texts.append(t)
    if not texts:
        raise MoespacError("no training text (the --text files are empty)")
    n_windows = max(1, max_tokens // window)
    chars = window * 8  # comfortably more than `window` tokens of English
    out, groups = [], []
    with Session(model, n_ctx=window * 2, tap=False) as s:
        for i, t in enumerate(texts):
            share = n_windows // len(texts) + (i < n_windows % len(texts))
            for j in range(share):
                pos = (len(t) - chars) * j // max(1, share) if len(t) > chars else 0
                pos = t.rfind("\n", 0, pos) + 1 if pos else 0
                toks = s.tokenize(t[pos : pos + chars], add_special=True)[:window]
                if len(toks) >= 16:
                    out.append(toks)
                    groups.append(i)
    return out, groups


def prompt_sequences(
    model: str | Path, prompts_file: str | Path, n_prompts: int, max_prompt_chars: int = 1200
) -> list[list[int]]:
    """The first turn of `n_prompts` prompts, chosen round-robin over categories (deterministic),
    rendered with the model's chat template when it has one."""
    rows = load_prompts(prompts_file, n_prompts, select="round-robin")
    with Session(model, n_ctx=2048, tap=False) as s:
        return [format_prompt(s, r["text"][:max_prompt_chars]) for r in rows]
