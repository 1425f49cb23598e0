"""Fixtures shared by the whole test-suite."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from moespac_gguf.core.child import rpc_server as start_rpc_server_process
from moespac_gguf.demo.synthetic import SyntheticSpec, write_synthetic_moe
from moespac_gguf.llama.devices import gpu_devices

# The CPU suite sees no GPU even on a GPU build (llama.cpp would offload to it); the GPU job of
# `make test` (MOESPAC_REQUIRE_GPU=1) runs the tests marked gpu with the device visible.
if os.environ.get("MOESPAC_REQUIRE_GPU") != "1":
    os.environ["MOESPAC_NO_GPU"] = "1"


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "harness_needs(*ops): the test's own harness (not the runtime) uses these residency.platform "
        "operations; skipped when MOESPAC_PLATFORM forces a table without them",
    )


def pytest_runtest_setup(item) -> None:
    marker = item.get_closest_marker("harness_needs")
    if marker is not None:
        from moespac_gguf.residency.platform import PLATFORM

        missing = [op for op in marker.args if not PLATFORM.can(op)]
        if missing:
            pytest.skip(f"the test's harness needs {', '.join(missing)}, which {PLATFORM.name}'s table lacks")


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need a ggml GPU device: skipped without one, failed instead when
    MOESPAC_REQUIRE_GPU=1 (the GPU job of `make test`, which must not pass by skipping)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items or gpu_devices():
        return
    if os.environ.get("MOESPAC_REQUIRE_GPU") == "1":
        raise pytest.UsageError("MOESPAC_REQUIRE_GPU=1 but this llama.cpp build shows no GPU device")
    skip = pytest.mark.skip(reason="no ggml GPU device (a GPU build, e.g. make test's Vulkan job, runs these)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_moe(tmp_path_factory) -> Callable[..., Path]:
    """Path factory for synthetic GGUF models, written once per spec per session.

    `tiny_moe()` is the default qwen3moe; `tiny_moe(arch="llama", expert_dtype="Q8_0")`
    or `tiny_moe(spec)` for anything else.
    """
    root = tmp_path_factory.mktemp("synthetic")
    cache: dict[SyntheticSpec, Path] = {}

    def make(spec: SyntheticSpec | None = None, **overrides) -> Path:
        spec = dataclasses.replace(spec or SyntheticSpec(), **overrides)
        if spec not in cache:
            cache[spec] = write_synthetic_moe(root / f"{len(cache)}-{spec.arch}.gguf", spec)
        return cache[spec]

    return make


@pytest.fixture(scope="session")
def rpc_server():
    """An RPC server for the whole session: (endpoint, process, log path). One, because ggml keeps
    every server added in its registry."""
    with start_rpc_server_process() as server:
        yield server.endpoint, server.proc, server.log_path


@pytest.fixture
def start_rpc_server():
    """A function starting a fresh RPC server for this test (one to kill): (endpoint, process);
    every one is stopped after the test."""
    with ExitStack() as servers:

        def start() -> tuple[str, subprocess.Popen]:
            server = servers.enter_context(start_rpc_server_process())
            return server.endpoint, server.proc

        yield start
