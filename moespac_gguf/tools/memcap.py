"""Real memory pressure: a child memory cgroup under this process's own cgroup.

A cgroup memory limit caps the page cache too, so a model larger than the cap
really pages from disk: the flash tier of a 16 GB MacBook or an 8 GB phone. We
only ever create, use and remove our own child group (v2 where this process's
cgroup has a memory controller, else v1), never touch others.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..core.errors import MoespacError
from ..residency.memory import memory_cgroups
from ..residency.platform import PLATFORM


def cgroup_root() -> tuple[str, Path]:
    """("v2"|"v1", this process's memory cgroup directory), or a MoespacError saying why there is none."""
    if not PLATFORM.can("proc"):
        raise MoespacError(
            f"the memory-capped benchmark caps memory with a Linux memory cgroup, and {PLATFORM.name} has "
            "none: run it on Linux as root, or measure without a cap (--no-cap)"
        )
    groups = memory_cgroups()
    if not groups:
        raise MoespacError(
            "no writable memory cgroup (neither v2 with a memory controller nor v1 'memory') "
            "— the memory-capped benchmark needs one (run as root on Linux)"
        )
    version, _, directory = groups[0]
    return version, directory


class MemoryCap:
    """A child memory cgroup capped at `limit_bytes`; `preexec` puts a child process into it.

    Use as a context manager: the group is removed afterwards (its page cache
    charge released first), also on errors.
    """

    def __init__(self, limit_bytes: int, name: str):
        self.version, parent = cgroup_root()
        self.path = parent / f"moespac-{os.getpid()}-{name}"
        self.limit_bytes = limit_bytes

    def __enter__(self) -> MemoryCap:
        try:
            self.path.mkdir()
            if self.version == "v2":
                (self.path / "memory.max").write_text(str(self.limit_bytes))
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        except OSError as e:
            self._remove()
            raise MoespacError(f"cannot create memory cgroup {self.path}: {e.strerror or e}") from None
        return self

    def preexec(self) -> None:
        """For subprocess.Popen(preexec_fn=...): join the group before exec."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak_bytes(self) -> int:
        f = self.path / ("memory.peak" if self.version == "v2" else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else 0

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        if not self.path.exists():
            return
        if self.version == "v1" and (self.path / "memory.force_empty").exists():
            try:
                (self.path / "memory.force_empty").write_text("0")
            except OSError:
                pass
        for _ in range(50):  # processes may take a moment to leave after exit
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
