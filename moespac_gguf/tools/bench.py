"""`moespac bench`: tokens/s and bytes read under a real memory cap, every contender side by side.

Each contender runs in its own child process inside its own memory cgroup
(memcap.py) with the same cap, the same prompts and a cold page cache (the
model files' pages are dropped before each start). Contenders:

  llama.cpp         plain mmap, no draft (the same decode path, K = 0)
  llama.cpp+random  the same with MADV_RANDOM on the mapping
  llama.cpp+sd      speculative decoding with the same draft (or --sd-draft), no expert management
  moespac           speculative decoding + utility estimator + balancer + engine
  moespac+gate      the same + the lookahead gate's in-decode predictions (--gate FILE)
  moespac+slots     moespac with a share of its expert budget (--slot-fraction) in host-RAM expert
                    slots (patches 0005-0007) that the same utility fills; the page-cache engine
                    gets the rest
  moespac+keep      moespac with --keep-at-use: the routing tap keeps experts as they are read
                    instead of the pinned engine fetching its plan (residency.keep); moespac's
                    default where a self-draft runs ahead
  moespac-plan      moespac with --no-keep-at-use: the pinned engine fetches its plan; moespac's
                    default otherwise

The parent checks that every contender's greedy output equals plain llama.cpp's.

With a GPU budget (`--gpu-budget SIZE`, BenchConfig.gpu_budget) the benchmark is the GPU mode
instead: tools.bench_gpu, with its own contenders and no memory cgroup.
With `--no-cap` (BenchConfig.uncapped) it is the uncapped comparison instead: tools.bench_uncapped.
With `--rpc HOST:PORT` or `--link RATE,DELAY` (BenchConfig.rpc_servers, links) it is the RPC mode:
tools.bench_rpc, this machine alone against the same with another machine's device.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..api.moespac import MoeSpac
from ..core.errors import MoespacError
from ..core.paths import REPO_ROOT
from ..core.prompts import SPEC_BENCH, load_prompts
from ..core.units import format_size
from ..decode.draft import SELF_DRAFT
from ..decode.stats import DecodeStats
from ..llama.chat import format_prompt
from ..llama.slots import SlotCache
from ..residency.pages import (
    MADV_RANDOM,
    drop_file_cache,
    file_cached_fraction,
    find_mapping,
    madvise,
    mapped_by_others,
    read_bytes,
    status_bytes,
)
from ..residency.slots import SlotFiller, slot_counts
from .memcap import MemoryCap, cgroup_root

CONTENDERS = (
    "llama.cpp",
    "llama.cpp+random",
    "llama.cpp+sd",
    "moespac",
    "moespac+gate",
    "moespac+slots",
    "moespac+keep",
    "moespac-plan",
)
# moespac+gate needs a trained gate (--gate); moespac+slots costs on CPU-only machines
# (bench/results/memcap_slots.md), it is for a faster slot tier
DEFAULT_CONTENDERS = CONTENDERS[:4]
SLOT_FRACTION = 0.5  # default share of the expert budget given to slots (moespac+slots)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark: the model, its drafts, the cap, the prompts and the contenders' options."""

    model: str
    model_draft: str | None = None
    sd_draft: str | None = None  # llama.cpp+sd's own draft (default: model_draft)
    mem_cap: int = 0  # bytes; 0: no cap (the model fits)
    prompts: str = str(SPEC_BENCH)
    limit: int = 8
    n_predict: int = 64
    n_ctx: int = 1024
    n_threads: int | None = None
    draft_max: int = 8
    draft_ahead: int | None = None
    gate: str | None = None
    contenders: tuple[str, ...] = DEFAULT_CONTENDERS
    slot_fraction: float = SLOT_FRACTION
    gpu_budget: int | None = None  # bytes of GPU memory for experts: the GPU mode (tools.bench_gpu); None: CPU mode
    n_gpu_layers: int | None = None  # the GPU mode's -ngl; the RPC mode's layers on the remote (None: all)
    uncapped: bool = False  # the uncapped comparison vs llama-bench and llama-cpp-python (tools.bench_uncapped)
    rounds: int = 2  # the uncapped mode's interleaved rounds
    # the RPC mode (tools.bench_rpc): real servers' HOST:PORT[,...] (a child: the one it uses) ...
    rpc_servers: str | None = None
    links: tuple[str, ...] = ()  # ... or links RATE,DELAY to emulate, each with a server of its own

    @property
    def sd(self) -> str | None:
        """llama.cpp+sd's draft: sd_draft, else the same draft as moespac's."""
        return self.sd_draft or self.model_draft

    @property
    def files(self) -> list[str]:
        """The model files a contender maps (a self-draft maps the target's)."""
        return [f for f in dict.fromkeys((self.model, self.model_draft, self.sd_draft)) if f and f != SELF_DRAFT]


