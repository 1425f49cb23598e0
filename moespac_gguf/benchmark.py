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

The parent checks that every contender's greedy output equals plain llama.cpp's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from .errors import MoespacError
from .memcap import MemoryCap
from .pages import drop_file_cache, file_cached_fraction, mapped_by_others, status_bytes
from .paths import REPO_ROOT, SHARED_DIR
from .record import format_prompt, load_prompts
from .session import SELF_DRAFT
from .speculative import DecodeStats
from .units import format_size, parse_size

CONTENDERS = ("llama.cpp", "llama.cpp+random", "llama.cpp+sd", "moespac", "moespac+gate", "moespac+slots")
# moespac+gate needs a trained gate (--gate); moespac+slots costs on CPU-only machines
# (bench/results/memcap_slots.md), it is for a faster slot tier
DEFAULT_CONTENDERS = CONTENDERS[:4]
SLOT_FRACTION = 0.5  # default share of the expert budget given to slots (moespac+slots)
DEFAULT_PROMPTS = SHARED_DIR / "data" / "prompts" / "spec_bench_question.jsonl"


def _io_counters() -> tuple[int, int]:
    read_bytes = 0
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                read_bytes = int(line.split()[1])
    return read_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_majflt


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


def run_contender(name: str, args) -> dict:
    """Run inside the capped child: load, generate every prompt, report one JSON object."""
    from .generate import MoeSpac
    from .pages import MADV_RANDOM, find_mapping, madvise

    managed = name.startswith("moespac")
    draft = sd_draft(args) if name == "llama.cpp+sd" else args.model_draft if managed else None
    budget = args.mem_cap if managed and args.mem_cap else None
    m = MoeSpac(args.model, draft, n_ctx=args.ctx_size, n_threads=args.threads, draft_max=args.draft_max,
                mem_budget=budget, gate=args.gate if name == "moespac+gate" else None,
                draft_ahead=args.draft_ahead if managed else None)
    filler = None
    if name == "moespac+slots":
        if budget is None:
            raise MoespacError("moespac+slots needs a memory cap (it sizes the slots)")
        from .slots import SlotFiller
        filler = SlotFiller.attach(m, args.slot_fraction)
    if name == "llama.cpp+random":
        mp = find_mapping(args.model)
        madvise(mp.start, mp.end - mp.start, MADV_RANDOM)
    prompts = load_prompts(args.prompts, args.limit, select="spread")
    meter = PrefillMeter()
    m.decoder.subscribe(meter)
    read0, faults0 = _io_counters()
    outputs, n_tokens, stats = [], 0, []
    t0 = time.perf_counter()
    for row in prompts:  # as `moespac trace --select spread` records them: its trace replays this run
        meter.begin()
        m.create_completion(format_prompt(m.target, row["text"]), max_tokens=args.n_predict)
        outputs.append(m.completion_tokens)
        n_tokens += len(m.completion_tokens)
        stats.append(m.stats)
    elapsed = time.perf_counter() - t0
    read1, faults1 = _io_counters()
    pooled = DecodeStats.pooled(stats)
    result = {"name": name, "draft": draft, "draft_ahead": m.decoder.draft_ahead,  # the rows it ran ahead, in effect
              "tokens_per_s": n_tokens / elapsed, "n_tokens": n_tokens, "seconds": elapsed,
              "bytes_read": read1 - read0, "major_faults": faults1 - faults0,
              "acceptance_rate": pooled.acceptance_rate, "outputs": outputs,
              "rss_anon_bytes": status_bytes("RssAnon"),  # not page cache: what the cap leaves the model
              # the same run without its prompt prefills (every prefill reads most experts once)
              "decode": {"tokens_per_s": pooled.tokens_per_s, "bytes_read": read1 - read0 - meter.bytes_read,
                         "seconds": pooled.t_total - pooled.t_prompt, "n_steps": pooled.n_steps,
                         "n_drafted": pooled.n_drafted, "draft_s": pooled.t_draft, "verify_s": pooled.t_verify,
                         "n_prompt": pooled.n_prompt, "prefill_s": pooled.t_prompt,
                         "prefill_bytes_read": meter.bytes_read}}
    if m.residency is not None:
        st = m.residency.engine.stats
        result["engine"] = {"prefetched_bytes": st.prefetched_bytes, "evicted_bytes": st.evicted_bytes,
                            "plans": st.plans, "budget_bytes": m.residency.budget_bytes,
                            "pinned": m.residency.pin, "engine_budget_bytes": m.residency.engine.budget}
    if m.draft is not None and m.draft.tap is not None:  # a self-draft under a budget
        result["draft_tap"] = {"rerouted": m.draft.tap.rerouted, "demand_paged_bytes": m.draft.tap.demand_paged_bytes}
    if m.gate_tap is not None:
        result["gate"] = {"calls": m.gate_tap.calls, "seconds": m.gate_tap.seconds}
    if filler is not None:
        result["slots"] = filler.stats()
        filler.close()
    m.close()
    return result


