"""Quality of the SmolMoE demo models (issue 3), measured by llama.cpp itself.

For every demo variant: held-out perplexity (dense vs MoE, same windows),
routing load entropy per layer over Spec-Bench prompts (from a trace recorded
with the routing tap), and for the drafts their greedy acceptance against the
default target. Optionally scans the truncated draft's depth. Prints a
markdown table and writes bench/results/demo_quality.json (date + machine).

    .venv/bin/python bench/demo_quality.py                      # default set (builds what is missing)
    .venv/bin/python bench/demo_quality.py --variants smolmoe smolmoe-16x --scan-depth 16 20 24
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

import numpy as np

from moespac_gguf.core.paths import CACHE_DIR, SHARED_DIR
from moespac_gguf.core.prompts import load_prompts
from moespac_gguf.demo.catalog import build, load_models
from moespac_gguf.demo.corpus import HELDOUT_NAMES, heldout_text
from moespac_gguf.demo.perplexity import perplexity
from moespac_gguf.demo.smolmoe.acceptance import draft_acceptance, greedy_acceptance_from_trace
from moespac_gguf.demo.smolmoe.config import smollm2_path
from moespac_gguf.demo.smolmoe.router import load_entropy
from moespac_gguf.demo.smolmoe.upcycle import write_truncated
from moespac_gguf.sim.record import record
from moespac_gguf.sim.trace import RoutingTrace

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"


def entropy_stats(trace: RoutingTrace) -> dict:
    counts = trace.usage_counts()
    ent = np.array([load_entropy(c) for c in counts])
    return {
        "entropy_mean": float(ent.mean()),
        "entropy_min": float(ent.min()),
        "entropy_min_layer": int(ent.argmin()),
        "entropy_per_layer": [round(float(x), 4) for x in ent],
        "all_experts_used": bool((counts > 0).all()),
        "min_expert_share": float((counts / counts.sum(1, keepdims=True)).min()),
        "n_tokens": trace.n_tokens,
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=None, help="upcycled demo models (default: all in models.toml)")
    p.add_argument("--ppl-chunks", type=int, default=16, help="held-out windows of 512 tokens (default 16)")
    p.add_argument("--prompts", type=int, default=40, help="Spec-Bench prompts per entropy trace (spread)")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per entropy prompt")
    p.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="use this recorded trace for the default model's entropy instead of recording one",
    )
    p.add_argument(
        "--acc-trace",
        type=Path,
        default=None,
        help="replay draft acceptance on this trace of the default target (default: --trace)",
    )
    p.add_argument("--acc-prompts", type=int, default=16)
    p.add_argument("--acc-tokens", type=int, default=64)
    p.add_argument("--draft-max", type=int, default=4)
    p.add_argument("--loop", action="store_true", help="measure acceptance with the real speculative loop")
    p.add_argument("--no-drafts", action="store_true", help="skip the draft acceptance part")
    p.add_argument("--drafts-only", action="store_true", help="only the draft acceptance part (merged into --out)")
    p.add_argument("--scan-depth", type=int, nargs="*", default=[], help="truncated-draft depths to measure")
    p.add_argument("--out", type=Path, default=RESULTS / "demo_quality.json")
    a = p.parse_args(argv)

    models = load_models()
    variants = [] if a.drafts_only else a.variants or [n for n, e in models.items() if e.kind == "upcycled"]
    drafts = [] if a.no_drafts else [n for n, e in models.items() if e.kind in ("dense", "truncated")]
    target_name = next(n for n, e in models.items() if e.kind == "upcycled" and e.default)
    t_build = {}
    for e, status, secs in build(sorted(set(drafts + [target_name, "smollm2"]), key=list(models).index)):
        t_build[e.name] = round(secs, 1) if status == "built" else None
    text = heldout_text()
    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "heldout": {"documents": list(HELDOUT_NAMES), "chunks": a.ppl_chunks, "ctx": 512},
        "entropy_prompts": {"file": str(PROMPTS), "n": a.prompts, "select": "spread", "tokens": a.tokens},
        "models": {},
        "drafts": {},
    }
    # a partial run (--drafts-only, named --variants, --no-drafts) merges into the earlier results
    old = json.load(open(a.out)) if a.out.is_file() and (a.drafts_only or a.variants or a.no_drafts) else {}
    out.update(
        {
            k: old[k]
            for k in ("models", "dense", "heldout", "entropy_prompts", "drafts", "acceptance_method", "traces")
            if k in old
        }
    )
    out["models"], out["drafts"] = dict(out["models"]), dict(out["drafts"] if not drafts else {})

    def ppl(path):
        r = perplexity(path, text, n_ctx=512, max_chunks=a.ppl_chunks)
        print(f"  perplexity {path.name}: {r['perplexity']:.3f} ({r['seconds']} s)", flush=True)
        return r

    dense = models["smollm2"].path
    if variants:
        out["dense"] = {"name": "smollm2", "size_bytes": dense.stat().st_size, "perplexity": ppl(dense)}
    prompts = load_prompts(PROMPTS, a.prompts, "spread")
    for name in variants:
        e = models[name]
        for _, status, secs in build([name]):  # one variant at a time: partial results are saved
            if status == "built":
                t_build[name] = round(secs, 1)
        cfg = e.config()
        row = {
            "experts": cfg.n_expert,
            "top_k": cfg.top_k,
            "dtype": cfg.dtype,
            "noise": cfg.noise,
            "size_bytes": e.path.stat().st_size,
            "build_s": t_build.get(name),
            "default": e.default,
        }
        row["perplexity"] = ppl(e.path)
        row["ppl_ratio"] = row["perplexity"]["perplexity"] / out["dense"]["perplexity"]["perplexity"]
        if e.default and a.trace:
            trace = RoutingTrace.load(a.trace)
            row["entropy_source"] = str(a.trace)
        else:
            trace = record(e.path, prompts, a.tokens, prompt_file=str(PROMPTS))
            row["entropy_source"] = f"{len(prompts)} Spec-Bench prompts (spread), {a.tokens} tokens each"
        row.update(entropy_stats(trace))
        print(f"  entropy {name}: mean {row['entropy_mean']:.3f} min {row['entropy_min']:.3f}", flush=True)
        out["models"][name] = row
        json.dump(out, open(a.out, "w"), indent=1)

    # acceptance: replayed on the default target's recorded greedy generations (exact for greedy; see
    # smolmoe.greedy_acceptance_from_trace), or the real speculative loop with --loop
    target = models[target_name].path
    acc_path = a.acc_trace or a.trace
    if acc_path and not a.loop:
        acc_trace = RoutingTrace.load(acc_path)
        out["acceptance_method"] = f"greedy replay on {acc_path.name} ({acc_trace.n_tokens} tokens), K={a.draft_max}"

        def acceptance(path):
            return greedy_acceptance_from_trace(path, acc_trace, a.draft_max)
    else:
        acc_prompts = [r["text"] for r in load_prompts(PROMPTS, a.acc_prompts, "spread")]
        out["acceptance_method"] = (
            f"speculative loop, {len(acc_prompts)} Spec-Bench prompts (spread), {a.acc_tokens} tokens, K={a.draft_max}"
        )

        def acceptance(path):
            return draft_acceptance(target, path, acc_prompts, a.acc_tokens, a.draft_max)

    for name in drafts:
        e = models[name]
        r = acceptance(e.path)
        r.update(
            {
                "size_bytes": e.path.stat().st_size,
                "layers": e.params.get("layers"),
                "keep_last": e.params.get("keep_last", 0),
                "target": target_name,
            }
        )
        out["drafts"][name] = r
        print(f"  acceptance {name}: {r['acceptance_rate']:.3f}", flush=True)
    scan = {}
    for depth in a.scan_depth:
        path = CACHE_DIR / "tmp" / f"smollm2-first{depth}.gguf"
        write_truncated(smollm2_path(), path, depth)
        scan[depth] = acceptance(path)["acceptance_rate"]
        print(f"  acceptance first {depth} layers: {scan[depth]:.3f}", flush=True)
        path.unlink()
    if scan:
        out["depth_scan"] = scan
    out["seconds"] = round(time.perf_counter() - T0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    json.dump(out, open(a.out, "w"), indent=1)
    print(markdown(out))
    return 0


def _mb(n):
    return f"{n / 1e6:.0f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def markdown(out: dict) -> str:
    # rows merged from several runs: each compares with the dense model on its own windows
    lines = [
        "| model | experts | top-k | expert dtype | file | held-out ppl | dense ppl, same windows | × dense "
        "| entropy mean | entropy min | all experts used |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in out["models"].items():
        ppl = r["perplexity"]
        lines.append(
            f"| {name}{' (default)' if r['default'] else ''} | {r['experts']} | {r['top_k']} | {r['dtype']} "
            f"| {_mb(r['size_bytes'])} | {ppl['perplexity']:.2f} "
            f"| {ppl['perplexity'] / r['ppl_ratio']:.2f} ({ppl['n_chunks']} × 512) | {r['ppl_ratio']:.2f} "
            f"| {r['entropy_mean']:.3f} | {r['entropy_min']:.3f} (layer {r['entropy_min_layer']}) "
            f"| {'yes' if r['all_experts_used'] else 'NO'} |"
        )
    k = next(iter(out["drafts"].values()))["draft_max"] if out["drafts"] else None
    lines += [
        "",
        f"| draft | layers | file | greedy acceptance vs smolmoe (K={k}) | tokens per verification |"
        if out["drafts"]
        else "",
        "|---|---|---|---|---|",
    ]
    for name, r in out["drafts"].items():
        layers = (
            f"first {r['layers']}" + (f" + last {r['keep_last']}" if r.get("keep_last") else "")
            if r["layers"]
            else "all 30"
        )
        lines.append(
            f"| {name} | {layers} | {_mb(r['size_bytes'])} | {r['acceptance_rate']:.3f} | {r['tokens_per_step']:.2f} |"
        )
    if out.get("depth_scan"):
        lines += [
            "",
            "truncated-draft depth scan (acceptance): "
            + ", ".join(f"{k} layers {v:.3f}" for k, v in out["depth_scan"].items()),
        ]
    return "\n".join(lines)


T0 = time.perf_counter()
if __name__ == "__main__":
    sys.exit(main())
