"""`moespac sim --sweep`: every policy on every device profile and model spec, plus two plots.

Writes to --out-dir, named by the draft length K: sim_k{K}_table.md (model x device rows, a
tokens/s · hit rate · GB moved per token cell per policy, budget = the device's memory),
sim_k{K}.json (every result), sim_k{K}_hit_rate.png (hit rate vs experts cached per layer, Mixtral
GSM8K) and sim_k{K}_tokens_per_s.png (tokens/s vs memory budget, Mixtral Q4_K_M, one panel per
device). Every policy is warmed up on the profile trace first (simulate.py's docstring).

The budget plot replays each (policy, budget) once and times it on every device: the replay does
not depend on the device, moespac's included (with one expert size, the balancer's saving per byte
is (p - move share) / flash bandwidth: the device scales it but never reorders it).

Only Mixtral-8x7B has recorded routing (../shared/data/traces: GSM8K replayed, HumanEval as the
static profile). The other models replay SYNTHETIC routing of their shape (`synthetic_routing`),
marked as such in the table: their rows show what their sizes do on each device, not how
predictable their real routing is.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path, atomic_write_text
from ..core.errors import MoespacError
from ..core.paths import SHARED_DIR
from ..residency.policy import POLICIES
from .profiles import ModelSpec, load_device, load_model, names
from .simulate import capacity_for, load_trace, make_policy, make_windows, replay, simulate, timing, warmup_of
from .trace import RoutingTrace

TRACES = SHARED_DIR / "data" / "traces"
REAL = {"mixtral-8x7b": ("mixtral8x7b_gsm8k_routing.jsonl", "mixtral8x7b_humaneval_routing.jsonl")}
# Synthetic routing: fitted so that a Mixtral-shaped trace (32 x top-2 of 8, 244 tokens) matches the real
# GSM8K trace: per-layer LRU(4) hit rate 0.55 (real 0.57), next-token reuse 0.35 (0.34), share of the
# top quarter of experts 0.35 (0.35). Three seeds averaged.
SYNTH_REUSE, SYNTH_ALPHA, SYNTH_TOKENS, SYNTH_SEQUENCES = 0.12, 8.0, 256, 2
MIXTRAL_BUDGETS_GB = (2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 27)


@dataclass(frozen=True)
class SweepSpec:
    """The speculation every cell of the sweep replays."""

    draft_k: float
    acceptance: float
    seed: int = 0


def synthetic_routing(model: ModelSpec, stream: int, seed: int = 0) -> RoutingTrace:
    """A routing trace of `model`'s shape. Per layer a fixed expert popularity ~ Dirichlet(alpha)
    (the model, from `seed`); each token keeps each of its predecessor's experts with probability
    SYNTH_REUSE and draws the rest from the popularity without replacement (Gumbel top-k); `stream`
    picks the "prompts": two streams of one model share its popularity."""
    L, E, k = model.n_layer, model.n_expert, model.top_k
    log_popularity = np.log(np.random.default_rng(seed).dirichlet(np.full(E, SYNTH_ALPHA), size=L))
    rng = np.random.default_rng([seed, stream])
    experts = np.empty((L, SYNTH_TOKENS, k), dtype=np.int16)
    length = SYNTH_TOKENS // SYNTH_SEQUENCES
    for t in range(SYNTH_TOKENS):
        score = log_popularity + rng.gumbel(size=(L, E))
        if t % length:
            previous = experts[:, t - 1].astype(np.intp)
            kept = np.where(rng.random((L, k)) < SYNTH_REUSE, np.inf, np.take_along_axis(score, previous, axis=1))
            np.put_along_axis(score, previous, kept, axis=1)
        experts[:, t] = np.argsort(-score, axis=1, kind="stable")[:, :k]
    tokens = np.arange(SYNTH_TOKENS)
    return RoutingTrace(
        experts,
        np.zeros(experts.shape),
        np.full(SYNTH_TOKENS, -1),
        tokens % length,
        tokens // length,
        np.ones(SYNTH_TOKENS),
        E,
        {"model": model.name, "source": f"synthetic routing, stream {stream}"},
    )


def _traces(name: str, model: ModelSpec) -> tuple[RoutingTrace, RoutingTrace, str]:
    """(replayed trace, static profile, label) of a model."""
    if name not in REAL:
        return synthetic_routing(model, 0), synthetic_routing(model, 1), "synthetic"
    paths = [TRACES / f for f in REAL[name]]
    if not all(p.is_file() for p in paths):
        raise MoespacError(f"the sweep replays the Mixtral traces in {TRACES}: not found")
    return load_trace(paths[0]), load_trace(paths[1]), "GSM8K"


def _table(results: list[dict], spec) -> str:
    mode = (
        f"speculative windows of K={spec.draft_k:g} drafted tokens, acceptance {spec.acceptance}"
        if spec.draft_k
        else "one token per window (no speculation)"
    )
    lines = [
        f"Cell: modeled tokens/s · hit rate · GB moved per token. {mode}; budget = the device's memory "
        f"for the model; default quant of each model.",
        "",
        "| model | trace | device | budget | " + " | ".join(POLICIES) + " |",
        "|---|---|---|---|" + "---|" * len(POLICIES),
    ]
    rows: dict[tuple, dict] = {}
    for r in results:
        rows.setdefault((r["model"], r["quant"], r["trace_label"], r["device"], r["budget_bytes"]), {})[r["policy"]] = r
    for (model, quant, label, device, budget), cells in rows.items():
        fits = next(iter(cells.values()))["fits"]
        cell = [
            f"{c['tokens_per_s']:.3g} · {c['hit_rate']:.0%} · {c['bytes_per_token'] / 1e9:.2f}"
            for c in (cells[p] for p in POLICIES)
        ]
        lines.append(
            f"| {model} {quant} | {label} | {device} | {budget / 1e9:.1f} GB{' (fits)' if fits else ''} | "
            + " | ".join(cell)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _figure(rows: int, cols: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib takes ~0.5 s to import
    from matplotlib.figure import Figure  # lazy: as above

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _hit_rate_plot(trace, profile, model, device, spec, out: Path) -> None:
    """Hit rate vs experts per layer, every policy, on the Mixtral trace."""
    windows = make_windows(trace, spec.draft_k, spec.acceptance, spec.seed)
    sizes = range(1, model.n_expert + 1)
    fig, ax = _figure(1, 1, (7, 4.5))
    for name in POLICIES:
        rates = [
            simulate(
                trace,
                "",
                name,
                device,
                model,
                cache_per_layer=n,
                draft_k=spec.draft_k,
                acceptance=spec.acceptance,
                profile=profile,
                seed=spec.seed,
            ).hit_rate
            for n in sizes
        ]
        ax[0, 0].plot(list(sizes), rates, marker="o", label=name)
    ax[0, 0].set(
        xlabel="experts cached per layer",
        ylabel="hit rate",
        title=f"{model.name}, GSM8K routing, {len(windows)} windows (K={spec.draft_k:g})",
    )
    ax[0, 0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _budget_plot(trace, profile, model, devices, spec, out: Path) -> None:
    """Tokens/s vs memory budget, every policy, one panel per device (replays shared by all devices)."""
    from matplotlib.ticker import ScalarFormatter  # lazy: as in _figure

    quant, expert_b, other_b = model.sizes(None)
    windows = make_windows(trace, spec.draft_k, spec.acceptance, spec.seed)
    warmup = warmup_of(profile, spec.draft_k, spec.acceptance, spec.seed)
    budgets = [gb * 1e9 for gb in MIXTRAL_BUDGETS_GB if gb * 1e9 > other_b]
    fig, axes = _figure(2, (len(devices) + 1) // 2, (11, 8))
    speeds = {}
    for name in POLICIES:
        for budget in budgets:
            capacity, _ = capacity_for(model, other_b, expert_b, devices[0], None, budget)
            policy = make_policy(name, trace, windows, devices[0], expert_b, profile)
            rep = replay(trace, windows, policy, capacity, warmup)
            for device in devices:
                speeds.setdefault((name, device.name), []).append(
                    timing(rep, device, expert_b, other_b, spec.draft_k)["tokens_per_s"]
                )
    for ax, device in zip(axes.flat, devices):
        for name in POLICIES:
            ax.plot([b / 1e9 for b in budgets], speeds[name, device.name], marker=".", label=name)
        ax.set(xlabel="memory budget (GB)", ylabel="modeled tokens/s", yscale="log", title=device.name)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="y", which="minor", labelsize=7)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{model.name} {quant}, GSM8K routing (K={spec.draft_k:g})")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def sweep(spec: SweepSpec, out: Path) -> None:
    """Write the sweep's table, JSON and plots into `out` (the module docstring)."""
    out.mkdir(parents=True, exist_ok=True)
    devices = [load_device(name) for name in names("devices")]
    results = []
    for name in names("models"):
        model = load_model(name)
        trace, profile, label = _traces(name, model)
        _, expert_b, other_b = model.sizes(None)
        for device in devices:
            fits = model.n_layer * model.n_expert * expert_b + other_b <= device.mem_bytes
            for policy in POLICIES:
                r = simulate(
                    trace,
                    label,
                    policy,
                    device,
                    model,
                    draft_k=spec.draft_k,
                    acceptance=spec.acceptance,
                    profile=profile,
                    seed=spec.seed,
                )
                results.append({**asdict(r), "trace_label": label, "fits": fits})
            print(f"{model.name} on {device.name}: done", flush=True)
    stem = f"sim_k{spec.draft_k:g}"
    files = [out / f"{stem}{suffix}" for suffix in (".json", "_table.md", "_hit_rate.png", "_tokens_per_s.png")]
    atomic_write_text(files[0], json.dumps(results, indent=1))
    atomic_write_text(files[1], _table(results, spec))
    mixtral = load_model("mixtral-8x7b")
    trace, profile, _ = _traces("mixtral-8x7b", mixtral)
    _hit_rate_plot(trace, profile, mixtral, devices[0], spec, files[2])
    _budget_plot(trace, profile, mixtral, devices, spec, files[3])
    print("wrote " + ", ".join(map(str, files)))
