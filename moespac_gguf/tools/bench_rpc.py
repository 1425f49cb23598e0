"""`moespac bench --link RATE,DELAY` / `--rpc HOST:PORT[,...]`: the RPC mode, this machine alone
against the same machine with another one's device over a link, the same memory cap here.

Each contender runs as in the capped benchmark (tools.bench.run_capped): its own child process
in its own memory cgroup with the same cap (`--mem-cap`; 0: none), a cold page cache, the same
prompts and greedy decoding. Contenders:

  local      the moespac runtime alone, on the CPU: the cap is its memory budget (the residency
             engine runs when the model does not fit), as the capped benchmark's moespac
  local+rpc  the same memory options plus the RPC device (`rpc_servers=[endpoint]`, -ngl as given,
             default all): the remote holds the layers; with the residency engine their expert
             tensors stay here, managed by it, and the remote's memory is the slot tier (hot
             experts computed there, as far as the balancer finds the link pays)
  auto       `--mem-budget auto` plus the RPC device: the runtime's own choice under the cap
             (MoeSpac._send_every_layer: every layer on the remote where a token is predicted
             faster there, else this machine as its memory plan says); the row says which, and
             the predicted seconds a token each way
  llama.cpp-rpc  what a llama.cpp user does with --rpc: every layer, expert tensors too, on the
             remote (--n-cpu-moe 0), no memory budget (the residency engine would keep the
             experts here), the same cap on this machine's process

A draft (-md, optional) is the same in both; with the RPC device it goes there too (-ngl applies to
it as to the target).

With `--link RATE,DELAY` the remote is emulated (tools.netem): our own rpc-server in a network
namespace on this machine, behind a veth pair shaped to the link's rate and one-way delay (a
round trip: two delays), started fresh for the contender and stopped after it, outside the
memory cgroup (it stands for another machine, but shares this one's cores: its compute is no
faster than this machine's). `--link` repeats: one row per link and remote contender (a sweep),
the local row once. Before the rows, `moespac calibrate --rpc` (under pressure with a cap) measures
each emulated link through a server of its own into a calibration file of this run
(MOESPAC_CALIBRATION; the user's own is not touched): every contender reads the first link's
figures of this machine, a remote contender its link's profile under its server's endpoint. The host-side veth's counters give the bytes over the link, at load (the offloaded
weights) and while generating. With `--rpc`, real servers: the bytes over the link are not
measured here (n/a).

Reported per row: load seconds, tokens/s (and the decode alone, without the prompt prefills),
bytes read from storage while generating, bytes over the link, the cgroup's peak memory, and
whether the greedy token ids equal local's. With two or more emulated links of different delays,
`link_needs` fits each remote contender's decoded token's seconds as c + k round trips + its
bytes at the rate, and says what a link must offer for it to decode faster than local.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from ..api.moespac import MoeSpac
from ..core.errors import MoespacError
from ..core.paths import REPO_ROOT
from ..core.units import format_size
from ..llama.rpc import parse_endpoint
from ..residency.costs import RPC_KEYS
from ..residency.pages import read_bytes
from .bench import BenchConfig, check_capped, generate_prompts, open_contender, report_rows, run_capped
from .bench_uncapped import threads
from .netem import LinkShape, check_can_emulate, emulated_host, link_bytes, stats_dir_for

RPC_CONTENDERS = ("local", "local+rpc", "auto", "llama.cpp-rpc")


def open_rpc_contender(name: str, cfg: BenchConfig) -> tuple[MoeSpac, str]:
    """(the contender's MoeSpac, its placement in words): local+rpc is local's memory options plus
    the RPC servers (their devices hold layers and, with the residency engine, the slot tier)."""
    budget = cfg.mem_cap or None  # None: off (the cap is 0: the model fits)
    memory = f"budget {format_size(budget) if budget else 'off'}"
    if name == "local":
        m = open_contender(cfg, cfg.model_draft, mem_budget=budget, draft_ahead=cfg.draft_ahead, n_gpu_layers=0)
        return m, f"this machine, {memory}"
    remote = {"rpc_servers": cfg.rpc_servers.split(","), "n_gpu_layers": cfg.n_gpu_layers}
    if name == "llama.cpp-rpc":
        m = open_contender(cfg, cfg.model_draft, mem_budget="off", n_cpu_moe=0, **remote)
        return m, "every layer and its experts on the remote, budget off"
    if name == "auto":
        m = open_contender(cfg, cfg.model_draft, mem_budget="auto", draft_ahead=cfg.draft_ahead, **remote)
        budget = m.memory_plan.budget_bytes
        memory = f"engine budget {format_size(budget)}" if budget else "no engine"
    else:
        m = open_contender(cfg, cfg.model_draft, mem_budget=budget, draft_ahead=cfg.draft_ahead, **remote)
    if not m.target.link.endpoints:  # the runtime's own decision (MoeSpac._send_every_layer, _rpc_placement)
        placement = f"the remote left out (this link cannot pay for it), {memory}"
    elif m.n_cpu_moe == 0:
        placement = "every layer and its experts on the remote, no engine"
    else:
        placement = f"+ remote device, {memory}" + (", slots there" if m.slots is not None else "")
    if m.all_remote is not None:
        predicted = m.all_remote
        placement += (
            f" (a token predicted {predicted.remote_s * 1e3:.0f} ms with every layer there, "
            f"{predicted.local_s * 1e3:.0f} ms here)"
        )
    return m, (f"{name}: " if name == "auto" else "") + placement


def run_contender(name: str, cfg: BenchConfig) -> dict:
    """Run inside the capped child: load, generate every prompt, report one JSON object (the
    link's counters around the load and the generation when the link is emulated)."""
    emulated = bool(cfg.links) and name != "local"
    stats = stats_dir_for(parse_endpoint(cfg.rpc_servers)[0]) if emulated else None
    if emulated and stats is None:
        raise MoespacError(f"no emulated link reaches {cfg.rpc_servers}")

    def counters() -> tuple[int, int]:
        return link_bytes(stats) if stats else (0, 0)

    c0, t0 = counters(), time.perf_counter()
    m, placement = open_rpc_contender(name, cfg)
    load_s, c1 = time.perf_counter() - t0, counters()
    predicted = asdict(m.all_remote) if m.all_remote is not None else None
    try:
        read0 = read_bytes()
        outputs, n_tokens, elapsed, pooled = generate_prompts(m, cfg)
        read1, c2 = read_bytes(), counters()
        slots = m.slots.stats() if m.slots is not None else None
    finally:
        m.close()
    return {
        "name": name,
        "placement": placement,
        "predicted": predicted,  # auto's prediction of a token's seconds (MoeSpac.all_remote), where it made one
        "endpoint": cfg.rpc_servers if name != "local" else None,
        "load_s": load_s,
        "tokens_per_s": n_tokens / elapsed,
        "n_tokens": n_tokens,
        "seconds": elapsed,
        "bytes_read": read1 - read0,
        "acceptance_rate": pooled.acceptance_rate,
        "decode": {
            "tokens_per_s": pooled.tokens_per_s,
            "seconds": pooled.t_total - pooled.t_prompt,
            "prefill_s": pooled.t_prompt,
        },
        "slots": slots,  # the slot tier's stats (on the remote device with --rpc and no local GPU)
        # [sent to, received from] the remote, in bytes (None: not measured)
        "link_bytes": {"load": [c1[0] - c0[0], c1[1] - c0[1]], "generate": [c2[0] - c1[0], c2[1] - c1[1]]}
        if stats
        else None,
        "outputs": outputs,
    }


def check(cfg: BenchConfig) -> None:
    """MoespacError, in one line, for an RPC benchmark that cannot run as asked."""
    unknown = [n for n in cfg.contenders if n not in RPC_CONTENDERS]
    if unknown or not cfg.contenders:
        raise MoespacError(
            f"unknown RPC contender(s) {', '.join(unknown) or '(none)'} (choose from {', '.join(RPC_CONTENDERS)})"
        )
    if bool(cfg.rpc_servers) == bool(cfg.links):
        raise MoespacError("the RPC mode takes --rpc HOST:PORT (real servers) or --link RATE,DELAY (emulated), one")
    if cfg.gpu_budget is not None or cfg.uncapped:
        raise MoespacError("the RPC mode (--rpc, --link) is not the GPU mode or the uncapped comparison")
    if cfg.sd_draft or cfg.gate:
        raise MoespacError("--sd-draft and --gate are for the capped benchmark's contenders, not the RPC mode")
    for endpoint in (cfg.rpc_servers or "").split(","):
        if endpoint:
            parse_endpoint(endpoint)
    for link in cfg.links:
        LinkShape.parse(link)
    if cfg.links:
        check_can_emulate()
    check_capped(cfg)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[bench] {text}", file=sys.stderr, flush=True)


def calibrate_link(cfg: BenchConfig, link: str, directory: Path, progress: bool) -> dict:
    """The calibration `moespac calibrate --rpc` measures over an emulated `link` (a server of its
    own), read costs under pressure where the run is capped, written under `directory`: this
    machine's figures, and the link's profile (residency.costs.RPC_KEYS) under "link"."""
    shape = LinkShape.parse(link)
    out = directory / f"measured-{len(list(directory.iterdir()))}.json"
    _say(progress, f"calibrating over an emulated {shape} link (moespac calibrate --rpc) ...")
    with emulated_host(shape, threads=threads(cfg)) as host:
        cmd = [sys.executable, "-m", "moespac_gguf.cli", "calibrate", "-m", cfg.model, "--rpc", host.endpoint]
        cmd += ["--out", str(out)] + (["-t", str(cfg.n_threads)] if cfg.n_threads else [])
        proc = subprocess.run(
            cmd + (["--under-pressure"] if cfg.mem_cap else []), capture_output=True, text=True, cwd=REPO_ROOT
        )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MoespacError(f"calibrating over the emulated {shape} link failed: {tail}")
    profile = json.loads(out.read_text())
    measured = profile.pop("rpc")[host.endpoint]
    _say(
        progress,
        f"{shape}: {format_size(measured['link_bps'])}/s, {measured['round_trip_s'] * 1e3:.2f} ms a round trip, "
        f"{measured['remote_s_per_token_expert'] * 1e6:.0f} us a remote expert",
    )
    return profile | {"link": {key: measured[key] for key in RPC_KEYS}}


def calibration_env(calibration: dict, endpoint: str | None, directory: Path) -> dict[str, str]:
    """The environment of a contender's child: MOESPAC_CALIBRATION naming a file under `directory`
    with `calibration`'s figures of this machine and its link's profile as the server at `endpoint`'s."""
    path = directory / "contender.json"
    rpc = {endpoint: calibration["link"]} if endpoint else {}
    path.write_text(json.dumps({k: v for k, v in calibration.items() if k != "link"} | {"rpc": rpc}))
    return {**os.environ, "MOESPAC_CALIBRATION": str(path)}


def run_row(
    name: str, cfg: BenchConfig, link: str | None, calibration: dict | None, directory: Path, progress: bool
) -> dict:
    """One contender's row: over an emulated `link` (a fresh server behind it), or as `cfg` says;
    with `calibration` (calibrate_link's) the runtime's costs are those (calibration_env)."""
    if link is None:
        _say(progress, f"{name} ...")
        env = calibration_env(calibration, None, directory) if calibration else None
        row = run_capped(name, cfg, env) | {"link": None, "shaping": None}
    else:
        shape = LinkShape.parse(link)
        _say(progress, f"{name} over an emulated {shape} link: starting rpc-server in a network namespace ...")
        with emulated_host(shape, threads=threads(cfg)) as host:
            _say(progress, f"{name}: server at {host.endpoint} ({host.shaping}); loading, then generating ...")
            env = calibration_env(calibration, host.endpoint, directory)
            row = run_capped(name, replace(cfg, rpc_servers=host.endpoint, links=(str(shape),)), env)
        row |= {"link": str(shape), "shaping": host.shaping}
    _say(progress, f"{name}: " + (row["error"] if "error" in row else f"{row['tokens_per_s']:.2f} tok/s"))
    return row


def link_needs(rows: list[dict], local: dict | None, name: str) -> dict | None:
    """What a link must offer for contender `name` to decode faster than local, from its emulated rows
    (None with fewer than two delays, or without local): each decoded token's seconds fitted as
    c + k * RTT + 8 b / rate (b: the generation's bytes over the link per token, both ways, the
    prompts' included: an upper bound; least squares over the rows for c and k), then the largest
    round trip at which it still beats local's seconds per decoded token at any rate, and
    the least rate at which it does with no delay. Decode, not prefill: the prompt's one batch
    pays the round trips once, each decoded token pays them again."""
    pts = [
        (
            2 * LinkShape.parse(r["link"]).delay_s,
            sum(r["link_bytes"]["generate"]) / r["n_tokens"],
            LinkShape.parse(r["link"]).rate_bits,
            1 / r["decode"]["tokens_per_s"],
        )
        for r in rows
        if r["name"] == name and r.get("link") and r.get("link_bytes") and r["decode"]["tokens_per_s"]
    ]
    if local is None or not local.get("decode", {}).get("tokens_per_s") or len({p[0] for p in pts}) < 2:
        return None
    xs, ys = [p[0] for p in pts], [p[3] - 8 * p[1] / p[2] for p in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    c = my - k * mx
    per_token = sum(p[1] for p in pts) / len(pts)
    local_s = 1 / local["decode"]["tokens_per_s"]
    margin = local_s - c  # what the link may add to each decoded token
    return {
        "local_s_per_token": local_s,
        "compute_s_per_token": c,
        "round_trips_per_token": k,
        "link_bytes_per_token": per_token,
        "max_rtt_s": margin / k if margin > 0 and k > 0 else None,
        "min_rate_bits": 8 * per_token / margin if margin > 0 else None,
    }


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Every contender of `cfg` (the remote ones once per link), as `moespac bench --rpc/--link --json` prints."""
    check(cfg)
    with tempfile.TemporaryDirectory(prefix="moespac-bench-rpc-") as tmp:
        directory = Path(tmp)
        measured = {link: calibrate_link(cfg, link, directory, progress) for link in cfg.links}
        rows = [
            run_row(name, cfg, link, measured.get(link, next(iter(measured.values()), None)), directory, progress)
            for name in cfg.contenders
            for link in (cfg.links if name != "local" and cfg.links else (None,))
        ]
    local = next((r for r in rows if r["name"] == "local"), None)
    reference = local.get("outputs") if local else None
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "mode": "rpc",
        "model": cfg.model,
        "draft": cfg.model_draft,
        "mem_cap": cfg.mem_cap,
        "remote": "emulated on this machine (tools.netem)" if cfg.links else cfg.rpc_servers,
        "server_threads": threads(cfg) if cfg.links else None,
        "prompts": str(cfg.prompts),
        "limit": cfg.limit,
        "n_predict": cfg.n_predict,
        "calibration": {link: c["link"] for link, c in measured.items()},
        "results": report_rows(rows, reference),
        # auto's placement changes with the link: no one placement to fit
        "link_needs": {name: link_needs(rows, local, name) for name in cfg.contenders if name not in ("local", "auto")},
    }


def _both(pair: list[int] | None, per: int = 1) -> str:
    return "n/a" if pair is None else f"{format_size(pair[0] / per)} / {format_size(pair[1] / per)}"


def markdown(report: dict, cfg: BenchConfig) -> str:
    """The RPC report as a table under a caption saying what was compared, and what the link must
    offer where the sweep says."""
    remote = (
        f"an rpc-server emulated on this machine ({report['server_threads']} threads, in a network namespace "
        "behind a shaped veth pair: it shares this machine's cores)"
        if cfg.links
        else f"the rpc-server(s) at {cfg.rpc_servers}"
    )
    lines = [
        f"RPC mode: model `{Path(cfg.model).name}` ({format_size(os.path.getsize(cfg.model))}), draft "
        f"`{Path(cfg.model_draft).name if cfg.model_draft else '-'}`, cap "
        f"{format_size(cfg.mem_cap) if cfg.mem_cap else 'none'} on this machine's process, remote: {remote}; "
        f"{cfg.limit} prompts x {cfg.n_predict} tokens, greedy. Link: rate, one-way delay (a round trip is two); "
        "bytes over the link: sent / received, headers included; read: from storage while generating.",
        "",
        "| contender | link | placement | load s | tok/s | vs local | decode tok/s | read | link at load "
        "| link per token | slot copies (hit rate) | peak memory | same output |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    measured = report.get("calibration") or {}
    if measured:
        lines[1:1] = [
            "",
            "Calibrated before the rows (`moespac calibrate --rpc` over each link, a server of its own; what "
            "the runtime's choices read): "
            + "; ".join(
                f"{link}: {format_size(c['link_bps'])}/s, {c['round_trip_s'] * 1e3:.2f} ms a round trip, "
                f"{c['remote_s_per_token_expert'] * 1e6:.0f} us a remote expert"
                for link, c in measured.items()
            )
            + ".",
        ]
    local = next((r for r in report["results"] if r["name"] == "local" and "error" not in r), None)
    for r in report["results"]:
        link = f"{r['link']} ({r['shaping']})" if r.get("link") else ("-" if r["name"] == "local" else "real")
        if "error" in r:
            lines.append(f"| {r['name']} | {link} | error: {r['error']} ||||||||||")
            continue
        vs = f"{r['tokens_per_s'] / local['tokens_per_s']:.2f}x" if local else "-"
        lb = r["link_bytes"]
        same = {True: "yes", False: "NO"}.get(r.get("same_output"), "-")
        slots = r.get("slots")
        copies = f"{slots['copies']} ({slots['hit_rate']:.2f})" if slots else "-"
        lines.append(
            f"| {r['name']} | {link} | {r['placement']} | {r['load_s']:.1f} | {r['tokens_per_s']:.2f} | {vs} | "
            f"{r['decode']['tokens_per_s']:.2f} | {format_size(r['bytes_read'])} | "
            f"{_both(lb and lb['load'])} | {_both(lb and lb['generate'], r['n_tokens'])} | {copies} | "
            f"{format_size(r['peak_bytes']) if r['peak_bytes'] else '-'} | {same} |"
        )
    for name, needs in report["link_needs"].items():
        if needs is None:
            continue
        pays = needs["min_rate_bits"] is not None  # a margin over local's time is left for the link
        if not pays:
            rtt = rate = "none (never pays)"
        else:
            rate = f"{needs['min_rate_bits'] / 1e6:.1f} Mbit/s"
            rtt = (
                f"{needs['max_rtt_s'] * 1e3:.2f} ms"
                if needs["max_rtt_s"]
                else "any length (no cost per round trip measured)"
            )
        lines += [
            "",
            f"What the link must offer {name} (decode, fitted over its links above): each decoded token costs "
            f"{needs['compute_s_per_token'] * 1e3:.1f} ms without the link + "
            f"{max(needs['round_trips_per_token'], 0.0):.1f} round trips + "
            f"{format_size(needs['link_bytes_per_token'])} over the link, against "
            f"{needs['local_s_per_token'] * 1e3:.1f} ms locally: it decodes faster with a round trip under "
            f"{rtt} (at any rate) and a rate over {rate} (with no delay); both eat the same margin.",
        ]
    return "\n".join(lines)
