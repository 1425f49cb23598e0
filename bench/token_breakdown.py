"""Where a decoded token's time goes, uncapped and without a draft (issue 21).

One model, the same prompt and the same greedy continuation for every layer of the stack, in
interleaved rounds (machine load hits every layer alike), each timed per token:

  graph          llama_decode of one token on a context without our eval callback: llama.cpp's
                 graph compute, OpenMP's thread wake-ups included (llama-cpp-python's floor)
  + tap          the same on a context whose cb_eval is the C routing tap
  + Session      Session.decode: batch filling, the full-vocabulary logits copy, the tap's read
                 (MoeSpac skips the read when nothing observes the routing)
  + MoeSpac      create_completion: sampling, the speculative loop's bookkeeping, events, stats,
                 detokenizing and stop strings; its `llama_decode` calls are timed, and what is
                 left per token is the Python controller's own cost

and two micro-measurements: the logits copy and the greedy argmax. Then what a speculative
verification of n tokens costs against a one-token one (flash attention off, as with a draft):
the adaptive draft length's reason to draft or not. The wake-up cost is the
graph row measured again in child processes under each OMP_WAIT_POLICY (passive, libgomp's
default, active). Writes bench/results/token_breakdown.{json,md}.

    .venv/bin/python bench/token_breakdown.py             # smolmoe, 2 threads, 5 rounds x 64 tokens
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "A mixture-of-experts model needs less compute per token because"
POLICIES = ("passive", "default", "active")


def measure(model: str, n_threads: int, rounds: int, n_tokens: int, only_graph: bool) -> dict[str, float]:
    """Median seconds per token of each layer (see the module docstring)."""
    from moespac_gguf import MoeSpac
    from moespac_gguf.llama.abi import llama_cpp as L
    from moespac_gguf.llama.session import Session

    m = MoeSpac(model, n_threads=n_threads, n_gpu_layers=0, mem_budget="off")
    prompt = m.tokenize(PROMPT)
    m.create_completion(prompt, max_tokens=n_tokens)
    tokens = list(m.completion_tokens)
    # the attention kernels MoeSpac uses without a draft (api.moespac.flash_attention)
    plain = Session(model, n_threads=n_threads, tap=False, flash_attn=True)
    tapped = Session(model, n_threads=n_threads, tap=True, flash_attn=True)

    def raw(s: Session) -> float:
        s.reset()
        s.decode(prompt)
        b = s.batch
        b.n_tokens, b.n_seq_id[0], b.seq_id[0][0], b.logits[0] = 1, 1, 0, 1
        t0 = time.perf_counter()
        for i, tok in enumerate(tokens):
            b.token[0], b.pos[0] = tok, len(prompt) + i
            if s.tap is not None:
                s.tap.reset()
            L.llama_decode(s.ctx, b)
        return (time.perf_counter() - t0) / len(tokens)

    def session(s: Session) -> float:
        s.reset()
        s.decode(prompt)
        t0 = time.perf_counter()
        for tok in tokens:
            s.decode([tok], all_logits=True)
        return (time.perf_counter() - t0) / len(tokens)

    decode_time = [0.0]
    real_decode = L.llama_decode

    def timed_decode(ctx, batch):
        t = time.perf_counter()
        rc = real_decode(ctx, batch)
        decode_time[0] += time.perf_counter() - t
        return rc

    def moespac() -> tuple[float, float]:
        m.create_completion(prompt, max_tokens=1)  # not timed: resets the KV like the others
        decode_time[0] = 0.0
        L.llama_decode = timed_decode
        try:
            m.create_completion(prompt, max_tokens=n_tokens)
        finally:
            L.llama_decode = real_decode
        st = m.stats
        n = st.n_generated
        t_loop = st.t_total - st.t_prompt  # the prompt's prefill is its own phase
        prefill_decode = st.t_prompt  # prefill is one llama_decode call and nothing else
        return t_loop / n, (t_loop - (decode_time[0] - prefill_decode)) / n

    rows: dict[str, list[float]] = {k: [] for k in ("graph", "tap", "session", "moespac", "controller")}
    for _ in range(rounds):
        rows["graph"].append(raw(plain))
        if only_graph:
            continue
        rows["tap"].append(raw(tapped))
        rows["session"].append(session(tapped))
        total, controller = moespac()
        rows["moespac"].append(total)
        rows["controller"].append(controller)
    out = {k: statistics.median(v) for k, v in rows.items() if v}
    if not only_graph:
        out["verify"] = verification_costs(model, n_threads, prompt, rounds)
        logits = np.ctypeslib.as_array(L.llama_get_logits(tapped.ctx), shape=(1, tapped.n_vocab))
        out["logits_copy"] = _micro(lambda: logits.copy())
        out["argmax"] = _micro(lambda: int(np.argmax(logits, axis=1)[0]))
    for s in (plain, tapped):
        s.close()
    m.close()
    return out


VERIFY_SIZES = (1, 2, 3, 5, 9)


def verification_costs(model: str, n_threads: int, prompt: list[int], rounds: int, n: int = 16) -> dict[str, float]:
    """Median seconds of a verification batch of each VERIFY_SIZES size after `prompt`, divided by
    a one-token one's (the same context, flash attention off as with a draft; rolled back each time)."""
    from moespac_gguf.llama.session import Session

    with Session(model, n_threads=n_threads, tap=False) as s:
        s.decode(prompt)
        times = {k: [] for k in VERIFY_SIZES}
        for _ in range(rounds):
            for k in VERIFY_SIZES:
                t0 = time.perf_counter()
                for _ in range(n):
                    s.decode(list(range(200, 200 + k)), all_logits=True)
                    s.rollback(len(prompt))
                times[k].append((time.perf_counter() - t0) / n)
    one = statistics.median(times[1])
    return {str(k): statistics.median(v) / one for k, v in times.items()}


