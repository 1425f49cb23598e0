"""`--mem-budget auto`: how much memory the model may use here, and whether it needs the engine.

The runtime measures the memory available to this process (the system's MemAvailable, and the
limit of every memory cgroup it is in, less what the group holds beyond reclaimable file cache)
and plans with headroom. When the model's and the draft's files fit beside the KV cache and the
compute buffers, no residency engine runs: llama.cpp's mmap holds everything and decoding is
plain llama.cpp. When they do not, the engine runs with the budget the plan computed. An
explicit size or "off" skips the measurement.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil

from ..core.errors import MoespacError
from ..core.layout import MoeLayout
from ..core.units import format_size, parse_size
from .platform import PLATFORM

AUTO, OFF = "auto", "off"
HEADROOM_FIXED = 64 << 20  # beyond HEADROOM_SHARE of the limit: the allocator, the interpreter's growth
HEADROOM_SHARE = 0.05  # of the limit that binds (MemTotal or the cgroup's limit): other processes, page tables
RUNTIME_FIXED = 128 << 20  # compute buffers, logits and the interpreter, before the contexts exist
CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Available:
    """Memory the model's file pages may occupy now, and the limit it comes from."""

    bytes: int
    limit_bytes: int  # the total of that limit (MemTotal or the cgroup's memory.max)
    source: str  # "system memory" or "memory cgroup limit"


@dataclass(frozen=True)
class MemoryPlan:
    """What the runtime decided about memory, as `--verbose` and `--json` show it."""

    mode: str  # "auto", "off" or "explicit"
    model_bytes: int
    draft_bytes: int
    budget_bytes: int | None = None  # the residency engine's budget; None: no engine
    available_bytes: int | None = None  # auto only, as measured
    source: str | None = None
    limit_bytes: int | None = None  # the total of the limit that binds
    headroom_bytes: int | None = None
    runtime_bytes: int | None = None  # the estimate before loading (KV bound + RUNTIME_FIXED)
    gpu_free_bytes: int | None = None  # the GPU's free memory once loaded (its slots' default budget)

    @property
    def engine(self) -> bool:
        return self.budget_bytes is not None

    def as_dict(self) -> dict:
        return asdict(self) | {"engine": self.engine}

    def summary(self) -> str:
        """One line: what was measured and what was decided."""
        files = f"model {format_size(self.model_bytes)}" + (
            f" + draft {format_size(self.draft_bytes)}" if self.draft_bytes else ""
        )
        if self.mode == OFF:
            return f"memory plan: off ({files}, no residency engine)"
        if self.mode == "explicit":
            return f"memory plan: --mem-budget {format_size(self.budget_bytes)} ({files}): residency engine on"
        head = (
            f"memory plan: {format_size(self.available_bytes)} available ({self.source} "
            f"{format_size(self.limit_bytes)}), {files}, "
            f"runtime ~{format_size(self.runtime_bytes)}, headroom {format_size(self.headroom_bytes)}"
        )
        gpu = "" if self.gpu_free_bytes is None else f"; GPU {format_size(self.gpu_free_bytes)} free"
        if not self.engine:
            return f"{head}: fits, no residency engine{gpu}"
        return f"{head}: does not fit, residency engine on with a budget of {format_size(self.budget_bytes)}{gpu}"


def parse_budget(value: int | str | None) -> int | str:
    """AUTO, OFF or a size in bytes from `--mem-budget`'s value (None: OFF, the API's spelling)."""
    if value is None:
        return OFF
    if isinstance(value, str):
        v = value.strip().lower()
        if v in (AUTO, OFF):
            return v
        try:
            value = parse_size(value)
        except MoespacError:
            raise MoespacError(f"--mem-budget takes a size such as 8G, 'auto' or 'off', not {value!r}") from None
    if value <= 0:
        raise MoespacError(f"--mem-budget must be a positive size, 'auto' or 'off', got {value}")
    return int(value)


# (limit file, usage file, the memory.stat key of the group's file cache) per cgroup version
_CGROUP_FILES = {
    "v2": ("memory.max", "memory.current", "file"),
    "v1": ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache"),
}
_NO_LIMIT = 1 << 60  # v1 writes "unlimited" as a page-rounded 2^63


