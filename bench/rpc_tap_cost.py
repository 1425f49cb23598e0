"""Cost of the routing tap and of the experts' placement over an RPC link (issue 25): decode with
every layer on an emulated remote (tools.netem), the tap on (as every MoeSpac runs) and off
(llama.cpp's own --rpc), the expert tensors there too (llama.cpp's --rpc) or here (--cpu-moe: the
RPC tier's placement, the experts under the residency engine and slots on the server).

The tap is an eval callback that reads each MoE layer's chosen experts after that layer: with the
layers on an RPC device, llama.cpp's scheduler then computes the graph layer by layer, reading
each layer's ids back over the link, and cannot reuse the graph it sent for the previous token
(ggml-rpc's GRAPH_RECOMPUTE), so every token pays a round trip per layer and sends its graph
again; with the experts here the graph alternates between the two machines at every layer anyway.
Per link: one server, four sessions of the same model on it, the same greedy tokens decoded in
alternating rounds; reported: milliseconds and bytes over the link
(sent / received) per decoded token, and the round trips the delay adds per token (the
difference to a link without delay, over one round trip). Each link runs in its own process (a
process keeps every RPC server it added, and ggml-rpc aborts it once one has gone). Writes
bench/results/rpc_tap_cost.{json,md}.

    .venv/bin/python bench/rpc_tap_cost.py                            # smolmoe, 1gbit,0ms and 1gbit,1ms
    .venv/bin/python bench/rpc_tap_cost.py -m PATH --link 1gbit,0ms --link 100mbit,5ms
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moespac_gguf.core.atomic import atomic_write_text
from moespac_gguf.demo.catalog import resolve_model
from moespac_gguf.llama.session import Session
from moespac_gguf.tools.netem import LinkShape, emulated_host

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "Explain how a mixture of experts model routes tokens"


def one_round(s: Session, prompt: list[int], n: int, host) -> tuple[float, list[int], list[int]]:
    """(seconds per decoded token, [sent, received] bytes per decoded token, the tokens)."""
    s.reset()
    tok = int(s.decode(prompt)[-1].argmax())
    b0, t0, out = host.link_bytes(), time.perf_counter(), []
    for _ in range(n):
        out.append(tok)
        tok = int(s.decode([tok])[-1].argmax())
    seconds, b1 = time.perf_counter() - t0, host.link_bytes()
    return seconds / n, [(b1[i] - b0[i]) / n for i in (0, 1)], out


def measure(model: str, link: str, n: int, rounds: int, threads: int) -> list[dict]:
    """Both sessions over one emulated link, alternating rounds; one row each (medians)."""
    with emulated_host(LinkShape.parse(link), threads=threads) as host:
        sessions = {
            (tap, here): Session(
                model,
                n_ctx=512,
                n_gpu_layers=-1,
                tap=tap,
                op_offload=False,
                rpc_servers=[host.endpoint],
                n_cpu_moe=None if here else 0,
            )
            for tap in (True, False)
            for here in (False, True)
        }
        prompt = sessions[True, False].tokenize(PROMPT)
        for s in sessions.values():
            one_round(s, prompt, 2, host)  # warm-up: the first graphs, the server's buffers
        runs = {tap: [] for tap in sessions}
        for _ in range(rounds):
            for tap, s in sessions.items():
                runs[tap].append(one_round(s, prompt, n, host))
        rows = [
            {
                "link": link,
                "shaping": host.shaping,
                "tap": tap,
                "experts_here": here,
                "ms_per_token": 1e3 * statistics.median(r[0] for r in rs),
                "bytes_per_token": [statistics.median(r[1][i] for r in rs) for i in (0, 1)],
                "same_tokens": len({tuple(r[2]) for rr in runs.values() for r in rr}) == 1,  # both taps, all rounds
            }
            for (tap, here), rs in runs.items()
        ]
        for s in sessions.values():
            s.close()
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", default="smolmoe", help="MoE model (name or path; default smolmoe)")
    p.add_argument("--link", action="append", help="RATE,DELAY (repeatable; default 1gbit,0ms and 1gbit,1ms)")
    p.add_argument("-n", "--decode-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2, help="the server's threads")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one link, rows as JSON
    p.add_argument("--out", default=str(RESULTS / "rpc_tap_cost.json"))
    args = p.parse_args(argv)
    links = args.link or ["1gbit,0ms", "1gbit,1ms"]
    model = str(resolve_model(args.model))
    if args.child:
        print(json.dumps(measure(model, links[0], args.decode_tokens, args.rounds, args.threads)))
        return 0
    rows = []
    for link in links:
        print(f"[rpc_tap_cost] {link} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--child", "-m", model, "--link", link, "-n", str(args.decode_tokens)]
        cmd += ["--rounds", str(args.rounds), "-t", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{link}: exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        rows += json.loads(proc.stdout.strip().splitlines()[-1])
    base = {(r["tap"], r["experts_here"]): r for r in rows if LinkShape.parse(r["link"]).delay_s == 0}
    for r in rows:
        rtt = 2 * LinkShape.parse(r["link"]).delay_s
        b = base.get((r["tap"], r["experts_here"]))
        r["round_trips_per_token"] = (r["ms_per_token"] - b["ms_per_token"]) / 1e3 / rtt if rtt and b else None
    lines = [
        f"Routing tap and expert placement over an emulated RPC link: `{Path(model).name}`, every layer on an "
        f"rpc-server in a network namespace on this machine ({args.threads} threads), its expert tensors there too "
        f"or here (--cpu-moe), greedy, {args.decode_tokens} decoded tokens, median of {args.rounds} alternating "
        "rounds. Round trips: the time the delay adds per token over one round trip.",
        "",
        "| link | routing tap | experts | ms / token | sent / token | received / token | round trips / token "
        "| same tokens |",
        "|---|---|---|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        k = "-" if r["round_trips_per_token"] is None else f"{r['round_trips_per_token']:.1f}"
        lines.append(
            f"| {r['link']} ({r['shaping']}) | {'on' if r['tap'] else 'off'} | "
            f"{'here (--cpu-moe)' if r['experts_here'] else 'remote'} | {r['ms_per_token']:.1f} | "
            f"{r['bytes_per_token'][0] / 1024:.1f} KiB | {r['bytes_per_token'][1] / 1024:.1f} KiB | {k} | "
            f"{'yes' if r['same_tokens'] else 'NO'} |"
        )
    atomic_write_text(args.out, json.dumps({"model": model, "rows": rows}, indent=1))
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
