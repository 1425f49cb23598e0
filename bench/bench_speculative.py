"""Speculative decoding on the demo pair (issue 4): no draft vs dense draft vs truncated draft.

Greedy chat completions of Spec-Bench prompts (spread over all 13 categories),
the three contenders run back to back on the same prompt so machine load hits
them alike (ratios are side by side in one run). Every drafted output must be
token-identical to the target's own greedy output; the script exits 1 if not.
Prints a markdown table and writes bench/results/speculative.{json,md}.

    .venv/bin/python bench/bench_speculative.py                  # 20 prompts x 64 tokens, K = 4 fixed
    .venv/bin/python bench/bench_speculative.py --adaptive --draft-max 8 --out bench/results/speculative_adaptive.json
    .venv/bin/python bench/bench_speculative.py --prompts 4 -n 16
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
from pathlib import Path

from tqdm import tqdm

from moespac_gguf import MoeSpac
from moespac_gguf.core.paths import SHARED_DIR
from moespac_gguf.core.prompts import load_prompts
from moespac_gguf.decode.stats import DecodeStats
from moespac_gguf.demo.catalog import model_path

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"
CONTENDERS = [
    ("no draft", None),
    ("dense draft (smollm2)", "smollm2"),
    ("truncated draft (smollm2-trunc)", "smollm2-trunc"),
]


def markdown(rows: list[dict], args) -> str:
    base = rows[0]["tokens_per_s"]
    out = [
        f"Demo pair `{args.target}`, {args.prompts} Spec-Bench prompts x {args.tokens} tokens, greedy, "
        f"draft-max {args.draft_max} ({'adaptive' if args.adaptive else 'fixed'}), {args.threads or 'default'} threads, {datetime.date.today()}.",
        "",
        "| contender | tokens | tokens/s | speed-up | acceptance | tokens / verification | draft s | verify s | identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        acc = "—" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.3f}"
        out.append(
            f"| {r['name']} | {r['n_tokens']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | {acc} "
            f"| {r['mean_accepted_len']:.2f} | {r['t_draft_s']:.1f} | {r['t_verify_s']:.1f} | "
            f"{'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--target", default="smolmoe", help="target model (name or path; default smolmoe)")
    p.add_argument("--prompts", type=int, default=20, help="Spec-Bench prompts, spread over categories (default 20)")
    p.add_argument("-n", "--tokens", type=int, default=64, help="tokens per prompt (default 64)")
    p.add_argument("--draft-max", type=int, default=4)
    p.add_argument(
        "--adaptive",
        action="store_true",
        help="let K adapt to the measured costs (it falls to 0 where drafting does not pay)",
    )
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "speculative.json")
    args = p.parse_args(argv)

    prompts = load_prompts(PROMPTS, args.prompts, select="spread")
    target = model_path(args.target)
    models = [
        (
            name,
            MoeSpac(
                target,
                model_path(d) if d else None,
                n_ctx=2048,
                n_threads=args.threads,
                draft_max=args.draft_max,
                adaptive_draft=args.adaptive,
                flash_attn="off",  # the drafted contenders' kernels for every contender: outputs compare
            ),
        )
        for name, d in CONTENDERS
    ]
    per = {name: [] for name, _ in CONTENDERS}
    stats = {name: [] for name, _ in CONTENDERS}
    identical = {name: True for name, _ in CONTENDERS}
    try:
        for row in tqdm(prompts, desc="prompts", file=sys.stderr):
            messages = [{"role": "user", "content": row["text"]}]
            reference = None
            for name, m in models:
                m.create_chat_completion(messages, max_tokens=args.tokens)
                tokens = list(m.completion_tokens)
                reference = tokens if reference is None else reference
                identical[name] &= tokens == reference
                stats[name].append(dataclasses.replace(m.stats))
                per[name].append(
                    {
                        **m.stats.as_dict(),
                        "question_id": row["question_id"],
                        "category": row["category"],
                        "identical": tokens == reference,
                    }
                )
    finally:
        for _, m in models:
            m.close()

    rows = [
        {"name": name, **DecodeStats.pooled(stats[name]).as_dict(), "identical": identical[name]}
        for name, _ in CONTENDERS
    ]
    table = markdown(rows, args)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "target": str(target),
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg(),
                },
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": rows,
                "per_prompt": per,
            },
            indent=1,
        )
        + "\n"
    )
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0 if all(identical.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
