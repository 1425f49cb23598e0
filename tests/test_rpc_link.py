"""An emulated second host (tools.netem, issue 25): `moespac rpc-server` in a network namespace of
its own behind a shaped veth pair. A synthetic F32 MoE with every layer on it gives the local
greedy output; the link's counters and timings show that the weights and every token crossed a
link with the given rate and delay; nothing is left behind, not even by a creator killed outright.
Skipped, with the reason, where a namespace cannot be made (not root, no ip/tc, no netns).

The model runs in child processes (the RPC benchmark's, tools.bench_rpc): a process keeps every
RPC server it ever added, and ggml-rpc aborts it when one of them has gone (tests/test_rpc.py's)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from moespac_gguf import MoeSpac, MoespacError, read_layout
from moespac_gguf.core.errors import RemoteDeviceLost
from moespac_gguf.demo.synthetic import SyntheticSpec, vocab
from moespac_gguf.residency.costs import load_costs
from moespac_gguf.residency.remote import remote_slot_share
from moespac_gguf.tools.bench import BenchConfig, run_capped
from moespac_gguf.tools.bench_rpc import link_needs, markdown
from moespac_gguf.tools.netem import LinkShape, RemoteHost, emulated_host, remove_leftovers

SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=128, n_ff_exp=128, n_expert=8, seed=9)
# a round trip (40 ms) is several times a token's time without the delay (~10 ms over loopback)
LINK = LinkShape.parse("20mbit,20ms")
N_PREDICT = 10
# this machine's figures in the calibrations below, and a server profile for which every remote
# slot pays: a server 10x faster per expert than this machine over a link that costs nothing
BASE = dict(flash_read_bps=1e9, memcpy_bps=5e9, mem_bps=9e9, cpu_s_per_token_expert=2e-4, page_in_latency_s=1e-4)
PAYS = dict(remote_s_per_token_expert=2e-5, link_bps=1e10, round_trip_s=1e-6)


@contextmanager
def emulated(shape: LinkShape = LINK) -> Iterator[RemoteHost]:
    """emulated_host, or a skip saying why it cannot be made here."""
    with ExitStack() as stack:
        try:
            host = stack.enter_context(emulated_host(shape))
        except MoespacError as e:
            pytest.skip(f"no emulated link here: {e}")
        yield host


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_profile(directory: Path, endpoint: str, link: dict) -> Path:
    """A calibration (the runtime's, where MOESPAC_CACHE is `directory`) whose profile of the server
    at `endpoint` is `link` (residency.costs.RPC_KEYS), this machine's own figures fixed."""
    calibration = directory / "calibration.json"
    calibration.write_text(json.dumps({**BASE, "rpc": {endpoint: {"device": "RPC0", **link}}}))
    return calibration


def test_experts_in_remote_slots_over_a_shaped_link_give_the_local_output(tiny_moe, tmp_path, monkeypatch):
    """Planned for a link that pays (PAYS), the hot experts are copied across the emulated link
    into the server's slots and computed there; the greedy output is the local one."""
    path = tiny_moe(SPEC)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "layers computed on another machine"}\n')
    cfg = BenchConfig(
        model=str(path),
        prompts=str(prompts),
        limit=1,
        n_predict=N_PREDICT,
        n_ctx=256,
        n_threads=1,
        links=(str(LINK),),
        mem_cap=1 << 30,  # the residency engine on: the tier's placement, the experts here (MoeSpac._rpc_placement)
    )
    local = run_capped("local", cfg)
    monkeypatch.setenv("MOESPAC_CACHE", str(tmp_path))  # the children's calibration: link_profile's
    with emulated() as host:
        link_profile(tmp_path, host.endpoint, PAYS)
        remote = run_capped("local+rpc", replace(cfg, rpc_servers=host.endpoint))
    assert "error" not in local and "error" not in remote, (local, remote)
    assert remote["outputs"] == local["outputs"] and remote["n_tokens"] == N_PREDICT
    slots = remote["slots"]
    assert slots["device"].startswith("RPC0") and slots["copies"] > 0 and slots["hit_rate"] > 0
    (sent_at_load, _), (sent, received) = remote["link_bytes"]["load"], remote["link_bytes"]["generate"]
    # the layers (the output layer among them) crossed at load, the experts' copies while generating
    assert sent_at_load > SPEC.n_embd * len(vocab()) * 4 and sent > slots["copied_bytes"]
    # every token's logits came back over it, each at least a round trip after its inputs went
    assert received > N_PREDICT * len(vocab()) * 4
    assert remote["seconds"] > N_PREDICT * 2 * LINK.delay_s
    assert local["link_bytes"] is None and local["slots"] is None


