"""`moespac perplexity`: perplexity of a GGUF model on a text, from llama.cpp's own logits.

Scored like llama.cpp's `llama-perplexity`: the token stream is cut into
windows of --ctx tokens (the first one replaced by BOS when the model adds
one); each window is decoded from an empty cache and only its second half is
scored, so every scored token sees at least ctx/2 tokens of context.
--max-chunks picks that many windows spread evenly over the text.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import MoespacError
from ..llama.session import Session


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return z[np.arange(len(targets)), targets] - lse


def windows(n_tokens: int, n_ctx: int, max_chunks: int | None) -> list[int]:
    """Start offsets of the scored windows."""
    n = n_tokens // n_ctx
    if n == 0:
        raise MoespacError(f"the text has {n_tokens} tokens, fewer than one window of --ctx {n_ctx}")
    starts = [i * n_ctx for i in range(n)]
    if max_chunks and max_chunks < n:
        starts = [starts[i] for i in np.unique(np.linspace(0, n - 1, max_chunks).round().astype(int))]
    return starts


def perplexity(
    model: str | Path,
    text: str,
    n_ctx: int = 512,
    max_chunks: int | None = None,
    n_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """{"perplexity", "stderr_nll", "n_scored", "n_chunks", "seconds", ...} of `model` on `text`."""
    if n_ctx < 16 or n_ctx % 2:
        raise MoespacError(f"--ctx must be an even number >= 16, got {n_ctx}")
    t0 = time.perf_counter()
    nll: list[np.ndarray] = []
    with Session(model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads, tap=False) as s:
        tokens = s.tokenize(text, add_special=False)
        add_bos = (s.metadata("tokenizer.ggml.add_bos_token") or "false").lower() == "true"
        starts = windows(len(tokens), n_ctx, max_chunks)
        half = n_ctx // 2
        for start in tqdm(starts, desc=f"perplexity {Path(model).name}", unit="chunk", disable=not progress):
            win = list(tokens[start : start + n_ctx])
            if add_bos:
                win[0] = s.bos
            s.reset()
            s.decode(win[:half])
            logits = s.decode(win[half:], all_logits=True)  # logits at positions half .. n_ctx-1
            targets = np.asarray(win[half + 1 :])  # predicted from positions half .. n_ctx-2
            nll.append(-_log_softmax_at(logits[:-1], targets))
    allnll = np.concatenate(nll)
    mean = float(allnll.mean())
    return {
        "model": Path(model).name,
        "perplexity": math.exp(mean),
        "mean_nll": mean,
        "stderr_nll": float(allnll.std(ddof=1) / math.sqrt(len(allnll))) if len(allnll) > 1 else 0.0,
        "n_scored": int(len(allnll)),
        "n_chunks": len(starts),
        "n_ctx": n_ctx,
        "n_text_tokens": len(tokens),
        "seconds": round(time.perf_counter() - t0, 1),
    }
