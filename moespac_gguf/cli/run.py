"""`moespac run`: generate text from a prompt, speculatively when a draft is given."""

from __future__ import annotations

import argparse
import json
import sys

from ..core.units import format_size
from ..residency.slots import SlotStats
from .interrupt import Interrupt, interrupted
from .options import add_model_args, add_n_predict, open_model, sampling


def slots_summary(st: SlotStats) -> str:
    """One line for a terminal: the slot tier's size, hit rate and copies."""
    where = st["device"] or ("GPU" if st["on_gpu"] else "host RAM")
    hits = "n/a" if st["hit_rate"] is None else f"{st['hit_rate']:.0%}"
    return (
        f"[{where} expert slots: {st['slots']} ({format_size(st['buffer_bytes'])}), hit rate {hits}, "
        f"{st['copies']} copies ({format_size(st['copied_bytes'])}), {st['planned_steps']} steps planned by the balancer]"
    )


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac run", description="Generate text from a prompt.")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True)
    add_n_predict(p, 128, "tokens to generate")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    with Interrupt() as stop, open_model(args) as m:
        if stop.requested:  # while loading
            return interrupted("run")
        request = dict(max_tokens=args.n_predict, stop=args.stop, cancel=stop.cancelled, **sampling(args))
        if args.json:
            out = m.create_completion(args.prompt, **request)
            st = m.stats
            print(
                json.dumps(
                    {
                        "text": out["choices"][0]["text"],
                        "tokens": m.completion_tokens,
                        "n_tokens": st.n_generated,
                        "tokens_per_s": st.tokens_per_s,
                        "acceptance_rate": st.acceptance_rate,
                        "stats": m.stats_dict(),
                        "memory_plan": m.memory_plan.as_dict(),
                    }
                ),
                flush=True,
            )
            return interrupted("run") if stop.requested else 0
        for chunk in m.create_completion(args.prompt, stream=True, **request):
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
        print(flush=True)
        if stop.requested:
            return interrupted("run")
        print(m.stats.summary())
        if m.slots is not None:
            print(slots_summary(m.slots.stats()))
        if m.stats.finish_reason == "context":
            print(f"moespac run: stopped: the context of {m.target.n_ctx} tokens is full (raise -c)", file=sys.stderr)
    return 0