def _io_counters() -> tuple[int, int]:
    return read_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def open_contender(cfg: BenchConfig, draft: str | None, **options) -> MoeSpac:
    """A contender's MoeSpac on cfg's model, context, threads and draft length; `options` are the
    mode's own. Flash attention is off unless `options` say otherwise: the drafted contenders'
    kernels for every contender, so that their outputs compare exactly."""
    kwargs = {"n_ctx": cfg.n_ctx, "n_threads": cfg.n_threads, "draft_max": cfg.draft_max, "flash_attn": "off"}
    return MoeSpac(cfg.model, draft, **(kwargs | options))


class PrefillMeter:
    """Speculative-loop observer: the bytes each prompt's prefill read (its own phase: a prefill
    batch routes to nearly every expert, so it would hide the decode's residency behaviour).
    The phase ends when the first step's drafts are heard: the target's and the draft's prompt
    prefills are in it (and that one step's drafting). `begin()` before each prompt."""

    def __init__(self):
        self.bytes_read = 0
        self._start: int | None = None

    def begin(self) -> None:
        self._start = _io_counters()[0]

    def on_draft(self, draft, ahead=None) -> None:
        if self._start is not None:
            self.bytes_read += _io_counters()[0] - self._start
            self._start = None

    def on_verify(self, event) -> None:
        pass


def generate_prompts(m: MoeSpac, cfg: BenchConfig, before_each=None) -> tuple[list[list[int]], int, float, DecodeStats]:
    """Every prompt of `cfg`, greedily, `cfg.n_predict` tokens each, in the order `moespac trace
    --select spread` records them (its trace replays the run): (outputs, tokens generated, wall
    seconds, the pooled stats). `before_each` is called before each prompt."""
    outputs, n_tokens, stats = [], 0, []
    t0 = time.perf_counter()
    for row in load_prompts(cfg.prompts, cfg.limit, select="spread"):
        if before_each is not None:
            before_each()
        m.create_completion(format_prompt(m.target, row["text"]), max_tokens=cfg.n_predict)
        outputs.append(m.completion_tokens)
        n_tokens += len(m.completion_tokens)
        stats.append(m.stats)
    return outputs, n_tokens, time.perf_counter() - t0, DecodeStats.pooled(stats)