def _micro(fn, n: int = 2000) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def child(policy: str, args) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", "-m", args.model, "-t", str(args.threads)]
    cmd += ["--rounds", str(args.rounds), "-n", str(args.n_tokens)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(report: dict) -> str:
    main, ms = report["layers"], lambda s: f"{s * 1e3:.3f}"
    lines = [
        f"`{Path(report['model']).name}`, {report['threads']} threads, {report['n_tokens']} tokens x "
        f"{report['rounds']} rounds (medians), OMP_WAIT_POLICY {report['policy']}; {report['machine']}",
        "",
        "| layer | ms/token | adds | tok/s |",
        "|---|---:|---:|---:|",
    ]
    prev = None
    for key, label in (
        ("graph", "llama_decode, no eval callback (graph + thread wake-ups)"),
        ("tap", "+ the C routing tap as cb_eval"),
        ("session", "+ Session.decode (batch, logits copy, tap read)"),
        ("moespac", "+ MoeSpac (sampling, loop, events, stats, text)"),
    ):
        adds = "" if prev is None else ms(main[key] - main[prev])
        lines.append(f"| {label} | {ms(main[key])} | {adds} | {1 / main[key]:.1f} |")
        prev = key
    lines += [
        "",
        f"Python controller per token (MoeSpac's wall time less its llama_decode calls): "
        f"**{ms(main['controller'])} ms**; of it the logits copy {ms(main['logits_copy'])} ms and the argmax "
        f"{ms(main['argmax'])} ms.",
        "",
        "| verification batch, tokens | " + " | ".join(main["verify"]) + " |",
        "|---|" + "---:|" * len(main["verify"]),
        "| cost / one-token verification | " + " | ".join(f"{v:.2f}" for v in main["verify"].values()) + " |",
        "",
        "| OMP_WAIT_POLICY | graph ms/token | tok/s |",
        "|---|---:|---:|",
    ]
    lines += [f"| {p} | {ms(v['graph'])} | {1 / v['graph']:.1f} |" for p, v in report["policies"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="smolmoe", help="MoE model (name or path; default smolmoe)")
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("-n", "--n-tokens", type=int, default=64)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from moespac_gguf.demo.catalog import resolve_model

    model = str(resolve_model(args.model))
    if args.child:
        print(json.dumps(measure(model, args.threads, args.rounds, args.n_tokens, only_graph=True)))
        return 0
    layers = measure(model, args.threads, args.rounds, args.n_tokens, only_graph=False)
    report = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": model,
        "threads": args.threads,
        "rounds": args.rounds,
        "n_tokens": args.n_tokens,
        "policy": os.environ.get("OMP_WAIT_POLICY", "as moespac_gguf chose"),
        "layers": layers,
        "policies": {pol: child(pol, args) for pol in POLICIES},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "token_breakdown.json").write_text(json.dumps(report, indent=1))
    md = table(report)
    (RESULTS / "token_breakdown.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