def test_both_ends_are_shaped_a_gone_host_is_one_line_and_nothing_is_left_behind(tiny_moe):
    with emulated() as host:
        veth = Path(host.stats_dir).parent.name
        assert host.namespace in namespaces()
        here = subprocess.run(["tc", "qdisc", "show", "dev", veth], capture_output=True, text=True).stdout
        inside = subprocess.run(
            ["ip", "netns", "exec", host.namespace, "tc", "qdisc", "show"], capture_output=True, text=True
        ).stdout
        for qdiscs in (here, inside):
            assert "rate 20Mbit" in qdiscs and ("netem" in qdiscs or "tbf" in qdiscs), qdiscs
        sent, received = host.link_bytes()
        assert sent > 0 and received > 0  # the readiness probes crossed it
        host.kill()  # the other machine goes away: reaching it is a one-line error, not ggml-rpc's abort
        run = [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", str(tiny_moe(SPEC)), "-p", "x", "-n", "1"]
        r = subprocess.run([*run, "--rpc", host.endpoint], capture_output=True, text=True)
        assert r.returncode == 2 and f"cannot reach the RPC server at {host.endpoint}" in r.stderr, r.stderr
    assert host.namespace not in namespaces()
    assert not Path(host.stats_dir).exists()
    assert host.server.proc.poll() is not None


def test_a_cut_link_ends_the_request_in_seconds_and_the_model_runs_on(tiny_moe):
    """A server that goes silent (the link cut: nothing closes the connection) is noticed by the
    client sockets' keepalive and send timeout (patches/0015), not waited for forever: the request
    ends with the one-line RemoteDeviceLost and the instance answers the next one here."""
    path = tiny_moe(SPEC)
    with MoeSpac(path, n_ctx=2048, mem_budget="off") as local:
        local.create_completion("a cable pulled", max_tokens=16)
        expected = local.completion_tokens
    with emulated(LinkShape.parse("1gbit,1ms")) as host:
        with MoeSpac(path, n_ctx=2048, mem_budget="off", rpc_servers=[host.endpoint]) as m:
            with pytest.raises(RemoteDeviceLost, match=f"the RPC server at {host.endpoint} stopped answering"):
                for i, _ in enumerate(m.create_completion("a cable pulled", max_tokens=2000, stream=True)):
                    if i == 3:
                        host.cut()
                        cut = time.monotonic()
            assert time.monotonic() - cut < 30
            m.create_completion("a cable pulled", max_tokens=16)
            assert m.completion_tokens == expected


def test_a_killed_creators_namespace_is_removed_on_next_use():
    creator = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom moespac_gguf.tools.netem import LinkShape, emulated_host\n"
            "with emulated_host(LinkShape.parse('1gbit,1ms')) as h:\n"
            "    print(h.namespace, flush=True)\n    sys.stdin.read()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    namespace = creator.stdout.readline().strip()
    creator.kill()
    creator.wait()
    if not namespace:
        pytest.skip(f"no emulated link here: {creator.stderr.read().strip().splitlines()[-1:]}")
    assert namespace in namespaces()  # SIGKILL: no cleanup ran
    deadline = time.monotonic() + 10  # its server and relay die with it (PR_SET_PDEATHSIG)
    while subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, "the server outlived its creator"
        time.sleep(0.1)
    assert namespace in remove_leftovers()
    assert namespace not in namespaces()


def test_rpc_bench_errors_are_one_line(tiny_moe):
    model = ["-m", str(tiny_moe(SPEC))]
    cases = [
        (["--mem-cap", "0", "--link", "1gbit"], "--link takes RATE,DELAY"),
        (["--mem-cap", "0", "--link", "1gbit,1ms", "--rpc", "127.0.0.1:50052"], "--rpc HOST:PORT (real servers) or"),
        (["--link", "1gbit,1ms"], "the RPC mode needs --mem-cap SIZE"),
        (["--mem-cap", "0", "--rpc", "127.0.0.1:50052", "--contenders", "llama.cpp"], "unknown RPC contender"),
        (["--mem-cap", "0", "--rpc", "localhost"], "--rpc takes HOST:PORT"),
    ]
    for args, msg in cases:
        r = subprocess.run(
            [sys.executable, "-m", "moespac_gguf.cli", "bench", *model, *args], capture_output=True, text=True
        )
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and msg in r.stderr, (args, r.stderr)


def test_link_needs_recovers_a_links_cost_from_the_sweep(tiny_moe):
    """Rows whose decode follows c + k * RTT + 8 b / rate exactly give back c and k, and the
    break-even round trip and rate; the table says what the link must offer."""
    c, k, b = 0.05, 40, 500_000  # seconds, round trips, bytes per token

    def row(link: str) -> dict:
        shape = LinkShape.parse(link)
        s_per_token = c + k * 2 * shape.delay_s + 8 * b / shape.rate_bits
        return {
            "name": "local+rpc",
            "link": link,
            "shaping": "netem",
            "placement": "+ remote device, budget off",
            "load_s": 1.0,
            "tokens_per_s": 1 / s_per_token,
            "n_tokens": 10,
            "seconds": 10 * s_per_token,
            "bytes_read": 0,
            "decode": {"tokens_per_s": 1 / s_per_token},
            "link_bytes": {"load": [10**6, 10**3], "generate": [10 * b, 0]},
            "peak_bytes": 0,
            "same_output": True,
        }

    local = row("100gbit,0ms") | {"name": "local", "link": None, "link_bytes": None, "decode": {"tokens_per_s": 5.0}}
    rows = [local] + [row(link) for link in ("100mbit,5ms", "1gbit,1ms", "10gbit,200us")]
    needs = link_needs(rows, local, "local+rpc")
    assert needs["compute_s_per_token"] == pytest.approx(c) and needs["round_trips_per_token"] == pytest.approx(k)
    margin = 0.2 - c  # local: 5 tok/s
    assert needs["max_rtt_s"] == pytest.approx(margin / k) and needs["min_rate_bits"] == pytest.approx(8 * b / margin)
    assert link_needs(rows[:2], local, "local+rpc") is None  # one delay: nothing to fit
    cfg = BenchConfig(model=str(tiny_moe(SPEC)), links=tuple(r["link"] for r in rows[1:]))
    table = markdown({"results": rows, "server_threads": 2, "link_needs": {"local+rpc": needs}}, cfg)
    assert f"a round trip under {margin / k * 1e3:.2f} ms" in table


def test_calibrate_measures_the_emulated_link(tiny_moe, tmp_path):
    """`moespac calibrate --rpc` over the link measures what residency.plan charges a remote slot: a
    bandwidth within the link's rate and a round trip of at least two delays; with those figures
    the balancer plans a smaller share of a fast server's slots than over a link that costs
    nothing (residency.remote.remote_slot_share). The server's own speed is PAYS's: the emulated
    one computes on this machine's cores, no faster than local, so no link would make it pay."""
    shape, out = LinkShape.parse("50mbit,5ms"), tmp_path / "calibration.json"
    with emulated(shape) as host:
        cmd = [sys.executable, "-m", "moespac_gguf.cli", "calibrate", "-m", str(tiny_moe(SPEC)), "--out", str(out)]
        r = subprocess.run([*cmd, "--rpc", host.endpoint], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        link = json.loads(out.read_text())["rpc"][host.endpoint]
    assert 0.3 * shape.rate_bits / 8 < link["link_bps"] < 1.05 * shape.rate_bits / 8
    assert link["round_trip_s"] > 2 * shape.delay_s
    # the same fast server behind the link as measured: the balancer plans fewer of its slots
    measured = {k: link[k] for k in ("link_bps", "round_trip_s")}
    layout = read_layout(tiny_moe(SPEC))
    share = {
        name: remote_slot_share(load_costs(rpc="x:1", path=link_profile(tmp_path, "x:1", profile)), layout)
        for name, profile in (("pays", PAYS), ("measured", PAYS | measured))
    }
    assert share["pays"] > 0 and share["measured"] < share["pays"], share
