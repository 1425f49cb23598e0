"""`moespac serve` in a child process, for a program that wants a local server of its own (an app,
a test, a script): started on a free localhost port, ready once /health answers, stopped with
SIGTERM (then SIGKILL) on exit (`moespac rpc-server` the same way: core.child). Standard library
only (and the package's core): importing it does not load the server or llama.cpp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..core.child import free_port, read_log, stop


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    log_path: str

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url."""
        return f"{self.url}/v1"

    def log(self) -> str:
        return read_log(self.log_path)

    def get_json(self, path: str, headers: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())


def _health(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def serve(*args: str, timeout: float = 180.0, env: dict | None = None) -> Iterator[Server]:
    """`moespac serve ARGS --port P` in a child process, ready when this yields; AssertionError
    with the server's log if it exits or does not answer within `timeout` seconds."""
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="moespac-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "moespac_gguf.cli", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", proc, log.name)
    try:
        deadline = time.monotonic() + timeout
        while not _health(server.url):
            if proc.poll() is not None:
                raise AssertionError(f"moespac serve exited with {proc.returncode}:\n{server.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"moespac serve did not answer /health in {timeout} s:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(proc)
        log.close()
        os.unlink(log.name)
