"""`moespac bench`: tokens/s and bytes read under a real memory cap, every contender side by side
(tools.bench), each in its own child process and memory cgroup."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

from ..api.options import ModelOptions
from ..core.units import parse_size
from ..decode.draft import SELF_DRAFT
from ..tools.bench import CONTENDERS, DEFAULT_CONTENDERS, SLOT_FRACTION, BenchConfig, markdown, run, run_contender
from .options import MODEL_HELP, add_options

BENCH_OPTIONS = ("n_ctx", "n_threads", "draft_max", "draft_ahead", "gate")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:  # one contender inside its cgroup: `--child NAME CONFIG_JSON` (tools.bench)
        name, config = argv[1:3]
        print(json.dumps(run_contender(name, BenchConfig(**json.loads(config)))))
        return 0
    p = argparse.ArgumentParser(
        prog="moespac bench",
        description="Tokens/s and bytes read under a real memory "
        "cap, every contender side by side (llama.cpp, +MADV_RANDOM, +speculative "
        "decoding, moespac).",
    )
    p.add_argument("-m", "--model", required=True, help=MODEL_HELP)
    p.add_argument("-md", "--model-draft", help=f"draft GGUF, or '{SELF_DRAFT}' (the target routing fewer experts)")
    p.add_argument(
        "--mem-cap",
        required=True,
        type=parse_size,
        help="memory cap for each contender, e.g. 1.5G (0: no cap, the model fits)",
    )
    p.add_argument("--prompts", default=BenchConfig.prompts)
    p.add_argument("--limit", type=int, default=BenchConfig.limit)
    p.add_argument("-n", "--n-predict", type=int, default=BenchConfig.n_predict)
    add_options(p, ModelOptions, only=BENCH_OPTIONS, n_ctx=BenchConfig.n_ctx)
    p.add_argument(
        "--sd-draft",
        metavar="FILE",
        help="llama.cpp+sd's draft GGUF instead of -md (e.g. a dense draft beside -md self, whose "
        "unrestricted self-draft thrashes under a cap without expert management)",
    )
    p.add_argument(
        "--contenders",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated, from {', '.join(CONTENDERS)} (default: all but moespac+gate and moespac+slots)",
    )
    p.add_argument(
        "--slot-fraction",
        type=float,
        default=SLOT_FRACTION,
        help="moespac+slots: share of the expert budget held in host-RAM expert slots",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON here, and the table beside it (.md)")
    args = p.parse_args(argv)
    # every BenchConfig field is a flag of the same name, contenders as one comma-separated string
    values = {f.name: getattr(args, f.name) for f in fields(BenchConfig)}
    cfg = BenchConfig(**{**values, "contenders": tuple(args.contenders.split(","))})
    report = run(cfg, progress=not args.json)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(report["results"], cfg) + "\n")
    print(json.dumps(report) if args.json else markdown(report["results"], cfg))
    return 0
