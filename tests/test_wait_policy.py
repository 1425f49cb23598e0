"""OMP_WAIT_POLICY as llama/abi.py chooses it before libllama loads (docs/results.md §2.5)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from moespac_gguf.llama import abi


def test_a_value_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    monkeypatch.setattr(abi, "busy_cpus", lambda: 2)
    assert abi.choose_wait_policy() == "active"
    assert os.environ["OMP_WAIT_POLICY"] == "active"


def test_passive_only_when_another_process_runs(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(abi, "busy_cpus", lambda: 0)
    assert abi.choose_wait_policy() is None and "OMP_WAIT_POLICY" not in os.environ  # libgomp's default
    monkeypatch.setattr(abi, "busy_cpus", lambda: 1)
    assert abi.choose_wait_policy() == "passive" and os.environ["OMP_WAIT_POLICY"] == "passive"


def test_a_busy_process_is_seen():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert abi.busy_cpus() >= 1
    finally:
        busy.kill()
        busy.wait()
