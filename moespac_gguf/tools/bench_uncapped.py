"""`moespac bench --no-cap`: the uncapped comparison, moespac against llama.cpp where the model fits.

No memory cap and no GPU: every contender runs CPU-only (-ngl 0) with the same model, the same
prompts (the same token ids: each prompt in the model's chat template, as `moespac run` sends it),
the same number of greedy tokens and the same threads, each in its own child process (`moespac
bench --child NAME CONFIG`) with the model files warm in the page cache. Flash attention is
llama.cpp's default (auto: on, on a CPU) for llama-bench, llama-cpp-python and moespac without a
draft, and off for the drafted contenders, as the runtime sets it (api.moespac.flash_attention).
Contenders:

  llama-bench       llama.cpp's own benchmark, stock: built WITHOUT our patches from the same
                    vendored source with llama.cpp's default build options (plus CMAKE_ARGS), by
                    `scripts/build_llama_cpp.py --stock llama-bench`; run as `-p P -n 0` and
                    `-p 0 -n N -d P`, P the prompts' mean length in tokens, N the tokens
                    generated, R (-r) the number of prompts: its tg decodes after P tokens of
                    context, as the others do after their prompts. It decodes no prompt of ours
                    (its context is synthetic) and produces no text: no same-output check
  llama-cpp-python  `llama_cpp.Llama` (our patched build, the library moespac runs on), greedy
                    `Llama.generate` over the same prompt tokens, KV cleared before each prompt;
                    timed with flash attention on, then once more untimed with it off, which is
                    the reference of the drafted contenders' output
  moespac           MoeSpac with its default memory plan and no draft
  moespac-fa-off    the same with flash attention off, as the drafted contenders run: what the
                    adaptive draft length itself costs is moespac+draft against this row
  moespac+draft     the same with the dense draft (-md, default the demo model smollm2)
  moespac+self      the same with the target as its own draft ("self")

Measured per contender: prompt tok/s (prompt tokens over the prefill's seconds: llama-bench's
pp; llama-cpp-python's time to its first token; moespac's prefill, which processes all but the
prompt's last token, that one opening the first verification step: those tokens are counted) and
decode tok/s (generated tokens over the rest: llama-bench's tg; llama-cpp-python's tokens after
its first over the time after it; moespac's DecodeStats). Rounds are interleaved: round r runs
every contender once, in order, then round r+1; the report gives each contender's median over the
rounds and every round's numbers. Same output: each contender's greedy token ids, in every round,
equal llama-cpp-python's first round's with the same flash attention (the reference; moespac's if
it failed, for the undrafted only). A contender that fails gets its error in its row; the others
still run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..core.errors import MoespacError
from ..core.paths import REPO_ROOT
from ..core.prompts import load_prompts
from ..core.units import format_size
from ..decode.draft import SELF_DRAFT
from ..llama.chat import format_prompt
from ..llama.session import Session
from .bench import BenchConfig, generate_prompts, open_contender
from .bench_gpu import run_child

UNCAPPED_CONTENDERS = ("llama-bench", "llama-cpp-python", "moespac", "moespac-fa-off", "moespac+draft", "moespac+self")
UNCAPPED_LIMIT = 20  # Spec-Bench prompts in this mode (--limit)
UNCAPPED_ROUNDS = BenchConfig.rounds  # interleaved rounds (--rounds)
DEFAULT_DRAFT = "smollm2"  # moespac+draft's draft without -md: the demo's dense draft
REFERENCES = ("llama-cpp-python", "moespac")  # whose greedy output the others must equal, in order
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_llama_cpp.py"
# Issue 21's targets: (what, contender, measure, against, at least)
TARGETS = (
    ("moespac decode", "moespac", "decode_tokens_per_s", "llama-bench", 0.95),
    ("moespac decode", "moespac", "decode_tokens_per_s", "llama-cpp-python", 1.0),
    ("moespac prompt", "moespac", "prompt_tokens_per_s", "llama-bench", 0.9),
    ("moespac+draft decode", "moespac+draft", "decode_tokens_per_s", "moespac", 0.95),
    # the adaptive draft's own cost: against the same attention kernels (a draft needs -fa off)
    ("moespac+draft decode", "moespac+draft", "decode_tokens_per_s", "moespac-fa-off", 0.95),
)


def threads(cfg: BenchConfig) -> int:
    """The threads every contender gets (-t; default: every core)."""
    return cfg.n_threads or os.cpu_count() or 1


def contender_draft(name: str, cfg: BenchConfig) -> str | None:
    return {"moespac+draft": cfg.model_draft, "moespac+self": SELF_DRAFT}.get(name)


# -- the stock llama-bench -----------------------------------------------------------------------


def stock_llama_bench(progress: bool = False) -> Path:
    """llama.cpp's stock llama-bench binary, built without our patches by the build script (once,
    cached; the first build takes minutes). MoespacError in one line if the build fails."""
    if progress:
        print(
            "[bench] llama-bench: the stock llama.cpp build (scripts/build_llama_cpp.py --stock llama-bench; "
            "cached, the first build takes a few minutes) ...",
            file=sys.stderr,
            flush=True,
        )
    proc = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), "--stock", "llama-bench"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        log = re.search(r"(\S+\.log)", proc.stderr + proc.stdout)
        where = f"see {log.group(1).rstrip(':')}" if log else (proc.stderr.strip().splitlines() or ["no output"])[0]
        raise MoespacError(f"could not build the stock llama-bench (exit {proc.returncode}): {where}")
    return Path(lines[-1])


def llama_bench_argv(binary: str | Path, cfg: BenchConfig, n_prompt: int, test: str) -> list[str]:
    """llama-bench's command line for one test, as many repetitions as prompts, CPU only (-ngl 0,
    no op offload), flash attention as llama.cpp's default (auto), JSON on stdout. "pp": a prompt
    of `n_prompt` tokens; "tg": n_predict tokens decoded after `n_prompt` tokens of context (-d),
    where the other contenders decode (llama-bench's tg alone starts from an empty context)."""
    sizes = ["-p", str(n_prompt), "-n", "0"] if test == "pp" else ["-p", "0", "-n", str(cfg.n_predict)]
    depth = ["-d", str(n_prompt)] if test == "tg" else []
    return [
        str(binary),
        "-m",
        cfg.model,
        "-t",
        str(threads(cfg)),
        *sizes,
        *depth,
        "-r",
        str(cfg.limit),
        "-ngl",
        "0",
        "-nopo",  # no op offload: on a GPU build, large batches' host ops would go to the GPU
        "1",
        "-fa",
        "auto",
        "-o",
        "json",
    ]


def parse_llama_bench(rows: list[dict]) -> dict:
    """llama-bench's JSON tests as {"pp": ..., "tg": ...}: tok/s (mean and stddev over repetitions)."""
    out = {}
    for row in rows:
        kind = "pp" if row["n_prompt"] > 0 and row["n_gen"] == 0 else "tg" if row["n_gen"] > 0 else None
        if kind:
            out[kind] = {
                "n": row["n_prompt"] or row["n_gen"],
                "tokens_per_s": row["avg_ts"],
                "stddev": row["stddev_ts"],
                "samples": row["samples_ts"],
            }
    if set(out) != {"pp", "tg"}:
        raise MoespacError(f"llama-bench reported no pp and tg test: {[r.get('n_prompt') for r in rows]}")
    return out


# -- the contenders (in the child) -----------------------------------------------------------------


def prompt_tokens(cfg: BenchConfig) -> list[list[int]]:
    """Every prompt's token ids, in the order generate_prompts runs them, as moespac formats them
    (the model's chat template): loads the model's vocabulary and context for a moment."""
    rows = load_prompts(cfg.prompts, cfg.limit, select="spread")
    with Session(cfg.model, n_ctx=cfg.n_ctx, tap=False) as s:
        return [format_prompt(s, row["text"]) for row in rows]


def run_llama_bench(cfg: BenchConfig) -> dict:
    prompts = prompt_tokens(cfg)
    n_prompt = round(sum(map(len, prompts)) / len(prompts))
    binary, rows, argvs = stock_llama_bench(), [], []
    for test in ("pp", "tg"):
        argv = llama_bench_argv(binary, cfg, n_prompt, test)
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise MoespacError(f"llama-bench exit {proc.returncode}: {tail}")
        rows += json.loads(proc.stdout)
        argvs.append(argv[1:])
    tests = parse_llama_bench(rows)
    return {
        "name": "llama-bench",
        "prompt_tokens_per_s": tests["pp"]["tokens_per_s"],
        "decode_tokens_per_s": tests["tg"]["tokens_per_s"],
        "n_prompt": n_prompt,  # the pp test's prompt and the tg test's context: the prompts' mean length
        "n_tokens": cfg.n_predict,
        "repetitions": cfg.limit,
        "tests": tests,
        "argv": argvs,
        "binary": str(binary),
        "cmake_args": os.environ.get("CMAKE_ARGS", ""),
    }


def llama_cpp_python_pass(cfg: BenchConfig, prompts: list[list[int]], flash_attn: bool) -> dict:
    """Every prompt through `llama_cpp.Llama` greedily: outputs and timings."""
    import llama_cpp  # lazy: the high-level binding loads libllama; only this contender uses it

    t = threads(cfg)
    llm = llama_cpp.Llama(
        cfg.model,
        n_ctx=cfg.n_ctx,
        n_threads=t,
        n_threads_batch=t,
        n_gpu_layers=0,
        op_offload=False,  # on a GPU build, large batches' host ops would go to the GPU
        flash_attn=flash_attn,
        verbose=False,
    )
    outputs, n_prompt, n_decoded, t_prompt, t_decode = [], 0, 0, 0.0, 0.0
    try:
        for tokens in prompts:
            llm.reset()  # no prefix reuse: the whole prompt is processed, as every other contender does
            ids, n = [], 0
            t0 = t1 = time.perf_counter()
            gen = llm.generate(tokens, temp=0.0)
            for tok in gen:
                n += 1
                if n == 1:
                    t1 = time.perf_counter()  # the prompt processed and its first token sampled
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                    break
                ids.append(tok)
                if n >= cfg.n_predict:
                    break
            t2 = time.perf_counter()
            gen.close()
            outputs.append(ids)
            n_prompt += len(tokens)
            t_prompt += t1 - t0
            n_decoded += max(n - 1, 0)
            t_decode += t2 - t1
    finally:
        llm.close()
    return {
        "prompt_tokens_per_s": n_prompt / t_prompt if t_prompt > 0 else 0.0,
        "decode_tokens_per_s": n_decoded / t_decode if t_decode > 0 else 0.0,
        "n_prompt": n_prompt,
        "n_tokens": n_decoded + len(prompts),
        "prompt_s": t_prompt,
        "decode_s": t_decode,
        "version": llama_cpp.__version__,
        "outputs": outputs,
    }


def run_llama_cpp_python(cfg: BenchConfig) -> dict:
    """Timed with flash attention (llama.cpp's default, as moespac without a draft); the outputs
    with it off, untimed, are what the drafted contenders must reproduce."""
    prompts = prompt_tokens(cfg)
    timed = llama_cpp_python_pass(cfg, prompts, flash_attn=True)
    return {
        "name": "llama-cpp-python",
        **timed,
        "outputs_fa_off": llama_cpp_python_pass(cfg, prompts, False)["outputs"],
    }


def run_moespac(name: str, cfg: BenchConfig) -> dict:
    draft = contender_draft(name, cfg)
    fa = "off" if name == "moespac-fa-off" else "auto"  # auto: as a user runs it
    m = open_contender(replace(cfg, n_threads=threads(cfg)), draft, n_gpu_layers=0, flash_attn=fa)
    try:
        outputs, n_tokens, elapsed, pooled = generate_prompts(m, cfg)
        # with a draft each prompt's last token opens the first step; without one it is prefilled
        prefilled = pooled.n_prompt - (len(outputs) if draft else 0)
        return {
            "name": name,
            "draft": draft,
            "prompt_tokens_per_s": prefilled / pooled.t_prompt if pooled.t_prompt > 0 else 0.0,
            "decode_tokens_per_s": pooled.tokens_per_s,
            "n_prompt": pooled.n_prompt,
            "n_tokens": pooled.n_generated,
            "prompt_s": pooled.t_prompt,
            "decode_s": pooled.t_total - pooled.t_prompt,
            "seconds": elapsed,
            "acceptance_rate": pooled.acceptance_rate,
            "n_steps": pooled.n_steps,
            "flash_attn": m.target.flash_attn,
            "mem_budget": m.options.mem_budget,  # the default memory plan, as it was asked
            "residency_engine": m.residency is not None,  # whether it ran (it need not when the model fits)
            "outputs": outputs,
        }
    finally:
        m.close()


def run_contender(name: str, cfg: BenchConfig) -> dict:
    """Run inside the child (`moespac bench --child NAME CONFIG` with cfg.uncapped): one JSON-able result."""
    if name == "llama-bench":
        return run_llama_bench(cfg)
    if name == "llama-cpp-python":
        return run_llama_cpp_python(cfg)
    if name in UNCAPPED_CONTENDERS:
        return run_moespac(name, cfg)
    raise MoespacError(f"unknown uncapped contender {name!r}")


# -- the parent -----------------------------------------------------------------------------------


def check(cfg: BenchConfig) -> None:
    """MoespacError, in one line, for an uncapped benchmark that cannot run as asked."""
    if not cfg.contenders:
        raise MoespacError("no contender to run")
    unknown = [n for n in cfg.contenders if n not in UNCAPPED_CONTENDERS]
    if unknown:
        raise MoespacError(
            f"unknown contender(s) {', '.join(unknown)} (with --no-cap choose from {', '.join(UNCAPPED_CONTENDERS)})"
        )
    if not Path(cfg.model).is_file():
        raise MoespacError(f"no such file: {cfg.model}")
    if "moespac+draft" in cfg.contenders:
        if not cfg.model_draft:
            raise MoespacError("moespac+draft needs a draft model (-md)")
        if cfg.model_draft != SELF_DRAFT and not Path(cfg.model_draft).is_file():
            raise MoespacError(f"no such file: {cfg.model_draft}")
    if cfg.mem_cap or cfg.gpu_budget is not None:
        raise MoespacError("--no-cap runs without a memory cap or GPU budget: not with --mem-cap or --gpu-budget")
    unused = {
        "--sd-draft": cfg.sd_draft,
        "--gate": cfg.gate,
        "--draft-ahead": cfg.draft_ahead,
        "-ngl": cfg.n_gpu_layers,
    }
    given = [flag for flag, value in unused.items() if value is not None]
    if given:
        raise MoespacError(f"{', '.join(given)}: not used by --no-cap (CPU only, every contender as a user runs it)")
    if cfg.rounds < 1:
        raise MoespacError(f"--rounds must be 1 or more, got {cfg.rounds}")
    if cfg.limit < 1:
        raise MoespacError(f"--limit must be 1 or more, got {cfg.limit}")
    if cfg.n_predict < 2:
        raise MoespacError(f"-n must be 2 or more (decode is timed after the first token), got {cfg.n_predict}")
    if threads(cfg) < 1:
        raise MoespacError(f"-t must be 1 or more, got {cfg.n_threads}")
    load_prompts(cfg.prompts, cfg.limit, select="spread")  # fail early on a bad prompt file


def reference_of(rounds: dict[str, list[dict]]) -> str | None:
    """The contender whose greedy output the others are checked against: the first of REFERENCES
    that ran without error in every round."""
    for name in REFERENCES:
        runs = rounds.get(name)
        if runs and all("outputs" in r for r in runs):
            return name
    return None


def same_output(runs: list[dict], reference: list[list[int]] | None) -> dict:
    """{"same_output", "same_prompts"} of one contender's rounds against the reference's outputs
    ({} where there is nothing to compare: no text, or no reference)."""
    if reference is None or not runs or any("outputs" not in r for r in runs):
        return {}
    worst = min((sum(a == b for a, b in zip(r["outputs"], reference)) for r in runs), default=0)
    same = all(r["outputs"] == reference for r in runs)
    return {"same_output": same, "same_prompts": f"{worst}/{len(reference)}"}


def summarize(name: str, runs: list[dict], reference: list[list[int]] | None) -> dict:
    """One contender's row of the report: the median over rounds, each round's numbers, same output."""
    errors = [r["error"] for r in runs if "error" in r]
    per_round = [{k: v for k, v in r.items() if k not in ("outputs", "name")} for r in runs]
    if errors:
        return {"name": name, "error": errors[0], "rounds": per_round}
    row = {
        "name": name,
        "draft": runs[0].get("draft"),
        "prompt_tokens_per_s": statistics.median(r["prompt_tokens_per_s"] for r in runs),
        "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in runs),
        "rounds": per_round,
    }
    return row | same_output(runs, reference)


def assemble(cfg: BenchConfig, rounds: dict[str, list[dict]], meta: dict | None = None) -> dict:
    """The report from every contender's per-round results (run's, or any of the same shape). The
    drafted contenders (and moespac-fa-off) run with flash attention off, so their reference is
    llama-cpp-python's output with it off (none when llama-cpp-python did not run)."""
    ref = reference_of(rounds)
    reference = rounds[ref][0]["outputs"] if ref else None
    off = rounds[ref][0].get("outputs_fa_off") if ref == "llama-cpp-python" else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "mode": "uncapped",
        "model": cfg.model,
        "model_bytes": os.path.getsize(cfg.model) if os.path.isfile(cfg.model) else None,
        "draft": cfg.model_draft,
        "prompts": str(cfg.prompts),
        "limit": cfg.limit,
        "n_predict": cfg.n_predict,
        "n_threads": threads(cfg),
        "n_ctx": cfg.n_ctx,
        "n_gpu_layers": 0,
        "flash_attn": "llama.cpp's default (auto) without a draft, off with one",
        "rounds": cfg.rounds,
        "statistic": "median of rounds",
        "reference": ref,
        **(meta or {}),
        "results": [
            summarize(
                name, runs, off if runs and (runs[0].get("draft") or runs[0].get("flash_attn") is False) else reference
            )
            for name, runs in rounds.items()
        ],
    }


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Every contender, `cfg.rounds` interleaved rounds, as `moespac bench --no-cap --json` prints."""
    cfg = replace(cfg, n_threads=threads(cfg), uncapped=True)
    check(cfg)
    meta = {}
    if "llama-bench" in cfg.contenders:  # built here, once, before the first round (the children find it cached)
        meta["llama_bench"] = str(stock_llama_bench(progress))
    rounds: dict[str, list[dict]] = {name: [] for name in cfg.contenders}
    for r in range(cfg.rounds):
        for name in cfg.contenders:
            if progress:
                print(f"[bench] round {r + 1}/{cfg.rounds}: {name} ...", file=sys.stderr, flush=True)
            rounds[name].append(run_child(name, cfg))
    return assemble(cfg, rounds, meta)


# -- the table --------------------------------------------------------------------------------------


def ratio(rows: dict[str, dict], name: str, measure: str, other: str) -> float | None:
    a, b = rows.get(name), rows.get(other)
    if not a or not b or "error" in a or "error" in b or not b[measure]:
        return None
    return a[measure] / b[measure]


def targets(report: dict) -> list[tuple[str, float | None, bool | None]]:
    """Issue 21's targets: (what, the measured ratio, met); None where a contender did not run."""
    rows = {r["name"]: r for r in report["results"]}
    out = []
    for what, name, measure, other, least in TARGETS:
        x = ratio(rows, name, measure, other)
        out.append((f"{what} ≥ {least:g}× {other}", x, None if x is None else x >= least))
    return out


