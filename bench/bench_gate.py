"""Lookahead gate on a real model: train on the local corpus, evaluate on held-out Spec-Bench prompts.

    python bench/bench_gate.py -m MODEL.gguf [--distance 3] [--tokens 6000] [--n-prompts 26]

Trains the gate on the training split of the local English corpus (moespac_gguf.corpus; the
held-out plays/books are never used, and Spec-Bench is a different domain altogether), evaluates
top-k recall/precision at d = 1..D against unaligned speculative gating, the previous token's
experts and a frequency prior on Spec-Bench prompts (first turn, chat template, plus greedy
continuations), measures the runtime callback's cost per decoded token, and writes
bench/results/gate.json and bench/results/gate.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: BLAS threads crawl on a busy 2-core box
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moespac_gguf.core.layout import read_layout  # noqa: E402
from moespac_gguf.core.paths import CACHE_DIR  # noqa: E402
from moespac_gguf.core.prompts import SPEC_BENCH  # noqa: E402
from moespac_gguf.demo.corpus import training_files  # noqa: E402
from moespac_gguf.gate.capture import capture, text_windows  # noqa: E402
from moespac_gguf.gate.evaluate import METHODS, eval_on_prompts, evaluate, format_table  # noqa: E402
from moespac_gguf.gate.fit import fit_gate  # noqa: E402
from moespac_gguf.gate.model import LookaheadGate  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def decode_ms(model, gate, threads, n_tokens=32, with_gate=False) -> float:
    """Mean wall time of one single-token decode, with or without the runtime gate callback."""
    from moespac_gguf.gate.runtime import GateTap
    from moespac_gguf.llama.session import Session

    tap = GateTap(gate) if with_gate else None
    with Session(model, n_ctx=512, n_threads=threads, capture=tap) as s:
        toks = s.tokenize("The quick brown fox jumps over the lazy dog. " * 4)
        logits = s.decode(toks)
        t0 = time.perf_counter()
        for _ in range(n_tokens):
            logits = s.decode([int(np.argmax(logits[-1]))])
        return 1000 * (time.perf_counter() - t0) / n_tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--distance", type=int, default=3)
    p.add_argument("--tokens", type=int, default=6000, help="training tokens")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--n-prompts", type=int, default=26)
    p.add_argument("--max-new", type=int, default=24)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--gen", type=int, default=0, help="greedy tokens generated after each training window")
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--gate", help="reuse this gate file instead of training")
    a = p.parse_args()

    model = Path(a.model)
    layout = read_layout(model)
    gate_path = Path(a.gate) if a.gate else CACHE_DIR / "gates" / f"{model.stem}.gate.npz"
    t0 = time.perf_counter()
    if not a.gate:
        seqs, groups = text_windows(model, training_files(), a.tokens, a.window)
        cap = capture(
            model,
            seqs,
            max_new=a.gen,
            n_ctx=a.window + a.gen + 8,
            n_threads=a.threads,
            desc="train capture",
            groups=groups,
        )
        gate = fit_gate(model, cap, a.distance, rank=a.rank)
        gate.info["text"] = "moespac_gguf.demo.corpus training split (Shakespeare + KJV, The Tempest and John held out)"
        gate.save(gate_path)
        del cap
    train_s = time.perf_counter() - t0
    gate = LookaheadGate.load(gate_path, model)
    t1 = time.perf_counter()
    result, cap = eval_on_prompts(model, gate, SPEC_BENCH, a.n_prompts, a.max_new, a.threads)
    generated = evaluate(gate, cap, rows=cap.generated)
    eval_s = time.perf_counter() - t1
    plain = decode_ms(model, gate, a.threads)
    gated = decode_ms(model, gate, a.threads, with_gate=True)

    size = gate_path.stat().st_size
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.system()}",
        "model": model.name,
        "model_bytes": layout.file_bytes,
        "arch": layout.arch,
        "moe_layers": len(layout.layers),
        "n_expert": layout.n_expert,
        "top_k": layout.n_expert_used,
        "n_embd": layout.n_embd,
        "distance": gate.distance,
        "gate_file_bytes": size,
        "gate_param_bytes": gate.nbytes,
        "gate_share": size / layout.file_bytes,
        "method": gate.info.get("method"),
        "rank": gate.info.get("rank"),
        "train_tokens": gate.info.get("trained_rows"),
        "val_tokens": gate.info.get("val_rows"),
        "val_recall": gate.info.get("val_recall"),
        "alpha_counts": {str(k): v for k, v in _counts(gate.info.get("alpha", {})).items()},
        "eval_prompts": a.n_prompts,
        "eval_tokens": cap.n_rows,
        "eval_generated_tokens": int(cap.generated.sum()),
        "eval_set": "Spec-Bench first turns, round-robin over the 13 categories, chat template, "
        f"prompt <= 1200 chars + {a.max_new} greedy tokens",
        "train_s": round(train_s, 1),
        "eval_s": round(eval_s, 1),
        "decode_ms_plain": round(plain, 2),
        "decode_ms_with_gate_callback": round(gated, 2),
        "threads": a.threads,
    }
    out = {"meta": meta, "per_distance": result, "per_distance_generated_rows": generated}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gate.json").write_text(json.dumps(out, indent=1) + "\n")
    md = render_md(meta, result, generated)
    (RESULTS / "gate.md").write_text(md)
    print(md)
    return 0


def _counts(alpha: dict) -> dict:
    """How many (l, d) pairs chose each shrinkage; the gate stores the unaligned one as "inf"."""
    out: dict = {}
    for v in alpha.values():
        key = "inf (unaligned)" if v in ("inf", float("inf")) else f"{v:g}"
        out[key] = out.get(key, 0) + 1
    return out


def render_md(meta: dict, result: dict, generated: dict) -> str:
    m = meta
    lines = [
        "## Lookahead gate: experts of layers l+1..l+D from the router input of layer l",
        "",
        f"Model {m['model']} ({m['arch']}, {m['moe_layers']} MoE layers, top-{m['top_k']} of {m['n_expert']} "
        f"experts, n_embd {m['n_embd']}, {m['model_bytes'] / 2**30:.2f} GiB). Gate: D = {m['distance']}, "
        f"**{m['gate_file_bytes'] / 1024:.0f} KiB = {100 * m['gate_share']:.3f}% of the model** "
        f"(sidecar .npz, float16 corrections; the routers it starts from are read from the model).",
        "",
        f"Method: speculative gating (router of layer l+d on the router input of layer l) aligned per "
        f"(l, d): {m['method']}; the grid includes no alignment. Trained on {m['train_tokens']} tokens of the "
        f"local corpus "
        f"({m['train_s']} s); evaluated on {m['eval_tokens']} held-out tokens of {m['eval_prompts']} "
        f"Spec-Bench prompts ({m['eval_generated_tokens']} of them generated).",
        "",
        f"Top-{m['top_k']} recall per token (predicted set = top-{m['top_k']}, so precision = recall):",
        "",
        format_table(result),
        "",
        "Generated (decode) rows only, top-k recall:",
        "",
        "| d | aligned gate | speculative gating (unaligned) | previous token | frequency prior |",
        "|---|---|---|---|---|",
    ]
    for d, r in generated.items():
        lines.append(f"| {d} | " + " | ".join(f"{r[f'{x}_recall']:.3f}" for x in METHODS) + " |")
    lines += [
        "",
        f"Runtime callback (Python, entered for every graph node): {m['decode_ms_plain']} ms per decoded "
        f"token without it, {m['decode_ms_with_gate_callback']} ms with it.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
