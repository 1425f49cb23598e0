"""Asynchronous Execution Engine: keep the planned experts in fast memory, in the background.

On this machine fast memory is the page cache behind llama.cpp's mmap of the
GGUF (tier T1) and slow memory the file on disk (T2). A worker thread moves
experts between them in ONE utility order: it evicts the lowest-utility
resident experts (MADV_PAGEOUT) when the budget needs room, and prefetches the
highest-utility missing ones through llama.cpp's own mapping: MADV_WILLNEED
reads an expert's byte ranges in large requests, MADV_POPULATE_READ maps them,
so the decode thread's later accesses are hits instead of 4 KiB faults one at a
time — and, being mapped, they can be evicted exactly (pages.py). The mapping gets
MADV_RANDOM so faults on experts we failed to predict do not read ahead into
experts nobody asked for. Resident expert bytes never exceed the budget.

With `pin` (the default where mlock is allowed) the held experts are also
mlocked, and so are the model's non-expert weights and the draft: under a
memory cap the kernel's reclaim then falls only on the unlocked pages, the
experts streamed in for a layer and dropped after it, instead of undoing the
plan (measured: unpinned, the kernel evicted planned experts as fast as the
engine fetched them). A pinned budget keeps room for that stream window.

Where the OS lacks an operation (residency.platform: macOS has no MADV_PAGEOUT or
MADV_POPULATE_READ) the engine does what it can: it reads with pread instead of populating, and
an evicted expert is unlocked (or just forgotten) for the kernel to reclaim first.

`ResidencyController` (controller.py) decides what the engine holds.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..core.errors import MoespacError
from ..core.layout import MoeLayout
from ..core.mapping import Mapping
from . import pages
from .platform import PLATFORM


@dataclass
class EngineStats:
    prefetched_bytes: int = 0
    evicted_bytes: int = 0
    prefetches: int = 0
    evictions: int = 0
    hinted_bytes: int = 0  # stream-window read-ahead asked for (hint), not held
    kept: int = 0  # experts the routing tap locked as they were read (keep at use, adopt)
    kept_bytes: int = 0
    plans: int = 0
    io_s: float = 0.0


class ExpertMap:
    """Byte ranges of every (MoE layer, expert) in the file and in llama.cpp's mapping."""

    def __init__(self, layout: MoeLayout, mappings: list[Mapping], others: list[Mapping] = ()):
        """`mappings`: where llama.cpp mapped the model for the target (Session.mappings), the
        largest fragment first; `others`: further mappings of the same file (a self-draft's),
        whose share of a page must be unmapped before that page can be evicted."""
        if not mappings:
            raise MoespacError(f"{layout.path} is not memory-mapped (was it loaded with use_mmap?)")
        self.layout = layout
        self.n_layer, self.n_expert = layout.n_layer, layout.n_expert
        self.bytes = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
        self.ranges: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for layer in layout.layers:
            for e in range(self.n_expert):
                self.ranges[layer.index, e] = layer.expert_ranges(e)
                self.bytes[layer.index, e] = layer.bytes_per_expert
        self.mapping, self.other_mappings = mappings[0], list(others)

    def other_ranges(self) -> list[tuple[int, int]]:
        """(file offset, length) of everything llama.cpp mapped but expert tensors: attention,
        norms, embeddings. The mapping starts at a page offset, not at 0 (the header before it is
        not mapped: advising or locking there fails with ENOMEM, or hits a neighbouring mapping)."""
        m = self.mapping
        spans = sorted((t.offset, t.nbytes) for layer in self.layout.layers for t in layer.tensors.values())
        out, pos, end = [], m.offset, min(self.layout.file_bytes, m.offset + m.end - m.start)
        for off, n in spans:
            if off > pos:
                out.append((pos, min(off, end) - pos))
            pos = max(pos, off + n)
        if pos < end:
            out.append((pos, end - pos))
        return out

    def resident(self) -> np.ndarray:
        """bool [n_layer, n_expert]: experts at least 90% in RAM (mincore; PLATFORM.can("residency"))."""
        out = np.zeros((self.n_layer, self.n_expert), dtype=bool)
        for (l, e), rs in self.ranges.items():
            total = sum(n for _, n in rs)
            got = sum(pages.resident_fraction(self.mapping.address(off), n) * n for off, n in rs)
            out[l, e] = got >= 0.9 * total
        return out