def _child_argv(name: str, args) -> list[str]:
    argv = [sys.executable, "-m", "moespac_gguf.benchmark", "--child", name, "-m", args.model,
            "--mem-cap", str(args.mem_cap), "--prompts", str(args.prompts), "--limit", str(args.limit),
            "-n", str(args.n_predict), "-c", str(args.ctx_size), "--draft-max", str(args.draft_max)]
    if args.model_draft:
        argv += ["-md", args.model_draft]
    if args.sd_draft:
        argv += ["--sd-draft", args.sd_draft]
    if args.gate:
        argv += ["--gate", args.gate]
    if args.threads:
        argv += ["-t", str(args.threads)]
    if args.draft_ahead is not None:
        argv += ["--draft-ahead", str(args.draft_ahead)]
    if name == "moespac+slots":
        argv += ["--slot-fraction", str(args.slot_fraction)]
    return argv


def sd_draft(args) -> str | None:
    """llama.cpp+sd's draft: --sd-draft, else the same draft as moespac's."""
    return args.sd_draft or args.model_draft


def _files(args) -> list[str]:
    """The model files a contender maps (a self-draft maps the target's)."""
    return [f for f in dict.fromkeys((args.model, args.model_draft, args.sd_draft)) if f and f != SELF_DRAFT]


def run_capped(name: str, args) -> dict:
    """One contender in its own cgroup, cold cache, as a child process."""
    files = _files(args)
    for f in files:
        drop_file_cache(f)
    # pages another process keeps mapped cannot be dropped (and are not charged to the cap): report them
    cached_at_start = {Path(f).name: round(file_cached_fraction(f), 3) for f in files}
    if not args.mem_cap:  # uncapped: the model fits; the question is only "never slower"
        proc = subprocess.run(_child_argv(name, args), capture_output=True, text=True, cwd=REPO_ROOT)
        peak = 0
    else:
        with MemoryCap(args.mem_cap, name.replace("+", "-").replace(".", "")) as cap:
            proc = subprocess.run(_child_argv(name, args), capture_output=True, text=True,
                                  preexec_fn=cap.preexec, cwd=REPO_ROOT)
            peak = cap.peak_bytes()
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"name": name, "error": f"exit {proc.returncode}: {tail}"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_bytes"] = peak
    result["cached_at_start"] = cached_at_start
    return result


