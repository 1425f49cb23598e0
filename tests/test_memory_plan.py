"""`--mem-budget auto`: the plan from measured memory (pure), and the runtime under a real cgroup limit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from moespac_gguf import MoeSpac, MoespacError
from moespac_gguf.core.layout import MoeLayout
from moespac_gguf.residency.memory import (
    HEADROOM_FIXED,
    Available,
    available_memory,
    kv_bound,
    measured_budget,
    parse_budget,
    plan_memory,
)
from moespac_gguf.tools.memcap import MemoryCap

MiB = 1 << 20
LAYOUT = MoeLayout(
    path="m.gguf",
    arch="qwen3moe",
    n_layer=4,
    n_expert=8,
    n_expert_used=2,
    n_shared_expert=0,
    n_dense_lead=0,
    n_embd=256,
    n_ff_exp=128,
    file_bytes=700 * MiB,
    expert_bytes=650 * MiB,
    other_bytes=50 * MiB,
)


def avail(n_bytes: int, limit: int = 1000 * MiB) -> Available:
    return Available(n_bytes, limit, "memory cgroup limit")


def test_parse_budget():
    assert parse_budget(None) == "off" and parse_budget("OFF") == "off" and parse_budget(" auto") == "auto"
    assert parse_budget("1G") == 1 << 30 and parse_budget(123) == 123
    for bad in ("lots", 0, -5, "0"):
        with pytest.raises(MoespacError, match="--mem-budget"):
            parse_budget(bad)


def test_auto_fits_means_no_engine():
    headroom = HEADROOM_FIXED + 50 * MiB
    need = LAYOUT.file_bytes + 30 * MiB + kv_bound(LAYOUT, 512) + (128 << 20) + headroom
    plan = plan_memory("auto", LAYOUT, 30 * MiB, 512, avail(need))
    assert not plan.engine and plan.budget_bytes is None and plan.mode == "auto"
    assert "fits, no residency engine" in plan.summary()
    # one byte less and the engine turns on, with what is available less the headroom
    plan = plan_memory("auto", LAYOUT, 30 * MiB, 512, avail(need - 1))
    assert plan.engine and plan.budget_bytes == need - 1 - headroom
    assert "does not fit, residency engine on" in plan.summary()


def test_auto_budget_is_measured_again_once_loaded():
    plan = plan_memory("auto", LAYOUT, 0, 512, avail(400 * MiB))
    again = measured_budget(plan, runtime_bytes=120 * MiB, available=avail(300 * MiB))
    # what is available now plus what this process already holds, less the same headroom
    assert again.budget_bytes == 300 * MiB + 120 * MiB - plan.headroom_bytes
    assert measured_budget(plan_memory("off", LAYOUT, 0, 512), 1, avail(1)).budget_bytes is None


def test_auto_too_small_is_one_line():
    with pytest.raises(MoespacError, match="not enough memory for m.gguf: .* non-expert weights"):
        plan_memory("auto", LAYOUT, 0, 512, avail(100 * MiB))


def test_explicit_and_off():
    assert plan_memory(1 << 30, LAYOUT, 0, 512).budget_bytes == 1 << 30
    assert not plan_memory("off", LAYOUT, 0, 512).engine


def test_available_memory_is_at_most_the_system_s():
    a = available_memory()
    assert 0 < a.bytes <= a.limit_bytes


def test_moespac_default_is_auto_and_a_small_model_needs_no_engine(tiny_moe):
    with MoeSpac(tiny_moe(), n_ctx=256) as m:
        assert m.memory_plan.mode == "auto" and not m.memory_plan.engine
        assert m.residency is None
    with MoeSpac(tiny_moe(), n_ctx=256, mem_budget="off") as m:
        assert m.memory_plan.mode == "off" and m.residency is None


def _smolmoe():
    from moespac_gguf.demo.catalog import model_path

    try:
        return model_path("smolmoe")
    except MoespacError:
        pytest.skip("demo model smolmoe not built (moespac models build smolmoe)")


def _run_capped(cap: int, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", str(_smolmoe()), "-p", "The capital of France is"]
    with MemoryCap(cap, "auto") as c:
        return subprocess.run(
            argv + ["-n", "4", "-c", "256", *extra], preexec_fn=c.preexec, capture_output=True, text=True, timeout=300
        )


@pytest.mark.harness_needs("proc")  # memory cgroups are Linux's
def test_auto_under_a_cgroup_limit_below_the_model_turns_the_engine_on():
    """SmolMoE (692 MiB) in a 450 MiB cgroup: the plan sees the limit, says so on one line, and runs
    the engine with the budget it computed; the text is plain decoding's."""
    r = _run_capped(450 << 20, "--json")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "memory plan" in line]
    assert len(lines) == 1 and "memory cgroup limit 450.00 MiB" in lines[0] and "residency engine on" in lines[0]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    plan = out["memory_plan"]
    assert plan["engine"] and plan["mode"] == "auto" and 0 < plan["budget_bytes"] < 450 << 20
    with MoeSpac(_smolmoe(), n_ctx=256, mem_budget="off") as m:
        m.create_completion("The capital of France is", max_tokens=4)
        assert out["tokens"] == m.completion_tokens


@pytest.mark.harness_needs("proc")  # memory cgroups are Linux's
def test_auto_under_a_cgroup_limit_too_small_is_a_one_line_error():
    r = _run_capped(150 << 20)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    # the plan refuses before loading, or the engine once the runtime's own memory is measured
    assert re.match(r"moespac run: error: (not enough memory for smolmoe|memory budget .* is too small)", last), last


@pytest.mark.harness_needs("proc", "evict")  # a memory cgroup, a cold page cache
@pytest.mark.parametrize("platform", [None, "macos"])
@pytest.mark.parametrize("draft", [None, "smollm2"])
def test_an_explicit_budget_is_kept_in_a_cgroup_of_that_size(draft, platform):
    """--mem-budget B in a memory cgroup capped at exactly B, from a cold page cache: the run ends
    normally (no OOM kill), the cgroup's peak charge is at most B, and the text is plain decoding's.
    Also with the page tier limited to macOS's operations (no MADV_PAGEOUT, no MADV_POPULATE_READ,
    no /proc): it says so in one line and still keeps the budget."""
    from moespac_gguf.demo.catalog import model_path
    from moespac_gguf.residency.pages import drop_file_cache

    budget = 350 << 20
    target = _smolmoe()
    extra = ["-md", str(model_path(draft))] if draft else []
    for f in [target, *extra[1:]]:
        drop_file_cache(f)
    argv = [sys.executable, "-m", "moespac_gguf.cli", "run", "-m", str(target), "-p", "The capital of France is"]
    with MemoryCap(budget, "budget") as c:
        r = subprocess.run(
            argv + ["-n", "16", "-c", "256", "--mem-budget", str(budget), "--json", *extra],
            preexec_fn=c.preexec,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "MOESPAC_PLATFORM": platform} if platform else None,
        )
        peak = c.peak_bytes()
    assert r.returncode == 0, f"exit {r.returncode} (-9: the OOM killer): {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr
    assert 0 < peak <= budget
    said = [line for line in r.stderr.splitlines() if "the page tier on" in line]
    assert len(said) == (1 if platform else 0), r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["memory_plan"]["mode"] == "explicit" and out["memory_plan"]["engine"]
    with MoeSpac(target, n_ctx=256, mem_budget="off") as m:
        m.create_completion("The capital of France is", max_tokens=16)
        assert out["tokens"] == m.completion_tokens
