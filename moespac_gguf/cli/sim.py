"""`moespac sim`: replay a routing trace through a residency policy on a modeled device."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ..core.errors import MoespacError
from ..core.units import format_size, parse_size
from ..residency.policy import POLICIES
from ..sim.profiles import PAGING, load_device, load_model
from ..sim.simulate import SimResult, default_model, load_trace, simulate
from ..sim.sweep import SweepSpec, sweep
from ..sim.trace import RoutingTrace


def _profile(args) -> RoutingTrace | None:
    if args.profile is None:
        return None
    if Path(args.profile).resolve() == Path(args.trace).resolve():
        raise MoespacError(
            "--profile must be a DIFFERENT trace than --trace (a static placement tuned on the "
            "replayed tokens would see the future)"
        )
    return load_trace(args.profile)


def _print(r: SimResult) -> None:
    room = (
        f"{r.cache_per_layer} experts/layer"
        if r.cache_per_layer is not None
        else f"{format_size(r.budget_bytes)} budget"
    )
    mode = f"K={r.draft_k:g}, A={r.acceptance}" if r.draft_k else "no speculation"
    if r.pinned:
        room += f", pinned + a {r.stream_window}-expert stream window"
    print(
        f"{r.policy} on {r.device}: {r.model} {r.quant}, {room} ({r.capacity_experts} experts), "
        f"{r.n_tokens} tokens in {r.n_windows} windows ({mode}; misses read {'by 4 KiB faults' if r.paging == 'fault' else 'in one read each'})"
    )
    print(f"  hit rate         {r.hit_rate:.3f}")
    print(f"  moved per token  {format_size(r.bytes_per_token)} ({format_size(r.prefetch_bytes_per_token)} prefetched)")
    print(f"  stall per token  {r.stall_s_per_token * 1e3:.2f} ms")
    print(f"  modeled speed    {r.tokens_per_s:.2f} tokens/s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moespac sim",
        description="Replay a routing trace through an expert "
        "residency policy on a modeled device (the model: moespac_gguf.sim.simulate).",
    )
    p.add_argument("--trace", help="trace .npz (moespac trace-import) or a Mixtral routing .jsonl")
    p.add_argument(
        "--policy",
        default="moespac",
        help=f"one of {', '.join(POLICIES)} (default moespac), or moespac-old (moespac before issue 24)",
    )
    p.add_argument(
        "--device",
        default="m2-macbook",
        help="a profile in moespac_gguf/sim/data/devices, or local "
        "(CACHE_DIR/calibration.json from moespac calibrate); default m2-macbook",
    )
    room = p.add_mutually_exclusive_group()
    room.add_argument("--cache-per-layer", type=int, help="experts held per layer")
    room.add_argument(
        "--mem-budget", type=parse_size, help="fast memory for the model, e.g. 8G (default: the device's memory)"
    )
    p.add_argument(
        "--draft-k",
        type=float,
        default=0,
        help="drafted tokens per verification window (default 0; a fractional K is the mean of an adaptive run)",
    )
    p.add_argument("--acceptance", type=float, default=0.7, help="chance each drafted token is accepted (default 0.7)")
    p.add_argument(
        "--paging",
        choices=PAGING,
        default="bulk",
        help="how a miss is read: one read per expert "
        "(bulk, default: the engine, slot copies) or 4 KiB page faults (fault: llama.cpp's mmap with "
        "MADV_RANDOM)",
    )
    p.add_argument(
        "--pinned",
        action="store_true",
        help="moespac as the pinned engine runs it under a memory budget: misses stream through, "
        "and the routing tap keeps a routed expert in place of a weaker held one as it is read "
        "(moespac-old: a kept miss is a fetch)",
    )
    p.add_argument(
        "--stream-window",
        type=int,
        default=0,
        help="experts the unlocked window beside a "
        "--pinned policy keeps after streaming them (the engine's stream window; default 0)",
    )
    p.add_argument(
        "--draft-ahead",
        type=int,
        default=0,
        metavar="N",
        help="the runtime's -md self --draft-ahead "
        "N: the --model .gguf's self-draft runs N rows ahead of every window (llama.cpp replays it), "
        "its routing of them the policy's lookahead (default 0)",
    )
    p.add_argument("--quant", help="quant type of the model spec (default: the spec's)")
    p.add_argument(
        "--model",
        help="a model spec: a name in moespac_gguf/sim/data/models, a TOML file of the same keys (a path "
        "ending in .toml: name, n_layer, n_expert, top_k, n_shared_expert, n_embd, n_ff_expert, total_params, "
        "default_quant, [bits_per_weight]), or a .gguf file; default from the trace (Mixtral traces)",
    )
    p.add_argument(
        "--profile",
        help="a DIFFERENT trace of the same model: static takes its hot experts from it, "
        "and every policy (but belady) is warmed up on it, uncounted",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the acceptance draws")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--sweep",
        action="store_true",
        help="every policy x shipped device x shipped model: table, "
        "JSON and plots in --out-dir (uses --draft-k, --acceptance, --seed; moespac_gguf.sim.sweep)",
    )
    p.add_argument("--out-dir", default="bench/results", help="where --sweep writes (default bench/results)")
    return p


def main(argv) -> int:
    args = parser().parse_args(argv)
    if args.sweep:
        sweep(SweepSpec(args.draft_k, args.acceptance, args.seed), Path(args.out_dir))
        return 0
    if args.trace is None:
        raise MoespacError("--trace is required (or --sweep)")
    trace = load_trace(args.trace)
    model = load_model(args.model or default_model(trace, args.trace))
    result = simulate(
        trace,
        args.trace,
        args.policy,
        load_device(args.device),
        model,
        args.quant,
        args.cache_per_layer,
        args.mem_budget,
        args.draft_k,
        args.acceptance,
        _profile(args),
        args.seed,
        args.paging,
        args.pinned,
        args.stream_window,
        args.draft_ahead,
        args.model,
    )
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        _print(result)
    return 0