def markdown(results: list[dict], args) -> str:
    """The report's rows as a table (rows carry `same_output`, not the outputs)."""
    base = {r["name"]: r for r in results if "error" not in r}
    lines = [f"model `{Path(args.model).name}` ({format_size(os.path.getsize(args.model))}), draft "
             f"`{Path(args.model_draft).name if args.model_draft else '-'}`"
             f"{f' (llama.cpp+sd: `{Path(args.sd_draft).name}`)' if args.sd_draft else ''}, "
             f"cap {format_size(args.mem_cap) if args.mem_cap else 'none'}, "
             f"{args.limit} prompts x {args.n_predict} tokens; decode: the same run without the prompt prefills",
             "",
             "| contender | tok/s | vs llama.cpp+random | vs llama.cpp+sd | bytes read | vs +random | decode tok/s "
             "| decode MiB/token | vs +random | major faults | acceptance | same output |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|"]
    measures = {"tok/s": lambda r: r["tokens_per_s"], "bytes": lambda r: r["bytes_read"],
                "decode": lambda r: r["decode"]["bytes_read"] / r["n_tokens"]}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |||||||||||")
            continue

        def ratio(measure, other):
            o, f = base.get(other), measures[measure]
            return f"{f(r) / f(o):.2f}x" if o and f(o) else "-"
        acc = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
        same = {True: "yes", False: "NO"}.get(r.get("same_output"), "-")
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.2f} | {ratio('tok/s', 'llama.cpp+random')} | "
                     f"{ratio('tok/s', 'llama.cpp+sd')} | {format_size(r['bytes_read'])} | "
                     f"{ratio('bytes', 'llama.cpp+random')} | {r['decode']['tokens_per_s']:.2f} | "
                     f"{measures['decode'](r) / 2**20:.1f} | {ratio('decode', 'llama.cpp+random')} | "
                     f"{r['major_faults']} | {acc} | {same} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moespac bench", description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", required=True)
    p.add_argument("-md", "--model-draft", help=f"draft GGUF, or '{SELF_DRAFT}' (the target routing fewer experts)")
    p.add_argument("--mem-cap", required=True, type=parse_size,
                   help="memory cap for each contender, e.g. 1.5G (0: no cap, the model fits)")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("-n", "--n-predict", type=int, default=64)
    p.add_argument("-c", "--ctx-size", type=int, default=1024)
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("--sd-draft", metavar="FILE",
                   help="llama.cpp+sd's draft GGUF instead of -md (e.g. a dense draft beside -md self, whose "
                   "unrestricted self-draft thrashes under a cap without expert management)")
    p.add_argument("--draft-max", type=int, default=8)
    p.add_argument("--draft-ahead", type=int, default=None, metavar="N",
                   help=f"moespac with -md {SELF_DRAFT}: tokens the draft runs ahead (default: moespac run's)")
    p.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS),
                   help=f"comma-separated, from {', '.join(CONTENDERS)} (default: all but moespac+gate and moespac+slots)")
    p.add_argument("--gate", help="lookahead-gate sidecar for the moespac+gate contender")
    p.add_argument("--slot-fraction", type=float, default=SLOT_FRACTION,
                   help="moespac+slots: share of the expert budget held in host-RAM expert slots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="also write the JSON here (e.g. bench/results/memcap.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_contender(args.child, args)))
        return 0
    for f in _files(args):
        if not Path(f).is_file():
            raise MoespacError(f"no such file: {f}")
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise MoespacError(f"unknown contender(s) {', '.join(unknown)} (choose from {', '.join(CONTENDERS)})")
    if any(n.startswith("moespac") for n in names) and not args.model_draft:
        raise MoespacError("moespac needs a draft model (-md)")
    if "llama.cpp+sd" in names and not sd_draft(args):
        raise MoespacError("llama.cpp+sd needs a draft model (-md or --sd-draft)")
    if "moespac+gate" in names and not args.gate:
        raise MoespacError("the moespac+gate contender needs a gate sidecar (--gate FILE, from moespac train-gate)")
    if not 0 < args.slot_fraction < 1:
        raise MoespacError(f"--slot-fraction must be between 0 and 1, got {args.slot_fraction}")
    if "moespac+slots" in names and not args.mem_cap:
        raise MoespacError("moespac+slots needs a memory cap (--mem-cap): it sizes the slots")
    load_prompts(args.prompts, args.limit, select="spread")  # fail early on a bad prompt file
    results = []
    for f in _files(args):
        pids = mapped_by_others(f)
        if pids:
            raise MoespacError(f"{f} is mapped by other processes (pids {', '.join(map(str, pids))}): their "
                               "pages would be shared with every contender and not charged to the cap; "
                               "stop them or benchmark a private copy")
    for name in names:
        if not args.json:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        results.append(run_capped(name, args))
    # plain llama.cpp's greedy output; +random decodes the same way (only paging differs)
    reference = next((r["outputs"] for name in ("llama.cpp", "llama.cpp+random") for r in results
                      if r["name"] == name and "outputs" in r), None)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "model": args.model, "draft": args.model_draft, "sd_draft": sd_draft(args), "mem_cap": args.mem_cap,
              "prompts": str(args.prompts), "limit": args.limit, "n_predict": args.n_predict,
              "results": [{k: v for k, v in r.items() if k != "outputs"} | (
                  {"same_output": r["outputs"] == reference} if "outputs" in r and reference else {})
                          for r in results]}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        Path(args.out).with_suffix(".md").write_text(markdown(report["results"], args) + "\n")
    print(json.dumps(report) if args.json else markdown(report["results"], args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
