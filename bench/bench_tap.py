"""Cost of the routing tap (issue 3): decode time with the C tap on vs off.

Two contexts of the same model, one with the tap installed as cb_eval and one
without, decode the same tokens in alternating rounds (so machine load hits
both alike): a prompt batch and single-token decode. Reports the median wall
time and the median process CPU time per token of each (CPU time is what the
tap adds in work; on a shared machine wall time also carries the neighbours'
load) and the overheads; writes bench/results/tap_overhead.{json,md}.

    .venv/bin/python bench/bench_tap.py                # demo model, 7 rounds
    .venv/bin/python bench/bench_tap.py -m PATH --rounds 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from moespac_gguf.core.paths import SHARED_DIR
from moespac_gguf.core.prompts import load_prompts
from moespac_gguf.demo.catalog import model_path
from moespac_gguf.llama.session import Session

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"


def one_round(s: Session, prompt: list[int], n_decode: int) -> dict[str, float]:
    """Wall and CPU seconds per prompt token and per decoded token for one pass."""
    s.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    logits = s.decode(prompt)
    t1, c1 = time.perf_counter(), time.process_time()
    tok = int(logits[-1].argmax())
    for _ in range(n_decode):
        tok = int(s.decode([tok])[-1].argmax())
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "prompt": (t1 - t0) / len(prompt),
        "decode": (t2 - t1) / n_decode,
        "prompt_cpu": (c1 - c0) / len(prompt),
        "decode_cpu": (c2 - c1) / n_decode,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="smolmoe", help="MoE model (name or path; default smolmoe)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("-n", "--decode-tokens", type=int, default=64)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "tap_overhead.json")
    args = p.parse_args(argv)

    path = model_path(args.model)
    kw = dict(n_ctx=args.prompt_tokens + args.decode_tokens + 8, n_threads=args.threads)
    sessions = {"tap off": Session(path, tap=False, **kw), "tap on": Session(path, tap=True, **kw)}
    text = " ".join(r["text"] for r in load_prompts(PROMPTS, 40, select="spread"))
    prompt = sessions["tap on"].tokenize(text)[: args.prompt_tokens]
    times = {k: {} for k in sessions}
    for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
        for name, s in sessions.items():
            for key, v in one_round(s, prompt, args.decode_tokens).items():
                times[name].setdefault(key, []).append(v)
    for s in sessions.values():
        s.close()

    med = {k: {phase: statistics.median(v) for phase, v in t.items()} for k, t in times.items()}
    overhead = {key: med["tap on"][key] / med["tap off"][key] - 1 for key in med["tap off"]}
    lines = [
        f"Routing tap cost on `{path.name}`, median of {args.rounds} alternating rounds, "
        f"{args.threads or 'all'} threads, {datetime.date.today()}.",
        "",
        "| phase | CPU ms/token, tap off | tap on | CPU overhead | wall ms/token, tap off | tap on | wall overhead |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for phase, label in (
        ("prompt", f"prompt batch ({len(prompt)} tokens)"),
        ("decode", f"single-token decode ({args.decode_tokens} tokens)"),
    ):
        cpu = phase + "_cpu"
        lines.append(
            f"| {label} | {med['tap off'][cpu] * 1e3:.2f} | {med['tap on'][cpu] * 1e3:.2f} "
            f"| {overhead[cpu] * 100:+.1f}% | {med['tap off'][phase] * 1e3:.2f} "
            f"| {med['tap on'][phase] * 1e3:.2f} | {overhead[phase] * 100:+.1f}% |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "model": str(path),
                "machine": {
                    "platform": platform.platform(),
                    "cpu_count": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg(),
                },
                "args": {k: str(v) for k, v in vars(args).items()},
                "median_s_per_token": med,
                "overhead": overhead,
                "rounds": times,
            },
            indent=1,
        )
        + "\n"
    )
    args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
