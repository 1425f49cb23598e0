"""`moespac trace`: record the routing of greedy generations into a RoutingTrace.

Each prompt (the first turn of a Spec-Bench row, chat-formatted with the
model's own template when it has one) is decoded in one batch with logits
for every row, so every layer routes every prompt token (phase 0); then up
to -n tokens are generated greedily one at a time (phase 1). Every token in
the trace was decoded by the model, including the last generated one, so
no row has -1 padding. Sequence ids are the prompt's index in the run.
"""

from __future__ import annotations

import datetime
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..core.errors import MoespacError
from ..llama.chat import format_prompt
from ..llama.session import Session
from .trace import DECODE, PROMPT, RoutingTrace


def record(
    model: str | Path,
    prompts: list[dict],
    n_tokens: int,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    prompt_file: str = "",
    progress: bool = True,
) -> RoutingTrace:
    """Greedy generations of `prompts` with the routing tap on; see the module docstring."""
    model = Path(model)
    parts: dict[str, list] = {k: [] for k in ("experts", "weights", "tokens", "positions", "sequence", "phase")}
    n_generated, t0 = 0, time.perf_counter()
    with Session(model, n_ctx=n_ctx, n_threads=n_threads, tap=True) as s:
        if s.tap is None:
            raise MoespacError(f"{model.name} is not an MoE model (no expert_used_count): nothing to trace")
        arch = s.metadata("general.architecture")
        n_expert = int(s.metadata(f"{arch}.expert_count") or 0)
        chat = bool(s.chat_template())

        def add(tokens: list[int], routing, start: int, seq: int, phase: int) -> None:
            parts["experts"].append(routing.experts)
            parts["weights"].append(routing.weights)
            parts["tokens"].append(np.asarray(tokens))
            parts["positions"].append(np.arange(start, start + len(tokens)))
            parts["sequence"].append(np.full(len(tokens), seq))
            parts["phase"].append(np.full(len(tokens), phase))

        for seq, row in enumerate(tqdm(prompts, desc=f"tracing {model.name}", unit="prompt", disable=not progress)):
            toks = format_prompt(s, row["text"])
            if len(toks) + n_tokens > s.n_ctx:
                toks = toks[: max(1, s.n_ctx - n_tokens)]
            s.reset()
            logits = s.decode(toks, all_logits=True)[-1]
            add(toks, s.last_routing, 0, seq, PROMPT)
            for _ in range(n_tokens):
                tok = int(np.argmax(logits))
                pos = s.n_past
                logits = s.decode([tok])[-1]
                add([tok], s.last_routing, pos, seq, DECODE)
                n_generated += 1
                if s.is_eog(tok):
                    break
    meta = {
        "model": model.name,
        "model_path": str(model.resolve()),
        "arch": arch,
        "source": "moespac trace (llama.cpp routing tap, greedy)",
        "prompt_file": prompt_file,
        "question_ids": [r["question_id"] for r in prompts],
        "categories": [r["category"] for r in prompts],
        "n_tokens_max": n_tokens,
        "n_ctx": n_ctx,
        "n_generated": n_generated,
        "chat_template": chat,
        "recorded": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    cat = {k: np.concatenate(v, axis=1 if k in ("experts", "weights") else 0) for k, v in parts.items()}
    return RoutingTrace(
        cat["experts"],
        cat["weights"],
        cat["tokens"],
        cat["positions"],
        cat["sequence"],
        cat["phase"],
        n_expert=n_expert,
        meta=meta,
    )