def run_contender(name: str, cfg: BenchConfig) -> dict:
    """Run inside the capped child: load, generate every prompt, report one JSON object."""
    managed = name.startswith("moespac")
    draft = cfg.sd if name == "llama.cpp+sd" else cfg.model_draft if managed else None
    budget = cfg.mem_cap if managed and cfg.mem_cap else None
    m = open_contender(
        cfg,
        draft,
        mem_budget=budget,
        gate=cfg.gate if name == "moespac+gate" else None,
        draft_ahead=cfg.draft_ahead if managed else None,
        keep_at_use={"moespac+keep": True, "moespac-plan": False}.get(name),
        n_gpu_layers=0,  # the memory-cap mode measures the CPU side, GPU build or not
    )
    filler = None
    if name == "moespac+slots":
        if budget is None:
            raise MoespacError("moespac+slots needs a memory cap (it sizes the slots)")
        counts = slot_counts(m.layout, m.residency.budget_bytes, cfg.slot_fraction, m.target.n_layer)
        r = m.residency
        filler = SlotFiller(
            SlotCache(m.target, counts), m.layout, r.costs, on_gpu=False, estimator=r.policy.estimator, engine=r.engine
        )
        m.decoder.subscribe(filler)
    if name == "llama.cpp+random":
        mp = find_mapping(cfg.model)
        madvise(mp.start, mp.end - mp.start, MADV_RANDOM)
    meter = PrefillMeter()
    m.decoder.subscribe(meter)
    read0, faults0 = _io_counters()
    outputs, n_tokens, elapsed, pooled = generate_prompts(m, cfg, before_each=meter.begin)
    read1, faults1 = _io_counters()
    result = {
        "name": name,
        "draft": draft,
        "draft_ahead": m.decoder.draft_ahead,  # the rows it ran ahead, in effect
        "tokens_per_s": n_tokens / elapsed,
        "n_tokens": n_tokens,
        "seconds": elapsed,
        "bytes_read": read1 - read0,
        "major_faults": faults1 - faults0,
        "acceptance_rate": pooled.acceptance_rate,
        "outputs": outputs,
        "rss_anon_bytes": status_bytes("RssAnon"),  # not page cache: what the cap leaves the model
        # the same run without its prompt prefills (every prefill reads most experts once)
        "decode": {
            "tokens_per_s": pooled.tokens_per_s,
            "bytes_read": read1 - read0 - meter.bytes_read,
            "seconds": pooled.t_total - pooled.t_prompt,
            "n_steps": pooled.n_steps,
            "n_drafted": pooled.n_drafted,
            "draft_s": pooled.t_draft,
            "verify_s": pooled.t_verify,
            "n_prompt": pooled.n_prompt,
            "prefill_s": pooled.t_prompt,
            "prefill_bytes_read": meter.bytes_read,
        },
    }
    if m.residency is not None:
        st = m.residency.engine.stats
        result["engine"] = {
            "prefetched_bytes": st.prefetched_bytes,
            "evicted_bytes": st.evicted_bytes,
            "plans": st.plans,
            "budget_bytes": m.residency.budget_bytes,
            "pinned": m.residency.pin,
            "engine_budget_bytes": m.residency.engine.budget,
        }
    if m.draft is not None and m.draft.tap is not None:  # a self-draft under a budget
        result["draft_tap"] = {"rerouted": m.draft.tap.rerouted, "demand_paged_bytes": m.draft.tap.demand_paged_bytes}
    if m.gate_tap is not None:
        result["gate"] = {"calls": m.gate_tap.calls, "seconds": m.gate_tap.seconds}
    if filler is not None:
        result["slots"] = filler.stats()
        filler.close()
    m.close()
    return result


def child_argv(name: str, cfg: BenchConfig) -> list[str]:
    """The command line of one contender's child process (`moespac bench --child`)."""
    return [sys.executable, "-m", "moespac_gguf.cli", "bench", "--child", name, json.dumps(asdict(cfg))]


def run_capped(name: str, cfg: BenchConfig, env: dict[str, str] | None = None) -> dict:
    """One contender in its own cgroup, cold cache, as a child process (with `env`'s variables)."""
    files = cfg.files
    for f in files:
        drop_file_cache(f)
    # pages another process keeps mapped cannot be dropped (and are not charged to the cap): report them
    cached_at_start = {Path(f).name: round(file_cached_fraction(f), 3) for f in files}
    if not cfg.mem_cap:  # uncapped: the model fits; the question is only "never slower"
        proc = subprocess.run(child_argv(name, cfg), capture_output=True, text=True, cwd=REPO_ROOT, env=env)
        peak = 0
    else:
        with MemoryCap(cfg.mem_cap, name.replace("+", "-").replace(".", "")) as cap:
            proc = subprocess.run(
                child_argv(name, cfg), capture_output=True, text=True, preexec_fn=cap.preexec, cwd=REPO_ROOT, env=env
            )
            peak = cap.peak_bytes()
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"name": name, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_bytes"] = peak
    result["cached_at_start"] = cached_at_start
    return result


def check(cfg: BenchConfig) -> None:
    """MoespacError, in one line, for a benchmark that cannot run as asked."""
    check_capped(cfg)
    names = cfg.contenders
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise MoespacError(f"unknown contender(s) {', '.join(unknown)} (choose from {', '.join(CONTENDERS)})")
    if any(n.startswith("moespac") for n in names) and not cfg.model_draft:
        raise MoespacError("moespac needs a draft model (-md)")
    if "llama.cpp+sd" in names and not cfg.sd:
        raise MoespacError("llama.cpp+sd needs a draft model (-md or --sd-draft)")
    if "moespac+gate" in names and not cfg.gate:
        raise MoespacError("the moespac+gate contender needs a gate sidecar (--gate FILE, from moespac train-gate)")
    if not 0 < cfg.slot_fraction < 1:
        raise MoespacError(f"--slot-fraction must be between 0 and 1, got {cfg.slot_fraction}")
    if "moespac+slots" in names and not cfg.mem_cap:
        raise MoespacError("moespac+slots needs a memory cap (--mem-cap): it sizes the slots")
    if cfg.n_gpu_layers is not None:
        raise MoespacError("-ngl is for the GPU mode (--gpu-budget SIZE)")


