"""Does `moespac sim --device local` predict what the memory-capped benchmark measures? (issue 7)

For each contender of one or more `moespac bench --json` runs (same model, draft, cap, prompts and
tokens), the simulator replays the routing trace of exactly those greedy generations (`moespac
trace` on the same prompts, recorded here once and cached) through the policy that models the
contender, on the device `moespac calibrate` measured on the same model:

  llama.cpp+random  lru-global (the kernel's page cache), K = 0, misses paged in by 4 KiB faults
  moespac           moespac (the runtime's own policy object, pinned as in the run: misses not kept for
                    free, but the stream window beside it keeps the latest ones), the run's mean K
                    (adaptive) and acceptance, bulk reads; with `-md self` its self-draft running
                    ahead as in the run (`--draft-ahead`, replayed by llama.cpp: moespac_gguf.draft_replay)

Not modelled: plain `llama.cpp` and `llama.cpp+sd`, whose misses go through the kernel's read-ahead:
under reclaim it reads pages that are evicted before use and read again (measured 2-18x the bytes
the simulator's cache needs), which the simulator has no model of; their measured rows are listed.
Each modelled contender's capacity is what the cap leaves it, measured in the run: for
llama.cpp+random the cap minus the process's anonymous memory and the non-expert weights; for
moespac the engine's pinned expert budget. Compared: decode tokens/s and bytes read per token,
prefills excluded (the benchmark meters them apart). Every run is replayed with its own K, acceptance
and capacity; agreement: the mean modeled tokens/s within +-25% of the mean measured over the runs
(runs of one command vary by more than that on a shared 2-core machine). A last row gives the offline optimum (belady) at moespac's capacity, K
and acceptance: the fewest bytes per token any residency policy could read there. Writes bench/results/sim_agreement.{json,md}.

    .venv/bin/python bench/sim_agreement.py bench/results/memcap_16x.json [more runs of the same setup]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np

from moespac_gguf.api.options import DRAFT_AHEAD
from moespac_gguf.core.layout import read_layout
from moespac_gguf.core.paths import CACHE_DIR
from moespac_gguf.core.prompts import load_prompts
from moespac_gguf.core.units import format_size
from moespac_gguf.decode.draft import SELF_DRAFT
from moespac_gguf.sim.profiles import Device, load_device, load_model
from moespac_gguf.sim.record import record
from moespac_gguf.sim.simulate import load_trace, simulate

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 0.25
# contender -> (policy, paging, drafts)
MODELS = {"llama.cpp+random": ("lru-global", "fault", False), "moespac": ("moespac", "bulk", True)}
# kernel read-ahead under reclaim: pages read ahead are evicted before use and read again
NOT_MODELLED = dict.fromkeys(("llama.cpp", "llama.cpp+sd"), "kernel read-ahead under reclaim (not in the simulator)")


def bench_trace(run: dict) -> Path:
    """The routing of the run's greedy generations (recorded once per model/prompts/length)."""
    path = CACHE_DIR / "traces" / f"{Path(run['model']).stem}-bench{run['limit']}-n{run['n_predict']}.npz"
    if not path.is_file():
        prompts = load_prompts(run["prompts"], run["limit"], select="spread")
        trace = record(run["model"], prompts, run["n_predict"], prompt_file=run["prompts"])
        path.parent.mkdir(parents=True, exist_ok=True)
        trace.save(path)
    return path


def check_same_setup(runs: list[dict]) -> None:
    keys = ("model", "draft", "mem_cap", "prompts", "limit", "n_predict")
    for run in runs[1:]:
        differ = [k for k in keys if run.get(k) != runs[0].get(k)]
        if differ:
            sys.exit(f"error: the runs differ in {', '.join(differ)}: compare runs of one setup")


def capacity_bytes(name: str, r: dict, run: dict, other_bytes: float) -> float:
    """Expert bytes the contender's fast memory held (module docstring)."""
    if name == "moespac":
        return r["engine"]["engine_budget_bytes"]
    return run["mem_cap"] - r["rss_anon_bytes"] - other_bytes


