"""Child processes that listen: a server of ours started on a free port, ready once it accepts a
TCP connection, stopped with SIGTERM (then SIGKILL) however the block ends; `moespac rpc-server`
that way (`rpc_server`, also under a command prefix such as `ip netns exec NS`). Standard library
only (and the package's errors), so the tests, `server.process` and `tools.netem` share it
without loading llama.cpp."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import MoespacError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def stop(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns once the process has exited."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RpcServer:
    endpoint: str  # HOST:PORT, as --rpc takes it
    proc: subprocess.Popen
    log_path: str  # its stdout and stderr (removed when it stops)

    def log(self) -> str:
        return read_log(self.log_path)


def _wait_accepting(host: str, port: int, proc: subprocess.Popen, what: str, log_path: str, timeout: float) -> None:
    """Return once HOST:PORT accepts a TCP connection; a one-line MoespacError (with the last line
    of the log at `log_path`) if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not listening after {timeout:g} s"
            last = (read_log(log_path).strip().splitlines() or ["no output"])[-1]
            raise MoespacError(f"{what} at {host}:{port} {why}: {last}")
        time.sleep(0.1)


@contextmanager
def listening_child(
    cmd: list[str], host: str, port: int, what: str, timeout: float = 60.0, preexec_fn=None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`cmd` in a child process (stdout and stderr to a log), ready when this yields (the process,
    the log's path): HOST:PORT accepted a TCP connection. However the block ends, the child is stopped (SIGTERM, then SIGKILL)
    and its log removed. A child that exits or does not listen within `timeout` seconds is a
    MoespacError naming `what`, with the log's last line."""
    log = tempfile.NamedTemporaryFile("w", prefix="moespac-child-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    try:
        _wait_accepting(host, port, proc, what, log.name, timeout)
        yield proc, log.name
    finally:
        stop(proc, grace=5)
        log.close()
        os.unlink(log.name)


@contextmanager
def rpc_server(
    host: str = "127.0.0.1",
    port: int | None = None,
    threads: int = 1,
    prefix: tuple[str, ...] = (),
    timeout: float = 60.0,
    preexec_fn=None,
) -> Iterator[RpcServer]:
    """`moespac rpc-server --host HOST --port PORT -t THREADS` as a listening_child, run under the
    command `prefix` (e.g. `ip netns exec NS`; `port` default: a free one here)."""
    port = port or free_port()
    cmd = [*prefix, sys.executable, "-m", "moespac_gguf.cli", "rpc-server", "--host", host, "--port", str(port)]
    with listening_child([*cmd, "-t", str(threads)], host, port, "moespac rpc-server", timeout, preexec_fn) as child:
        yield RpcServer(f"{host}:{port}", *child)