def markdown(report: dict, cfg: BenchConfig) -> str:
    """The report as a table (README-ready) under a caption saying what was compared, and the
    targets line under it."""
    rows = {r["name"]: r for r in report["results"]}
    size = f" ({format_size(report['model_bytes'])})" if report.get("model_bytes") else ""
    draft = Path(report["draft"]).name if report.get("draft") and report["draft"] != SELF_DRAFT else report["draft"]
    caption = (
        f"Uncapped, CPU only: model `{Path(report['model']).name}`{size}, "
        f"{report['limit']} prompts x {report['n_predict']} tokens, greedy, {report['n_threads']} threads, "
        f"-ngl 0, flash attention llama.cpp's default (`-fa auto`: on) for llama-bench, llama-cpp-python and "
        f"moespac, off for the drafted rows (exact verification needs it off), "
        f"warm page cache, median of {report['rounds']} interleaved round(s). "
        f"llama-bench: stock llama.cpp (no patches, llama.cpp's default build options) from the same vendored "
        f"source, pp P and tg N at depth P (`-d P`), P the prompts' mean length. "
        f"llama-cpp-python: our patched build (`Llama.generate`). moespac: the default memory plan, no draft; "
        f"moespac+draft: draft `{draft or '-'}`; moespac+self: the target as its own draft. "
        f"same output: greedy token ids vs {report['reference'] or '-'} with the same flash attention."
    )
    lines = [
        caption,
        "",
        "| contender | prompt tok/s | decode tok/s | decode vs llama-bench | decode vs llama-cpp-python "
        "| prompt vs llama-bench | same output |",
        "|---|---:|---:|---:|---:|---:|:-:|",
    ]

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}x"

    for r in report["results"]:
        name = r["name"]
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} ||||||")
            continue
        if name == report["reference"] and r.get("same_output"):
            same = "reference"
        else:
            same = {True: "yes", False: f"NO ({r.get('same_prompts')} prompts)"}.get(r.get("same_output"), "-")
        lines.append(
            f"| {name} | {r['prompt_tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.2f} | "
            f"{fmt(ratio(rows, name, 'decode_tokens_per_s', 'llama-bench'))} | "
            f"{fmt(ratio(rows, name, 'decode_tokens_per_s', 'llama-cpp-python'))} | "
            f"{fmt(ratio(rows, name, 'prompt_tokens_per_s', 'llama-bench'))} | {same} |"
        )
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    lines += [
        "",
        "Targets: "
        + "; ".join(f"{what}: {'-' if x is None else f'{x:.2f}×'} {verdict[ok]}" for what, x, ok in targets(report))
        + ".",
    ]
    return "\n".join(lines)