class ResidencyEngine:
    """Background worker applying residency targets under a byte budget."""

    def __init__(self, experts: ExpertMap, budget_bytes: int, pin: bool = False):
        self.map = experts
        self.budget = budget_bytes
        self.pin = pin
        self.stats = EngineStats()
        self.can = PLATFORM.can
        if self.can("prefetch"):
            for m in (experts.mapping, *experts.other_mappings):
                pages.madvise(m.start, m.end - m.start, pages.MADV_RANDOM)
        self.fd = os.open(experts.layout.path, os.O_RDONLY)
        # pinned: "resident" means locked (unlocked pages are the kernel's to reclaim); without a
        # residency query, what this engine fetched itself
        shape = (experts.n_layer, experts.n_expert)
        self.resident = experts.resident() if not pin and self.can("residency") else np.zeros(shape, bool)
        # held by another tier (expert slots): computed from there, so never fetched or kept here
        self.elsewhere = np.zeros((experts.n_layer, experts.n_expert), bool)
        self._populate = self.can("populate")  # MADV_POPULATE_READ (Linux 5.14+); else pread the bytes
        self._target: tuple[np.ndarray, np.ndarray] | None = None
        self._cv = threading.Condition()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = False
        self.error: Exception | None = None  # what stopped the worker thread
        self._thread = threading.Thread(target=self._run, name="moespac-engine", daemon=True)
        self._thread.start()

    def apply(self, want: np.ndarray, priority: np.ndarray) -> None:
        """Make `want` (bool [L,E]) resident, most `priority` first; the newest target wins.
        Raises what stopped the worker, if something did (the generation ends with it)."""
        if self.error is not None:
            raise self.error
        with self._cv:
            self._target = (want & ~self.elsewhere, priority.copy())
            self._idle.clear()
            self._cv.notify()

    def hint(self, experts: np.ndarray, priority: np.ndarray) -> None:
        """Start reading `experts` (bool [L,E]) that are not held, most `priority` first, into the
        stream window (MADV_WILLNEED: asynchronous, nothing locked, nothing evicted for them):
        for predictions about to be needed (the lookahead gate's next layers), which must not
        reshuffle the held set on every layer."""
        if not self.can("prefetch"):
            return
        todo = np.argwhere(experts & ~self.resident)
        for l, e in sorted(map(tuple, todo), key=lambda ix: -priority[ix]):
            for off, n in self.map.ranges[l, e]:
                pages.madvise(self.map.mapping.address(off), n, pages.MADV_WILLNEED)
            self.stats.hinted_bytes += int(self.map.bytes[l, e])

    def adopt(self, admitted: np.ndarray, evicted: np.ndarray) -> None:
        """Experts the routing tap locked (`admitted`) and unlocked (`evicted`) itself during a
        decode (keep at use, residency.keep; flat ids): the held set follows, and the evicted are
        paged out as a planned eviction is. Only unlocked, their pages stay on the active list as
        the decode just touched them, and under a cgroup cap the kernel did not find them in time:
        two capped runs of three were OOM-killed with nothing inactive to reclaim. On the decode
        thread: the worker thread was no faster on 2 cores, and MADV_COLD instead was slower
        (docs/results.md 8.3)."""
        with self._cv:
            self.resident.flat[admitted] = True
        self.stats.kept += len(admitted)
        self.stats.kept_bytes += int(self.map.bytes.flat[admitted].sum())
        for ix in evicted:
            self._evict(divmod(int(ix), self.map.n_expert))

    def address_ranges(self) -> np.ndarray:
        """uint64 [n_layer * n_expert, R, 2]: every expert's (address, length) ranges in the
        mapping, padded with (0, 0) (residency.keep, for the routing tap)."""
        width = max((len(rs) for rs in self.map.ranges.values()), default=1)
        out = np.zeros((self.map.n_layer * self.map.n_expert, width, 2), dtype=np.uint64)
        for (l, e), rs in self.map.ranges.items():
            for j, (off, n) in enumerate(rs):
                out[l * self.map.n_expert + e, j] = (self.map.mapping.address(off), n)
        return out

    def note_used(self, used: np.ndarray) -> None:
        """Experts the decode thread just paged in itself (from the routing): count them as resident,
        so the next target evicts them when unwanted instead of the kernel reclaiming blindly."""
        if self.pin:
            return  # unlocked pages: the kernel reclaims them first, which is what we want
        with self._cv:
            self.resident |= used & ~self.elsewhere

    def refresh(self) -> None:
        """Re-read residency from the kernel (mincore): corrects drift after kernel reclaim."""
        if self.pin or not self.can("residency"):
            return  # locked pages do not drift; without mincore there is nothing to re-read
        with self._cv:
            self.resident[:] = self.map.resident()

    def wait_idle(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join()
        os.close(self.fd)

    # -- worker ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while self._target is None and not self._stop:
                    self._idle.set()
                    self._cv.wait()
                if self._stop:
                    return
                want, priority = self._target
                self._target = None
            self.stats.plans += 1
            try:
                self._converge(want, priority)
            except Exception as e:  # not silently in this thread: the next apply() raises it
                self.error = e
                self._idle.set()
                return

    def _preempted(self) -> bool:
        return self._target is not None or self._stop

    def _converge(self, want: np.ndarray, priority: np.ndarray) -> None:
        """Evict unwanted experts (least useful first) as room is needed, fetch wanted ones (most useful first)."""
        bytes_ = self.map.bytes
        fetch = [tuple(ix) for ix in np.argwhere(want & ~self.resident & (bytes_ > 0))]
        fetch.sort(key=lambda ix: -priority[ix])
        evictable = [tuple(ix) for ix in np.argwhere(~want & self.resident)]
        evictable.sort(key=lambda ix: priority[ix])
        used = int(bytes_[self.resident].sum())
        for ix in fetch:
            if self._preempted():
                return
            need = int(bytes_[ix])
            while used + need > self.budget and evictable:
                victim = evictable.pop(0)
                self._evict(victim)
                used -= int(bytes_[victim])
            if used + need > self.budget:
                break
            if not self._fetch(ix):
                self.budget = used  # the kernel refused to lock more: that is the real budget
                break
            used += need
        while used > self.budget and evictable and not self._preempted():
            victim = evictable.pop(0)
            self._evict(victim)
            used -= int(bytes_[victim])

    def _fetch(self, ix: tuple[int, int]) -> bool:
        t = time.perf_counter()
        if self.pin:
            if not pages.mlock_ranges([(self.map.mapping.address(off), n) for off, n in self.map.ranges[ix]]):
                return False
        else:
            for off, n in self.map.ranges[ix]:
                addr = self.map.mapping.address(off)
                if self.can("prefetch"):
                    pages.madvise(addr, n, pages.MADV_WILLNEED)  # large async reads, then wait for them:
                if self._populate:
                    try:
                        pages.madvise(addr, n, pages.MADV_POPULATE_READ)
                        continue
                    except OSError:
                        self._populate = False
                os.pread(self.fd, n, off)  # into the page cache; the decode thread maps it on use
        self.stats.io_s += time.perf_counter() - t
        self.resident[ix] = True
        self.stats.prefetches += 1
        self.stats.prefetched_bytes += int(self.map.bytes[ix])
        return True

    def release(self, ix: tuple[int, int]) -> None:
        """An expert now served from elsewhere (a slot copy): give its file pages back, best
        effort (PAGEOUT refuses a range that shares a page with a locked neighbour)."""
        self._page_out(ix, unlock=self.pin and bool(self.resident[ix]), best_effort=True)
        self.resident[ix] = False

    def _page_out(self, ix: tuple[int, int], unlock: bool, best_effort: bool = False) -> None:
        for off, n in self.map.ranges[ix]:
            addr = self.map.mapping.address(off)
            try:
                if unlock:
                    pages.munlock(addr, n)
                if not self.can("evict"):
                    continue  # unlocked, it is the kernel's to reclaim first
                for other in self.map.other_mappings:  # PAGEOUT leaves pages another mapping shares
                    pages.madvise(other.address(off), n, pages.MADV_DONTNEED)
                pages.madvise(addr, n, pages.MADV_PAGEOUT)
            except OSError:
                if not best_effort:
                    raise

    def _evict(self, ix: tuple[int, int]) -> None:
        # PAGEOUT reclaims the pages mapped here; fadvise drops what is cached
        # but unmapped (demand-paged and never touched, or the pread fallback).
        self.resident[ix] = False  # first: a draft restricted to held experts stops using it
        self._page_out(ix, unlock=self.pin)
        if self.can("evict"):
            for off, n in self.map.ranges[ix]:
                os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
        self.stats.evictions += 1
        self.stats.evicted_bytes += int(self.map.bytes[ix])
