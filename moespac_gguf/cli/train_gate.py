"""`moespac train-gate`: fit the lookahead gate to a model and write its sidecar file."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..demo.corpus import training_files
from ..gate.capture import capture, text_windows
from ..gate.fit import fit_gate
from ..gate.model import MAX_GATE_SHARE


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac train-gate",
        description="Fit the lookahead gate (experts of layers l+1..l+D from layer l) and write its sidecar file.",
    )
    p.add_argument("-m", "--model", required=True, help="GGUF MoE model")
    p.add_argument("--text", nargs="+", metavar="FILE", help="training text files")
    p.add_argument(
        "--corpus",
        action="store_true",
        help="train on the local English corpus (moespac_gguf.demo.corpus, held-out split excluded)",
    )
    p.add_argument("--distance", "-d", type=int, default=3, help="lookahead distance D (default 3)")
    p.add_argument("--out", "-o", required=True, help="gate file to write (.npz)")
    p.add_argument("--tokens", type=int, default=6000, help="training tokens to capture (default 6000)")
    p.add_argument("--window", type=int, default=256, help="tokens per training sequence (default 256)")
    p.add_argument("--rank", type=int, default=0, help="rank of each correction (0 = full, default)")
    p.add_argument(
        "--alpha-scope",
        choices=("pair", "distance"),
        default="pair",
        help="choose the shrinkage per (l, d) (default) or per distance, pooled over layers",
    )
    p.add_argument(
        "--gen",
        type=int,
        default=0,
        help="also train on this many greedy tokens the model writes after each window (default 0)",
    )
    p.add_argument("-t", "--threads", type=int, default=None)
    a = p.parse_args(argv)
    if not a.text and not a.corpus:
        p.error("give --text FILE... or --corpus")
    files = list(a.text or [])
    if a.corpus:
        files += training_files()
    t0 = time.perf_counter()
    seqs, groups = text_windows(a.model, files, a.tokens, a.window)
    cap = capture(
        a.model, seqs, max_new=a.gen, n_ctx=a.window + a.gen + 8, n_threads=a.threads, desc="capture", groups=groups
    )
    gate = fit_gate(a.model, cap, a.distance, rank=a.rank, alpha_scope=a.alpha_scope)
    gate.info["text"] = [str(f) for f in files]
    gate.info["train_s"] = round(time.perf_counter() - t0, 1)
    gate.save(a.out)
    size = Path(a.out).stat().st_size
    share = size / Path(a.model).stat().st_size
    print(
        f"{a.out}: gate for {Path(a.model).name}, D={a.distance}, {len(gate.deltas)} aligned (l, d) pairs, "
        f"{size / 1024:.1f} KiB on disk = {100 * share:.3f}% of the model, {cap.n_rows} tokens, "
        f"{gate.info['train_s']} s"
    )
    for d, v in gate.info["val_recall"].items():
        print(
            f"  d={d}: validation top-{gate.n_expert_used} recall {v['aligned']:.3f} aligned "
            f"vs {v['unaligned']:.3f} speculative gating"
        )
    if share > MAX_GATE_SHARE:
        print(
            f"warning: the gate is {100 * share:.2f}% of the model (> {100 * MAX_GATE_SHARE:.0f}%): use --rank",
            file=sys.stderr,
        )
    return 0
