"""An emulated second host: `moespac rpc-server` in a network namespace of its own, reached over a
veth pair whose two ends are shaped to a link's rate and one-way delay, for the tests and
`moespac bench --link RATE,DELAY`.

`emulated_host(LinkShape.parse("1gbit,1ms"))` creates the namespace (`moespac-PID-N`), the veth
pair (`mpPIDhN` here, `mpPIDnN` inside) with private addresses (10.213.x.y/30: .1 here, .2
inside), shapes both ends, starts the server inside (`ip netns exec`) and yields once the server
accepts connections through the link. Shaping: `tc qdisc ... netem delay D rate R` on both ends
where the kernel has netem; where it has not (sch_netem missing, as in some containers), tbf
shapes the rate on both ends and a delay relay inside the namespace (tools.delay_relay) holds
every byte D in each direction in front of the server. Either way a round trip takes 2 D more,
and every byte between this host and the server crosses the host-side veth, whose counters
(`RemoteHost.link_bytes`) measure the traffic.

The server and the relay are children of the process that enters the context, outside any memory
cgroup a benchmark puts its contenders in (the server stands for another machine), and die with
it (PR_SET_PDEATHSIG). However the block ends (an exception, Ctrl-C), the processes are stopped,
the veth pair and the namespace deleted. A process killed outright leaves its namespace behind:
the next `emulated_host`, of any process, removes those whose creator is gone (their processes
killed first). Linux, root, iproute2's `ip` and `tc`; otherwise a one-line MoespacError.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import pid_alive
from ..core.child import RpcServer, listening_child, rpc_server
from ..core.errors import MoespacError

PREFIX = "moespac-"  # namespaces: moespac-PID-N
_NAMESPACE = re.compile(r"moespac-(\d+)-\d+")
_HOST_VETH = re.compile(r"mp(\d+)h\d+")
RPC_PORT = 50052  # the server's port inside the namespace (llama.cpp's default)
RELAY_PORT = RPC_PORT + 1  # the delay relay's, in front of it, where tbf shapes the rate
NETEM_LIMIT = 100_000  # packets a netem queue holds (its default 1000 drops at 10 Gbit/s x 1 ms)
TBF_LATENCY = "100ms"  # the longest a packet waits in a tbf queue before it is dropped
_serial = itertools.count()

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|tbit)\s*$", re.IGNORECASE)
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_DELAY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s)\s*$", re.IGNORECASE)
_DELAY_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass(frozen=True)
class LinkShape:
    """A link's rate (bits/s, each direction) and one-way delay (seconds): a round trip takes 2 delays."""

    rate_bits: int
    delay_s: float

    @classmethod
    def parse(cls, text: str) -> LinkShape:
        """'RATE,DELAY' in tc's units, e.g. '1gbit,1ms', '100mbit,5ms', '10gbit,200us'; else a MoespacError."""
        rate, _, delay = str(text).partition(",")
        r, d = _RATE.match(rate), _DELAY.match(delay)
        if not r or not d:
            raise MoespacError(f"--link takes RATE,DELAY (e.g. 1gbit,1ms or 100mbit,5ms), not {text!r}")
        shape = cls(
            int(float(r.group(1)) * _RATE_UNITS[r.group(2).lower()]),
            float(d.group(1)) * _DELAY_UNITS[d.group(2).lower()],
        )
        if shape.rate_bits < 8000:
            raise MoespacError(f"--link {text}: the rate must be at least 8kbit")
        return shape

    def __str__(self) -> str:
        rate = next(f"{self.rate_bits / s:g}{u}" for u, s in reversed(_RATE_UNITS.items()) if self.rate_bits >= s)
        delay = f"{self.delay_s * 1e3:g}ms" if self.delay_s >= 1e-3 or not self.delay_s else f"{self.delay_s * 1e6:g}us"
        return f"{rate},{delay}"


def link_bytes(stats_dir: str | os.PathLike) -> tuple[int, int]:
    """(sent, received) bytes so far through a host-side network device, from its statistics
    directory (/sys/class/net/DEV/statistics): its tx and rx counters, headers included."""
    d = Path(stats_dir)
    return int((d / "tx_bytes").read_text()), int((d / "rx_bytes").read_text())


