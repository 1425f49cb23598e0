"""What this operating system lets the page tier do, as one table of capabilities.

The residency engine works through a handful of OS operations on llama.cpp's mapping of the
model. Linux has all of them; macOS lacks MADV_PAGEOUT (evicting file pages), MADV_POPULATE_READ,
posix_fadvise, /proc and memory cgroups; other systems get hints only. Each operation of
residency.pages asks this table first, and the engine asks it before choosing how to fetch and
evict, so a missing operation degrades to what exists (an unlocked expert is left for the kernel
to reclaim; bytes read come from getrusage) instead of failing, and the engine says so once.

`MOESPAC_PLATFORM=linux|macos|hints` forces a table (tests run the residency suite with macOS's
on Linux): an operation the forced table lacks raises MissingOperation when called, so a test
fails wherever the runtime would call what the platform does not have.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from ..core.errors import MoespacError

# prefetch: MADV_WILLNEED/RANDOM hints; populate: MADV_POPULATE_READ (read in, waiting);
# lock/unlock: mlock/munlock; evict: MADV_PAGEOUT + posix_fadvise(DONTNEED) (give file pages
# back); residency: mincore; read_bytes: /proc/self/io; anon_rss: /proc/self/status's RssAnon;
# proc: the rest of /proc/self (maps, status: the benchmarks' and calibration's Linux tools)
OPERATIONS = ("prefetch", "populate", "lock", "unlock", "evict", "residency", "read_bytes", "anon_rss", "proc")
FALLBACKS = {
    "populate": "pread",
    "evict": "unlock and leave it to the kernel",
    "read_bytes": "getrusage's block reads",
    "anon_rss": "psutil's RSS",
    "residency": "trust its own bookkeeping",
    "lock": "no pinning",
}


class MissingOperation(MoespacError):
    """The runtime called an operation this platform's table does not have (a bug)."""


@dataclass(frozen=True)
class Platform:
    name: str
    has: frozenset[str]
    forced: bool = False

    def can(self, op: str) -> bool:
        return op in self.has

    def need(self, op: str) -> None:
        if op not in self.has:
            raise MissingOperation(f"{op} is not available on {self.name} (residency.platform)")

    def missing(self) -> list[str]:
        return [op for op in OPERATIONS if op not in self.has]

    def degraded(self) -> str | None:
        """One line saying what the page tier does without, or None when nothing is missing."""
        gone = [op for op in self.missing() if op in FALLBACKS]
        if not gone:
            return None
        how = "; ".join(f"{op}: {FALLBACKS[op]}" for op in gone)
        return f"the page tier on {self.name} runs without {', '.join(gone)} ({how})"


TABLES = {
    "linux": frozenset(OPERATIONS),
    "macos": frozenset({"prefetch", "lock", "unlock", "residency"}),
    "hints": frozenset({"prefetch"}),
}


def detect() -> Platform:
    forced = os.environ.get("MOESPAC_PLATFORM")
    if forced:
        if forced not in TABLES:
            raise MoespacError(f"MOESPAC_PLATFORM={forced}: give one of {', '.join(TABLES)}")
        return Platform(forced, TABLES[forced], forced=True)
    name = "linux" if sys.platform.startswith("linux") else "macos" if sys.platform == "darwin" else "hints"
    return Platform(name, TABLES[name])


PLATFORM = detect()
_said = False


def say_degraded_once() -> None:
    """Print PLATFORM.degraded() on stderr the first time the page tier starts in this process."""
    global _said
    line = PLATFORM.degraded()
    if line and not _said:
        _said = True
        print(f"moespac: {line}", file=sys.stderr)