def run_ahead(r: dict, run: dict) -> int:
    """Rows the run's self-draft ran ahead: as recorded, else (runs before the bench recorded it) the
    runtime's default for `-md self` under a budget."""
    if "draft_ahead" in r:
        return r["draft_ahead"]
    return DRAFT_AHEAD if run["draft"] == SELF_DRAFT else 0


def agreement(runs: list[dict], trace_path: Path, device: Device) -> list[dict]:
    """One row per run of each contender the simulator models (module docstring), replayed with that
    run's own K, acceptance and capacity, each followed for moespac by the offline bound; then the
    measured rows of the contenders it does not model."""
    trace = load_trace(trace_path)
    model = load_model(runs[0]["model"])
    _, expert_b, other_b = model.sizes(None)
    n_all = model.n_layer * model.n_expert
    rows = []
    for run in runs:
        for r in run["results"]:
            if r["name"] not in MODELS or "decode" not in r or "rss_anon_bytes" not in r:
                continue  # an error, or a run from before the benchmark metered decode and memory
            policy, paging, drafted = MODELS[r["name"]]
            dec = r["decode"]
            k = dec["n_drafted"] / dec["n_steps"] if drafted else 0.0  # the adaptive run's mean K
            acceptance = (r["acceptance_rate"] or 0.0) if drafted else 0.0
            budget = other_b + max(capacity_bytes(r["name"], r, run, other_b), 0.0)
            engine = r.get("engine", {})
            pinned = bool(engine.get("pinned"))  # then the rest of its budget is the stream window
            window = int((engine["budget_bytes"] - engine["engine_budget_bytes"]) // expert_b) if pinned else 0
            ahead = run_ahead(r, run) if drafted else 0
            for name, pol in ((r["name"], policy), ("(offline optimum)", "belady")):
                if pol == "belady" and r["name"] != "moespac":
                    continue  # the least any policy could read with moespac's capacity, K and acceptance
                sim = simulate(
                    trace,
                    "bench",
                    pol,
                    device,
                    model,
                    mem_budget=budget,
                    draft_k=k,
                    acceptance=acceptance,
                    paging=paging,
                    pinned=pinned,
                    stream_window=window,
                    draft_ahead=ahead,
                    self_draft=run["model"],
                )
                measured = dec["tokens_per_s"] if pol != "belady" else None
                ratio = sim.tokens_per_s / measured if measured else None
                rows.append(
                    {
                        "contender": name,
                        "run": run["date"],
                        "policy": pol,
                        "paging": paging,
                        "draft_k": k,
                        "acceptance": round(acceptance, 3),
                        "draft_ahead": ahead,
                        "capacity_experts": sim.capacity_experts,
                        "capacity_share": sim.capacity_experts / n_all,
                        "measured_tokens_per_s": measured,
                        "modeled_tokens_per_s": sim.tokens_per_s,
                        "ratio": ratio,
                        "agrees": None if ratio is None else bool(abs(ratio - 1.0) <= TOLERANCE),
                        "measured_bytes_per_token": dec["bytes_read"] / r["n_tokens"] if measured else None,
                        "modeled_bytes_per_token": sim.bytes_per_token,
                        "modeled_hit_rate": sim.hit_rate,
                    }
                )
    for run in runs:
        for r in run["results"]:
            if r["name"] in NOT_MODELLED and "decode" in r:
                rows.append(
                    {
                        "contender": r["name"],
                        "run": run["date"],
                        "policy": NOT_MODELLED[r["name"]],
                        "measured_tokens_per_s": r["decode"]["tokens_per_s"],
                        "modeled_tokens_per_s": None,
                        "measured_bytes_per_token": r["decode"]["bytes_read"] / r["n_tokens"],
                    }
                )
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per modelled contender over the runs: mean measured vs mean modeled tokens/s (runs of one command
    vary by more than the tolerance on a shared machine, so the agreement is judged on the means)."""
    out = []
    for name in MODELS:
        mine = [r for r in rows if r["contender"] == name]
        if mine:
            measured = [r["measured_tokens_per_s"] for r in mine]
            modeled = [r["modeled_tokens_per_s"] for r in mine]
            ratio = float(np.mean(modeled) / np.mean(measured))
            out.append(
                {
                    "contender": name,
                    "runs": len(mine),
                    "measured_mean": float(np.mean(measured)),
                    "measured_min": min(measured),
                    "measured_max": max(measured),
                    "modeled_mean": float(np.mean(modeled)),
                    "ratio": ratio,
                    "agrees": bool(abs(ratio - 1.0) <= TOLERANCE),
                }
            )
    return out


def markdown(rows: list[dict], runs: list[dict], device: Device) -> str:
    run0 = runs[0]
    lines = [
        f"`moespac sim --device local` against `moespac bench`: model `{Path(run0['model']).name}`, draft "
        f"`{Path(run0['draft']).name}`, cap {format_size(run0['mem_cap'])}, {run0['limit']} prompts x "
        f"{run0['n_predict']} tokens, {len(runs)} run(s); decode only (prefills metered apart). "
        f"Calibration: reads {format_size(device.flash_read_bps)}/s, "
        f"{(device.fault_s_per_page or device.page_in_latency_s) * 1e6:.0f} us per 4 KiB fault, "
        f"{device.cpu_s_per_token_expert * 1e6:.0f} us per token-expert, step {device.step_overhead_s * 1e3:.1f} ms, "
        f"draft {device.draft_s * 1e3:.1f} ms/token, prefetch overlap {device.io_overlap:g}.",
        "",
        "| contender | run | modeled as | K, A, ahead | capacity | measured tok/s | modeled tok/s | modeled / measured "
        "| within ±25% | measured MiB/token | modeled MiB/token |",
        "|---|---|---|---|---:|---:|---:|---:|:-:|---:|---:|",
    ]

    def num(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for r in rows:
        if r["modeled_tokens_per_s"] is None:
            lines.append(
                f"| {r['contender']} | {r['run']} | not modelled: {r['policy']} | | | "
                f"{r['measured_tokens_per_s']:.2f} | - | - | - | {r['measured_bytes_per_token'] / 2**20:.1f} | - |"
            )
            continue
        agrees = "-" if r["agrees"] is None else ("yes" if r["agrees"] else "NO")
        mib = None if r["measured_bytes_per_token"] is None else r["measured_bytes_per_token"] / 2**20
        lines.append(
            f"| {r['contender']} | {r['run']} | {r['policy']}, {r['paging']} | {r['draft_k']:.2f}, "
            f"{r['acceptance']:.2f}, {r.get('draft_ahead', 0)} | {r['capacity_experts']} ({r['capacity_share']:.0%}) | "
            f"{num(r['measured_tokens_per_s'])} | {r['modeled_tokens_per_s']:.2f} | {num(r['ratio'])} | "
            f"{agrees} | {num(mib, '{:.1f}')} | {r['modeled_bytes_per_token'] / 2**20:.1f} |"
        )
    lines += [
        "",
        "| contender | runs | measured tok/s, mean (min-max) | modeled tok/s, mean | modeled / measured "
        "| within ±25% |",
        "|---|---:|---:|---:|---:|:-:|",
    ]
    for r in summary(rows):
        lines.append(
            f"| {r['contender']} | {r['runs']} | {r['measured_mean']:.2f} ({r['measured_min']:.2f}-"
            f"{r['measured_max']:.2f}) | {r['modeled_mean']:.2f} | {r['ratio']:.2f} | "
            f"{'yes' if r['agrees'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bench", nargs="+", type=Path, help="moespac bench --out JSON files of one setup")
    p.add_argument("--out", type=Path, default=RESULTS / "sim_agreement.json")
    args = p.parse_args(argv)
    runs = [json.loads(f.read_text()) for f in args.bench]
    check_same_setup(runs)
    read_layout(runs[0]["model"])  # one-line error if the benchmarked model is gone
    device = load_device("local")
    rows = agreement(runs, bench_trace(runs[0]), device)
    if not rows:
        sys.exit("error: no contender in these runs has the decode metrics (re-run moespac bench)")
    md = markdown(rows, runs, device)
    means = summary(rows)
    args.out.write_text(
        json.dumps(
            {
                "date": str(datetime.date.today()),
                "runs": [str(f) for f in args.bench],
                "tolerance": TOLERANCE,
                "rows": rows,
                "summary": means,
            },
            indent=1,
        )
    )
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)
    return 0 if all(r["agrees"] for r in means) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
