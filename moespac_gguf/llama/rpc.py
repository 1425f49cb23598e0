"""llama.cpp's RPC backend: another machine's memory and compute as more ggml devices.

`moespac rpc-server` serves this machine's CPU over TCP (`serve`); `--rpc HOST:PORT` makes a
server's devices available to llama.cpp (`add_servers`), which puts layers there first, as its
own `--rpc` does. Everything goes through the generic registry calls (the "RPC" backend's proc
addresses), as llama.cpp's tools reach it. The protocol has no authentication: a server must
only be reachable on a trusted network.

A server that stops answering (killed, its machine gone, the link cut: patches/0015 notices a
silent peer in about 10 s) fails its connection instead of aborting the process: every later
call on it completes without I/O. `Link` compares ggml-rpc's count of lost connections around
a decode and turns a loss into RemoteDeviceLost, so that decode's results are discarded; the
lost endpoint's devices are then left out of `usable_devices` (a model loaded afterwards runs
without them) until `add_servers` reaches the server again. `add_servers` also connects to
each endpoint itself first, so an unreachable server is a one-line error.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence

from ..core.errors import MoespacError, RemoteDeviceLost
from .abi import last_log_line
from .devices import GGML_BACKEND_DEVICE_TYPE_CPU, Device, _ggml, rpc_devices

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
)
_FAILURES = ctypes.CFUNCTYPE(ctypes.c_uint64)
_added: dict[str, int] = {}  # endpoint -> its registry entry (ggml_backend_register takes each once)
_lost: set[str] = set()  # endpoints whose connection was lost, until add_servers reaches them again


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST:PORT -> (host, port), or a one-line MoespacError."""
    host, sep, port = str(endpoint).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MoespacError(f"--rpc takes HOST:PORT (e.g. 192.168.1.20:50052), not {endpoint!r}")
    return host.strip("[]"), int(port)


def _proc(name: str):
    reg = _ggml.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise MoespacError("this llama.cpp build has no RPC backend: rebuild it (scripts/setup.sh adds -DGGML_RPC=ON)")
    address = _ggml.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise MoespacError(f"this llama.cpp build's RPC backend lacks {name}")
    return address


def add_servers(endpoints: Sequence[str], timeout: float = 5.0) -> None:
    """Make the devices of the RPC servers at `endpoints` available to llama.cpp (before a model
    loads). A server that cannot be reached, or has no device, is a MoespacError."""
    for endpoint in endpoints:
        if endpoint in _added and endpoint not in _lost:
            continue
        host, port = parse_endpoint(endpoint)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise MoespacError(f"cannot reach the RPC server at {endpoint}: {e.strerror or e}") from None
        _lost.discard(endpoint)
        if endpoint in _added:
            continue
        reg = _ADD_SERVER(_proc("ggml_backend_rpc_add_server"))(endpoint.encode())
        if not reg:
            raise MoespacError(f"the RPC server at {endpoint} has no device")
        _ggml.ggml_backend_register(reg)
        _added[endpoint] = reg


def usable_devices(endpoints: Sequence[str]) -> list[Device]:
    """The devices of the servers at `endpoints` (added) that a model may be put on now: those
    not lost since they were added."""
    return [d for d in rpc_devices(endpoints) if d.description not in _lost]


def _failures() -> int:
    """ggml-rpc's count of connections lost so far in this process (patches/0015)."""
    global _count_failures
    if _count_failures is None:
        _count_failures = _FAILURES(_proc("ggml_backend_rpc_moespac_failures"))
    return int(_count_failures())


_count_failures = None


class Link:
    """The RPC connections one model's calls depend on (none: every check is free)."""

    def __init__(self, devices: list[Device]):
        self.endpoints = [d.description for d in devices]
        self._seen = _failures() if self.endpoints else 0

    def check(self) -> None:
        """RemoteDeviceLost when a connection was lost since the last check: the calls since then
        computed from zeroed data. The endpoint comes from ggml-rpc's log line naming it."""
        if not self.endpoints or _failures() == self._seen:
            return
        self._seen = _failures()
        endpoint, _, why = last_log_line("RPC server ").partition(" stopped answering: ")
        if endpoint in _added and endpoint not in self.endpoints:
            return  # another model's server
        if endpoint not in self.endpoints:  # the line is gone: name the only candidate, or all
            endpoint = ",".join(self.endpoints)
        _lost.update(endpoint.split(","))
        raise RemoteDeviceLost(endpoint, f"the RPC server at {endpoint} stopped answering ({why or 'connection lost'})")


def serve(host: str, port: int, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU to RPC clients at HOST:PORT until the process ends (blocks)."""
    start = _START_SERVER(_proc("ggml_backend_rpc_start_server"))
    devices = (ctypes.c_void_p * 1)(_ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU))
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devices)