def check_capped(cfg: BenchConfig) -> None:
    """MoespacError, in one line, where contenders cannot run capped as run_capped runs them: a
    model file missing, a bad prompt file, no memory cgroup, or a model file another process maps
    (its pages would not be charged to the cap)."""
    for f in cfg.files:
        if not Path(f).is_file():
            raise MoespacError(f"no such file: {f}")
    load_prompts(cfg.prompts, cfg.limit, select="spread")  # fail early on a bad prompt file
    if cfg.mem_cap:
        cgroup_root()  # a MoespacError saying why memory cannot be capped here
    for f in cfg.files:
        pids = mapped_by_others(f)
        if pids:
            raise MoespacError(
                f"{f} is mapped by other processes (pids {', '.join(map(str, pids))}): their "
                "pages would be shared with every contender and not charged to the cap; "
                "stop them or benchmark a private copy"
            )


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Every contender of `cfg`, one after the other, as the report `moespac bench --json` prints."""
    check(cfg)
    results = []
    for name in cfg.contenders:
        if progress:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(run_capped(name, cfg))
    # plain llama.cpp's greedy output; +random decodes the same way (only paging differs)
    reference = next(
        (
            r["outputs"]
            for name in ("llama.cpp", "llama.cpp+random")
            for r in results
            if r["name"] == name and "outputs" in r
        ),
        None,
    )
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": cfg.model,
        "draft": cfg.model_draft,
        "sd_draft": cfg.sd,
        "mem_cap": cfg.mem_cap,
        "prompts": str(cfg.prompts),
        "limit": cfg.limit,
        "n_predict": cfg.n_predict,
        "results": report_rows(results, reference),
    }


def report_rows(rows: list[dict], reference: list | None) -> list[dict]:
    """The report's rows: each contender's without its generated tokens, with `same_output` (its
    tokens equal `reference`'s) where both are known."""
    return [
        {k: v for k, v in r.items() if k != "outputs"}
        | ({"same_output": r["outputs"] == reference} if "outputs" in r and reference else {})
        for r in rows
    ]


def markdown(results: list[dict], cfg: BenchConfig) -> str:
    """The report's rows as a table (rows carry `same_output`, not the outputs)."""
    base = {r["name"]: r for r in results if "error" not in r}
    lines = [
        f"model `{Path(cfg.model).name}` ({format_size(os.path.getsize(cfg.model))}), draft "
        f"`{Path(cfg.model_draft).name if cfg.model_draft else '-'}`"
        f"{f' (llama.cpp+sd: `{Path(cfg.sd_draft).name}`)' if cfg.sd_draft else ''}, "
        f"cap {format_size(cfg.mem_cap) if cfg.mem_cap else 'none'}, "
        f"{cfg.limit} prompts x {cfg.n_predict} tokens; decode: the same run without the prompt prefills",
        "",
        "| contender | tok/s | vs llama.cpp+random | vs llama.cpp+sd | bytes read | vs +random | decode tok/s "
        "| decode MiB/token | vs +random | major faults | acceptance | same output |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    measures = {
        "tok/s": lambda r: r["tokens_per_s"],
        "bytes": lambda r: r["bytes_read"],
        "decode": lambda r: r["decode"]["bytes_read"] / r["n_tokens"],
    }
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |||||||||||")
            continue

        def ratio(measure, other, r=r):
            o, f = base.get(other), measures[measure]
            return f"{f(r) / f(o):.2f}x" if o and f(o) else "-"

        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = {True: "yes", False: "NO"}.get(r.get("same_output"), "-")
        lines.append(
            f"| {r['name']} | {r['tokens_per_s']:.2f} | {ratio('tok/s', 'llama.cpp+random')} | "
            f"{ratio('tok/s', 'llama.cpp+sd')} | {format_size(r['bytes_read'])} | "
            f"{ratio('bytes', 'llama.cpp+random')} | {r['decode']['tokens_per_s']:.2f} | "
            f"{measures['decode'](r) / 2**20:.1f} | {ratio('decode', 'llama.cpp+random')} | "
            f"{r['major_faults']} | {acc} | {same} |"
        )
    return "\n".join(lines)
