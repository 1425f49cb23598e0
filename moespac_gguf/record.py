"""`moespac trace`: record the routing of greedy generations into a RoutingTrace.

Each prompt (the first turn of a Spec-Bench row, chat-formatted with the
model's own template when it has one) is decoded in one batch with logits
for every row, so every layer routes every prompt token (phase 0); then up
to -n tokens are generated greedily one at a time (phase 1). Every token in
the trace was decoded by the model, including the last generated one, so
no row has -1 padding. Sequence ids are the prompt's index in the run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import MoespacError
from .trace import DECODE, PROMPT, RoutingTrace


def load_prompts(path: str | Path, limit: int | None = None, select: str = "first") -> list[dict]:
    """Rows of a Spec-Bench style JSONL ({"turns": [...], "category": ..., "question_id": ...}).

    select "first" takes the first `limit` rows; "spread" takes `limit` rows
    evenly spaced over the file (every category of Spec-Bench is then covered).
    """
    path = Path(path)
    if not path.is_file():
        raise MoespacError(f"prompt file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["turns"][0] if "turns" in row else row["prompt"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise MoespacError(f"{path}:{lineno}: expected a JSON object with \"turns\" (or \"prompt\")") from None
            if not isinstance(text, str) or not text.strip():
                raise MoespacError(f"{path}:{lineno}: empty prompt")
            rows.append({"text": text, "category": row.get("category", ""),
                         "question_id": row.get("question_id", lineno), "line": lineno})
    if not rows:
        raise MoespacError(f"{path} holds no prompts")
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise MoespacError(f"--limit must be >= 1, got {limit}")
    if select == "spread":
        idx = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
        return [rows[i] for i in idx]
    return rows[:limit]


def format_prompt(session, text: str) -> list[int]:
    """Token ids of `text` as one user turn of the model's chat template (raw text without one)."""
    from .generate import chat_tokens

    tokens = chat_tokens(session, [{"role": "user", "content": text}])
    return session.tokenize(text) if tokens is None else tokens


def record(model: str | Path, prompts: list[dict], n_tokens: int, n_ctx: int = 2048,
           n_threads: int | None = None, prompt_file: str = "", progress: bool = True) -> RoutingTrace:
    """Greedy generations of `prompts` with the routing tap on; see the module docstring."""
    from .session import Session

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
    meta = {"model": model.name, "model_path": str(model.resolve()), "arch": arch,
            "source": "moespac trace (llama.cpp routing tap, greedy)", "prompt_file": prompt_file,
            "question_ids": [r["question_id"] for r in prompts], "categories": [r["category"] for r in prompts],
            "n_tokens_max": n_tokens, "n_ctx": n_ctx, "n_generated": n_generated,
            "chat_template": chat,
            "recorded": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "seconds": round(time.perf_counter() - t0, 1)}
    cat = {k: np.concatenate(v, axis=1 if k in ("experts", "weights") else 0) for k, v in parts.items()}
    return RoutingTrace(cat["experts"], cat["weights"], cat["tokens"], cat["positions"], cat["sequence"],
                        cat["phase"], n_expert=n_expert, meta=meta)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac trace",
                                description="Record the expert routing of greedy generations into a trace (.npz).")
    p.add_argument("-m", "--model", required=True, help="MoE GGUF file, or a name from `moespac models`")
    p.add_argument("--prompts", required=True, help="JSONL with \"turns\" (Spec-Bench) or \"prompt\" per row")
    p.add_argument("--limit", type=int, default=None, help="number of prompts (default: all)")
    p.add_argument("--select", choices=("first", "spread"), default="first",
                   help="first N rows, or N rows spread evenly over the file (all categories)")
    p.add_argument("-n", "--n-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    p.add_argument("--out", required=True, help="output .npz path")
    p.add_argument("-c", "--ctx-size", type=int, default=2048)
    p.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.n_tokens < 0:
        raise MoespacError(f"-n must be >= 0, got {a.n_tokens}")
    from .models import resolve_model
    model = resolve_model(a.model)
    prompts = load_prompts(a.prompts, a.limit, a.select)
    trace = record(model, prompts, a.n_tokens, n_ctx=a.ctx_size, n_threads=a.threads,
                   prompt_file=str(Path(a.prompts).resolve()))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trace.save(out)
    m = trace.meta
    n_prompt = int((trace.phase == PROMPT).sum())
    print(f"{len(prompts)} prompts: {n_prompt} prompt + {m['n_generated']} generated tokens, {trace.n_layer} layers, "
          f"top-{trace.k} of {trace.n_expert} experts, {m['seconds']} s")
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.2f} MB)")
    return 0
