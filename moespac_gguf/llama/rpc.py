"""llama.cpp's RPC backend: another machine's memory and compute as more ggml devices.

`moespac rpc-server` serves this machine's CPU over TCP (`serve`); `--rpc HOST:PORT` makes a
server's devices available to llama.cpp (`add_servers`), which puts layers there first, as its
own `--rpc` does. Everything goes through the generic registry calls (the "RPC" backend's proc
addresses), as llama.cpp's tools reach it. The protocol has no authentication: a server must
only be reachable on a trusted network.

ggml-rpc aborts the whole process when a server it talks to fails (connecting, the handshake,
or any later call). `add_servers` therefore first connects to each endpoint itself, so an
unreachable server is a one-line error, not an abort; a server that dies mid-generation still
ends the process (issue 25).
"""

from __future__ import annotations

import ctypes
import socket

from ..core.errors import MoespacError
from .devices import GGML_BACKEND_DEVICE_TYPE_CPU, _ggml

_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)
_START_SERVER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)
)
_added: dict[str, int] = {}  # endpoint -> its registry entry (ggml_backend_register takes each once)


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


def add_servers(endpoints: list[str], timeout: float = 5.0) -> None:
    """Make the devices of the RPC servers at `endpoints` available to llama.cpp (before a model
    loads). A server that cannot be reached, or has no device, is a MoespacError."""
    for endpoint in endpoints:
        if endpoint in _added:
            continue
        host, port = parse_endpoint(endpoint)
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            raise MoespacError(f"cannot reach the RPC server at {endpoint}: {e.strerror or e}") from None
        reg = _ADD_SERVER(_proc("ggml_backend_rpc_add_server"))(endpoint.encode())
        if not reg:
            raise MoespacError(f"the RPC server at {endpoint} has no device")
        _ggml.ggml_backend_register(reg)
        _added[endpoint] = reg


def serve(host: str, port: int, n_threads: int, cache_dir: str | None = None) -> None:
    """Serve this machine's CPU to RPC clients at HOST:PORT until the process ends (blocks)."""
    start = _START_SERVER(_proc("ggml_backend_rpc_start_server"))
    devices = (ctypes.c_void_p * 1)(_ggml.ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU))
    start(f"{host}:{port}".encode(), cache_dir.encode() if cache_dir else None, n_threads, 1, devices)
