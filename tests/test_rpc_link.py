"""An emulated second host (tools.netem, issue 25): `moespac rpc-server` in a network namespace of
its own behind a shaped veth pair. A synthetic F32 MoE with every layer on it gives the local
greedy output; the link's counters and timings show that the weights and every token crossed a
link with the given rate and delay; nothing is left behind, not even by a creator killed outright.
Skipped, with the reason, where a namespace cannot be made (not root, no ip/tc, no netns).

The model runs in child processes (the RPC benchmark's, tools.bench_rpc): a process keeps every
RPC server it ever added, and ggml-rpc aborts it when one of them has gone (tests/test_rpc.py's)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from moespac_gguf import MoespacError, read_layout
from moespac_gguf.demo.synthetic import SyntheticSpec, vocab
from moespac_gguf.tools.bench import BenchConfig, run_capped
from moespac_gguf.tools.bench_rpc import link_needs, markdown
from moespac_gguf.tools.netem import LinkShape, RemoteHost, emulated_host, remove_leftovers

SPEC = SyntheticSpec(arch="qwen3moe", n_layer=3, n_embd=128, n_ff_exp=128, n_expert=8, seed=9)
# slow enough that the rate, not the delay, sets the load's time (5.5 MB: over 2 s) and that a round
# trip (40 ms) is several times a token's time without the delay (~10 ms over loopback)
LINK = LinkShape.parse("20mbit,20ms")
N_PREDICT = 10


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


def test_layers_over_a_shaped_link_give_the_local_output(tiny_moe, tmp_path):
    path = tiny_moe(SPEC)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "layers computed on another machine"}\n')
    cfg = BenchConfig(
        model=str(path), prompts=str(prompts), limit=1, n_predict=N_PREDICT, n_ctx=256, n_threads=1, links=(str(LINK),)
    )
    local = run_capped("local", cfg)
    with emulated() as host:
        remote = run_capped("local+rpc", replace(cfg, rpc_servers=host.endpoint))
    assert "error" not in local and "error" not in remote, (local, remote)
    assert remote["outputs"] == local["outputs"] and remote["n_tokens"] == N_PREDICT
    experts = read_layout(path).expert_bytes
    (sent_at_load, _), (_, received) = remote["link_bytes"]["load"], remote["link_bytes"]["generate"]
    # every expert tensor crossed the link at load, no faster than the rate
    assert sent_at_load > experts
    assert remote["load_s"] > 0.9 * sent_at_load * 8 / LINK.rate_bits
    # every token's logits came back over it (the output layer is remote), each at least a round trip later
    assert received > N_PREDICT * len(vocab()) * 4
    assert remote["seconds"] > N_PREDICT * 2 * LINK.delay_s
    assert local["link_bytes"] is None


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
            "placement": "fallback: budget off, all layers on the remote",
            "fallback": True,
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
    needs = link_needs(rows, local)
    assert needs["compute_s_per_token"] == pytest.approx(c) and needs["round_trips_per_token"] == pytest.approx(k)
    margin = 0.2 - c  # local: 5 tok/s
    assert needs["max_rtt_s"] == pytest.approx(margin / k) and needs["min_rate_bits"] == pytest.approx(8 * b / margin)
    assert link_needs(rows[:2], local) is None  # one delay: nothing to fit
    cfg = BenchConfig(model=str(tiny_moe(SPEC)), links=tuple(r["link"] for r in rows[1:]))
    table = markdown({"results": rows, "server_threads": 2, "link_needs": needs}, cfg)
    assert f"a round trip under {margin / k * 1e3:.2f} ms" in table and "fallback:" in table