def memory_cgroups() -> list[tuple[str, Path, Path]]:
    """("v2"|"v1", the hierarchy's root, this process's group in it) for each cgroup hierarchy
    with a memory controller, v2 first; [] without /proc (memory cgroups are Linux's)."""
    if not PLATFORM.can("proc"):
        return []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        hier, controllers, rel = line.split(":", 2)
        if hier == "0":  # v2 (under unified/ on a hybrid system)
            root = CGROUP_ROOT / "unified" if (CGROUP_ROOT / "unified").is_dir() else CGROUP_ROOT
            d = root / rel.lstrip("/")
            try:
                if "memory" in (d / "cgroup.controllers").read_text().split():
                    out.insert(0, ("v2", root, d))
            except OSError:
                pass
        elif "memory" in controllers.split(","):
            root = CGROUP_ROOT / "memory"
            out.append(("v1", root, root / rel.lstrip("/")))
    return out


def _cgroup_limits() -> list[Available]:
    """Each memory cgroup limit on this process (its own group's and every ancestor's, v2 or v1):
    what its files may still take, the limit less what the group holds beyond its file cache,
    which is reclaimable."""
    out = []
    for version, root, d in memory_cgroups():
        limit_file, usage_file, cache_key = _CGROUP_FILES[version]
        while d == root or root in d.parents:
            try:
                raw = (d / limit_file).read_text().strip()
                if raw != "max" and int(raw) < _NO_LIMIT:
                    stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
                    held = int((d / usage_file).read_text()) - int(stat.get(cache_key, 0))
                    out.append(Available(max(0, int(raw) - held), int(raw), "memory cgroup limit"))
            except (OSError, ValueError):
                pass
            if d == root:
                break
            d = d.parent
    return out


def available_memory() -> Available:
    """The binding limit on this process's memory now: the system's available memory (page cache
    counted as available, as the kernel does) or a memory cgroup's, whichever leaves less."""
    vm = psutil.virtual_memory()
    candidates = [Available(int(vm.available), int(vm.total), "system memory"), *_cgroup_limits()]
    return min(candidates, key=lambda a: a.bytes)


def kv_bound(layout: MoeLayout, n_ctx: int) -> int:
    """An upper bound on the target's F16 KV cache: K and V of n_embd per layer and position
    (grouped-query attention stores less)."""
    return 2 * 2 * n_ctx * layout.n_layer * layout.n_embd


def plan_memory(
    mode: int | str, layout: MoeLayout, draft_bytes: int, n_ctx: int, available: Available | None = None
) -> MemoryPlan:
    """The plan for `mode` (parse_budget's value). Auto: the files fit when model + draft +
    the runtime's estimate + headroom <= available; otherwise the engine's budget is what is
    available less the headroom (residency.controller.expert_budget then takes the non-expert
    weights, the draft and the measured runtime out of it, and says when too little is left)."""
    model = layout.file_bytes
    if mode == OFF:
        return MemoryPlan(OFF, model, draft_bytes)
    if mode != AUTO:
        return MemoryPlan("explicit", model, draft_bytes, budget_bytes=int(mode))
    avail = available or available_memory()
    headroom = HEADROOM_FIXED + int(HEADROOM_SHARE * avail.limit_bytes)
    runtime = kv_bound(layout, n_ctx) + RUNTIME_FIXED
    fits = model + draft_bytes + runtime + headroom <= avail.bytes
    budget = None if fits else avail.bytes - headroom  # refined by measured_budget once loaded
    if budget is not None and budget <= layout.other_bytes + draft_bytes:
        raise MoespacError(
            f"not enough memory for {Path(layout.path).name}: {format_size(avail.bytes)} available "
            f"({avail.source} {format_size(avail.limit_bytes)}) less {format_size(headroom)} headroom cannot hold its non-expert weights "
            f"({format_size(layout.other_bytes)})"
            + (f" and the draft ({format_size(draft_bytes)})" if draft_bytes else "")
        )
    return MemoryPlan(AUTO, model, draft_bytes, budget, avail.bytes, avail.source, avail.limit_bytes, headroom, runtime)


def measured_budget(plan: MemoryPlan, runtime_bytes: int, available: Available | None = None) -> MemoryPlan:
    """An auto plan's budget measured again once the contexts exist: what is available now plus
    what this process already holds (`runtime_bytes`, its anonymous memory: the KV cache, compute
    buffers, the interpreter), less the headroom. The engine's budget counts that runtime too."""
    if plan.mode != AUTO or not plan.engine:
        return plan
    avail = available or available_memory()
    return replace(plan, budget_bytes=avail.bytes + runtime_bytes - plan.headroom_bytes, available_bytes=avail.bytes)
