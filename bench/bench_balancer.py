"""Balancer solve times on real MoE shapes: HiGHS (in-process) vs CBC (subprocess) vs greedy.

Each instance is a re-plan: the plan in force was made for the previous step's utility, the
routing has drifted, the current step's top-k experts per layer are must_have, and the budget is
half of the expert bytes. Times are wall clock for greedy start + model build + solve.

    python bench/bench_balancer.py [--quick]

Prints a markdown table and writes bench/results/balancer.json.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moespac_gguf.residency.costs import DeviceCosts  # noqa: E402
from moespac_gguf.residency.ilp import DEFAULT_SOLVER, _build_model, solve_mip  # noqa: E402
from moespac_gguf.residency.plan import FLASH, Plan, PlanProblem, greedy, tier_costs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "balancer.json"
BITS_PER_WEIGHT = 4.5  # about Q4_K_M
ROWS_PER_STEP = 5  # K = 4 drafted tokens + 1
# name: (MoE layers, routed experts, experts per token, n_embd, expert FFN width)
SHAPES = {
    "Mixtral-8x7B": (32, 8, 2, 4096, 14336),
    "DeepSeek-V2-Lite": (26, 64, 6, 2048, 1408),
    "Qwen3-30B-A3B": (48, 128, 8, 2048, 768),
}
METHODS = ("greedy", "highs", "cbc")


def expert_bytes(n_embd: int, n_ff: int) -> float:
    """gate + up + down projections of one expert."""
    return 3 * n_embd * n_ff * BITS_PER_WEIGHT / 8


def device(name: str, size: float) -> DeviceCosts:
    """A laptop-class machine: per-token expert cost = streaming its weights at 50 GB/s (CPU) or 400 GB/s (GPU)."""
    return DeviceCosts(
        flash_read_bps=3e9,
        memcpy_bps=20e9,
        cpu_s_per_token_expert=size / 50e9,
        gpu_s_per_token_expert=size / 400e9 if name == "gpu" else None,
    )


def routing(rng, n_layer: int, n_expert: int, k: int) -> np.ndarray:
    """Expected tokens per expert of one step: skewed per-layer popularity, k routings per row."""
    return ROWS_PER_STEP * k * rng.dirichlet(np.full(n_expert, 0.3), size=n_layer)


def instance(shape: str, device_name: str, seed: int = 0) -> PlanProblem:
    n_layer, n_expert, k, n_embd, n_ff = SHAPES[shape]
    rng = np.random.default_rng(seed)
    size = expert_bytes(n_embd, n_ff)
    previous = routing(rng, n_layer, n_expert, k)
    utility = 0.7 * previous + 0.3 * routing(rng, n_layer, n_expert, k)
    common = dict(
        expert_bytes=np.full(n_layer, size),
        slot_capacity=np.full(n_layer, max(1, n_expert // 4)),
        resident_budget_bytes=0.5 * size * n_layer * n_expert,
        costs=device(device_name, size),
    )
    in_force = greedy(PlanProblem(utility=previous, current=np.full((n_layer, n_expert), FLASH), **common)).tier
    must = np.zeros((n_layer, n_expert), dtype=bool)
    np.put_along_axis(must, np.argsort(-utility, axis=1)[:, :k], True, axis=1)
    return PlanProblem(utility=utility, current=in_force, must_have=must, **common)


def build_seconds(problem: PlanProblem) -> float:
    start = time.perf_counter()
    _build_model(problem, tier_costs(problem))
    return time.perf_counter() - start


def run(method: str, problem: PlanProblem, time_limit: float) -> Plan:
    if method == "greedy":
        return greedy(problem)
    return solve_mip(problem, solver=method, time_limit=time_limit)


def measure(shape: str, device_name: str, seeds: int, time_limit: float) -> list[dict]:
    """One row per method over `seeds` instances: median and worst time, worst ratio to the best plan."""
    runs = {method: [] for method in METHODS}
    builds = []
    for seed in range(seeds):
        problem = instance(shape, device_name, seed)
        plans = {method: run(method, problem, time_limit) for method in METHODS}
        best = min(plan.predicted_step_s for plan in plans.values())
        for method, plan in plans.items():
            runs[method].append((plan, plan.predicted_step_s / best))
        builds.append(build_seconds(problem))
    n_layer, n_expert = SHAPES[shape][:2]
    return [
        dict(
            model=shape,
            shape=f"{n_layer}x{n_expert}",
            device=device_name,
            method=method,
            build_s=None if method == "greedy" else statistics.median(builds),
            solve_s=statistics.median(plan.solve_s for plan, _ in results),
            max_solve_s=max(plan.solve_s for plan, _ in results),
            statuses=sorted({plan.status for plan, _ in results}),
            step_ms=statistics.median(plan.predicted_step_s * 1e3 for plan, _ in results),
            vs_best=max(ratio for _, ratio in results),
        )
        for method, results in runs.items()
    ]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | layers x experts | device | method | build s | total s median | total s max | status "
        "| step ms | worst vs best |",
        "|---|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        build = "" if r["build_s"] is None else f"{r['build_s']:.3f}"
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['device']} | {r['method']} | {build} | "
            f"{r['solve_s']:.3f} | {r['max_solve_s']:.3f} | {'/'.join(r['statuses'])} | "
            f"{r['step_ms']:.1f} | {r['vs_best']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one instance per shape instead of three")
    parser.add_argument("--time-limit", type=float, default=10.0, help="solver time limit, seconds")
    args = parser.parse_args(argv)
    seeds = 1 if args.quick else 3
    rows = [
        row
        for shape in SHAPES
        for device_name in ("cpu", "gpu")
        for row in measure(shape, device_name, seeds, args.time_limit)
    ]
    print(markdown(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            dict(
                date=datetime.datetime.now().isoformat(timespec="seconds"),
                machine=dict(
                    processor=platform.processor(),
                    machine=platform.machine(),
                    platform=platform.platform(),
                    cpu_count=os.cpu_count(),
                    python=platform.python_version(),
                    pulp=importlib.metadata.version("pulp"),
                    highspy=importlib.metadata.version("highspy"),
                ),
                settings=dict(
                    instances_per_shape=seeds,
                    time_limit_s=args.time_limit,
                    gap=inspect.signature(solve_mip).parameters["gap"].default,
                    default_solver=DEFAULT_SOLVER,
                    bits_per_weight=BITS_PER_WEIGHT,
                    rows_per_step=ROWS_PER_STEP,
                    budget_share=0.5,
                    slots_share=0.25,
                ),
                rows=rows,
            ),
            indent=1,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
