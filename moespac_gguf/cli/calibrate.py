"""`moespac calibrate`: measure this machine's costs for the balancer and the simulator (tools.calibrate)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..core.atomic import atomic_write_text
from ..core.errors import MoespacError
from ..core.paths import CALIBRATION_PATH
from ..core.units import format_size
from ..residency.costs import read_calibration
from ..tools.calibrate import calibrate, read_costs_here


def previous_rpc(path: Path) -> dict:
    """The RPC servers' profiles an earlier calibration at `path` holds (none if it is missing or
    damaged): calibrating one server, or none, keeps the others'."""
    try:
        return read_calibration(path)["rpc"] if path.is_file() else {}
    except MoespacError:
        return {}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="moespac calibrate", description="Measure this machine's costs for the balancer and the simulator."
    )
    p.add_argument("-m", "--model", required=True, help="a GGUF MoE on the disk to measure")
    p.add_argument(
        "-md",
        "--model-draft",
        help="draft GGUF, or 'self' (the target routing fewer experts): also measure its time per token",
    )
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument(
        "--under-pressure",
        action="store_true",
        help="measure the read costs inside a small memory "
        "cgroup (every read evicts a page first), as runs under --mem-cap/--mem-budget see them",
    )
    p.add_argument(
        "--rpc",
        metavar="HOST:PORT[,...]",
        default="",
        help="also measure these RPC servers (moespac rpc-server) as the slot device: expert compute there, the "
        "link's bandwidth and round trip (without a local GPU: one would hold the slots)",
    )
    p.add_argument("--out", default=str(CALIBRATION_PATH))
    p.add_argument("--read-costs-child", type=int, help=argparse.SUPPRESS)  # its value: bytes per read
    args = p.parse_args(argv)
    if args.read_costs_child:
        print(json.dumps(read_costs_here(args.model, args.read_costs_child)))
        return 0
    rpc = [e.strip() for e in args.rpc.split(",") if e.strip()]
    profile = calibrate(args.model, args.model_draft, args.threads, args.under_pressure, rpc)
    servers = {**previous_rpc(Path(args.out)), **profile.get("rpc", {})}
    if servers:
        profile["rpc"] = servers
    atomic_write_text(args.out, json.dumps(profile, indent=1))
    pressure = " (under memory pressure)" if args.under_pressure else ""
    print(
        f"flash read     {format_size(profile['flash_read_bps'])}/s{pressure}\n"
        f"page-in        {profile['page_in_latency_s'] * 1e6:.0f} us per random 4 KiB read, "
        f"{profile['fault_s_per_page'] * 1e6:.0f} us per 4 KiB fault in order\n"
        f"memcpy         {format_size(profile['memcpy_bps'])}/s\nmemory read    {format_size(profile['mem_bps'])}/s\n"
        f"expert matmul  {profile['cpu_s_per_token_expert'] * 1e6:.1f} us per token (upper bound)\n"
        f"step overhead  {profile['step_overhead_s'] * 1e3:.2f} ms"
    )
    if "gpu" in profile:
        g = profile["gpu"]
        print(
            f"GPU            {g['device']}{' (unified memory)' if g['unified_memory'] else ''}\n"
            f"GPU expert     {g['gpu_s_per_token_expert'] * 1e6:.1f} us per token, "
            f"{g['gpu_s_per_token_expert_batch'] * 1e6:.1f} us per token in a verification batch\n"
            f"host -> GPU    {format_size(g['h2d_bps'])}/s"
        )
    for endpoint, r in profile.get("rpc", {}).items():
        if endpoint in rpc:
            print(
                f"RPC            {r['device']}\n"
                f"remote expert  {r['remote_s_per_token_expert'] * 1e6:.1f} us per token\n"
                f"link           {format_size(r['link_bps'])}/s, {r['round_trip_s'] * 1e6:.0f} us round trip"
            )
    print(f"saved to {args.out}")
    return 0
