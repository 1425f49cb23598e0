"""The page cache as a tier: where llama.cpp mapped the model, and madvise/mincore/fadvise on it.

Measured on this kernel (NOTES.md): MADV_PAGEOUT really drops resident file
pages (splitting large folios it only partly covers) but only pages mapped in
this process, and only pages no other mapping shares (a page two mappings of
the file share stays put until MADV_DONTNEED unmaps it from the others, which
alone evicts nothing); MADV_WILLNEED is asynchronous; MADV_POPULATE_READ maps pages in,
waiting for them; MADV_RANDOM stops fault readahead (the cheap trick that halves
I/O); posix_fadvise(DONTNEED) drops only unmapped clean pages in folios wholly
inside the range (a whole file: a cold cache before a benchmark run; a small
range inside large folios: nothing). Python's mmap lacks these constants.

Every operation asks residency.platform's table first: on a system without it (macOS has no
MADV_PAGEOUT, MADV_POPULATE_READ, posix_fadvise or /proc) the caller checks `PLATFORM.can`
and degrades; calling it anyway raises MissingOperation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import resource
from pathlib import Path

import numpy as np
import psutil

from ..core.mapping import Mapping
from .platform import PLATFORM

MADV_RANDOM, MADV_WILLNEED, MADV_DONTNEED, MADV_PAGEOUT, MADV_POPULATE_READ = 1, 3, 4, 21, 22
PAGE = os.sysconf("SC_PAGE_SIZE")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def find_mappings(path: str | Path) -> list[Mapping]:
    """Every mapping of `path` in this process, largest first, from /proc/self/maps (Linux: the
    benchmarks and calibration; the runtime asks llama.cpp, Session.mappings)."""
    PLATFORM.need("proc")
    target = os.path.realpath(path)
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                found.append(Mapping(lo, hi, int(parts[2], 16)))
    if not found:
        raise RuntimeError(f"{path} is not memory-mapped in this process (was it loaded with use_mmap?)")
    return sorted(found, key=lambda m: m.start - m.end)


def find_mapping(path: str | Path) -> Mapping:
    """The largest mapping of `path` in this process."""
    return find_mappings(path)[0]


def mapped_by_others(path: str | Path) -> list[int]:
    """PIDs of other processes that map `path`: their pages can neither be dropped nor
    charged to a benchmark's memory cap, so a "cold" run would not be cold."""
    PLATFORM.need("proc")
    target, me, pids = os.path.realpath(path), os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                if any(line.rstrip().endswith(target) for line in f):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def _page_span(addr: int, length: int) -> tuple[int, int]:
    lo = addr - addr % PAGE
    hi = -(-(addr + length) // PAGE) * PAGE
    return lo, hi - lo


ADVICE_OPERATION = {
    MADV_RANDOM: "prefetch",
    MADV_WILLNEED: "prefetch",
    MADV_POPULATE_READ: "populate",
    MADV_PAGEOUT: "evict",
    MADV_DONTNEED: "evict",
}


def madvise(addr: int, length: int, advice: int) -> None:
    PLATFORM.need(ADVICE_OPERATION[advice])
    lo, n = _page_span(addr, length)
    if _libc.madvise(lo, n, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) failed: {os.strerror(err)}")


def mlock(addr: int, length: int) -> None:
    """Lock file pages into RAM (reading them in): the kernel's reclaim cannot take them back,
    so a memory cap's pressure falls on the unlocked pages only. OSError (ENOMEM/EPERM) when
    RLIMIT_MEMLOCK or the memory cgroup refuses."""
    PLATFORM.need("lock")
    lo, n = _page_span(addr, length)
    if _libc.mlock(lo, n) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mlock failed: {os.strerror(err)}")


def munlock(addr: int, length: int) -> None:
    PLATFORM.need("unlock")
    lo, n = _page_span(addr, length)
    _libc.munlock(lo, n)


def mlock_ranges(ranges: list[tuple[int, int]]) -> bool:
    """Read in (MADV_WILLNEED: large requests) and lock every (address, length), or none of them:
    False, with nothing left locked, when the kernel refuses one."""
    done = []
    try:
        for addr, n in ranges:
            madvise(addr, n, MADV_WILLNEED)
            mlock(addr, n)
            done.append((addr, n))
    except OSError:
        for addr, n in done:
            munlock(addr, n)
        return False
    return True


def read_bytes() -> int:
    """Bytes this process (and its finished children) made the kernel read from storage:
    /proc/self/io's read_bytes (page-cache hits are not counted). Without /proc, getrusage's
    block reads times 512 (Linux's unit; macOS counts read operations, so there a lower bound)."""
    if not PLATFORM.can("read_bytes"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_inblock * 512
    with open("/proc/self/io") as f:
        return next((int(line.split()[1]) for line in f if line.startswith("read_bytes:")), 0)


def anon_rss(mapped: list[Mapping] = ()) -> int:
    """This process's anonymous resident memory (heap, KV cache, buffers: what no file backs).
    Without /proc, psutil's RSS less what mincore finds resident of the `mapped` model ranges
    (RSS counts mapped file pages too; the rest of the file pages it counts, if any, make this an
    upper bound, so a budget computed from it errs on the safe side)."""
    if PLATFORM.can("anon_rss"):
        return status_bytes("RssAnon")
    rss = psutil.Process().memory_info().rss
    if PLATFORM.can("residency"):
        rss -= int(sum(resident_fraction(m.start, m.end - m.start) * (m.end - m.start) for m in mapped))
    return max(rss, 0)


def status_bytes(key: str) -> int:
    """A memory line of /proc/self/status in bytes (e.g. "RssAnon", "VmRSS", "VmLck"); 0 if absent."""
    if key != "RssAnon":
        PLATFORM.need("proc")
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def resident_fraction(addr: int, length: int) -> float:
    """Share of the pages of [addr, addr+length) in RAM (mincore)."""
    PLATFORM.need("residency")
    lo, n = _page_span(addr, length)
    pages = n // PAGE
    vec = np.zeros(pages, dtype=np.uint8)
    if _libc.mincore(lo, n, vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore failed: {os.strerror(err)}")
    return float((vec & 1).sum()) / pages


def drop_file_cache(path: str | Path) -> None:
    """Evict the file's unmapped pages from the page cache (a cold start).

    Dirty pages (a file just written or copied) cannot be dropped: flush them first.
    """
    PLATFORM.need("evict")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def file_cached_fraction(path: str | Path) -> float:
    """Share of the file's pages in the page cache (maps it briefly; mincore)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        try:
            return resident_fraction(view.ctypes.data, view.size)
        finally:
            del view