def stats_dir_for(address: str) -> str | None:
    """The statistics directory of the host-side veth of the emulated link that reaches `address`
    (an emulated host's address: its /30 is on that veth), or None when no emulated link does."""
    target = ipaddress.ip_address(address)
    for line in _run("ip", "-o", "-4", "addr", what="ip addr").stdout.splitlines():
        fields = line.split()
        dev, inet = fields[1], fields[3]
        if _HOST_VETH.fullmatch(dev) and target in ipaddress.ip_interface(inet).network:
            return f"/sys/class/net/{dev}/statistics"
    return None


@dataclass
class RemoteHost:
    """The emulated host while the context lasts: `endpoint` is what --rpc takes."""

    endpoint: str
    shape: LinkShape
    shaping: str  # "netem", or "tbf + delay relay" (or "tbf" without a delay) where the kernel lacks netem
    namespace: str
    stats_dir: str  # the host-side veth's statistics: link_bytes(stats_dir)
    server: RpcServer
    relay: subprocess.Popen | None  # the delay relay in front of the server, where there is one

    def link_bytes(self) -> tuple[int, int]:
        """(sent to, received from) the emulated host so far, in bytes."""
        return link_bytes(self.stats_dir)

    def cut(self) -> None:
        """The link goes silent, as a pulled cable or a machine losing power: the host-side veth
        goes down, so packets are dropped and nothing closes the connection."""
        _run("ip", "link", "set", Path(self.stats_dir).parent.name, "down", what="cannot cut the link")

    def kill(self) -> None:
        """SIGKILL the server and its relay: the other machine goes away, its endpoint refuses
        connections (a client talking to it sees what it would see then)."""
        for proc in (self.relay, self.server.proc):
            if proc is not None:
                proc.kill()
                proc.wait()


def _run(*cmd: str, what: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MoespacError(f"{what}: {' '.join(cmd)}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return proc


def check_can_emulate() -> None:
    """A one-line MoespacError saying why a link cannot be emulated here (not Linux, not root, no ip/tc)."""
    if not sys.platform.startswith("linux"):
        raise MoespacError(f"emulating a link needs Linux network namespaces, not {sys.platform}: give --rpc HOST:PORT")
    if os.geteuid() != 0:
        raise MoespacError("emulating a link needs root (network namespaces, tc): run as root or give --rpc HOST:PORT")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise MoespacError(f"emulating a link needs iproute2's ip and tc ({' and '.join(missing)} not found)")


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", what="cannot list network namespaces").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _delete(namespace: str | None, host_veth: str | None) -> None:
    """Kill what still runs in `namespace` (by pid), delete the veth pair and the namespace;
    what is already gone is skipped."""
    if namespace is not None:
        pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    if host_veth is not None and Path("/sys/class/net", host_veth).exists():
        subprocess.run(["ip", "link", "del", host_veth], capture_output=True)  # deletes its peer too
    if namespace is not None:
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


def remove_leftovers() -> list[str]:
    """Delete the namespaces and host-side veths of emulated hosts whose creating process is gone
    (killed before it could clean up); returns their names."""
    gone = []
    for name in _namespaces():
        m = _NAMESPACE.fullmatch(name)
        if m and not pid_alive(int(m.group(1))):
            _delete(name, None)
            gone.append(name)
    for dev in os.listdir("/sys/class/net"):
        m = _HOST_VETH.fullmatch(dev)
        if m and not pid_alive(int(m.group(1))):
            _delete(None, dev)
            gone.append(dev)
    return gone


def _free_subnet() -> tuple[str, str]:
    """(host, inside) addresses of a 10.213.x.y/30 no address here uses, searched from one this
    process's id picks (two processes creating hosts at once start apart)."""
    used = set(re.findall(r"inet (10\.213\.\d+\.\d+)/", _run("ip", "-o", "-4", "addr", what="ip addr").stdout))
    start = os.getpid() % 16384
    for k in range(start, start + 16384):
        net = f"10.213.{(k % 16384) >> 6}."
        host, inside = net + str((k & 63) * 4 + 1), net + str((k & 63) * 4 + 2)
        if host not in used and inside not in used:
            return host, inside
    raise MoespacError("no free /30 left in 10.213.0.0/16 for an emulated link")


def _qdisc(dev: str, namespace: str | None, spec: list[str]) -> subprocess.CompletedProcess:
    where = ["ip", "netns", "exec", namespace] if namespace else []
    return subprocess.run([*where, "tc", "qdisc", "add", "dev", dev, "root", *spec], capture_output=True, text=True)


def _shape(ends: list[tuple[str, str | None]], shape: LinkShape) -> str:
    """Shape both `ends` (device, namespace) to `shape`: netem where the kernel has it, else tbf
    (the rate; the delay is then the relay's). Returns which."""
    netem = [
        "netem",
        "delay",
        f"{shape.delay_s * 1e6:.0f}us",
        "rate",
        f"{shape.rate_bits}bit",
        "limit",
        str(NETEM_LIMIT),
    ]
    first = _qdisc(*ends[0], netem)
    if first.returncode == 0:
        kind, spec = "netem", netem
    elif "unknown" in first.stderr.lower():  # "Specified qdisc kind is unknown": no sch_netem
        burst = max(shape.rate_bits // 8 // 1000, 1 << 16)  # a millisecond at the rate, at least a GSO packet
        spec = ["tbf", "rate", f"{shape.rate_bits}bit", "burst", str(burst), "latency", TBF_LATENCY]
        kind = "tbf + delay relay" if shape.delay_s else "tbf"
    else:
        raise MoespacError(f"cannot shape {ends[0][0]} with netem: {first.stderr.strip() or 'tc failed'}")
    for dev, namespace in ends[1:] if kind == "netem" else ends:
        proc = _qdisc(dev, namespace, spec)
        if proc.returncode != 0:
            raise MoespacError(f"cannot shape {dev} with {spec[0]}: {proc.stderr.strip() or 'tc failed'}")
    return kind


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the process that started it dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


@contextmanager
def emulated_host(shape: LinkShape, threads: int = 1, timeout: float = 60.0) -> Iterator[RemoteHost]:
    """An RPC server `threads` wide behind a link shaped to `shape`, while the block runs (the
    module's docstring: namespace, veth pair, shaping, cleanup). MoespacError in one line when it
    cannot be made here (check_can_emulate, or the namespace, veth or qdisc refused)."""
    check_can_emulate()
    remove_leftovers()
    n = next(_serial)
    namespace, host_veth, inner_veth = f"{PREFIX}{os.getpid()}-{n}", f"mp{os.getpid()}h{n}", f"mp{os.getpid()}n{n}"
    host_ip, inner_ip = _free_subnet()
    inside = ("ip", "netns", "exec", namespace)
    try:
        _run("ip", "netns", "add", namespace, what="cannot create a network namespace")
        _run(
            "ip", "link", "add", host_veth, "type", "veth", "peer", "name", inner_veth, what="cannot create a veth pair"
        )
        _run("ip", "link", "set", inner_veth, "netns", namespace, what="cannot move a veth into the namespace")
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_veth, what="cannot address the veth")
        _run("ip", "link", "set", host_veth, "up", what="cannot bring the veth up")
        for cmd in (
            ["addr", "add", f"{inner_ip}/30", "dev", inner_veth],
            ["link", "set", inner_veth, "up"],
            ["link", "set", "lo", "up"],
        ):
            _run(*inside, "ip", *cmd, what="cannot set up the namespace's network")
        shaping = _shape([(host_veth, None), (inner_veth, namespace)], shape)
        with ExitStack() as stack:
            server = stack.enter_context(
                rpc_server(inner_ip, RPC_PORT, threads, inside, timeout, preexec_fn=_die_with_parent)
            )
            endpoint, relay = server.endpoint, None
            if shaping == "tbf + delay relay":
                cmd = [*inside, sys.executable, "-m", "moespac_gguf.tools.delay_relay"]
                cmd += [f"{inner_ip}:{RELAY_PORT}", endpoint, repr(shape.delay_s)]
                relay, _ = stack.enter_context(
                    listening_child(cmd, inner_ip, RELAY_PORT, "the delay relay", timeout, _die_with_parent)
                )
                endpoint = f"{inner_ip}:{RELAY_PORT}"
            stats = f"/sys/class/net/{host_veth}/statistics"
            yield RemoteHost(endpoint, shape, shaping, namespace, stats, server, relay)
    finally:
        _delete(namespace, host_veth)
